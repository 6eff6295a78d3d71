// Package lab builds keeplb's local lab out of network namespaces: a LAN
// (a bridge in a namespace of its own), nodes on it, each with a pod
// network behind it, clients on the LAN, and "pods" that answer HTTP and
// UDP with their own name. The end-to-end tests and make demo run keeplb's
// speakers against it; it is the kernel side of a cluster, without kubelet
// or kube-proxy.
//
// Addresses (IPv4):
//
//	LAN        10.70.0.0/24   node i at 10.70.0.(10+i), clients from .100
//	VIPs       10.70.0.200-10.70.0.250 (VIPRange), on the LAN so ARP works
//	pods       10.244.i.0/24 behind node i (gateway 10.244.i.1 on the node's
//	           bridge cbr0), pod j at 10.244.i.(10+j)
//
// Nodes route each other's pod networks over the LAN, as a flat routed pod
// network would, and forward (ip_forward). A pod's replies go to its node,
// so a reply to a client address returns through the VIP holder only when
// the holder masqueraded the request or the pod is the holder's own.
//
// Lab needs root and a kernel with network namespaces, veth and bridge; it
// runs the "ip" command of iproute2.
package lab

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
)

// VIPRange is the range of LAN addresses left free for VIPs.
const VIPRange = "10.70.0.200-10.70.0.250"

// LAN is the lab's LAN.
var lan = netip.MustParsePrefix("10.70.0.0/24")

// Lab is one lab: namespaces named after its prefix.
type Lab struct {
	// Prefix starts every namespace name, so that labs can coexist and
	// leftovers be found (Cleanup).
	Prefix string
	// Nodes are the lab's nodes, in creation order.
	Nodes []*Node

	sw      string // namespace of the LAN bridge
	mu      sync.Mutex
	ports   int // veth ports on the bridge so far
	clients map[string]netip.Addr
	closers []func()
}

// Node is a lab node: a namespace on the LAN with a pod network.
type Node struct {
	// Name is the node's name and its namespace's.
	Name string
	// IP is its LAN address, its InternalIP.
	IP netip.Addr
	// PodCIDR is its pod network; the node is its .1.
	PodCIDR netip.Prefix
	// Pods are its pods, in creation order.
	Pods []*Pod

	index int
}

// Pod is a lab pod: a namespace behind its node.
type Pod struct {
	// Name is the pod's name and its namespace's.
	Name string
	// Node is the name of its node.
	Node string
	// IP is its address.
	IP netip.Addr
}

// New creates a lab with n nodes (at most 9). On error, what was made is
// removed.
func New(prefix string, n int) (l *Lab, err error) {
	if n < 1 || n > 9 {
		return nil, fmt.Errorf("lab: %d nodes: want 1 to 9", n)
	}
	l = &Lab{Prefix: prefix, sw: prefix + "-lan", clients: map[string]netip.Addr{}}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if err := addNS(l.sw); err != nil {
		return nil, err
	}
	if err := ipRun(l.sw, "link add br0 type bridge", "link set br0 up"); err != nil {
		return nil, err
	}
	for i := 1; i <= n; i++ {
		node := &Node{
			Name:    fmt.Sprintf("%s-node%d", prefix, i),
			IP:      netip.AddrFrom4([4]byte{10, 70, 0, byte(10 + i)}),
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
			index:   i,
		}
		if err := l.attach(node.Name, node.IP); err != nil {
			return nil, err
		}
		gw := node.PodCIDR.Addr().Next()
		if err := ipRun(node.Name, "link add cbr0 type bridge", "addr add "+gw.String()+"/24 dev cbr0", "link set cbr0 up"); err != nil {
			return nil, err
		}
		// What a Kubernetes node sets: forwarding for pods; for the VIPs
		// keepalived adds, answer ARP only for addresses of the asking
		// interface and announce from the best local address.
		if err := Sysctls(node.Name, map[string]string{
			"net.ipv4.ip_forward":             "1",
			"net.ipv4.ip_nonlocal_bind":       "1",
			"net.ipv4.conf.all.arp_ignore":    "1",
			"net.ipv4.conf.all.arp_announce":  "2",
			"net.ipv4.conf.all.rp_filter":     "0",
			"net.ipv4.conf.default.rp_filter": "0",
		}); err != nil {
			return nil, err
		}
		l.Nodes = append(l.Nodes, node)
	}
	for _, a := range l.Nodes {
		for _, b := range l.Nodes {
			if a != b {
				if err := ipRun(a.Name, "route add "+b.PodCIDR.String()+" via "+b.IP.String()); err != nil {
					return nil, err
				}
			}
		}
	}
	return l, nil
}

// Node returns the node named name, or nil.
func (l *Lab) Node(name string) *Node {
	for _, n := range l.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// AddClient adds a client namespace on the LAN at 10.70.0.(100+k) for the
// k-th client, and returns its name (prefix-name) and address.
func (l *Lab) AddClient(name string) (string, netip.Addr, error) {
	l.mu.Lock()
	k := len(l.clients)
	l.mu.Unlock()
	ns := l.Prefix + "-" + name
	a := netip.AddrFrom4([4]byte{10, 70, 0, byte(100 + k)})
	if err := l.attach(ns, a); err != nil {
		return "", netip.Addr{}, err
	}
	l.mu.Lock()
	l.clients[ns] = a
	l.mu.Unlock()
	return ns, a, nil
}

// AddPod adds a pod namespace behind node and returns it.
func (l *Lab) AddPod(node *Node, name string) (*Pod, error) {
	j := len(node.Pods)
	base := node.PodCIDR.Addr().As4()
	p := &Pod{Name: l.Prefix + "-" + name, Node: node.Name, IP: netip.AddrFrom4([4]byte{base[0], base[1], base[2], byte(10 + j)})}
	if err := addNS(p.Name); err != nil {
		return nil, err
	}
	port := fmt.Sprintf("v%d", j)
	if err := ipRun(node.Name,
		"link add "+port+" type veth peer name eth0 netns "+p.Name,
		"link set "+port+" master cbr0 up"); err != nil {
		return nil, err
	}
	if err := ipRun(p.Name,
		"addr add "+p.IP.String()+"/24 dev eth0",
		"link set eth0 up",
		"route add default via "+node.PodCIDR.Addr().Next().String()); err != nil {
		return nil, err
	}
	node.Pods = append(node.Pods, p)
	return p, nil
}

// SetLink sets a namespace's eth0 up or down: a node's, to cut it off the
// LAN as a crash would.
func SetLink(ns string, up bool) error {
	state := "down"
	if up {
		state = "up"
	}
	return ipRun(ns, "link set eth0 "+state)
}

// SetNodeLink sets node's eth0 up or down, as SetLink, and on the way up
// puts back the routes to the other nodes' pods, which the kernel deleted
// with the link: a crashed node that comes back reaches every pod again,
// as its CNI would see to.
func (l *Lab) SetNodeLink(node string, up bool) error {
	if err := SetLink(node, up); err != nil || !up {
		return err
	}
	for _, b := range l.Nodes {
		if b.Name != node {
			if err := ipRun(node, "route replace "+b.PodCIDR.String()+" via "+b.IP.String()); err != nil {
				return err
			}
		}
	}
	return nil
}

// OnClose registers f to run first on Close: servers to stop.
func (l *Lab) OnClose(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closers = append(l.closers, f)
}

// Close stops what OnClose registered and deletes the lab's namespaces.
func (l *Lab) Close() {
	l.mu.Lock()
	closers := l.closers
	l.closers = nil
	l.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	_ = Cleanup(l.Prefix)
}

// Cleanup deletes every namespace whose name starts with prefix+"-": a
// lab's, also one left by a process that died.
func Cleanup(prefix string) error {
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip netns list: %w: %s", err, out)
	}
	var errs []error
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			if out, err := exec.Command("ip", "netns", "del", f[0]).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", f[0], err, out))
			}
		}
	}
	return errors.Join(errs...)
}

// attach creates namespace ns with eth0 on the LAN at a.
func (l *Lab) attach(ns string, a netip.Addr) error {
	if err := addNS(ns); err != nil {
		return err
	}
	l.mu.Lock()
	port := fmt.Sprintf("p%d", l.ports)
	l.ports++
	l.mu.Unlock()
	if err := ipRun(l.sw,
		"link add "+port+" type veth peer name eth0 netns "+ns,
		"link set "+port+" master br0 up"); err != nil {
		return err
	}
	return ipRun(ns, "addr add "+netip.PrefixFrom(a, lan.Bits()).String()+" dev eth0", "link set eth0 up")
}

// addNS creates a namespace with lo up.
func addNS(ns string) error {
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %w: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return ipRun(ns, "link set lo up")
}

// ipRun runs each space-separated "ip" command in namespace ns.
func ipRun(ns string, cmds ...string) error {
	for _, c := range cmds {
		args := append([]string{"-n", ns}, strings.Fields(c)...)
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Sysctls writes sysctls inside namespace ns, through /proc/sys as seen
// from a thread in it.
func Sysctls(ns string, kv map[string]string) error {
	return Do(ns, func() error {
		for k, v := range kv {
			if err := writeSysctl(k, v); err != nil {
				return fmt.Errorf("sysctl %s=%s in %s: %w", k, v, ns, err)
			}
		}
		return nil
	})
}

// NodePort makes node forward TCP and UDP on its address and port to pod's
// podPort, as kube-proxy does for a NodePort of a Cluster Service: DNAT
// in the nat prerouting hook and masquerade to the node, in an nftables
// table of its own (ip lab-kube-proxy). Nothing listens on the node's
// port, so a packet that reaches it without passing prerouting (IPVS
// delivering a connection to a local real server does that) finds no
// socket, as on a real node.
func (l *Lab) NodePort(node *Node, port uint16, pod *Pod, podPort uint16) error {
	var b strings.Builder
	b.WriteString("table ip lab-kube-proxy {\n")
	b.WriteString("  chain prerouting { type nat hook prerouting priority dstnat; policy accept; }\n")
	b.WriteString("  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n}\n")
	for _, proto := range []string{"tcp", "udp"} {
		fmt.Fprintf(&b, "add rule ip lab-kube-proxy prerouting ip daddr %s %s dport %d dnat to %s:%d\n", node.IP, proto, port, pod.IP, podPort)
		fmt.Fprintf(&b, "add rule ip lab-kube-proxy postrouting meta l4proto %s ct status dnat ct original ip daddr %s ct original proto-dst %d masquerade\n", proto, node.IP, port)
	}
	return nftRun(node.Name, b.String())
}

// nftRun runs an nft script in namespace ns.
func nftRun(ns, script string) error {
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f in %s: %w: %s\n%s", ns, err, strings.TrimSpace(string(out)), script)
	}
	return nil
}
