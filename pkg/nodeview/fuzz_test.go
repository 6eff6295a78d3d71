package nodeview

import (
	"testing"

	v1 "k8s.io/api/core/v1"
)

// FuzzOf: whatever a kubelet writes into status.addresses, the node view
// keeps only plain global unicast addresses (no zone, no IPv4-mapped form),
// and every InternalIP is either kept or reported, never both or neither.
func FuzzOf(f *testing.F) {
	for _, s := range []string{"10.0.0.1", "2001:db8::1", "fe80::1%eth0", "2001:db8::1%eth0", "::ffff:10.0.0.1", "127.0.0.1", "0.0.0.0", "ff02::1", "10.0.0.1 } ; flush ruleset", "", "::", "255.255.255.255"} {
		f.Add(s, "10.0.0.2")
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		n := &v1.Node{Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
			{Type: v1.NodeInternalIP, Address: a},
			{Type: v1.NodeExternalIP, Address: a},
			{Type: v1.NodeInternalIP, Address: b},
		}}}
		vn, ignored := Of(n)
		if len(vn.InternalIPs)+len(ignored) != 2 {
			t.Fatalf("%q, %q: %d kept and %d ignored of 2 InternalIPs", a, b, len(vn.InternalIPs), len(ignored))
		}
		for _, ip := range vn.InternalIPs {
			if ip.Zone() != "" || ip.Is4In6() || !ip.IsGlobalUnicast() || ip.IsLinkLocalUnicast() {
				t.Fatalf("%q, %q: kept %s", a, b, ip)
			}
		}
		for _, ig := range ignored {
			if ig.Reason == "" || ig.Field == "" {
				t.Fatalf("%q, %q: ignored without a reason or field: %+v", a, b, ig)
			}
		}
	})
}
