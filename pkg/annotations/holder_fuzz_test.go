package annotations

import (
	"net/netip"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
)

// FuzzParseHolders feeds ParseHolders arbitrary annotation values. It
// never records a zoned or IPv4-mapped address or an empty node, and for
// node names Kubernetes allows, Format writes a value that parses back to
// the same holders of the Service's VIPs and formats to itself.
func FuzzParseHolders(f *testing.F) {
	f.Add("node-a", "")
	f.Add("192.0.2.1=node-a,2001:db8::1=node-b", "198.51.100.7")
	f.Add(" ::ffff:192.0.2.1 = node-a , 2001:db8::1=node-b ", "::ffff:198.51.100.7")
	f.Add("192.0.2.1=,nonsense=node-x,fe80::1%eth0=node-y,2001:db8::1=node-b,junk", "fe80::1%eth0")
	f.Fuzz(func(t *testing.T, value, extra string) {
		vips := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
		if a, err := netip.ParseAddr(extra); err == nil && a.Zone() == "" {
			vips = append(vips, a)
		}
		h := ParseHolders(value, vips)
		valid := true
		for addr, node := range h {
			if addr.Zone() != "" || addr.Is4In6() || node == "" || node != strings.TrimSpace(node) {
				t.Fatalf("ParseHolders(%q) recorded %s=%q", value, addr, node)
			}
			valid = valid && len(validation.IsDNS1123Subdomain(node)) == 0
		}
		if !valid {
			return // not a node name: Format need not round-trip it
		}
		s := h.Format(vips)
		back := ParseHolders(s, vips)
		for _, v := range vips {
			if back[v.Unmap()] != h[v.Unmap()] {
				t.Fatalf("ParseHolders(%q) = %v; Format gives %q, which parses to %v", value, h, s, back)
			}
		}
		if again := back.Format(vips); again != s {
			t.Fatalf("Format is not stable: %q, then %q", s, again)
		}
	})
}
