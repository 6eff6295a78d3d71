package nft_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// randomRules draws Rules from a small universe, so that two draws share
// most of their elements and differ in some: both families, every
// protocol, source ranges that nest (a range replaced by one containing
// it, which an interval set only takes once the old one is gone), and,
// with invalid set, entries the table cannot express.
func randomRules(rng *rand.Rand, invalid bool) nft.Rules {
	vips := addrs("192.0.2.1", "192.0.2.2", "192.0.2.3", "2001:db8::1", "2001:db8::2")
	protos := []string{ipvs.TCP, ipvs.UDP, ipvs.SCTP}
	ports := []uint16{80, 443, 53}
	reals := map[bool][]netip.Addr{
		false: addrs("10.0.0.1", "10.0.0.2", "10.0.1.3"),
		true:  addrs("fd00::1", "fd00::2"),
	}
	ranges := prefixes("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "198.51.100.0/24", "198.51.100.128/25", "203.0.113.0/25", "203.0.113.128/25",
		"2001:db8:1::/48", "2001:db8:1:2::/64", "2001:db8:2::/48")
	var virtuals []ipvs.Key
	for _, v := range vips {
		for _, p := range protos {
			for _, port := range ports {
				virtuals = append(virtuals, ipvs.Key{Address: v, Protocol: p, Port: port})
			}
		}
	}
	some := func(n int) bool { return rng.IntN(n) == 0 }

	var in nft.Rules
	for _, v := range virtuals {
		for _, r := range reals[v.Address.Is6()] {
			for _, rport := range []uint16{30080, 8080} {
				if some(3) {
					in.SNAT = append(in.SNAT, nft.SNAT{Virtual: v, Reals: []netip.AddrPort{netip.AddrPortFrom(r, rport)}})
				}
			}
		}
		if some(4) {
			if in.SourceRanges == nil {
				in.SourceRanges = map[ipvs.Key][]netip.Prefix{}
			}
			var rs []netip.Prefix
			for _, p := range ranges {
				if some(3) {
					rs = append(rs, p)
				}
			}
			in.SourceRanges[v] = rs
		}
		if some(2) {
			in.Guard.Ports = append(in.Guard.Ports, v)
		}
		if some(3) {
			in.Whole = append(in.Whole, v)
		}
	}
	for _, v := range vips {
		if !some(5) {
			in.Guard.VIPs = append(in.Guard.VIPs, v)
		}
		if some(2) {
			in.Guard.Echo = append(in.Guard.Echo, v)
		}
	}
	for _, p := range []uint16{8848, 8849} {
		if some(2) {
			in.Sync.Ports = append(in.Sync.Ports, p)
		}
	}
	for _, a := range addrs("10.0.0.1", "10.0.0.2", "::ffff:10.0.0.3", "fd00::1") {
		if some(2) {
			in.Sync.Peers = append(in.Sync.Peers, a)
		}
	}
	// Flipped now and then: every real server changes set, and the
	// transit sets fill or empty.
	in.FollowVIP = some(4)
	if invalid && some(2) {
		zoned := netip.MustParseAddr("fe80::1%eth0")
		in.Sync.Peers = append(in.Sync.Peers, zoned)
		in.Sync.Ports = append(in.Sync.Ports, 0)
		in.SNAT = append(in.SNAT, nft.SNAT{Virtual: virtuals[0], Reals: []netip.AddrPort{netip.AddrPortFrom(zoned, 80)}})
		in.Whole = append(in.Whole, ipvs.Key{Address: zoned, Protocol: "TCP", Port: 80})
		in.Guard.VIPs = append(in.Guard.VIPs, zoned)
		in.Guard.Ports = append(in.Guard.Ports, ipvs.Key{Address: vips[0], Protocol: "ICMP", Port: 1})
	}
	// Mapped addresses are the unmapped ones to nft.
	if len(in.SNAT) > 0 && some(3) {
		s := in.SNAT[0]
		if s.Virtual.Address.Is4() {
			r := s.Reals[0]
			s.Reals = []netip.AddrPort{netip.AddrPortFrom(netip.AddrFrom16(r.Addr().As16()), r.Port())}
			in.SNAT = append(in.SNAT, s)
		}
	}
	return in
}

// canonical is a fake's dump with each set's elements sorted: a whole
// write adds them in order, an update appends the new ones, and a set has
// no order.
func canonical(dump string) string {
	var other, elements []string
	for _, l := range strings.SplitAfter(dump, "\n") {
		if strings.HasPrefix(l, "add element ") {
			elements = append(elements, l)
		} else {
			other = append(other, l)
		}
	}
	slices.Sort(elements)
	return strings.Join(other, "") + strings.Join(elements, "")
}

// elementsOnly fails t unless every operation of tx adds or deletes a set
// element of keeplb's table.
func elementsOnly(t *testing.T, tx *knftables.Transaction) {
	t.Helper()
	for _, l := range strings.Split(strings.TrimSuffix(tx.String(), "\n"), "\n") {
		if !strings.HasPrefix(l, "add element inet keeplb ") && !strings.HasPrefix(l, "delete element inet keeplb ") {
			t.Fatalf("an update sent %q; want element operations only:\n%s", l, tx)
		}
	}
}

// whole returns the fake's table after a whole write of in to an empty
// fake, and Compute's error.
func whole(t *testing.T, in nft.Rules) (string, error) {
	t.Helper()
	fake := knftables.NewFake(nft.Family, nft.Table)
	err := write(context.Background(), fake, in)
	if fake.Table == nil {
		t.Fatalf("a whole write wrote no table: %v", err)
	}
	return fake.Dump(), err
}

// TestUpdateEqualsWrite: a table updated from one Rules to the next, again
// and again, is the table a whole write of the last one gives, by element
// operations alone, as many as the sets differ by; invalid entries are
// left out and named the same way.
func TestUpdateEqualsWrite(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	fake := knftables.NewFake(nft.Family, nft.Table)
	written, _ := nft.Compute(nft.Rules{})
	tx := fake.NewTransaction()
	nft.Write(tx, written)
	if err := fake.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		in := randomRules(rng, true)
		want, wantErr := whole(t, in)
		next, err := nft.Compute(in)
		if fmt.Sprint(err) != fmt.Sprint(wantErr) {
			t.Fatalf("step %d: Compute's error %v; a whole write's %v", i, err, wantErr)
		}
		tx := fake.NewTransaction()
		n := nft.Update(tx, written, next)
		if n != tx.NumOperations() {
			t.Fatalf("step %d: Update says %d operations, the transaction has %d", i, n, tx.NumOperations())
		}
		if n == 0 {
			if got := canonical(fake.Dump()); got != canonical(want) {
				t.Fatalf("step %d: no operation, but the table differs from a whole write's:\n got:\n%s\nwant:\n%s", i, got, canonical(want))
			}
			continue
		}
		elementsOnly(t, tx)
		if err := fake.Run(t.Context(), tx); err != nil {
			t.Fatalf("step %d: the update failed on a table as written: %v\n%s", i, err, tx)
		}
		if got := canonical(fake.Dump()); got != canonical(want) {
			t.Fatalf("step %d: the updated table differs from a whole write's:\n got:\n%s\nwant:\n%s", i, got, canonical(want))
		}
		written = next
	}
}

// TestUpdateSendsTheDifference: equal elements are no operation at all;
// one masqueraded real server replaced by another is one delete and one
// add, and so is a source range replaced by one that contains it, the
// delete first (the kernel test checks that nft takes it).
func TestUpdateSendsTheDifference(t *testing.T) {
	from, _ := nft.Compute(dualStack())
	again, _ := nft.Compute(dualStack())
	for _, to := range []*nft.Elements{from, again} {
		if tx := knftables.NewFake(nft.Family, nft.Table).NewTransaction(); nft.Update(tx, from, to) != 0 || tx.NumOperations() != 0 {
			t.Errorf("an update to the same elements sent:\n%s", tx)
		}
	}
	moved := dualStack()
	moved.SNAT = slices.Clone(moved.SNAT)
	moved.SNAT[1] = nft.SNAT{Virtual: moved.SNAT[1].Virtual, Reals: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.3:30080")}}
	ranges := func(p string) nft.Rules {
		return nft.Rules{SourceRanges: map[ipvs.Key][]netip.Prefix{web4: prefixes(p)}}
	}
	for _, tc := range []struct {
		name     string
		from, to nft.Rules
		want     string
	}{
		{"a real server replaced", dualStack(), moved,
			"delete element inet keeplb snat-v4 { 192.0.2.10 . tcp . 80 . 10.0.0.2 . 30080 }\n" +
				"add element inet keeplb snat-v4 { 192.0.2.10 . tcp . 80 . 10.0.0.3 . 30080 }\n"},
		{"a range widened", ranges("10.1.0.0/16"), ranges("10.0.0.0/8"),
			"delete element inet keeplb allowed-v4 { 192.0.2.10 . tcp . 80 . 10.1.0.0/16 }\n" +
				"add element inet keeplb allowed-v4 { 192.0.2.10 . tcp . 80 . 10.0.0.0/8 }\n"},
	} {
		from, _ := nft.Compute(tc.from)
		to, _ := nft.Compute(tc.to)
		tx := knftables.NewFake(nft.Family, nft.Table).NewTransaction()
		nft.Update(tx, from, to)
		if got := tx.String(); got != tc.want {
			t.Errorf("%s: update:\n%s\nwant:\n%s", tc.name, got, tc.want)
		}
	}
}

// TestUpdateOfAnotherTableFails: an update assumes the table holds what
// was written. When it does not (an element deleted, the table flushed or
// gone), nft fails the transaction and changes nothing; a whole write
// then brings the table back.
func TestUpdateOfAnotherTableFails(t *testing.T) {
	in := dualStack()
	from, _ := nft.Compute(in)
	to, _ := nft.Compute(nft.Rules{Guard: in.Guard})
	for _, tc := range []struct {
		name   string
		behind func(*knftables.Transaction)
	}{
		{"an element deleted", func(tx *knftables.Transaction) {
			tx.Delete(&knftables.Element{Family: nft.Family, Table: nft.Table, Set: "snat-v6", Key: []string{"2001:db8::10", "tcp", "443", "fd00::2", "30443"}})
		}},
		{"a set flushed", func(tx *knftables.Transaction) {
			tx.Flush(&knftables.Set{Family: nft.Family, Table: nft.Table, Name: "filtered-v4"})
		}},
		{"the table deleted", nft.Delete},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := knftables.NewFake(nft.Family, nft.Table)
			tx := fake.NewTransaction()
			nft.Write(tx, from)
			if err := fake.Run(t.Context(), tx); err != nil {
				t.Fatal(err)
			}
			tx = fake.NewTransaction()
			tc.behind(tx)
			if err := fake.Run(t.Context(), tx); err != nil {
				t.Fatal(err)
			}
			before := fake.Dump()
			tx = fake.NewTransaction()
			nft.Update(tx, from, to)
			if err := fake.Run(t.Context(), tx); err == nil {
				t.Fatalf("the update succeeded on a table not as written:\n%s", fake.Dump())
			}
			if got := fake.Dump(); got != before {
				t.Errorf("the failed update changed the table:\n got:\n%s\nwant:\n%s", got, before)
			}
			tx = fake.NewTransaction()
			nft.Write(tx, to)
			if err := fake.Run(t.Context(), tx); err != nil {
				t.Fatal(err)
			}
			if want, _ := whole(t, nft.Rules{Guard: in.Guard}); fake.Dump() != want {
				t.Errorf("a whole write after the failure:\n%s\nwant:\n%s", fake.Dump(), want)
			}
		})
	}
}

// TestKeepSNAT: the write before IPVS masquerades the union of what is
// and what was; the rest is the new Rules' alone.
func TestKeepSNAT(t *testing.T) {
	old := dualStack()
	in := nft.Rules{
		SNAT:         snat(web4, "10.0.0.2:30080", "10.0.0.9:30080"),
		SourceRanges: map[ipvs.Key][]netip.Prefix{ssh4: prefixes("10.0.0.0/8")},
	}
	was, _ := nft.Compute(old)
	now, _ := nft.Compute(in)
	kept := now.KeepSNAT(was)
	if kept.SNATs() != len(old.SNAT)+1 {
		t.Errorf("the union masquerades %d; want %d", kept.SNATs(), len(old.SNAT)+1)
	}
	if now.SNATs() != 2 || was.SNATs() != len(old.SNAT) {
		t.Errorf("KeepSNAT changed its operands: %d and %d", now.SNATs(), was.SNATs())
	}
	union := in
	union.SNAT = append(slices.Clone(in.SNAT), old.SNAT...)
	want, _ := whole(t, union)
	fake := knftables.NewFake(nft.Family, nft.Table)
	tx := fake.NewTransaction()
	nft.Write(tx, kept)
	if err := fake.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	if fake.Dump() != want {
		t.Errorf("the union's table:\n%s\nwant:\n%s", fake.Dump(), want)
	}
	if now.KeepSNAT(nil) != now {
		t.Error("KeepSNAT of nothing made a copy")
	}
}
