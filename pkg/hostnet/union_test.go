package hostnet

import (
	"net/netip"
	"slices"
	"testing"
)

// TestLinkUnion: the union of interrupted reads has every link and prefix
// any read had, each once, in the order first seen, and a default route
// any read saw; also at a link's 10,000 VIPs read ten times over, the
// size at which a search of the list per prefix took seconds under TCG.
func TestLinkUnion(t *testing.T) {
	p := netip.MustParsePrefix
	var u linkUnion
	u.add([]Link{
		{Name: "eth0", Prefixes: []netip.Prefix{p("192.0.2.1/24"), p("192.0.2.10/32")}},
		{Name: "lo", Prefixes: []netip.Prefix{p("127.0.0.1/8")}},
	})
	u.add([]Link{
		{Name: "eth0", Prefixes: []netip.Prefix{p("192.0.2.10/32"), p("2001:db8::1/64")}, DefaultRoute4: true},
		{Name: "vrrp0", Prefixes: []netip.Prefix{p("198.51.100.1/32")}, DefaultRoute6: true},
	})
	u.add([]Link{{Name: "eth0", Prefixes: []netip.Prefix{p("192.0.2.1/24"), p("192.0.2.11/32")}}})
	want := []Link{
		{Name: "eth0", Prefixes: []netip.Prefix{p("192.0.2.1/24"), p("192.0.2.10/32"), p("2001:db8::1/64"), p("192.0.2.11/32")}, DefaultRoute4: true},
		{Name: "lo", Prefixes: []netip.Prefix{p("127.0.0.1/8")}},
		{Name: "vrrp0", Prefixes: []netip.Prefix{p("198.51.100.1/32")}, DefaultRoute6: true},
	}
	if !slices.EqualFunc(u.links, want, func(a, b Link) bool {
		return a.Name == b.Name && slices.Equal(a.Prefixes, b.Prefixes) && a.DefaultRoute4 == b.DefaultRoute4 && a.DefaultRoute6 == b.DefaultRoute6
	}) {
		t.Errorf("union:\n got %+v\nwant %+v", u.links, want)
	}

	// Ten reads of 10,000 VIPs each, shifted by 1,000: 19,000 distinct.
	var big linkUnion
	for r := range 10 {
		l := Link{Name: "eth0"}
		for i := range 10000 {
			n := r*1000 + i
			l.Prefixes = append(l.Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}), 32))
		}
		big.add([]Link{l})
	}
	got := big.links[0].Prefixes
	if len(got) != 19000 || len(slices.Compact(slices.SortedFunc(slices.Values(got), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) }))) != 19000 {
		t.Errorf("%d prefixes in the union of the big reads; want 19000, each once", len(got))
	}
	if got[0].String() != "10.0.0.0/32" {
		t.Errorf("the union starts with %s; want the first read's first, 10.0.0.0/32", got[0])
	}
}
