package nft_test

import (
	"context"
	"errors"
	"flag"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func key(proto, addrPort string) ipvs.Key {
	ap := netip.MustParseAddrPort(addrPort)
	return ipvs.Key{Address: ap.Addr(), Protocol: proto, Port: ap.Port()}
}

func snat(v ipvs.Key, reals ...string) []nft.SNAT {
	var out []nft.SNAT
	for _, r := range reals {
		out = append(out, nft.SNAT{Virtual: v, Reals: []netip.AddrPort{netip.MustParseAddrPort(r)}})
	}
	return out
}

func prefixes(ss ...string) []netip.Prefix {
	out := []netip.Prefix{}
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

var (
	web4  = key(ipvs.TCP, "192.0.2.10:80")
	dns4  = key(ipvs.UDP, "192.0.2.10:53")
	sctp4 = key(ipvs.SCTP, "192.0.2.11:3868")
	ssh4  = key(ipvs.TCP, "192.0.2.12:22")
	web6  = key(ipvs.TCP, "[2001:db8::10]:443")
)

// dualStack has both families, all protocols, nested and foreign-family
// ranges, and a virtual server whose ranges admit none of its family.
func dualStack() nft.Rules {
	return nft.Rules{
		SNAT: slices.Concat(
			snat(web4, "10.0.0.1:30080", "10.0.0.2:30080"),
			snat(dns4, "10.0.0.1:30053"),
			snat(sctp4, "10.244.1.5:3868"),
			snat(web6, "[fd00::1]:30443", "[fd00::2]:30443"),
		),
		SourceRanges: map[ipvs.Key][]netip.Prefix{
			web4: prefixes("198.51.100.0/24", "10.1.0.0/16", "10.0.0.0/8", "2001:db8:1::/48"),
			ssh4: prefixes("2001:db8:1::/48"),
			web6: prefixes("2001:db8:1::/48", "2001:db8:2::/48", "203.0.113.0/24"),
		},
		Guard: nft.Guard{
			VIPs:  addrs("192.0.2.10", "192.0.2.11", "192.0.2.12", "2001:db8::10"),
			Ports: []ipvs.Key{dns4, web4, sctp4, ssh4, web6},
			Echo:  addrs("192.0.2.10", "2001:db8::10"),
		},
	}
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

var goldenCases = []struct {
	name string
	in   nft.Rules
}{
	{"empty", nft.Rules{}},
	{"ipv4-snat", nft.Rules{SNAT: snat(web4, "10.0.0.1:30080", "10.0.0.2:30080")}},
	{"ipv6-source-ranges", nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{web6: prefixes("2001:db8:1::/48")}}},
	{"guard", nft.Rules{Guard: nft.Guard{VIPs: addrs("192.0.2.10", "2001:db8::10"), Ports: []ipvs.Key{web4, web6}, Echo: addrs("2001:db8::10")}}},
	{"dualstack", dualStack()},
	{"sync-guard", nft.Rules{Sync: nft.SyncGuard{
		Ports: []uint16{8849, 8848, 8848},
		Peers: addrs("192.0.2.3", "::ffff:192.0.2.2", "2001:db8::3", "192.0.2.3"),
	}}},
	{"follow-vip", nft.Rules{
		FollowVIP: true,
		SNAT:      snat(web4, "10.0.0.1:8080", "10.0.0.2:8080"),
		Whole:     []ipvs.Key{web4},
		Guard:     nft.Guard{VIPs: addrs("192.0.2.10", "2001:db8::10"), Ports: []ipvs.Key{web4, web6}},
	}},
	// Whole does nothing without FollowVIP.
	{"ipv4-snat-whole", nft.Rules{SNAT: snat(web4, "10.0.0.1:30080", "10.0.0.2:30080"), Whole: []ipvs.Key{web4}}},
}

func sync(t *testing.T, fake *knftables.Fake, in nft.Rules) {
	t.Helper()
	if err := write(context.Background(), fake, in); err != nil {
		t.Fatalf("Sync: %v", err)
	}
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(nft.Family, nft.Table)
			sync(t, fake, tc.in)
			got := fake.Dump()
			path := filepath.Join("testdata", tc.name+".nft")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("dump differs from %s (run with -update to accept):\n got:\n%s\nwant:\n%s", path, got, want)
			}
		})
	}
}

func TestSyncIsIdempotent(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(nft.Family, nft.Table)
			sync(t, fake, tc.in)
			first := fake.Dump()
			sync(t, fake, tc.in)
			if second := fake.Dump(); second != first {
				t.Errorf("second sync changed the table:\nfirst:\n%s\nsecond:\n%s", first, second)
			}
		})
	}
}

// TestSyncRewrites checks that a sync leaves nothing of the previous one:
// syncing A, then B, then A again gives what syncing A alone gives.
func TestSyncRewrites(t *testing.T) {
	a, b := dualStack(), nft.Rules{SNAT: snat(key(ipvs.TCP, "192.0.2.99:8080"), "10.9.9.9:31000")}
	alone := knftables.NewFake(nft.Family, nft.Table)
	sync(t, alone, a)

	fake := knftables.NewFake(nft.Family, nft.Table)
	sync(t, fake, a)
	sync(t, fake, b)
	if strings.Contains(fake.Dump(), "192.0.2.10") {
		t.Errorf("after syncing B, A's elements remain:\n%s", fake.Dump())
	}
	sync(t, fake, a)
	if got, want := fake.Dump(), alone.Dump(); got != want {
		t.Errorf("A, B, A differs from A:\n got:\n%s\nwant:\n%s", got, want)
	}
}

// TestInputOrderIrrelevant checks that shuffled, duplicated input gives
// the same table.
func TestInputOrderIrrelevant(t *testing.T) {
	in := dualStack()
	want := knftables.NewFake(nft.Family, nft.Table)
	sync(t, want, in)

	shuffled := slices.Clone(in.SNAT)
	slices.Reverse(shuffled)
	shuffled = append(shuffled, in.SNAT[0], in.SNAT[3])
	ranges := map[ipvs.Key][]netip.Prefix{}
	for k, ps := range in.SourceRanges {
		ps = slices.Clone(ps)
		slices.Reverse(ps)
		ranges[k] = append(ps, ps...)
	}
	rev := func(as []netip.Addr) []netip.Addr {
		as = slices.Clone(as)
		slices.Reverse(as)
		return append(as, as...)
	}
	ports := slices.Clone(in.Guard.Ports)
	slices.Reverse(ports)
	guard := nft.Guard{VIPs: rev(in.Guard.VIPs), Echo: rev(in.Guard.Echo), Ports: append(ports, ports[0])}
	got := knftables.NewFake(nft.Family, nft.Table)
	sync(t, got, nft.Rules{SNAT: shuffled, SourceRanges: ranges, Guard: guard})
	if got.Dump() != want.Dump() {
		t.Errorf("shuffled input gives another table:\n got:\n%s\nwant:\n%s", got.Dump(), want.Dump())
	}
}

// TestEmpty documents the choice: without input the table, its chains and
// rules stay, and every set is empty.
func TestEmpty(t *testing.T) {
	fake := knftables.NewFake(nft.Family, nft.Table)
	sync(t, fake, nft.Rules{})
	if fake.Table == nil {
		t.Fatal("no table after syncing empty input")
	}
	want := []string{nft.ChainSNAT, nft.ChainSourceRanges, nft.ChainGuard, nft.ChainGuard + "-v4", nft.ChainGuard + "-v6", nft.ChainSync, nft.ChainTransit}
	if got := slices.Sorted(maps.Keys(fake.Table.Chains)); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
		t.Errorf("chains = %v, want %v", got, want)
	}
	for name, n := range map[string]int{nft.ChainSNAT: 6, nft.ChainSourceRanges: 2, nft.ChainGuard: 2, nft.ChainGuard + "-v4": 6, nft.ChainGuard + "-v6": 6, nft.ChainSync: 2, nft.ChainTransit: 4} {
		if ch := fake.Table.Chains[name]; ch == nil || len(ch.Rules) != n {
			t.Errorf("chain %s: want %d rules", name, n)
		}
	}
	if len(fake.Table.Sets) != 21 {
		t.Errorf("%d sets, want 21", len(fake.Table.Sets))
	}
	for name, s := range fake.Table.Sets {
		if len(s.Elements) != 0 {
			t.Errorf("set %s has elements %v", name, s.Elements)
		}
	}
	if fake.Table.Counters[nft.CounterGuard] == nil {
		t.Errorf("no counter %s", nft.CounterGuard)
	}
}

// TestFilteredWithoutRanges: a virtual server listed with no range of its
// family is filtered, and admits nobody; one not listed is open.
func TestFilteredWithoutRanges(t *testing.T) {
	fake := knftables.NewFake(nft.Family, nft.Table)
	sync(t, fake, nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{web4: {}, web6: nil, ssh4: prefixes("::/0")}})
	if got, want := elements(t, fake, "filtered-v4"), []string{"192.0.2.10 . tcp . 80", "192.0.2.12 . tcp . 22"}; !slices.Equal(got, want) {
		t.Errorf("filtered-v4 = %q, want %q", got, want)
	}
	if got, want := elements(t, fake, "filtered-v6"), []string{"2001:db8::10 . tcp . 443"}; !slices.Equal(got, want) {
		t.Errorf("filtered-v6 = %q, want %q", got, want)
	}
	for _, set := range []string{"allowed-v4", "allowed-v6"} {
		if got := elements(t, fake, set); len(got) != 0 {
			t.Errorf("%s = %q, want none", set, got)
		}
	}
}

// elements returns a set's elements as "a . b . c" strings.
func elements(t *testing.T, fake *knftables.Fake, set string) []string {
	t.Helper()
	s := fake.Table.Sets[set]
	if s == nil {
		t.Fatalf("no set %s", set)
	}
	out := []string{}
	for _, e := range s.Elements {
		out = append(out, strings.Join(e.Key, " . "))
	}
	return out
}

func TestElements(t *testing.T) {
	fake := knftables.NewFake(nft.Family, nft.Table)
	sync(t, fake, dualStack())
	for _, tc := range []struct {
		set  string
		want []string
	}{
		{"snat-v4", []string{
			"192.0.2.10 . tcp . 80 . 10.0.0.1 . 30080",
			"192.0.2.10 . tcp . 80 . 10.0.0.2 . 30080",
			"192.0.2.10 . udp . 53 . 10.0.0.1 . 30053",
			"192.0.2.11 . sctp . 3868 . 10.244.1.5 . 3868",
		}},
		{"snat-v6", []string{
			"2001:db8::10 . tcp . 443 . fd00::1 . 30443",
			"2001:db8::10 . tcp . 443 . fd00::2 . 30443",
		}},
		// dns4 is not listed: open, so not filtered. ssh4 has only IPv6
		// ranges: filtered, and nothing allowed.
		{"filtered-v4", []string{"192.0.2.10 . tcp . 80", "192.0.2.12 . tcp . 22"}},
		// 10.1.0.0/16 lies in 10.0.0.0/8; the IPv6 range is ignored.
		{"allowed-v4", []string{
			"192.0.2.10 . tcp . 80 . 10.0.0.0/8",
			"192.0.2.10 . tcp . 80 . 198.51.100.0/24",
		}},
		{"filtered-v6", []string{"2001:db8::10 . tcp . 443"}},
		{"allowed-v6", []string{
			"2001:db8::10 . tcp . 443 . 2001:db8:1::/48",
			"2001:db8::10 . tcp . 443 . 2001:db8:2::/48",
		}},
		{"vips-v4", []string{"192.0.2.10", "192.0.2.11", "192.0.2.12"}},
		{"vips-v6", []string{"2001:db8::10"}},
		{"ports-v4", []string{"192.0.2.10 . tcp . 80", "192.0.2.10 . udp . 53", "192.0.2.11 . sctp . 3868", "192.0.2.12 . tcp . 22"}},
		{"ports-v6", []string{"2001:db8::10 . tcp . 443"}},
		{"echo-v4", []string{"192.0.2.10"}},
		{"echo-v6", []string{"2001:db8::10"}},
	} {
		if got := elements(t, fake, tc.set); !slices.Equal(got, tc.want) {
			t.Errorf("%s:\n got %q\nwant %q", tc.set, got, tc.want)
		}
	}
}

func TestSourceRangeNormalization(t *testing.T) {
	vip := key(ipvs.TCP, "192.0.2.10:443")
	for _, tc := range []struct {
		name   string
		ranges []string
		want   []string
	}{
		{"host bits are masked", []string{"10.1.2.3/8"}, []string{"10.0.0.0/8"}},
		{"4in6 becomes IPv4", []string{"::ffff:198.51.100.0/120"}, []string{"198.51.100.0/24"}},
		{"duplicates", []string{"10.0.0.0/8", "10.0.0.0/8"}, []string{"10.0.0.0/8"}},
		{"nested, inner first", []string{"10.1.2.0/24", "10.1.0.0/16", "10.2.0.0/16"}, []string{"10.1.0.0/16", "10.2.0.0/16"}},
		{"all", []string{"10.0.0.0/8", "0.0.0.0/0"}, []string{"0.0.0.0/0"}},
		{"adjacent stay", []string{"10.0.1.0/24", "10.0.0.0/24"}, []string{"10.0.0.0/24", "10.0.1.0/24"}},
		{"other family only", []string{"::/0"}, []string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(nft.Family, nft.Table)
			sync(t, fake, nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{vip: prefixes(tc.ranges...)}})
			if got := elements(t, fake, "filtered-v4"); !slices.Equal(got, []string{"192.0.2.10 . tcp . 443"}) {
				t.Errorf("filtered-v4 = %q", got)
			}
			var want []string
			for _, w := range tc.want {
				want = append(want, "192.0.2.10 . tcp . 443 . "+w)
			}
			if got := elements(t, fake, "allowed-v4"); !slices.Equal(got, want) {
				t.Errorf("allowed-v4:\n got %q\nwant %q", got, want)
			}
		})
	}
}

// TestRules pins the rule text, which the golden files also hold, to the
// matching the package doc argues for.
func TestRules(t *testing.T) {
	fake := knftables.NewFake(nft.Family, nft.Table)
	sync(t, fake, nft.Rules{})
	var got []string
	for _, c := range []string{nft.ChainSNAT, nft.ChainSourceRanges, nft.ChainGuard, nft.ChainGuard + "-v4", nft.ChainGuard + "-v6", nft.ChainTransit} {
		ch := fake.Table.Chains[c]
		if ch.Type != nil {
			got = append(got, string(*ch.Type)+" "+string(*ch.Hook)+" "+string(*ch.Priority))
		} else {
			got = append(got, "regular "+c)
		}
		for _, r := range ch.Rules {
			got = append(got, r.Rule)
		}
	}
	want := []string{
		"nat postrouting srcnat",
		"meta l4proto { tcp, udp, sctp } ct original ip daddr . meta l4proto . ct original proto-dst . ip daddr . th dport @snat-v4 masquerade",
		"meta l4proto { tcp, udp, sctp } ct original ip6 daddr . meta l4proto . ct original proto-dst . ip6 daddr . th dport @snat-v6 masquerade",
		// FollowVIP: to the address the client opened the connection to.
		"meta l4proto { tcp, udp, sctp } ct original ip daddr . meta l4proto . ct original proto-dst . ip daddr . th dport @snat-vip-v4 snat ip to ct original ip daddr",
		"meta l4proto { tcp, udp, sctp } ct original ip6 daddr . meta l4proto . ct original proto-dst . ip6 daddr . th dport @snat-vip-v6 snat ip6 to ct original ip6 daddr",
		"meta l4proto { tcp, udp, sctp } ct original ip daddr . meta l4proto . ct original proto-dst @snat-vip-whole-v4 ip daddr != @vips-v4 snat ip to ct original ip daddr",
		"meta l4proto { tcp, udp, sctp } ct original ip6 daddr . meta l4proto . ct original proto-dst @snat-vip-whole-v6 ip6 daddr != @vips-v6 snat ip6 to ct original ip6 daddr",
		"filter input filter",
		"ip daddr . meta l4proto . th dport @filtered-v4 ip daddr . meta l4proto . th dport . ip saddr != @allowed-v4 counter drop",
		"ip6 daddr . meta l4proto . th dport @filtered-v6 ip6 daddr . meta l4proto . th dport . ip6 saddr != @allowed-v6 counter drop",
		// Before kube-proxy's DNAT (dstnat, -100), so VIP:NodePort is
		// seen as such; after conntrack (-200), for ct state.
		"filter prerouting dstnat - 50",
		"ip daddr @vips-v4 fib daddr type local jump vip-guard-v4",
		"ip6 daddr @vips-v6 fib daddr type local jump vip-guard-v6",
		"regular vip-guard-v4",
		`iifname "lo" accept`,
		"ct state established,related accept",
		"ip daddr . meta l4proto . th dport @ports-v4 accept",
		"icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
		"ip daddr @echo-v4 icmp type echo-request accept",
		`counter name "vip-guard-dropped" drop`,
		"regular vip-guard-v6",
		`iifname "lo" accept`,
		"ct state established,related accept",
		"ip6 daddr . meta l4proto . th dport @ports-v6 accept",
		"icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-neighbor-solicit, nd-neighbor-advert } accept",
		"ip6 daddr @echo-v6 icmpv6 type echo-request accept",
		`counter name "vip-guard-dropped" drop`,
		// Before conntrack (-200) looks the packet up in its zone.
		"filter prerouting raw",
		"ip saddr @transit-v4 fib daddr type != local ct zone set 27500",
		"ip daddr @transit-v4 fib daddr type != local ct zone set 27500",
		"ip6 saddr @transit-v6 fib daddr type != local ct zone set 27500",
		"ip6 daddr @transit-v6 fib daddr type != local ct zone set 27500",
	}
	if !slices.Equal(got, want) {
		t.Errorf("rules:\n got %q\nwant %q", got, want)
	}
}

// foreign fills fake with tables that are not ours, one of them named
// keeplb in another family, and returns their dump.
func foreign(t *testing.T, fake *knftables.Fake) string {
	t.Helper()
	tx := fake.NewTransaction()
	for _, tbl := range []struct {
		family knftables.Family
		name   string
	}{{knftables.InetFamily, "kube-proxy"}, {knftables.IPv4Family, "keeplb"}, {knftables.IPv6Family, "filter"}} {
		tx.Add(&knftables.Table{Family: tbl.family, Name: tbl.name})
		tx.Add(&knftables.Chain{Family: tbl.family, Table: tbl.name, Name: "input",
			Type: knftables.PtrTo(knftables.FilterType), Hook: knftables.PtrTo(knftables.InputHook), Priority: knftables.PtrTo(knftables.FilterPriority)})
		tx.Add(&knftables.Set{Family: tbl.family, Table: tbl.name, Name: "snat-v4", Type: "ipv4_addr"})
		tx.Add(&knftables.Element{Family: tbl.family, Table: tbl.name, Set: "snat-v4", Key: []string{"192.0.2.10"}})
		tx.Add(&knftables.Rule{Family: tbl.family, Table: tbl.name, Chain: "input", Rule: "ip saddr @snat-v4 drop"})
	}
	if err := fake.Run(context.Background(), tx); err != nil {
		t.Fatal(err)
	}
	return fake.Dump()
}

func TestForeignTablesSurvive(t *testing.T) {
	fake := knftables.NewFake("", "") // no default table: holds any
	before := foreign(t, fake)

	sync(t, fake, dualStack())
	sync(t, fake, nft.Rules{})
	var others []string
	for _, l := range strings.SplitAfter(fake.Dump(), "\n") {
		if !strings.Contains(l, " inet keeplb ") && !strings.HasSuffix(l, " inet keeplb\n") {
			others = append(others, l)
		}
	}
	if got := strings.Join(others, ""); got != before {
		t.Errorf("sync changed other tables:\n got:\n%s\nwant:\n%s", got, before)
	}
	if fake.Tables[nft.Family][nft.Table] == nil {
		t.Fatal("sync wrote no inet keeplb table")
	}

	if err := nft.Cleanup(context.Background(), fake); err != nil {
		t.Fatal(err)
	}
	if got := fake.Dump(); got != before {
		t.Errorf("cleanup changed other tables:\n got:\n%s\nwant:\n%s", got, before)
	}
}

func TestCleanup(t *testing.T) {
	fake := knftables.NewFake(nft.Family, nft.Table)
	if err := nft.Cleanup(context.Background(), fake); err != nil {
		t.Fatalf("Cleanup without a table: %v", err)
	}
	sync(t, fake, dualStack())
	if err := nft.Cleanup(context.Background(), fake); err != nil {
		t.Fatal(err)
	}
	if fake.Table != nil || fake.Dump() != "" {
		t.Errorf("table left after Cleanup:\n%s", fake.Dump())
	}
}

// TestInvalidInput checks that an entry the table cannot express is named
// in the error and left out, and that the rest is written all the same:
// one bad entry must not stop the table from following every other
// Service, nor reach nft's script text (a zoned address would be written
// as "fe80::1%eth0", which nft cannot parse).
func TestInvalidInput(t *testing.T) {
	zoned := func(a string) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(a), 30080) }
	for _, tc := range []struct {
		name string
		bad  nft.Rules
		want string
	}{
		{"unknown protocol", nft.Rules{SNAT: snat(key("ICMP", "192.0.2.10:80"), "10.0.0.1:80")}, `unknown protocol "ICMP"`},
		{"mixed families", nft.Rules{SNAT: snat(web4, "[fd00::1]:80")}, "different address families"},
		{"invalid VIP", nft.Rules{SNAT: []nft.SNAT{{Virtual: ipvs.Key{Protocol: ipvs.TCP, Port: 80}, Reals: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:80")}}}}, "invalid VIP"},
		{"zoned VIP", nft.Rules{SNAT: []nft.SNAT{{Virtual: ipvs.Key{Address: netip.MustParseAddr("2001:db8::10%eth0"), Protocol: ipvs.TCP, Port: 443}, Reals: []netip.AddrPort{netip.MustParseAddrPort("[fd00::1]:30443")}}}}, "VIP with a zone"},
		{"invalid real server", nft.Rules{SNAT: []nft.SNAT{{Virtual: web4, Reals: []netip.AddrPort{{}}}}}, "invalid real server"},
		{"link-local real server with a zone", nft.Rules{SNAT: []nft.SNAT{{Virtual: web6, Reals: []netip.AddrPort{zoned("fe80::1%eth0")}}}}, "real server address with a zone"},
		{"global real server with a zone", nft.Rules{SNAT: []nft.SNAT{{Virtual: web6, Reals: []netip.AddrPort{zoned("2001:db8::1%eth0")}}}}, "real server address with a zone"},
		{"real port 0", nft.Rules{SNAT: snat(web4, "10.0.0.1:0")}, "real server port 0"},
		{"VIP port 0", nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{key(ipvs.TCP, "192.0.2.10:0"): prefixes("10.0.0.0/8")}}, "port 0"},
		{"zoned VIP with ranges", nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{{Address: netip.MustParseAddr("fe80::10%eth0"), Protocol: ipvs.TCP, Port: 80}: prefixes("2001:db8::/32")}}, "VIP with a zone"},
		{"zoned guarded VIP", nft.Rules{Guard: nft.Guard{VIPs: addrs("fe80::10%eth0")}}, "guard: VIP fe80::10%eth0 with a zone"},
		{"invalid echo VIP", nft.Rules{Guard: nft.Guard{Echo: []netip.Addr{{}}}}, "guard: invalid echo VIP"},
		{"guarded port 0", nft.Rules{Guard: nft.Guard{Ports: []ipvs.Key{key(ipvs.TCP, "192.0.2.10:0")}}}, "guard: port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := dualStack()
			in.SNAT = append(in.SNAT, tc.bad.SNAT...)
			maps.Copy(in.SourceRanges, tc.bad.SourceRanges)
			in.Guard.VIPs = append(slices.Clone(in.Guard.VIPs), tc.bad.Guard.VIPs...)
			in.Guard.Echo = append(slices.Clone(in.Guard.Echo), tc.bad.Guard.Echo...)
			in.Guard.Ports = append(slices.Clone(in.Guard.Ports), tc.bad.Guard.Ports...)
			fake := knftables.NewFake(nft.Family, nft.Table)
			err := write(context.Background(), fake, in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want one containing %q", err, tc.want)
			}
			want := knftables.NewFake(nft.Family, nft.Table)
			sync(t, want, dualStack())
			if got := fake.Dump(); got != want.Dump() {
				t.Errorf("the table is not the valid entries' alone:\n got:\n%s\nwant:\n%s", got, want.Dump())
			}
			if strings.Contains(fake.Dump(), "%") {
				t.Errorf("a zone reached the table:\n%s", fake.Dump())
			}
		})
	}
}

// TestInvalidSourceRange checks that an invalid source range only narrows
// what its virtual server admits: the valid ranges stay, and with none
// valid it admits no client. It never opens the virtual server.
func TestInvalidSourceRange(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ranges []netip.Prefix
		want   []string
	}{
		{"with a valid range", []netip.Prefix{{}, netip.MustParsePrefix("10.0.0.0/8")}, []string{"192.0.2.10 . tcp . 80 . 10.0.0.0/8"}},
		{"alone", []netip.Prefix{{}}, []string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(nft.Family, nft.Table)
			err := write(context.Background(), fake, nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{web4: tc.ranges}})
			if err == nil || !strings.Contains(err.Error(), "invalid source range") {
				t.Fatalf("error = %v, want one naming the invalid source range", err)
			}
			if got := elements(t, fake, "filtered-v4"); !slices.Equal(got, []string{"192.0.2.10 . tcp . 80"}) {
				t.Errorf("filtered-v4 = %q: the virtual server must stay filtered", got)
			}
			if got := elements(t, fake, "allowed-v4"); !slices.Equal(got, tc.want) {
				t.Errorf("allowed-v4 = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestTransactionNeedsMatchingInterface checks that an Interface made for
// another table cannot be used by mistake.
func TestTransactionNeedsMatchingInterface(t *testing.T) {
	fake := knftables.NewFake(knftables.IPv4Family, "other")
	if err := write(context.Background(), fake, dualStack()); err == nil {
		t.Error("Sync through an Interface for ip other succeeded")
	}
}

// write runs the transaction for in, as dataplane.Reconciler does: the
// entries nft.Transaction leaves out are reported after the rest is
// written.
func write(ctx context.Context, n knftables.Interface, in nft.Rules) error {
	e, invalid := nft.Compute(in)
	if err := nft.Whole(ctx, n, e); err != nil {
		return errors.Join(err, invalid)
	}
	return invalid
}
