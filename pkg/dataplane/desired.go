package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	servicehelper "k8s.io/cloud-provider/service/helpers"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/nodeview"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/rendezvous"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// Inputs is what a speaker reads from the API, from its informer caches:
// the dataplane's input here, and the VRRP plan's (speaker.PlanInput).
type Inputs struct {
	Services []*v1.Service
	Slices   []*discoveryv1.EndpointSlice
	Nodes    []*v1.Node
	Pools    []*v1alpha1.IPPool
	// Class and DefaultClass decide which Services are keeplb's, by the
	// same rule as the controller.
	Class        string
	DefaultClass bool
	// Successors map VIPs to the node that takes each over from this node
	// or back from it (vrrp.Plan.Successors). The speaker sets it with
	// --conn-sync: nodeport forwarding of a Cluster Service then sends no
	// new connection to that node's NodePort (weight 0), so that none is
	// synced to it as a connection to its own address, which IPVS there
	// cannot hand to kube-proxy (see withoutSuccessor). Nil: every
	// NodePort takes new connections.
	Successors map[netip.Addr]string
}

// State is the IPVS table a node should have, and what goes with it.
type State struct {
	// IPVS is the desired table of keeplb's virtual servers.
	IPVS ipvs.Table
	// SNAT lists the real servers whose forwarded traffic must be
	// masqueraded, sorted.
	SNAT []nft.SNAT
	// Owners maps each virtual server to its Service, "namespace/name".
	Owners map[ipvs.Key]string
	// SourceRanges maps each virtual server whose Service restricts its
	// clients (loadBalancerSourceRanges) to the ranges of the VIP's family
	// it admits; an empty list admits no client. A virtual server absent
	// is open to all. See sourceRanges for how the field is read.
	SourceRanges map[ipvs.Key][]netip.Prefix
	// Guard is what the VIP port guard lets through to keeplb's VIPs. It
	// is the same on every node, whichever pools the node may hold.
	Guard nft.Guard
	// Sync is the guard of the kernel's connection sync daemons, which
	// the caller sets (package connsync computes it): the dataplane
	// writes it with the rest of keeplb's table.
	Sync nft.SyncGuard
	// FollowVIP masquerades to the VIP rather than to the node, and keeps
	// flows routed for a VIP held elsewhere in a conntrack zone of their
	// own (nft.Rules.FollowVIP), which the caller sets with Sync.
	FollowVIP bool
	// NodeAddresses are this node's InternalIPs, unmapped: where the
	// holders' nodeport forwarding sends this node's share. The entries of
	// those flows are kube-proxy's, which keeplb's conntrack cleanups keep
	// (conntrack.OfVIPs).
	NodeAddresses []netip.Addr

	ranges    []allocator.Range
	kubeProxy map[ipvs.Key]bool
}

// Owns reports whether keeplb owns the virtual server k: its address lies
// in one of the pools, and no Service forwarded by kube-proxy uses it. Pass
// it to Diff and Sync.
func (s State) Owns(k ipvs.Key) bool {
	if s.kubeProxy[k] {
		return false
	}
	for _, r := range s.ranges {
		if r.Contains(k.Address) {
			return true
		}
	}
	return false
}

// Problem is something in a Service the dataplane cannot do as asked; it
// does the closest safe thing and says so here, for an event.
type Problem struct {
	// Service is "namespace/name".
	Service string
	// Field is the annotation or field at fault.
	Field string
	// Message says what was done instead and how to fix it.
	Message string
}

// String returns "namespace/name: field: message".
func (p Problem) String() string { return p.Service + ": " + p.Field + ": " + p.Message }

// nodeInfo is a Node reduced to what forwarding needs.
type nodeInfo struct {
	name     string
	member   bool // not excluded
	eligible bool // a member, and Ready (or Ready ignored: vrrp.FailStatic)
	ip4, ip6 netip.Addr
}

func (n nodeInfo) ip(v6 bool) netip.Addr {
	if v6 {
		return n.ip6
	}
	return n.ip4
}

type computer struct {
	in   Inputs
	node string
	self *v1.Node
	// selfEligible: this node is Ready and not excluded, so it serves its
	// own share of nodeport traffic (see service).
	selfEligible bool
	nodes        []nodeInfo
	// candidates are the nodes nodeport subsets are chosen from, per
	// family (index 1 for IPv6), made on first use.
	candidates [2][]rendezvous.Candidate
	slices     map[string][]*discoveryv1.EndpointSlice
	parsed     []pools.Parsed
	admits     map[string]bool // pool name: may this node hold its VIPs
	st         State
	problems   []Problem
	// entries are the virtual servers of the Service part computes, in
	// the order they were made, with their ports' names.
	entries []partEntry
	// guard is the Service's share of State.Guard, and rangesReported
	// whether its source ranges were found invalid already (one problem
	// per Service, not per address).
	guard          nft.Guard
	rangesReported bool
}

// Desired returns the IPVS table node should have, with the problems found.
// It is pure and deterministic. A speaker that syncs again and again uses
// a Cache, which gives the same result without recomputing the Services
// that did not change.
func Desired(in Inputs, node string) (State, []Problem) {
	return (&Cache{}).Desired(in, node)
}

func newComputer(in Inputs, node string) *computer {
	c := &computer{
		in:   in,
		node: node,
		st: State{
			IPVS:         ipvs.Table{},
			Owners:       map[ipvs.Key]string{},
			SourceRanges: map[ipvs.Key][]netip.Prefix{},
			kubeProxy:    map[ipvs.Key]bool{},
		},
		admits: map[string]bool{},
	}
	members, unready := 0, 0
	for _, n := range in.Nodes {
		info, view := infoOf(n)
		if n.Name == node {
			c.self = n
			for _, a := range []netip.Addr{info.ip4, info.ip6} {
				if a.IsValid() {
					c.st.NodeAddresses = append(c.st.NodeAddresses, a.Unmap())
				}
			}
		}
		if info.member {
			members++
			if !view.Ready {
				unready++
			}
		}
		c.nodes = append(c.nodes, info)
	}
	// The rule of the VRRP plan: when more than half of the nodes go
	// NotReady at once, Ready is the control plane's trouble, not theirs,
	// and their NodePorts still serve.
	failStatic := vrrp.FailStatic(members, unready)
	for i, n := range c.nodes {
		if failStatic && n.member {
			c.nodes[i].eligible = true
		}
		if n.name == node {
			c.selfEligible = c.nodes[i].eligible
		}
	}
	slices.SortFunc(c.nodes, func(a, b nodeInfo) int { return strings.Compare(a.name, b.name) })
	c.slices = nodeview.ByService(in.Slices)
	c.parsed = pools.Parse(in.Pools)
	order := make([]string, len(c.parsed))
	for i, p := range c.parsed {
		c.st.ranges = append(c.st.ranges, p.Pool.Ranges...)
		order[i] = p.Pool.Name
	}
	// The plan's rule for the nodes that may hold a pool's VIPs (Ready
	// aside: a NotReady node keeps its table so that it forwards at once
	// when it comes back).
	var selfLabels map[string]string
	if c.self != nil {
		selfLabels = c.self.Labels
	}
	for _, vp := range vrrp.PoolsOf(in.Pools, order) {
		c.admits[vp.Name] = vp.Admits(selfLabels)
	}
	return c
}

// part computes one Service's share of the desired state on its own, as
// if no other Service existed: the Cache settles contested ports.
func (c *computer) part(svc *v1.Service) part {
	saved, savedProblems := c.st, c.problems
	c.st = State{IPVS: ipvs.Table{}, Owners: map[ipvs.Key]string{}, SourceRanges: map[ipvs.Key][]netip.Prefix{}, kubeProxy: map[ipvs.Key]bool{}}
	c.problems, c.entries, c.guard, c.rangesReported = nil, nil, nft.Guard{}, false
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		a, err := netip.ParseAddr(ing.IP)
		if err != nil {
			continue
		}
		a = a.Unmap()
		name := pools.Find(c.parsed, a)
		if name == "" {
			continue
		}
		pool := c.pool(name)
		c.guardVIP(svc, a, pool)
		c.service(svc, a, pool, c.admits[name])
	}
	p := part{problems: c.problems, guard: c.guard}
	for k := range c.st.kubeProxy {
		p.kubeProxy = append(p.kubeProxy, k)
	}
	p.entries = c.entries
	c.st, c.problems = saved, savedProblems
	return p
}

func (c *computer) ours(svc *v1.Service) bool {
	return annotations.Handles(svc, c.in.Class, c.in.DefaultClass)
}

func (c *computer) pool(name string) *v1alpha1.IPPool {
	for _, p := range c.in.Pools {
		if p.Name == name {
			return p
		}
	}
	return nil
}

func (c *computer) problem(svc *v1.Service, field, format string, args ...any) {
	c.problems = append(c.problems, Problem{Service: svc.Namespace + "/" + svc.Name, Field: field, Message: fmt.Sprintf(format, args...)})
}

// service adds the virtual servers of one address of svc.
func (c *computer) service(svc *v1.Service, vip netip.Addr, pool *v1alpha1.IPPool, admitted bool) {
	key := svc.Namespace + "/" + svc.Name
	mode := c.mode(svc, pool)
	if mode == v1alpha1.ForwardingKubeProxy {
		for _, p := range svc.Spec.Ports {
			if proto, ok := protocol(p.Protocol); ok {
				c.st.kubeProxy[ipvs.Key{Address: vip, Protocol: proto, Port: uint16(p.Port)}] = true
			}
		}
		return
	}
	if !admitted {
		return
	}
	if mode == v1alpha1.ForwardingNodePort {
		for _, p := range svc.Spec.Ports {
			if p.NodePort == 0 {
				field := "spec.ports[" + portName(p) + "].nodePort"
				if a := svc.Spec.AllocateLoadBalancerNodePorts; a != nil && !*a {
					field = "spec.allocateLoadBalancerNodePorts"
				}
				c.problem(svc, field, "nodeport forwarding needs a NodePort for every port; forwarding to pods instead (set %s pod to say so, or allocate NodePorts)", annotations.Forwarding)
				mode = v1alpha1.ForwardingPod
				break
			}
		}
	}
	local := svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
	vs := ipvs.VirtualServer{Address: vip, Scheduler: c.scheduler(svc)}
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		vs.Persistent = true
		vs.Timeout = time.Duration(v1.DefaultClientIPServiceAffinitySeconds) * time.Second
		if cfg := svc.Spec.SessionAffinityConfig; cfg != nil && cfg.ClientIP != nil && cfg.ClientIP.TimeoutSeconds != nil && *cfg.ClientIP.TimeoutSeconds > 0 {
			vs.Timeout = time.Duration(*cfg.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	v6 := vip.Is6()
	ranges, filtered := c.sourceRanges(svc, v6)
	var perNode map[string]int // Local nodeport: ready endpoints per node
	var chosen []string        // Cluster nodeport: the Service's subset
	if mode == v1alpha1.ForwardingNodePort {
		if local {
			perNode = nodeview.LocalWeights(c.slices[key], familyOf(v6))
		} else if k := subsetSize(pool); k > 0 {
			chosen = rendezvous.Choose(rendezvous.KeyHash(key), c.subsetCandidates(v6), k)
		}
		if !slices.ContainsFunc(c.nodes, func(n nodeInfo) bool { return n.eligible && n.ip(v6).IsValid() }) {
			c.problem(svc, "status.loadBalancer.ingress", "no Ready node has an %s InternalIP, so %s has no NodePort to forward to", familyName(v6), vip)
		}
	}
	for _, p := range svc.Spec.Ports {
		proto, ok := protocol(p.Protocol)
		if !ok {
			c.problem(svc, "spec.ports["+portName(p)+"].protocol", "IPVS cannot forward protocol %q; the port is not forwarded", p.Protocol)
			continue
		}
		vs := vs
		vs.Protocol, vs.Port = proto, uint16(p.Port)
		k := vs.Key()
		if owner, taken := c.st.Owners[k]; taken {
			c.problem(svc, "spec.ports["+portName(p)+"]", "%s is already forwarded for %s; this port is not forwarded", k, owner)
			continue
		}
		var reals, unmasqueraded []ipvs.RealServer
		switch mode {
		case v1alpha1.ForwardingNodePort:
			reals = c.nodePortReals(uint16(p.NodePort), v6, local, perNode, chosen)
			// This node's own share goes to its own endpoints, not to its
			// NodePort: IPVS hands a connection to a local real server
			// straight to the socket layer, past the hooks where kube-proxy
			// translates NodePorts, so nothing would answer there. It has
			// a share only when it is in the Service's subset.
			if c.selfEligible && (chosen == nil || slices.Contains(chosen, c.node)) {
				own := c.podReals(key, p, v6, true)
				reals = dedupe(append(reals, own...))
				if local {
					unmasqueraded = own // as in pod forwarding: keep the client's address
				}
			}
			if !local {
				reals = c.withoutSuccessor(reals, vip, uint16(p.NodePort))
			}
		case v1alpha1.ForwardingPod:
			reals = c.podReals(key, p, v6, local)
			if local {
				unmasqueraded = reals
			}
		}
		c.st.IPVS[k] = ipvs.Entry{Virtual: vs, Reals: reals}
		c.st.Owners[k] = key
		c.entries = append(c.entries, partEntry{entry: c.st.IPVS[k], port: portName(p), ranges: ranges, filtered: filtered,
			unmasqueraded: unmasqueraded, noneMasqueraded: mode == v1alpha1.ForwardingPod && local})
	}
}

// guardVIP adds vip, with every port of svc, to the Service's share of
// the guard: whatever the forwarding mode and whether or not this node may
// hold the VIP, so that every node has the same guard and a VIP is guarded
// wherever it goes.
func (c *computer) guardVIP(svc *v1.Service, vip netip.Addr, pool *v1alpha1.IPPool) {
	c.guard.VIPs = append(c.guard.VIPs, vip)
	if pool == nil || pool.Spec.ICMPEcho != v1alpha1.ICMPEchoDrop {
		c.guard.Echo = append(c.guard.Echo, vip)
	}
	for _, p := range svc.Spec.Ports {
		if proto, ok := protocol(p.Protocol); ok && p.Port > 0 && p.Port < 65536 {
			c.guard.Ports = append(c.guard.Ports, ipvs.Key{Address: vip, Protocol: proto, Port: uint16(p.Port)})
		}
	}
}

// sourceRanges returns the source ranges that admit clients of svc's VIP
// of one family, and whether the VIP is filtered at all. They are read as
// the cloud-provider library reads them (the field, else the legacy
// annotation service.beta.kubernetes.io/load-balancer-source-ranges), and,
// as kube-proxy does, per family: a family is open to all only when the
// ranges hold its own zero CIDR (0.0.0.0/0 opens IPv4, not IPv6), and
// ranges of the other family do not count, so a VIP whose family has no
// range admits no client. Ranges that do not parse close the VIP to every
// client, with a problem: a mistyped filter must not open what it meant to
// restrict. The API server validates the field, so in practice only the
// annotation can be wrong.
func (c *computer) sourceRanges(svc *v1.Service, v6 bool) ([]netip.Prefix, bool) {
	field, value := "spec.loadBalancerSourceRanges", strings.Join(svc.Spec.LoadBalancerSourceRanges, ",")
	if len(svc.Spec.LoadBalancerSourceRanges) == 0 {
		field, value = v1.AnnotationLoadBalancerSourceRangesKey, strings.TrimSpace(svc.Annotations[v1.AnnotationLoadBalancerSourceRangesKey])
		if value == "" {
			return nil, false // no ranges: open to all
		}
	}
	closed := func() ([]netip.Prefix, bool) {
		if !c.rangesReported {
			c.rangesReported = true
			c.problem(svc, field, "%q is not a comma-separated list of CIDRs; until it is (e.g. 203.0.113.0/24,198.51.100.7/32), the VIP's ports are closed to every client", value)
		}
		return []netip.Prefix{}, true
	}
	set, err := servicehelper.GetLoadBalancerSourceRanges(svc)
	if err != nil {
		return closed()
	}
	out := []netip.Prefix{}
	for _, s := range set.StringSlice() {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return closed()
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		if p.Addr().Is6() != v6 {
			continue
		}
		if p.Bits() == 0 {
			return nil, false // this family's zero CIDR: open to all
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out), true
}

func (c *computer) mode(svc *v1.Service, pool *v1alpha1.IPPool) v1alpha1.Forwarding {
	f, err := annotations.ForwardingOf(svc, pool)
	if err != nil {
		c.problem(svc, annotations.Forwarding, "%q is not a forwarding mode (nodeport, pod or kube-proxy); using the pool's", svc.Annotations[annotations.Forwarding])
	}
	return f
}

func (c *computer) scheduler(svc *v1.Service) string {
	s, err := annotations.SchedulerOf(svc)
	if err != nil {
		c.problem(svc, annotations.Scheduler, "%q is not an IPVS scheduler keeplb knows; using %s. Use one of %s", svc.Annotations[annotations.Scheduler], annotations.DefaultScheduler, strings.Join(annotations.Schedulers, ", "))
	}
	return s
}

// nodePortReals returns the NodePorts of the eligible nodes other than this
// one: with Local, only those in perNode, weighted by their ready local
// endpoints; else, when chosen is not nil, only those in the Service's
// subset.
func (c *computer) nodePortReals(nodePort uint16, v6, local bool, perNode map[string]int, chosen []string) []ipvs.RealServer {
	var out []ipvs.RealServer
	for _, n := range c.nodes {
		ip := n.ip(v6)
		if !n.eligible || !ip.IsValid() || n.name == c.node {
			continue
		}
		if chosen != nil && !slices.Contains(chosen, n.name) {
			continue
		}
		w := 1
		if local {
			ready, ok := perNode[n.name]
			if !ok {
				continue
			}
			w = max(ready, 0)
		}
		out = append(out, ipvs.RealServer{Address: ip, Port: nodePort, Weight: w})
	}
	return dedupe(out)
}

// withoutSuccessor returns reals with the NodePort of vip's successor
// (Inputs.Successors) at weight 0, taking no new connection, unless no
// other real server would take one. The connections this node sends
// through that NodePort are synced to the successor with its own address
// as their real server, and the VIP goes there at a handover, a crash or
// a failback. IPVS hands a connection to a local real server to the
// socket layer, past kube-proxy's DNAT, and for a synced one the kernel
// refuses even that while conntrack tracks the packet (ip_vs_nat_xmit),
// so those streams stalled for seconds at every move
// (docs/connections.md). Every pod stays reachable: kube-proxy behind the
// other NodePorts spreads a Cluster Service over all its endpoints. At
// weight 0 rather than gone, the connections already sent there (before
// the successor changed) go on.
func (c *computer) withoutSuccessor(reals []ipvs.RealServer, vip netip.Addr, nodePort uint16) []ipvs.RealServer {
	next, ok := c.in.Successors[vip.Unmap()]
	if !ok {
		return reals
	}
	i, found := slices.BinarySearchFunc(c.nodes, next, func(n nodeInfo, name string) int { return strings.Compare(n.name, name) })
	if !found {
		return reals
	}
	addr := c.nodes[i].ip(vip.Is6())
	at := slices.IndexFunc(reals, func(r ipvs.RealServer) bool { return r.Address == addr && r.Port == nodePort })
	if at < 0 || !slices.ContainsFunc(reals, func(r ipvs.RealServer) bool { return r.Weight > 0 && (r.Address != addr || r.Port != nodePort) }) {
		return reals
	}
	out := slices.Clone(reals)
	out[at].Weight = 0
	return out
}

// subsetSize is the pool's nodes per Service under nodeport forwarding;
// 0 means all.
func subsetSize(pool *v1alpha1.IPPool) int {
	if pool == nil {
		return v1alpha1.DefaultNodePortSubsetSize
	}
	return pool.Spec.SubsetSize()
}

// subsetCandidates returns the nodes nodeport subsets of the family are
// chosen from: the eligible nodes with an InternalIP of it, this one
// included, so that every node computes the same subsets.
func (c *computer) subsetCandidates(v6 bool) []rendezvous.Candidate {
	i := 0
	if v6 {
		i = 1
	}
	if c.candidates[i] == nil {
		c.candidates[i] = []rendezvous.Candidate{}
		for _, n := range c.nodes {
			if n.eligible && n.ip(v6).IsValid() {
				c.candidates[i] = append(c.candidates[i], rendezvous.Candidate{Name: n.name, Hash: rendezvous.NodeHash(n.name)})
			}
		}
	}
	return c.candidates[i]
}

// podReals returns the endpoints of one Service port.
func (c *computer) podReals(key string, p v1.ServicePort, v6, local bool) []ipvs.RealServer {
	// Sized for every endpoint at once: the lists are kept (100,000 real
	// servers at 10,000 Services), and grown by appends they held a third
	// more than they used, besides the garbage of growing.
	n := 0
	for _, s := range c.slices[key] {
		if !local {
			n += len(s.Endpoints)
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.NodeName != nil && *ep.NodeName == c.node {
				n++
			}
		}
	}
	if n == 0 {
		return nil
	}
	out := make([]ipvs.RealServer, 0, n)
	for _, s := range c.slices[key] {
		if !nodeview.InFamily(s, familyOf(v6)) {
			continue
		}
		port, ok := targetPort(s, p)
		if !ok {
			continue
		}
		for _, ep := range s.Endpoints {
			w, ok := nodeview.Weight(ep)
			if !ok || len(ep.Addresses) == 0 {
				continue
			}
			if local && (ep.NodeName == nil || *ep.NodeName != c.node) {
				continue
			}
			a, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || a.Unmap().Is6() != v6 {
				continue
			}
			out = append(out, ipvs.RealServer{Address: a.Unmap(), Port: port, Weight: w})
		}
	}
	if len(out) == 0 {
		return nil // not an empty list that keeps its capacity
	}
	return dedupe(out)
}

// targetPort returns the port a slice resolved for the Service port: the
// slice port of the same name and protocol. A slice that lists no ports at
// all (managed by hand) gets a numeric targetPort as is; a named one that a
// slice does not resolve is not forwarded to that slice's endpoints.
func targetPort(s *discoveryv1.EndpointSlice, p v1.ServicePort) (uint16, bool) {
	want := p.Protocol
	if want == "" {
		want = v1.ProtocolTCP
	}
	for _, sp := range s.Ports {
		name, proto := "", v1.ProtocolTCP
		if sp.Name != nil {
			name = *sp.Name
		}
		if sp.Protocol != nil {
			proto = *sp.Protocol
		}
		if name == p.Name && proto == want && sp.Port != nil && *sp.Port > 0 && *sp.Port < 65536 {
			return uint16(*sp.Port), true
		}
	}
	if len(s.Ports) > 0 || p.TargetPort.Type == intstr.String {
		return 0, false
	}
	if tp := p.TargetPort.IntValue(); tp > 0 && tp < 65536 {
		return uint16(tp), true
	}
	return uint16(p.Port), true
}

// dedupe sorts reals and keeps one per address and port, the highest
// weight: an endpoint may sit in two slices while it moves between them.
func dedupe(rs []ipvs.RealServer) []ipvs.RealServer {
	slices.SortFunc(rs, func(a, b ipvs.RealServer) int {
		if c := ipvs.CompareReal(a, b); c != 0 {
			return c
		}
		return b.Weight - a.Weight
	})
	return slices.CompactFunc(rs, func(a, b ipvs.RealServer) bool { return a.AddrPort() == b.AddrPort() })
}

// infoOf reduces n to what forwarding needs, through nodeview: only
// addresses other nodes can send to become NodePort real servers.
func infoOf(n *v1.Node) (nodeInfo, vrrp.Node) {
	view, _ := nodeview.Of(n) // the speaker tells the user about ignored ones
	_, excluded := view.Labels[vrrp.ExcludeLabel]
	ni := nodeInfo{
		name:   view.Name,
		member: !excluded,
		ip4:    view.InternalIP(allocator.IPv4),
		ip6:    view.InternalIP(allocator.IPv6),
	}
	ni.eligible = ni.member && view.Ready
	return ni, view
}

func protocol(p v1.Protocol) (string, bool) {
	switch p {
	case v1.ProtocolTCP, "":
		return ipvs.TCP, true
	case v1.ProtocolUDP:
		return ipvs.UDP, true
	case v1.ProtocolSCTP:
		return ipvs.SCTP, true
	}
	return "", false
}

func portName(p v1.ServicePort) string {
	if p.Name != "" {
		return p.Name
	}
	return fmt.Sprint(p.Port)
}

func familyOf(v6 bool) allocator.Family {
	if v6 {
		return allocator.IPv6
	}
	return allocator.IPv4
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}
