package allocator

import (
	"net/netip"
	"slices"
	"testing"
)

// TestHolders checks that Holders names the Services an address is
// allocated to, whichever way the address is written, and no Service that
// only lists it in its status.
func TestHolders(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	x := mustAssign(t, a, req("ns/x", withShare("k", 80)))
	mustAssign(t, a, req("ns/a", withShare("k", 443)))
	a.SetStatus("other/f", ips("192.0.2.3"))
	for _, s := range []string{x.Addrs[0].String(), "::ffff:" + x.Addrs[0].String()} {
		if got := a.Holders(netip.MustParseAddr(s)); !slices.Equal(got, []string{"ns/a", "ns/x"}) {
			t.Errorf("Holders(%s) = %v, want [ns/a ns/x]", s, got)
		}
	}
	if got := a.Holders(netip.MustParseAddr("192.0.2.3")); got != nil {
		t.Errorf("Holders of an address only listed in a status = %v, want none", got)
	}
}
