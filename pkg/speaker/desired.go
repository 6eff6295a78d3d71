package speaker

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nodeview"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// PlanInput turns the API state into the VRRP plan's input, and maps each
// VIP to the Services that use it. Services that are not keeplb's, and
// addresses in no pool, are left out: the speaker never touches them.
// Pools get their VRIDs by vrrp.PoolsOf.
func PlanInput(in dataplane.Inputs) (vrrp.Input, map[netip.Addr][]string) {
	parsed := pools.Parse(in.Pools)
	var out vrrp.Input
	order := make([]string, len(parsed))
	for i, p := range parsed {
		order[i] = p.Pool.Name
	}
	out.Pools = vrrp.PoolsOf(in.Pools, order)
	for _, n := range in.Nodes {
		out.Nodes = append(out.Nodes, nodeOf(n))
	}
	byName := make(map[string]*v1alpha1.IPPool, len(in.Pools))
	for _, p := range in.Pools {
		byName[p.Name] = p
	}
	bySvc := nodeview.ByService(in.Slices)
	owners := map[netip.Addr][]string{}
	for _, svc := range in.Services {
		if !annotations.Handles(svc, in.Class, in.DefaultClass) {
			continue
		}
		key := svc.Namespace + "/" + svc.Name
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			a, err := netip.ParseAddr(ing.IP)
			if err != nil {
				continue
			}
			a = a.Unmap()
			pool := pools.Find(parsed, a)
			if pool == "" {
				continue
			}
			v := vrrp.VIP{Addr: a, Pool: pool, Service: key, Created: svc.CreationTimestamp.Time}
			f, _ := annotations.ForwardingOf(svc, byName[pool])
			v.Forwarded = f != v1alpha1.ForwardingKubeProxy
			if localVIPs(svc) {
				v.Local, v.LocalNodes = true, nodeview.LocalNodes(bySvc[key], allocator.FamilyOf(a))
			}
			out.VIPs = append(out.VIPs, v)
			owners[a] = append(owners[a], key)
		}
	}
	for _, keys := range owners {
		sort.Strings(keys)
	}
	return out, owners
}

// localVIPs reports whether the plan places svc's VIPs by its endpoints:
// with externalTrafficPolicy Local, only nodes with a ready local endpoint
// may hold them. It is the only way endpoints reach the plan.
func localVIPs(svc *v1.Service) bool {
	return svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
}

// nodeOf is the plan's view of n (package nodeview); warnNodes tells the
// user about the InternalIPs it leaves out.
func nodeOf(n *v1.Node) vrrp.Node {
	vn, _ := nodeview.Of(n)
	return vn
}

// Layout says where the speaker keeps keepalived's files.
type Layout struct {
	// RunDir holds keepalived.conf, the notify FIFO and the track files.
	RunDir string
}

// ConfigPath is keepalived's configuration file.
func (l Layout) ConfigPath() string { return filepath.Join(l.RunDir, "keepalived.conf") }

// FIFOPath is keepalived's notify FIFO.
func (l Layout) FIFOPath() string { return filepath.Join(l.RunDir, "notify.fifo") }

// TrackPath is the track file of a Local instance.
func (l Layout) TrackPath(instance string) string {
	return filepath.Join(l.RunDir, "track", instance)
}

// ConfigProblem is something this node leaves out of its keepalived.conf:
// a whole VRRP instance, or one unicast peer of one. It names the object to
// fix; the rest of the node's VRRP goes on.
type ConfigProblem struct {
	// Instance is the VRRP instance.
	Instance string
	// Dropped says the whole instance is left out: this node takes no
	// part in it and does not hold its VIPs. Otherwise only a peer, or
	// some VIPs, are.
	Dropped bool
	// Kind and Name name the object to fix: an IPPool, a Service
	// ("namespace/name") or a Node.
	Kind, Name string
	// Field is the field of that object to fix, when known.
	Field string
	// Peer is the unicast peer left out, if that is the problem.
	Peer netip.Addr
	// Message says what is wrong, what the speaker does about it, and how
	// to fix it.
	Message string
}

// Kinds of the objects ConfigProblem names.
const (
	KindIPPool  = "IPPool"
	KindService = "Service"
	KindNode    = "Node"
)

// KeepalivedConfig renders this node's share of the plan as keepalived
// configuration: the instances it takes part in, on the interfaces that
// carry their VIPs here. What cannot be configured (an instance without an
// interface here, a unicast address keepalived cannot use) is left out and
// reported; the rest is unaffected. Its global settings are always valid:
// the router ID is the node's name made to fit (keepalived.FitName). in is
// the plan's input: its nodes give the unicast peers, its pools and VIPs
// the advert addresses and the comments.
func KeepalivedConfig(plan vrrp.Plan, node string, in vrrp.Input, links []hostnet.Link, l Layout) (keepalived.Config, []ConfigProblem) {
	ifaces := make([]vrrp.Interface, len(links))
	for i, ln := range links {
		ifaces[i] = vrrp.Interface{Name: ln.Name, Prefixes: ln.Prefixes, DefaultRoute4: ln.DefaultRoute4, DefaultRoute6: ln.DefaultRoute6}
	}
	cfg := keepalived.Config{RouterID: keepalived.FitName(node, 0), NotifyFIFO: l.FIFOPath()}
	anchors := advertAddrs(plan, in.Pools)
	services := localServices(in.VIPs)
	var problems []ConfigProblem
	for _, inst := range plan.For(node) {
		pl, err := vrrp.Place(inst, ifaces)
		if err != nil {
			missing := 0
			for _, d := range pl.Devs {
				if d == "" {
					missing++
				}
			}
			what := fmt.Sprintf("holds %d of the instance's %d VIPs", len(inst.VIPs)-missing, len(inst.VIPs))
			if pl.Interface == "" {
				what = "leaves the instance out"
			}
			first, _, _ := strings.Cut(err.Error(), "\n")
			problems = append(problems, ConfigProblem{Instance: inst.Name, Dropped: pl.Interface == "", Kind: KindIPPool, Name: inst.Pool, Field: "spec.vrrp.interface",
				Message: fmt.Sprintf("node %s %s of VRRP instance %s: %d VIPs have no interface here (%s). Set the IPPool's spec.vrrp.interface to an interface every node of the pool has, or give this node an interface in the VIPs' subnet or a default route of their family",
					node, what, inst.Name, missing, first)})
		}
		if pl.Interface == "" {
			continue
		}
		ki := keepalived.Instance{
			Name:           inst.Name,
			Comment:        instanceComment(inst, services),
			Interface:      pl.Interface,
			VRID:           inst.VRID,
			Priority:       inst.Priorities[node],
			AdvertInterval: inst.Advert,
			Version:        inst.Version,
			IPv6:           inst.Family == allocator.IPv6,
			PreemptDelay:   inst.HoldDown,
			NoPreempt:      inst.NoPreempt,
			AdvertAddr:     anchors[inst.Name],
		}
		for i, v := range inst.VIPs {
			if pl.Devs[i] != "" {
				ki.VIPs = append(ki.VIPs, netip.PrefixFrom(v, v.BitLen()))
			}
		}
		if inst.Unicast {
			var ps []ConfigProblem
			var ok bool
			ki.UnicastSrc, ki.UnicastPeers, ps, ok = unicast(inst, node, in.Nodes)
			problems = append(problems, ps...)
			if !ok {
				continue
			}
		}
		if inst.TrackFile {
			cfg.TrackFiles = append(cfg.TrackFiles, keepalived.TrackFile{Name: inst.Name, Path: l.TrackPath(inst.Name)})
			ki.TrackFile, ki.TrackWeight = inst.Name, 1
		}
		cfg.Instances = append(cfg.Instances, ki)
	}
	return cfg, problems
}

// unicast returns this node's unicast source and peers for inst, leaving
// out the addresses keepalived cannot use (a zone, an IPv4-mapped IPv6
// address, this node's own address claimed by another). Without a usable
// source the instance is left out (ok is false); a peer without one is only
// left out of the peers, so that one bad Node never stops the others' VRRP.
// Alone, a node has nobody to advertise to: it gets neither source nor
// peers.
func unicast(inst vrrp.Instance, node string, nodes []vrrp.Node) (src netip.Addr, peers []netip.Addr, problems []ConfigProblem, ok bool) {
	v6 := inst.Family == allocator.IPv6
	src, all := vrrp.UnicastPeers(inst, node, nodes)
	usable := func(a netip.Addr) bool { return a.IsValid() && a.Zone() == "" && !a.Is4In6() && a.Is6() == v6 }
	if !usable(src) {
		why := fmt.Sprintf("unicast adverts need an %s InternalIP on this Node", inst.Family)
		if src.IsValid() {
			why = fmt.Sprintf("its InternalIP %s cannot be a unicast advert source: it has a zone or is IPv4-mapped", src)
		}
		return netip.Addr{}, nil, []ConfigProblem{{Instance: inst.Name, Dropped: true, Kind: KindNode, Name: node, Field: "status.addresses",
			Message: fmt.Sprintf("node %s leaves out VRRP instance %s: %s. Fix the Node's InternalIP addresses (the kubelet's --node-ip)", node, inst.Name, why)}}, false
	}
	// owner names the node a peer address comes from: the first by name,
	// so that the message, and with it the event, is the same every sync.
	owner := func(a netip.Addr) string {
		best := ""
		for _, n := range nodes {
			if _, member := inst.Priorities[n.Name]; !member || n.Name == node || best != "" && n.Name > best {
				continue
			}
			if slices.ContainsFunc(n.InternalIPs, func(b netip.Addr) bool { return b.Unmap() == a }) {
				best = n.Name
			}
		}
		return best
	}
	for _, p := range all {
		var why string
		switch {
		case p == src:
			why = "is also this node's address"
		case !usable(p):
			why = "has a zone or is IPv4-mapped, which keepalived cannot send to"
		default:
			peers = append(peers, p)
			continue
		}
		from := owner(p)
		problems = append(problems, ConfigProblem{Instance: inst.Name, Kind: KindNode, Name: from, Field: "status.addresses", Peer: p,
			Message: fmt.Sprintf("node %s sends the unicast adverts of VRRP instance %s without peer %s: its InternalIP %s %s. Fix the Node's InternalIP addresses (the kubelet's --node-ip)", node, inst.Name, from, p, why)})
	}
	if len(peers) == 0 {
		return netip.Addr{}, nil, problems, true
	}
	return src, peers, problems, true
}

// instanceComment says where an instance comes from, in the rendered file:
// its IPPool and, for a Local address, its Services. The instance name may
// be shortened (keepalived.FitName); this is not.
func instanceComment(inst vrrp.Instance, services map[netip.Addr][]string) string {
	c := "IPPool " + inst.Pool
	if svcs := servicesOf(inst, services); len(svcs) > 0 {
		if len(svcs) > 3 {
			svcs = append(svcs[:3], fmt.Sprintf("and %d more", len(svcs)-3))
		}
		c += ", Service " + strings.Join(svcs, ", ")
	}
	if len(c) > keepalived.MaxCommentLen {
		c = c[:keepalived.MaxCommentLen]
	}
	return c
}

// localServices maps each Local address to its Services.
func localServices(vips []vrrp.VIP) map[netip.Addr][]string {
	out := map[netip.Addr][]string{}
	for _, v := range vips {
		if v.Local {
			out[v.Addr] = append(out[v.Addr], v.Service)
		}
	}
	return out
}

// servicesOf returns the Services ("namespace/name") of an instance of one
// Local address, sorted; nil for other instances, which are their pool's
// (a Local address held in a shared instance because its pool ran out of
// VRIDs included).
func servicesOf(inst vrrp.Instance, local map[netip.Addr][]string) []string {
	if !inst.Local || len(inst.VIPs) != 1 {
		return nil
	}
	return slices.Compact(slices.Sorted(slices.Values(local[inst.VIPs[0]])))
}

// advertAddrs returns the advert addresses of the instances that cannot
// keep the default one (169.254.0.VRID or fe80::a9fe:VRID, see package
// keepalived): those that share their family and VRID with an instance of
// an older pool on another interface, which the plan allows since VRIDs are
// per interface. The oldest pool's instance keeps the default, so adding a
// pool never changes an existing instance's adverts; each other gets
// 169.254.N.VRID (fe80::a9fe:NNVV), N from 1 to 254 chosen by a hash of its
// interface. It depends only on the plan and the pools, so every node
// computes the same.
func advertAddrs(plan vrrp.Plan, pools []vrrp.Pool) map[string]netip.Addr {
	order := make(map[string]int, len(pools))
	for _, p := range pools {
		order[p.Name] = p.Order
	}
	type key struct {
		fam  allocator.Family
		vrid int
	}
	groups := map[key][]vrrp.Instance{}
	for _, inst := range plan.Instances {
		k := key{inst.Family, inst.VRID}
		groups[k] = append(groups[k], inst)
	}
	out := map[string]netip.Addr{}
	for k, g := range groups {
		if len(g) < 2 {
			continue
		}
		slices.SortFunc(g, func(a, b vrrp.Instance) int {
			return cmp.Or(cmp.Compare(order[a.Pool], order[b.Pool]), cmp.Compare(a.Pool, b.Pool), cmp.Compare(a.Name, b.Name))
		})
		used := map[byte]bool{}
		for _, inst := range g[1:] {
			h := fnv.New32a()
			h.Write([]byte(inst.Interface))
			n := byte(1 + h.Sum32()%254)
			for used[n] {
				n = n%254 + 1
			}
			used[n] = true
			if k.fam == allocator.IPv6 {
				out[inst.Name] = netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 12: 0xa9, 13: 0xfe, 14: n, 15: byte(k.vrid)})
			} else {
				out[inst.Name] = netip.AddrFrom4([4]byte{169, 254, n, byte(k.vrid)})
			}
		}
	}
	return out
}

// withoutInstances returns c without the instances named in drop (their
// track files stay: keepalived accepts a file no instance uses).
func withoutInstances(c keepalived.Config, drop map[string]bool) keepalived.Config {
	if len(drop) == 0 {
		return c
	}
	c.Instances = slices.DeleteFunc(slices.Clone(c.Instances), func(in keepalived.Instance) bool { return drop[in.Name] })
	return c
}

// withoutPreemptDelay returns c with the instances named in prompt
// rendered without preempt_delay: their failback hold just ended, or they
// are new to the cluster (vrrp.Hold.Prompt).
func withoutPreemptDelay(c keepalived.Config, prompt map[string]bool) keepalived.Config {
	if len(prompt) == 0 {
		return c
	}
	c.Instances = slices.Clone(c.Instances)
	for i := range c.Instances {
		if prompt[c.Instances[i].Name] {
			c.Instances[i].PreemptDelay = 0
		}
	}
	return c
}
