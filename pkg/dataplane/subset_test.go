package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// bigCluster is n Ready nodes node-000… with 10.1.x.y addresses and one
// nodeport pool, whose subset size is size (nil: the default).
func bigCluster(n int, size *int32) Inputs {
	in := Inputs{Class: class, DefaultClass: true}
	for i := range n {
		in.Nodes = append(in.Nodes, node(fmt.Sprintf("node-%03d", i), true, fmt.Sprintf("10.1.%d.%d", i/250, i%250+1)))
	}
	p := pool("p", v1alpha1.ForwardingNodePort, "192.0.2.0/24")
	p.Spec.NodePortSubsetSize = size
	in.Pools = []*v1alpha1.IPPool{p}
	return in
}

// nodePortTargets returns the NodePort real servers of vip's port 80 on
// node: the nodes it forwards to, by address.
func nodePortTargets(t *testing.T, in Inputs, node, vip string) []netip.Addr {
	t.Helper()
	st, problems := Desired(in, node)
	if len(problems) > 0 {
		t.Fatalf("problems: %v", problems)
	}
	e, ok := st.IPVS[ipvs.Key{Address: addr(vip), Protocol: "TCP", Port: 80}]
	if !ok {
		t.Fatalf("no virtual server for %s on %s", vip, node)
	}
	var out []netip.Addr
	for _, r := range e.Reals {
		if r.Port == 30080 {
			out = append(out, r.Address)
		}
	}
	return out
}

// TestNodePortSubsets: with 40 nodes, each Service is forwarded to the
// NodePorts of 16 of them (its subset, this node's own share going to its
// own pods when it is in the subset), every node computes the same subset,
// two Services get different subsets, and size 0 means every node.
func TestNodePortSubsets(t *testing.T) {
	in := bigCluster(40, nil)
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1"}), service("api", []string{"192.0.2.2"})}
	subsetOf := func(vip string) []netip.Addr {
		// From a node that is not in the subset, every member is a real
		// server; from one that is, every member but itself.
		var union []netip.Addr
		for _, n := range []string{"node-000", "node-013", "node-027", "node-039"} {
			for _, a := range nodePortTargets(t, in, n, vip) {
				if !slices.Contains(union, a) {
					union = append(union, a)
				}
			}
		}
		return union
	}
	web := subsetOf("192.0.2.1")
	if len(web) != v1alpha1.DefaultNodePortSubsetSize {
		t.Fatalf("web forwarded to %d nodes, want %d: %v", len(web), v1alpha1.DefaultNodePortSubsetSize, web)
	}
	for _, n := range []string{"node-000", "node-013", "node-027", "node-039"} {
		got := nodePortTargets(t, in, n, "192.0.2.1")
		self := addr(in.Nodes[slices.IndexFunc(in.Nodes, func(x *v1.Node) bool { return x.Name == n })].Status.Addresses[0].Address)
		want := slices.DeleteFunc(slices.Clone(web), func(a netip.Addr) bool { return a == self })
		slices.SortFunc(got, netip.Addr.Compare)
		slices.SortFunc(want, netip.Addr.Compare)
		if !slices.Equal(got, want) {
			t.Errorf("%s forwards web to %v, want the subset without itself %v", n, got, want)
		}
	}
	if api := subsetOf("192.0.2.2"); slices.Equal(api, web) {
		t.Errorf("web and api have the same subset %v", web)
	}

	in.Pools[0].Spec.NodePortSubsetSize = ptr[int32](0)
	if got := nodePortTargets(t, in, "node-000", "192.0.2.1"); len(got) != 39 {
		t.Errorf("subset size 0: %d NodePorts, want the 39 other nodes", len(got))
	}
	in.Pools[0].Spec.NodePortSubsetSize = ptr[int32](3)
	if got := nodePortTargets(t, in, "node-000", "192.0.2.1"); len(got) < 2 || len(got) > 3 {
		t.Errorf("subset size 3: %d NodePorts, want 3 (2 if node-000 is in it)", len(got))
	}
}

// TestNodePortSubsetStableWhenANodeLeaves: a node going NotReady changes
// only the subsets it was in, each by exactly one replacement.
func TestNodePortSubsetStableWhenANodeLeaves(t *testing.T) {
	in := bigCluster(60, nil)
	for i := range 50 {
		in.Services = append(in.Services, service(fmt.Sprintf("svc-%d", i), []string{fmt.Sprintf("192.0.2.%d", i+1)}))
	}
	// Each node forwards to the subset but itself: seen from two nodes,
	// the union is the whole subset.
	subsetOf := func(vip string) []netip.Addr {
		out := nodePortTargets(t, in, "node-058", vip)
		for _, a := range nodePortTargets(t, in, "node-059", vip) {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
		slices.SortFunc(out, netip.Addr.Compare)
		return out
	}
	before := map[string][]netip.Addr{}
	for i := range 50 {
		before[fmt.Sprint(i)] = subsetOf(fmt.Sprintf("192.0.2.%d", i+1))
	}
	leaving := in.Nodes[7]
	leaving.Status.Conditions[0].Status = v1.ConditionFalse
	gone := addr(leaving.Status.Addresses[0].Address)
	changed := 0
	for i := range 50 {
		after := subsetOf(fmt.Sprintf("192.0.2.%d", i+1))
		old := before[fmt.Sprint(i)]
		if !slices.Contains(old, gone) {
			if !slices.Equal(after, old) {
				t.Errorf("svc-%d did not include %s but its NodePorts changed: %v → %v", i, leaving.Name, old, after)
			}
			continue
		}
		changed++
		var lost, added []netip.Addr
		for _, a := range old {
			if !slices.Contains(after, a) {
				lost = append(lost, a)
			}
		}
		for _, a := range after {
			if !slices.Contains(old, a) {
				added = append(added, a)
			}
		}
		if !slices.Equal(lost, []netip.Addr{gone}) || len(added) != 1 {
			t.Errorf("svc-%d: lost %v and gained %v, want only %s replaced by one node", i, lost, added, gone)
		}
	}
	if changed == 0 {
		t.Errorf("%s was in no subset of 50 Services: the test proves nothing", leaving.Name)
	}
}

// TestNodePortSubsetLeavesLocalAlone: with externalTrafficPolicy Local the
// real servers are the nodes with endpoints, however many: subsetting them
// would drop pods from service.
func TestNodePortSubsetLeavesLocalAlone(t *testing.T) {
	in := bigCluster(40, ptr[int32](2))
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1"}, local)}
	var eps []ep
	for i := range 20 {
		eps = append(eps, ep{fmt.Sprintf("10.244.%d.5", i), fmt.Sprintf("node-%03d", i+10), "ready"})
	}
	in.Slices = []*discoveryv1.EndpointSlice{slice("web", "web-1", discoveryv1.AddressTypeIPv4, httpPort(8080), eps...)}
	if got := nodePortTargets(t, in, "node-000", "192.0.2.1"); len(got) != 20 {
		t.Errorf("Local with 20 nodes having endpoints, subset size 2: %d NodePorts, want 20", len(got))
	}
}
