package dataplane

import (
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// TestNodeAddressesFromKubelet checks that InternalIPs no other node can
// send to (kubelets write them unvalidated) never become NodePort real
// servers or masquerading entries: a zoned address would reach nft's
// script text (see package nft) and garbage has no place there either.
func TestNodeAddressesFromKubelet(t *testing.T) {
	in := cluster(v1alpha1.ForwardingNodePort)
	in.Nodes = append(in.Nodes,
		node("linklocal", true, "fe80::1%eth0"),
		node("zoned", true, "2001:db8:9::1%eth0"),
		node("garbage", true, "10.0.0.1 } ; flush ruleset"),
		node("loopback", true, "127.0.0.1", "::1"),
		node("mapped", true, "::ffff:10.0.0.7"),
	)
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1", "2001:db8::1"})}
	st, _ := Desired(in, "n1")
	want := table(
		entry(vs("192.0.2.1", "TCP", 80, "rr"), rs("10.0.0.2", 30080, 1), rs("10.0.0.3", 30080, 1), rs("10.0.0.7", 30080, 1)),
		entry(vs("2001:db8::1", "TCP", 80, "rr"), rs("fd00::2", 30080, 1), rs("fd00::3", 30080, 1)),
	)
	if !st.IPVS.Equal(want) {
		t.Errorf("IPVS table\n%s\nwant\n%s", st.IPVS, want)
	}
	for _, s := range st.SNAT {
		for _, r := range s.Reals {
			if a := r.Addr(); a.Zone() != "" || !a.IsGlobalUnicast() || a.Is4In6() {
				t.Errorf("masquerading entry %s has a real server no node can send to: %s", s, r)
			}
		}
	}
}

// TestFailStaticNodePorts checks that the dataplane follows the plan's
// fail-static rule: with more than half of the nodes NotReady, every
// node's NodePort stays a real server, rather than none.
func TestFailStaticNodePorts(t *testing.T) {
	all := []ipvs.RealServer{rs("10.0.0.2", 30080, 1), rs("10.0.0.3", 30080, 1), rs("10.0.0.9", 30080, 1)}
	for _, tc := range []struct {
		name     string
		notReady []string
		want     []ipvs.RealServer
	}{
		// cluster has "down" NotReady: 1 of 4.
		{"one of four NotReady", nil, all[:2]},
		{"two of four NotReady", []string{"n3"}, all[:1]},
		{"three of four NotReady", []string{"n2", "n3"}, all},
		{"every node NotReady", []string{"n1", "n2", "n3"}, all},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := cluster(v1alpha1.ForwardingNodePort)
			for _, n := range in.Nodes {
				if slices.Contains(tc.notReady, n.Name) {
					n.Status.Conditions[0].Status = v1.ConditionUnknown
				}
			}
			// An excluded NotReady node neither serves nor counts.
			ex := node("excluded", false, "10.0.0.10")
			ex.Labels = map[string]string{"node.kubernetes.io/exclude-from-external-load-balancers": ""}
			in.Nodes = append(in.Nodes, ex)
			in.Services = []*v1.Service{service("web", []string{"192.0.2.1"})}
			st, _ := Desired(in, "n1")
			want := table(entry(vs("192.0.2.1", "TCP", 80, "rr"), tc.want...))
			if !st.IPVS.Equal(want) {
				t.Errorf("IPVS table\n%s\nwant\n%s", st.IPVS, want)
			}
		})
	}
}
