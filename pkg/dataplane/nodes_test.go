package dataplane

import (
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
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
		if a := s.Real.Addr(); a.Zone() != "" || !a.IsGlobalUnicast() || a.Is4In6() {
			t.Errorf("masquerading entry %s has a real server no node can send to", s)
		}
	}
}
