package dataplane

import (
	"maps"
	"net/netip"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// nodePortWeights returns the weights of vip:80's NodePort real servers
// (port 30080) on node, by address.
func nodePortWeights(t *testing.T, st State, vip string) map[netip.Addr]int {
	t.Helper()
	e, ok := st.IPVS[ipvs.Key{Address: addr(vip), Protocol: "TCP", Port: 80}]
	if !ok {
		t.Fatalf("no virtual server for %s", vip)
	}
	out := map[netip.Addr]int{}
	for _, r := range e.Reals {
		if r.Port == 30080 {
			out[r.Address] = r.Weight
		}
	}
	return out
}

// TestNodePortSuccessor: with Inputs.Successors (--conn-sync), a Cluster
// Service's nodeport forwarding sends no new connection to the NodePort
// of the node that would take the VIP from this one (weight 0, kept for
// the connections already there), per family; without, or for a Local
// Service, every NodePort takes new ones; and when the successor's
// NodePort is all there is, it takes them too.
func TestNodePortSuccessor(t *testing.T) {
	in := cluster(v1alpha1.ForwardingNodePort)
	in.Slices = webSlices()
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1", "2001:db8::1"})}
	st, _ := Desired(in, "n1")
	all := map[netip.Addr]int{addr("10.0.0.2"): 1, addr("10.0.0.3"): 1}
	if got := nodePortWeights(t, st, "192.0.2.1"); !maps.Equal(got, all) {
		t.Errorf("without successors: %v, want %v", got, all)
	}

	in.Successors = map[netip.Addr]string{addr("192.0.2.1"): "n2", addr("2001:db8::1"): "n3"}
	st, _ = Desired(in, "n1")
	if got, want := nodePortWeights(t, st, "192.0.2.1"), map[netip.Addr]int{addr("10.0.0.2"): 0, addr("10.0.0.3"): 1}; !maps.Equal(got, want) {
		t.Errorf("successor n2: %v, want %v", got, want)
	}
	if got, want := nodePortWeights(t, st, "2001:db8::1"), map[netip.Addr]int{addr("fd00::2"): 1, addr("fd00::3"): 0}; !maps.Equal(got, want) {
		t.Errorf("IPv6, successor n3: %v, want %v", got, want)
	}
	// This node's own pods keep their share.
	e := st.IPVS[ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}]
	if !slices.ContainsFunc(e.Reals, func(r ipvs.RealServer) bool { return r.Address == addr("10.1.1.1") && r.Weight > 0 }) {
		t.Errorf("n1's own pod lost its share: %v", e.Reals)
	}

	in.Services = []*v1.Service{service("web", []string{"192.0.2.1", "2001:db8::1"}, local)}
	st, _ = Desired(in, "n1")
	succ := in.Successors
	in.Successors = nil
	without, _ := Desired(in, "n1")
	in.Successors = succ
	if got, want := nodePortWeights(t, st, "192.0.2.1"), nodePortWeights(t, without, "192.0.2.1"); !maps.Equal(got, want) || got[addr("10.0.0.2")] == 0 {
		t.Errorf("Local with successors: %v, want as without %v (n2 with its ready endpoint)", got, want)
	}

	// n1 has no pod, and n2 is the only other node: its NodePort is all
	// n1 can forward to.
	in = cluster(v1alpha1.ForwardingNodePort)
	in.Nodes = in.Nodes[:2]
	in.Slices = []*discoveryv1.EndpointSlice{slice("web", "web-4", discoveryv1.AddressTypeIPv4, httpPort(8080), ep{"10.1.2.1", "n2", "ready"})}
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1"})}
	in.Successors = map[netip.Addr]string{addr("192.0.2.1"): "n2"}
	st, _ = Desired(in, "n1")
	if got, want := nodePortWeights(t, st, "192.0.2.1"), map[netip.Addr]int{addr("10.0.0.2"): 1}; !maps.Equal(got, want) {
		t.Errorf("the successor's NodePort alone: %v, want %v", got, want)
	}
}

// TestCacheFollowsSuccessors: a Cache recomputes a Service whose VIP's
// successor changed though nothing else did, and Update applies the
// successors it is given.
func TestCacheFollowsSuccessors(t *testing.T) {
	in := versioned(func() Inputs {
		in := cluster(v1alpha1.ForwardingNodePort)
		in.Slices = webSlices()
		in.Services = []*v1.Service{service("web", []string{"192.0.2.1"})}
		return in
	}())
	var ca Cache
	ca.Compute(in, "n1")
	in.Successors = map[netip.Addr]string{addr("192.0.2.1"): "n3"}
	st, _, _ := ca.Compute(in, "n1")
	if got := nodePortWeights(t, st, "192.0.2.1")[addr("10.0.0.3")]; got != 0 {
		t.Errorf("after the successor became n3, its NodePort's weight is %d, want 0", got)
	}
	st, _, _, ok := ca.Update(map[string]ServiceInputs{"ns/web": {Service: in.Services[0], Slices: in.Slices}}, map[netip.Addr]string{addr("192.0.2.1"): "n2"})
	if !ok {
		t.Fatal("Update after Compute refused")
	}
	if got, want := nodePortWeights(t, st, "192.0.2.1"), map[netip.Addr]int{addr("10.0.0.2"): 0, addr("10.0.0.3"): 1}; !maps.Equal(got, want) {
		t.Errorf("Update with successor n2: %v, want %v", got, want)
	}
}
