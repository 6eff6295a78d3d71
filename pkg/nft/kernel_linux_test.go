package nft_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// The tests in this file run the generated ruleset in a real kernel, in
// network namespaces of their own. The kernel needs nftables and
// conntrack, not IPVS: the masquerade test emulates what IPVS NAT does to
// a connection with an nftables DNAT.

// requireKernel skips t unless it can create network namespaces and run
// nft in them.
func requireKernel(t *testing.T) {
	t.Helper()
	netnstest.Require(t, "apt-get install iproute2 nftables", "ip", "nft")
}

// vethSeq numbers veth names, unique within the test binary.
var vethSeq atomic.Int32

// newNetns creates a network namespace with lo up, deleted when t ends,
// and returns its name. It skips t if namespaces or nftables are
// unavailable.
func newNetns(t *testing.T, suffix string) string {
	t.Helper()
	name := netnstest.New(t, suffix)
	if out, err := exec.Command("ip", "netns", "exec", name, "nft", "list", "tables").CombinedOutput(); err != nil {
		t.Skipf("skipped: nftables unusable in a network namespace: %v: %s", err, out)
	}
	return name
}

// run runs a command and returns its output; it fails t on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// nftIn runs nft in namespace ns with stdin, returning output and error.
func nftIn(ns, stdin string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, "nft"}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// inNetns runs f on a thread of its own in namespace name: sockets f
// opens and processes it starts live there. The thread stays locked and
// dies with its goroutine, so no other goroutine ever runs in name.
func inNetns(t *testing.T, name string, f func() error) error {
	t.Helper()
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("opening netns %s: %v", name, err)
	}
	defer h.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("entering netns %s: %w", name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// realNFT runs the table's transaction and nft.Cleanup through knftables' real
// implementation in namespace ns, opened with nft.NewAt.
type realNFT struct {
	t  *testing.T
	ns string
}

func (r realNFT) open() knftables.Interface {
	r.t.Helper()
	n, err := nft.NewAt("/run/netns/" + r.ns)
	if err != nil {
		r.t.Fatalf("nft.NewAt(%s): %v", r.ns, err)
	}
	return n
}

func (r realNFT) sync(in nft.Rules) error {
	return write(context.Background(), r.open(), in)
}

func (r realNFT) cleanup() error {
	return nft.Cleanup(context.Background(), r.open())
}

// TestNewAtWritesTheNamedNamespace checks that every call of the
// Interface NewAt returns, its constructor's probe included, runs nft in
// the named namespace: the table appears there, its listing is read from
// there, and the test's own namespace never gets it.
func TestNewAtWritesTheNamedNamespace(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "at")
	_, hostErr := exec.Command("nft", "list", "table", "inet", "keeplb").CombinedOutput()
	hostHadTable := hostErr == nil
	r := realNFT{t, ns}
	n := r.open()
	in := nft.Rules{SNAT: []nft.SNAT{{Virtual: ipvs.Key{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80}, Reals: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:30080")}}}}
	if err := write(t.Context(), n, in); err != nil {
		t.Fatalf("Sync through NewAt: %v", err)
	}
	if out, err := nftIn(ns, "", "list", "table", "inet", "keeplb"); err != nil || !strings.Contains(out, "10.0.0.1") {
		t.Fatalf("table inet keeplb missing from namespace %s: %v:\n%s", ns, err, out)
	}
	sets, err := n.List(t.Context(), "set")
	if err != nil || !slices.Contains(sets, "snat-v4") {
		t.Errorf("List(set) through NewAt = %v, %v; want snat-v4 among them", sets, err)
	}
	elems, err := n.ListElements(t.Context(), "set", "snat-v4")
	if err != nil || len(elems) != 1 {
		t.Errorf("ListElements(snat-v4) through NewAt = %d elements, %v; want 1", len(elems), err)
	}
	if !hostHadTable {
		if out, err := exec.Command("nft", "list", "table", "inet", "keeplb").CombinedOutput(); err == nil {
			t.Errorf("the test's own namespace got table inet keeplb:\n%s", out)
		}
	}
	if err := nft.Cleanup(t.Context(), n); err != nil {
		t.Fatal(err)
	}
	if out, err := nftIn(ns, "", "list", "table", "inet", "keeplb"); err == nil {
		t.Errorf("table inet keeplb survived Cleanup through NewAt:\n%s", out)
	}
	if _, err := nft.NewAt("/run/netns/kltest-no-such-namespace"); err == nil {
		t.Error("NewAt of a missing namespace succeeded")
	}
}

// TestKernelAcceptsRuleset applies every golden case with knftables' real
// implementation, twice, next to a foreign table, then cleans up. It is
// what checks the syntax (the Fake does not parse rules) and that nested
// source ranges, which the kernel rejects in a concatenated interval set,
// are reduced (dualstack has some).
func TestKernelAcceptsRuleset(t *testing.T) {
	requireKernel(t)
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			ns := newNetns(t, "rules")
			foreign := "table ip keeplb {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n"
			if out, err := nftIn(ns, foreign, "-f", "-"); err != nil {
				t.Fatalf("adding a foreign table: %v: %s", err, out)
			}
			before, _ := nftIn(ns, "", "list", "table", "ip", "keeplb")

			r := realNFT{t, ns}
			if err := r.cleanup(); err != nil {
				t.Fatalf("Cleanup without our table: %v", err)
			}
			if err := r.sync(tc.in); err != nil {
				t.Fatalf("first Sync: %v", err)
			}
			first, err := nftIn(ns, "", "list", "table", "inet", "keeplb")
			if err != nil {
				t.Fatalf("nft list table inet keeplb: %v: %s", err, first)
			}
			if err := r.sync(tc.in); err != nil {
				t.Fatalf("second Sync: %v", err)
			}
			second, _ := nftIn(ns, "", "list", "table", "inet", "keeplb")
			if first != second {
				t.Errorf("second Sync changed the table:\nfirst:\n%s\nsecond:\n%s", first, second)
			}
			// Every element the Fake holds is in the kernel's table.
			fake := knftables.NewFake(nft.Family, nft.Table)
			sync(t, fake, tc.in)
			for name, set := range fake.Table.Sets {
				for _, e := range set.Elements {
					if k := strings.Join(e.Key, " . "); !strings.Contains(second, k) {
						t.Errorf("set %s: element %s missing from the kernel:\n%s", name, k, second)
					}
				}
			}
			if after, _ := nftIn(ns, "", "list", "table", "ip", "keeplb"); after != before {
				t.Errorf("Sync changed table ip keeplb:\nbefore:\n%s\nafter:\n%s", before, after)
			}

			if err := r.cleanup(); err != nil {
				t.Fatalf("Cleanup: %v", err)
			}
			if out, err := nftIn(ns, "", "list", "table", "inet", "keeplb"); err == nil {
				t.Errorf("table inet keeplb survived Cleanup:\n%s", out)
			}
			if after, _ := nftIn(ns, "", "list", "table", "ip", "keeplb"); after != before {
				t.Errorf("Cleanup changed table ip keeplb:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// listen opens a TCP listener on addr in namespace ns and reports the
// source address of every connection it accepts.
func listen(t *testing.T, ns, addr string) <-chan netip.Addr {
	t.Helper()
	var ln net.Listener
	if err := inNetns(t, ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan netip.Addr, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			c.Close()
		}
	}()
	return peers
}

// dial connects from src to dst in namespace ns; it reports whether the
// connection was established.
func dial(t *testing.T, ns, src, dst string) bool {
	t.Helper()
	err := inNetns(t, ns, func() error {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), 0)),
			Timeout:   700 * time.Millisecond,
		}
		c, err := d.Dial("tcp", dst)
		if err != nil {
			return err
		}
		return c.Close()
	})
	var nerr net.Error
	if err != nil && !(errors.As(err, &nerr) && nerr.Timeout()) {
		t.Fatalf("dial %s from %s: %v", dst, src, err)
	}
	return err == nil
}

// TestKernelSourceRanges sends real TCP connections through the
// source-ranges chain: over lo, so they traverse input as IPVS's would.
func TestKernelSourceRanges(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "ranges")
	for _, a := range []string{"192.0.2.10/32", "198.51.100.7/32", "203.0.113.7/32", "2001:db8::10/128", "2001:db8:1::7/128", "2001:db8:2::7/128"} {
		run(t, "ip", "-n", ns, "addr", "add", a, "dev", "lo", "nodad")
	}
	listen(t, ns, "192.0.2.10:8443")
	listen(t, ns, "192.0.2.10:8444")
	listen(t, ns, "192.0.2.10:9000")
	listen(t, ns, "[2001:db8::10]:8443")
	in := nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{
		key(ipvs.TCP, "192.0.2.10:8443"):     prefixes("198.51.100.0/24", "2001:db8:1::/48"),
		key(ipvs.TCP, "192.0.2.10:9000"):     nil, // filtered, no range: closed
		key(ipvs.TCP, "[2001:db8::10]:8443"): prefixes("2001:db8:1::/48"),
	}}
	if err := (realNFT{t, ns}).sync(in); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src, dst string
		want     bool
	}{
		{"198.51.100.7", "192.0.2.10:8443", true},
		{"203.0.113.7", "192.0.2.10:8443", false},
		{"203.0.113.7", "192.0.2.10:8444", true}, // not listed: open
		{"198.51.100.7", "192.0.2.10:9000", false},
		{"2001:db8:1::7", "[2001:db8::10]:8443", true},
		{"2001:db8:2::7", "[2001:db8::10]:8443", false},
	} {
		if got := dial(t, ns, tc.src, tc.dst); got != tc.want {
			t.Errorf("connection from %s to %s established = %v, want %v", tc.src, tc.dst, got, tc.want)
		}
	}
	out, _ := nftIn(ns, "", "list", "chain", "inet", "keeplb", nft.ChainSourceRanges)
	if strings.Contains(out, "counter packets 0 ") {
		t.Errorf("a drop counter stayed 0 although connections were dropped:\n%s", out)
	}
}

// TestKernelMasquerade checks the ipvs-masquerade chain's conntrack
// match. IPVS NAT with net.ipv4.vs.conntrack=1 leaves the connection's
// original tuple at client → VIP:port and sends the packet to the real
// server; an nftables DNAT in output does the same to the conntrack entry
// and the packet, so the chain sees what it would see behind IPVS.
func TestKernelMasquerade(t *testing.T) {
	requireKernel(t)
	lb, backend := newNetns(t, "lb"), newNetns(t, "be")
	veth := fmt.Sprintf("klnft%d", vethSeq.Add(1))
	run(t, "ip", "-n", lb, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", backend)
	run(t, "ip", "-n", lb, "addr", "add", "10.99.0.1/24", "dev", veth)
	run(t, "ip", "-n", lb, "link", "set", veth, "up")
	run(t, "ip", "-n", backend, "addr", "add", "10.99.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", backend, "link", "set", "eth0", "up")
	run(t, "ip", "-n", backend, "route", "add", "default", "via", "10.99.0.1")
	for _, a := range []string{"192.0.2.10/32", "198.51.100.7/32"} {
		run(t, "ip", "-n", lb, "addr", "add", a, "dev", "lo")
	}
	emulation := `table ip ipvs-emulation {
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr 192.0.2.10 tcp dport { 80, 81 } dnat to 10.99.0.2:8080
	}
}
`
	if out, err := nftIn(lb, emulation, "-f", "-"); err != nil {
		t.Fatalf("adding the IPVS emulation: %v: %s", err, out)
	}
	peers := listen(t, backend, "10.99.0.2:8080")
	in := nft.Rules{SNAT: snat(key(ipvs.TCP, "192.0.2.10:80"), "10.99.0.2:8080")}
	if err := (realNFT{t, lb}).sync(in); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dst  string
		want string
	}{
		{"192.0.2.10:80", "10.99.0.1"},    // listed: masqueraded to lb's address
		{"192.0.2.10:81", "198.51.100.7"}, // same real server, other VIP port: not listed
	} {
		if !dial(t, lb, "198.51.100.7", tc.dst) {
			t.Fatalf("connection to %s failed", tc.dst)
		}
		select {
		case got := <-peers:
			if got.String() != tc.want {
				t.Errorf("via %s the real server saw %s, want %s", tc.dst, got, tc.want)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("the real server accepted nothing via %s", tc.dst)
		}
	}
}

// TestKernelNodeAddressesFromKubelet runs the path a Node's addresses take
// to the kernel: Nodes whose kubelets report a zoned, link-local or
// garbage InternalIP, through dataplane.Desired, into a real nft
// transaction. The transaction must be accepted and masquerade exactly
// the valid nodes' NodePorts. Once, "fe80::1%eth0" went into the script
// text as it was, nft rejected the whole transaction, and the table
// stopped following every other Service on every node.
func TestKernelNodeAddressesFromKubelet(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "kubelet")
	node := func(name string, ips ...string) *v1.Node {
		n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: v1.NodeStatus{Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}}}}
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: ip})
		}
		return n
	}
	in := dataplane.Inputs{
		Class: "keeplb.io/vip", DefaultClass: true,
		Nodes: []*v1.Node{
			node("self", "10.0.0.1", "fd00::1"),
			node("good", "10.0.0.2", "fd00::2"),
			node("linklocal", "10.0.0.3", "fe80::1%eth0"),
			node("zoned", "2001:db8:9::1%eth0"),
			node("garbage", "10.0.0.1 } ; flush ruleset"),
		},
		Pools: []*v1alpha1.IPPool{{ObjectMeta: metav1.ObjectMeta{Name: "p"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"192.0.2.0/24", "2001:db8::/64"}}}},
		Services: []*v1.Service{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
			Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer,
				Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080}}},
			Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: "192.0.2.1"}, {IP: "2001:db8::1"}}}},
		}},
	}
	st, _ := dataplane.Desired(in, "self")
	if err := (realNFT{t, ns}).sync(nft.Rules{SNAT: st.SNAT}); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	out, err := nftIn(ns, "", "list", "table", "inet", "keeplb")
	if err != nil {
		t.Fatalf("nft list table inet keeplb: %v: %s", err, out)
	}
	for _, want := range []string{"192.0.2.1 . tcp . 80 . 10.0.0.2 . 30080", "192.0.2.1 . tcp . 80 . 10.0.0.3 . 30080", "2001:db8::1 . tcp . 80 . fd00::2 . 30080"} {
		if !strings.Contains(out, want) {
			t.Errorf("masquerading of %s missing:\n%s", want, out)
		}
	}
	for _, bad := range []string{"fe80", "2001:db8:9::", "%", "flush"} {
		if strings.Contains(out, bad) {
			t.Errorf("the table holds %q:\n%s", bad, out)
		}
	}
}

// TestKernelRefusesZonedAddresses is the nft layer's own defence: a zoned
// address that reaches it anyway is left out with an error, and the
// kernel takes the rest of the table.
func TestKernelRefusesZonedAddresses(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "zoned")
	in := dualStack()
	for _, a := range []string{"fe80::1%eth0", "2001:db8::1%eth0"} {
		in.SNAT = append(in.SNAT, nft.SNAT{Virtual: web6, Reals: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr(a), 30443)}})
	}
	err := (realNFT{t, ns}).sync(in)
	if err == nil || !strings.Contains(err.Error(), "zone") || strings.Contains(err.Error(), "writing nftables table") {
		t.Fatalf("Sync = %v; want the zoned entries refused and the rest written", err)
	}
	out, lerr := nftIn(ns, "", "list", "set", "inet", "keeplb", "snat-v6")
	if lerr != nil {
		t.Fatalf("nft list set: %v: %s", lerr, out)
	}
	if !strings.Contains(out, "fd00::1 . 30443") || strings.Contains(out, "fe80") || strings.Contains(out, "2001:db8::1 ") {
		t.Errorf("snat-v6 does not hold exactly the valid real servers:\n%s", out)
	}
}

// ping sends one ICMP or ICMPv6 echo request from src to dst in namespace
// ns and reports whether a reply came within 700 ms. It uses a raw
// socket (the test runs as root) and builds the request itself.
func ping(t *testing.T, ns, src, dst string) bool {
	t.Helper()
	v6 := netip.MustParseAddr(dst).Is6()
	network, typ, reply := "ip4:icmp", byte(8), byte(0)
	if v6 {
		network, typ, reply = "ip6:ipv6-icmp", 128, 129
	}
	got := false
	err := inNetns(t, ns, func() error {
		c, err := net.ListenPacket(network, src)
		if err != nil {
			return err
		}
		defer c.Close()
		id := byte(vethSeq.Add(1))
		msg := []byte{typ, 0, 0, 0, 0x4b, id, 0, 1, 'k', 'l'}
		if !v6 { // the kernel computes ICMPv6 checksums itself
			var sum uint32
			for i := 0; i < len(msg); i += 2 {
				sum += uint32(msg[i])<<8 | uint32(msg[i+1])
			}
			sum = sum>>16 + sum&0xffff
			sum += sum >> 16
			msg[2], msg[3] = byte(^sum>>8), byte(^sum)
		}
		if _, err := c.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
			return err
		}
		deadline := time.Now().Add(700 * time.Millisecond)
		buf := make([]byte, 1500)
		for {
			_ = c.SetReadDeadline(deadline)
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return nil // timed out: no reply
			}
			if n >= 6 && buf[0] == reply && buf[4] == 0x4b && buf[5] == id && from.String() == dst {
				got = true
				return nil
			}
		}
	})
	if err != nil {
		t.Fatalf("ping %s from %s in %s: %v", dst, src, ns, err)
	}
	return got
}

// TestKernelGuard sends real traffic from a client namespace to VIPs held
// by a node namespace, as keepalived holds them (a /32 and a /128 on the
// node's interface), with what dataplane.Desired computes for Services
// in each forwarding mode. Listeners on the wildcard address stand for
// sshd and the kubelet; an nftables DNAT at dstnat priority stands for
// kube-proxy in iptables mode, which translates a NodePort on every local
// address and, for a kube-proxy-forwarded Service, the VIP's port. Before
// keeplb's table all of them answer on the VIPs (so the test can fail);
// after it, only the Services' ports and ping (where the pool allows it)
// do, through the VIPs, while the node's own address still reaches
// everything, and a connection opened before the guard survives it.
func TestKernelGuard(t *testing.T) {
	requireKernel(t)
	node, client := newNetns(t, "gnode"), newNetns(t, "gclient")
	veth := fmt.Sprintf("klg%d", vethSeq.Add(1))
	run(t, "ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", client)
	for _, a := range []string{"10.98.0.1/24", "fd98::1/64", "10.98.0.200/32", "10.98.0.201/32", "10.98.0.202/32", "fd98::200/128"} {
		run(t, "ip", "-n", node, "addr", "add", a, "dev", veth, "nodad")
	}
	for _, a := range []string{"10.98.0.2/24", "fd98::2/64"} {
		run(t, "ip", "-n", client, "addr", "add", a, "dev", "eth0", "nodad")
	}
	run(t, "ip", "-n", node, "link", "set", veth, "up")
	run(t, "ip", "-n", client, "link", "set", "eth0", "up")

	// Host-network listeners on every address: sshd, the kubelet, a
	// Service's port (standing for IPVS, which would take it before the
	// socket layer) and kube-proxy's backends.
	for _, port := range []string{"2222", "10250", "80", "8443", "8080"} {
		listen(t, node, "[::]:"+port) // dual-stack wildcard
	}
	kubeProxy := `table ip kube-proxy-emulation {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local tcp dport 30080 dnat to 10.98.0.1:8080
		ip daddr 10.98.0.201 tcp dport 443 dnat to 10.98.0.1:8443
	}
}
`
	if out, err := nftIn(node, kubeProxy, "-f", "-"); err != nil {
		t.Fatalf("adding the kube-proxy emulation: %v: %s", err, out)
	}

	quiet := &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: "quiet"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.98.0.202/32"}, ICMPEcho: v1alpha1.ICMPEchoDrop}}
	svc := func(name, fwd string, vips []string, port int32) *v1.Service {
		return &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Annotations: map[string]string{"keeplb.io/forwarding": fwd}},
			Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer,
				Ports: []v1.ServicePort{{Name: "p", Protocol: v1.ProtocolTCP, Port: port, NodePort: 30080}}},
			Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: func() (out []v1.LoadBalancerIngress) {
				for _, v := range vips {
					out = append(out, v1.LoadBalancerIngress{IP: v})
				}
				return out
			}()}},
		}
	}
	in := dataplane.Inputs{
		Class: "keeplb.io/vip", DefaultClass: true,
		Pools: []*v1alpha1.IPPool{
			{ObjectMeta: metav1.ObjectMeta{Name: "p"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.98.0.200-10.98.0.201", "fd98::200/128"}}},
			quiet,
		},
		Services: []*v1.Service{
			svc("web", "nodeport", []string{"10.98.0.200", "fd98::200"}, 80),
			svc("kp", "kube-proxy", []string{"10.98.0.201"}, 443),
			svc("pods", "pod", []string{"10.98.0.202"}, 80),
		},
	}
	st, _ := dataplane.Desired(in, "gnode")

	type check struct {
		dst  string
		want bool // with the guard
	}
	checks := []check{
		{"10.98.0.200:80", true},     // web's Service port
		{"[fd98::200]:80", true},     // and on its IPv6 VIP
		{"10.98.0.200:2222", false},  // sshd
		{"[fd98::200]:2222", false},  // sshd over IPv6
		{"10.98.0.200:10250", false}, // the kubelet
		{"[fd98::200]:10250", false},
		{"10.98.0.200:30080", false}, // a NodePort, which kube-proxy would translate
		{"10.98.0.201:443", true},    // kp's Service port, translated by kube-proxy
		{"10.98.0.201:80", false},    // another Service's port, not kp's
		{"10.98.0.201:30080", false},
		{"10.98.0.202:80", true}, // pods' Service port, on a pool whose VIPs drop ping
		{"10.98.0.202:2222", false},
		{"10.98.0.1:2222", true}, // the node's own address: not a VIP, untouched
		{"10.98.0.1:30080", true},
		{"[fd98::1]:10250", true},
	}
	src := func(dst string) string {
		if strings.HasPrefix(dst, "[") {
			return "fd98::2"
		}
		return "10.98.0.2"
	}
	pings := []check{{"10.98.0.200", true}, {"fd98::200", true}, {"10.98.0.201", true}, {"10.98.0.202", false}, {"10.98.0.1", true}}
	pingSrc := func(dst string) string {
		if netip.MustParseAddr(dst).Is6() {
			return "fd98::2"
		}
		return "10.98.0.2"
	}
	for _, c := range checks {
		if !dial(t, client, src(c.dst), c.dst) {
			t.Fatalf("before keeplb's table, %s does not answer: the test would prove nothing", c.dst)
		}
	}
	for _, p := range pings {
		if !ping(t, client, pingSrc(p.dst), p.dst) {
			t.Fatalf("before keeplb's table, %s does not answer ping", p.dst)
		}
	}
	// A connection opened through a VIP before the guard: established, so
	// the guard lets it live on.
	var early net.Conn
	if err := inNetns(t, client, func() (err error) {
		early, err = net.DialTimeout("tcp", "10.98.0.200:2222", time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer early.Close()

	if err := (realNFT{t, node}).sync(nft.Rules{SNAT: st.SNAT, SourceRanges: st.SourceRanges, Guard: st.Guard}); err != nil {
		t.Fatal(err)
	}
	for _, c := range checks {
		if got := dial(t, client, src(c.dst), c.dst); got != c.want {
			t.Errorf("with the guard, connection to %s established = %v, want %v", c.dst, got, c.want)
		}
	}
	for _, p := range pings {
		if got := ping(t, client, pingSrc(p.dst), p.dst); got != p.want {
			t.Errorf("with the guard, ping %s answered = %v, want %v", p.dst, got, p.want)
		}
	}
	// The early connection still carries data: the listener closes it
	// once accepted, so a read sees EOF, not a timeout.
	_ = early.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := early.Read(make([]byte, 1)); err == nil || !errors.Is(err, io.EOF) {
		t.Errorf("the connection opened before the guard: read %v, want EOF from the listener", err)
	}
	drops, err := nft.GuardDrops(t.Context(), (realNFT{t, node}).open())
	if err != nil {
		t.Fatal(err)
	}
	if drops == 0 {
		t.Error("the guard's counter stayed 0")
	}
	t.Logf("the guard dropped %d packets", drops)
}

// TestKernelSyncGuard sends real UDP datagrams to the sync daemons' ports
// over lo, so that they traverse input as sync messages from another node
// would: those of a peer (IPv4, IPv4-mapped in the Rules, IPv6) arrive,
// those of any other address are dropped and counted, and other ports
// are left alone.
func TestKernelSyncGuard(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "sync")
	for _, a := range []string{"192.0.2.1/32", "192.0.2.2/32", "192.0.2.66/32", "2001:db8::1/128", "2001:db8::2/128", "2001:db8::66/128"} {
		run(t, "ip", "-n", ns, "addr", "add", a, "dev", "lo", "nodad")
	}
	in := nft.Rules{Sync: nft.SyncGuard{Ports: []uint16{8848, 8849}, Peers: addrs("::ffff:192.0.2.2", "2001:db8::2")}}
	if err := (realNFT{t, ns}).sync(in); err != nil {
		t.Fatal(err)
	}
	// A receiver per port and family; what each got, by source.
	type datagram struct {
		port uint16
		src  netip.Addr
	}
	got := make(chan datagram, 64)
	for _, laddr := range []string{"192.0.2.1:8848", "192.0.2.1:8849", "192.0.2.1:8850", "[2001:db8::1]:8848"} {
		ap := netip.MustParseAddrPort(laddr)
		var c *net.UDPConn
		if err := inNetns(t, ns, func() (err error) {
			c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go func() {
			buf := make([]byte, 64)
			for {
				_, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				got <- datagram{ap.Port(), from.Addr().Unmap()}
			}
		}()
	}
	send := func(src, dst string) {
		t.Helper()
		if err := inNetns(t, ns, func() error {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), 0)), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("sync"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	// The strangers' datagrams go first: by the time the peer's last one
	// arrives, theirs would have too.
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.66", "192.0.2.1:8848"},
		{"192.0.2.66", "192.0.2.1:8849"},
		{"2001:db8::66", "[2001:db8::1]:8848"},
		{"192.0.2.66", "192.0.2.1:8850"}, // not a sync port: arrives
		{"192.0.2.2", "192.0.2.1:8848"},
		{"192.0.2.2", "192.0.2.1:8849"},
		{"2001:db8::2", "[2001:db8::1]:8848"},
	} {
		send(tc.src, tc.dst)
	}
	want := map[datagram]bool{
		{8850, netip.MustParseAddr("192.0.2.66")}:  true,
		{8848, netip.MustParseAddr("192.0.2.2")}:   true,
		{8849, netip.MustParseAddr("192.0.2.2")}:   true,
		{8848, netip.MustParseAddr("2001:db8::2")}: true,
	}
	deadline := time.After(5 * time.Second)
	for arrived := map[datagram]bool{}; len(arrived) < len(want); {
		select {
		case d := <-got:
			if !want[d] {
				t.Fatalf("a datagram from %s to port %d arrived: the sync guard let a stranger through", d.src, d.port)
			}
			arrived[d] = true
		case <-deadline:
			t.Fatalf("only %v of %v arrived in 5s", arrived, want)
		}
	}
	out, _ := nftIn(ns, "", "list", "chain", "inet", "keeplb", nft.ChainSync)
	if !strings.Contains(out, "counter packets 2 ") || !strings.Contains(out, "counter packets 1 ") {
		t.Errorf("the sync guard's counters are not 2 (IPv4) and 1 (IPv6) drops:\n%s", out)
	}
}
