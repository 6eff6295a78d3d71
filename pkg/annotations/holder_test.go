package annotations

import (
	"maps"
	"net/netip"
	"slices"
	"testing"
)

func TestParseHolders(t *testing.T) {
	dual := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	for _, tc := range []struct {
		name, value string
		want        Holders
	}{
		{"empty", "", Holders{}},
		{"a bare name holds every VIP", "node-a", Holders{dual[0]: "node-a", dual[1]: "node-a"}},
		{"entries", "192.0.2.1=node-a,2001:db8::1=node-b", Holders{dual[0]: "node-a", dual[1]: "node-b"}},
		{"spaces and a mapped address", " ::ffff:192.0.2.1 = node-a , 2001:db8::1=node-b ", Holders{dual[0]: "node-a", dual[1]: "node-b"}},
		{"one entry", "2001:db8::1=node-b", Holders{dual[1]: "node-b"}},
		{"bad entries are ignored", "192.0.2.1=,nonsense=node-x,fe80::1%eth0=node-y,2001:db8::1=node-b,junk", Holders{dual[1]: "node-b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ParseHolders(tc.value, dual); !maps.Equal(got, tc.want) {
				t.Errorf("ParseHolders(%q) = %v, want %v", tc.value, got, tc.want)
			}
		})
	}
}

func TestFormatHolders(t *testing.T) {
	v4, v6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	dual := []netip.Addr{v6, v4} // ingress order does not matter
	for _, tc := range []struct {
		name string
		h    Holders
		vips []netip.Addr
		want string
	}{
		{"none", Holders{}, dual, ""},
		{"one node holds every VIP", Holders{v4: "node-a", v6: "node-a"}, dual, "node-a"},
		{"single stack", Holders{v4: "node-a"}, []netip.Addr{v4}, "node-a"},
		{"two nodes", Holders{v4: "node-a", v6: "node-b"}, dual, "192.0.2.1=node-a,2001:db8::1=node-b"},
		{"one VIP unknown", Holders{v6: "node-b"}, dual, "2001:db8::1=node-b"},
		{"a VIP the Service lost is dropped", Holders{v4: "node-a", v6: "node-b"}, []netip.Addr{v6}, "node-b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.h.Format(tc.vips)
			if got != tc.want {
				t.Fatalf("Format = %q, want %q", got, tc.want)
			}
			// What a speaker writes, every speaker reads back the same.
			back := ParseHolders(got, tc.vips)
			for _, v := range tc.vips {
				if back[v] != tc.h[v] {
					t.Errorf("round trip: %s held by %q, want %q", v, back[v], tc.h[v])
				}
			}
		})
	}
	if got := (Holders{v4: "node-a", v6: "node-b"}).Nodes([]netip.Addr{v6, netip.MustParseAddr("192.0.2.9"), v4}); !slices.Equal(got, []string{"node-b", "", "node-a"}) {
		t.Errorf("Nodes = %q", got)
	}
}
