package dataplane

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/nft"
)

// nftLog is a knftables.Fake that keeps the text of every transaction run
// and can fail the next runs.
type nftLog struct {
	*knftables.Fake
	runs []string
	fail int // runs left to fail
}

func (l *nftLog) Run(ctx context.Context, tx *knftables.Transaction) error {
	l.runs = append(l.runs, tx.String())
	if l.fail > 0 {
		l.fail--
		return errors.New("injected: Error: Could not process rule: No buffer space available")
	}
	return l.Fake.Run(ctx, tx)
}

// take returns the runs since the last call.
func (l *nftLog) take() []string {
	runs := l.runs
	l.runs = nil
	return runs
}

func isWhole(run string) bool { return strings.HasPrefix(run, "add table inet keeplb") }

// elementsOnly reports whether every operation of a run adds or deletes a
// set element.
func elementsOnly(run string) bool {
	for _, l := range strings.Split(strings.TrimSuffix(run, "\n"), "\n") {
		if !strings.HasPrefix(l, "add element inet keeplb ") && !strings.HasPrefix(l, "delete element inet keeplb ") {
			return false
		}
	}
	return true
}

// sortedDump is a fake's dump with each set's elements sorted: a whole
// write adds them in order, a change appends.
func sortedDump(fake *knftables.Fake) string {
	var other, els []string
	for _, l := range strings.SplitAfter(fake.Dump(), "\n") {
		if strings.HasPrefix(l, "add element ") {
			els = append(els, l)
		} else {
			other = append(other, l)
		}
	}
	slices.Sort(els)
	return strings.Join(other, "") + strings.Join(els, "")
}

// wholeTable is the dump of a whole write of st's rules to a new fake.
func wholeTable(t *testing.T, rules nft.Rules) string {
	t.Helper()
	fake := knftables.NewFake(nft.Family, nft.Table)
	tx := fake.NewTransaction()
	_ = nft.Transaction(tx, rules)
	if err := fake.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	return sortedDump(fake)
}

func stateRules(st State) nft.Rules {
	return nft.Rules{SNAT: st.SNAT, SourceRanges: st.SourceRanges, Guard: st.Guard}
}

// newLoggedRig is newDeltaRig with its table's writes logged and, with
// ordering, IPVS checking that each real server it adds or deletes is
// masqueraded.
func newLoggedRig(t *testing.T, n int, ordering bool) (*deltaRig, *nftLog) {
	g := &deltaRig{t: t, in: benchInputs(n), ca: &Cache{}, fake: ipvstesting.New(), nf: knftables.NewFake(nft.Family, nft.Table), rv: 1 << 20}
	log := &nftLog{Fake: g.nf}
	var k ipvs.Interface = g.fake
	if ordering {
		k = orderingIPVS{Fake: g.fake, t: t, nft: g.nf}
	}
	g.r = NewReconciler("n0", Kernel{IPVS: k, NFT: log})
	st, _, d := g.ca.Compute(g.in, "n0")
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if runs := log.take(); len(runs) != 1 || !isWhole(runs[0]) {
		t.Fatalf("the first sync wrote %d times; want once, whole:\n%s", len(runs), strings.Join(runs, "\n---\n"))
	}
	return g, log
}

func joins(s *discoveryv1.EndpointSlice) {
	s.Endpoints = append(s.Endpoints, slice("x", "x", discoveryv1.AddressTypeIPv4, nil, ep{"10.99.0.1", "n9", "ready"}).Endpoints...)
}

func leaves(s *discoveryv1.EndpointSlice) { s.Endpoints = s.Endpoints[1:] }

// TestSyncDeltaWritesElements: an endpoint that joins or leaves changes
// keeplb's table by that one element, sent alone: added before IPVS
// forwards to it, deleted after IPVS let go of it (orderingIPVS checks),
// and the table is then what a whole write of the State gives.
func TestSyncDeltaWritesElements(t *testing.T) {
	g, log := newLoggedRig(t, 50, true)
	for _, tc := range []struct {
		name string
		edit func(*discoveryv1.EndpointSlice)
		want []string
	}{
		{"an endpoint joins", joins, []string{"add element inet keeplb snat-v4 { 172.16.0.20 . tcp . 80 . 10.99.0.1 . 8080 }\n"}},
		{"an endpoint leaves", leaves, []string{"delete element inet keeplb snat-v4 { 172.16.0.20 . tcp . 80 . 10.1.0.20 . 8080 }\n"}},
	} {
		_, st, rep := g.change(20, tc.edit)
		if rep.NFTFailures != 0 {
			t.Errorf("%s: %d failed writes", tc.name, rep.NFTFailures)
		}
		if got := log.take(); !slices.Equal(got, tc.want) {
			t.Errorf("%s: the table's writes\n%q\nwant\n%q", tc.name, got, tc.want)
		}
		if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
			t.Errorf("%s: the table differs from a whole write:\n got:\n%s\nwant:\n%s", tc.name, got, want)
		}
	}
	// A port of a Service changes: the guard's and the masquerading's
	// elements move, still by element operations alone.
	g.in.Services[7].Spec.Ports[0].Port = 81
	st, _, d, _ := g.ca.Update(map[string]ServiceInputs{"ns/s00007": {Service: g.in.Services[7], Slices: g.in.Slices[7:8]}}, nil)
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	runs := log.take()
	if len(runs) != 2 || !elementsOnly(runs[0]) || !elementsOnly(runs[1]) {
		t.Errorf("a port change wrote\n%s\nwant two runs of element operations", strings.Join(runs, "---\n"))
	}
	if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
		t.Errorf("after a port change the table differs from a whole write:\n got:\n%s\nwant:\n%s", got, want)
	}
}

// TestFullSyncWritesWhole: a full sync (the speaker's periodic resync,
// Sync) that changes anything in the table rewrites it whole, and so
// heals an element deleted behind keeplb's back, which a write of the
// elements alone would never see; one that changes nothing writes
// nothing, as before.
func TestFullSyncWritesWhole(t *testing.T) {
	g, log := newLoggedRig(t, 20, false)
	st, _, d := g.ca.Compute(g.in, "n0")
	d.Full = true // the speaker's periodic resync
	gone := &knftables.Element{Family: nft.Family, Table: nft.Table, Set: "snat-v4", Key: []string{"172.16.0.3", "tcp", "80", "10.2.0.3", "8080"}}
	tx := g.nf.NewTransaction()
	tx.Delete(gone)
	if err := g.nf.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if runs := log.take(); len(runs) != 0 {
		t.Fatalf("a full sync of an unchanged State wrote:\n%s", strings.Join(runs, "---\n"))
	}
	joins(g.in.Slices[9])
	g.in.Slices[9].ResourceVersion = "joined"
	st, _, d = g.ca.Compute(g.in, "n0")
	d.Full = true
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if runs := log.take(); len(runs) != 1 || !isWhole(runs[0]) {
		t.Errorf("a full sync with a change wrote %d times; want once, whole:\n%s", len(runs), strings.Join(runs, "---\n"))
	}
	if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
		t.Errorf("the full sync did not heal the table:\n got:\n%s\nwant:\n%s", got, want)
	}
	g.change(11, joins)
	if runs := log.take(); len(runs) != 1 || !elementsOnly(runs[0]) {
		t.Errorf("a change after the full sync:\n%s\nwant one run of element operations", strings.Join(runs, "---\n"))
	}
	leaves(g.in.Slices[12])
	g.in.Slices[12].ResourceVersion = "left"
	st, _, _ = g.ca.Compute(g.in, "n0")
	if _, err := g.r.Sync(t.Context(), st); err != nil {
		t.Fatal(err)
	}
	if runs := log.take(); len(runs) != 1 || !isWhole(runs[0]) {
		t.Errorf("Sync with a change wrote %d times; want once, whole", len(runs))
	}
	if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
		t.Errorf("after Sync the table differs from a whole write:\n got:\n%s\nwant:\n%s", got, want)
	}
}

// TestSyncDeltaTableNotAsWritten: when the table is not as last written
// (an element it is to delete is gone, its set flushed), nft refuses the
// change whole; the write rewrites the table whole at once, and the sync
// succeeds with the table as the State wants.
func TestSyncDeltaTableNotAsWritten(t *testing.T) {
	for _, tc := range []struct {
		name   string
		behind func(*knftables.Transaction)
	}{
		{"the element to delete gone", func(tx *knftables.Transaction) {
			tx.Delete(&knftables.Element{Family: nft.Family, Table: nft.Table, Set: "snat-v4", Key: []string{"172.16.0.5", "tcp", "80", "10.1.0.5", "8080"}})
		}},
		// Not the table deleted: knftables' Fake panics listing the
		// counters of a missing table (real nft fails).
		{"the set flushed", func(tx *knftables.Transaction) {
			tx.Flush(&knftables.Set{Family: nft.Family, Table: nft.Table, Name: "snat-v4"})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Not orderingIPVS: the element is gone by the test's doing.
			g, log := newLoggedRig(t, 20, false)
			tx := g.nf.NewTransaction()
			tc.behind(tx)
			if err := g.nf.Run(t.Context(), tx); err != nil {
				t.Fatal(err)
			}
			_, st, rep := g.change(5, leaves)
			if rep.NFTFailures != 0 {
				t.Errorf("%d failed writes", rep.NFTFailures)
			}
			runs := log.take()
			if len(runs) != 2 || !elementsOnly(runs[0]) || !isWhole(runs[1]) {
				t.Errorf("the writes:\n%s\nwant the change refused, then a whole write", strings.Join(runs, "---\n"))
			}
			if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
				t.Errorf("the table differs from a whole write:\n got:\n%s\nwant:\n%s", got, want)
			}
			if !g.r.CanForward() {
				t.Error("cannot forward after the table was rewritten")
			}
		})
	}
}

// TestSyncDeltaAfterFailedWrite: a write that fails (the change and the
// whole write after it) fails the sync, and the next write is whole: the
// table's state is unknown. The masquerading of the real server that
// left is kept until a write succeeds after IPVS let go of it.
func TestSyncDeltaAfterFailedWrite(t *testing.T) {
	g, log := newLoggedRig(t, 20, true)
	log.fail = 2
	s := g.in.Slices[5]
	leaves(s)
	g.rv++
	s.ResourceVersion = "changed"
	st, _, d, _ := g.ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: g.in.Services[5], Slices: []*discoveryv1.EndpointSlice{s}}}, nil)
	rep, err := g.r.SyncDelta(t.Context(), st, d)
	if err == nil || rep.NFTFailures != 1 {
		t.Fatalf("SyncDelta with the table's writes failing: %v, %d failed writes", err, rep.NFTFailures)
	}
	if g.r.CanForward() {
		t.Error("CanForward after a failed write")
	}
	if runs := log.take(); len(runs) != 2 || !elementsOnly(runs[0]) || !isWhole(runs[1]) {
		t.Errorf("the failed writes:\n%s\nwant a change, then a whole write", strings.Join(runs, "---\n"))
	}
	if got := elements(t, g.nf, "snat-v4"); !slices.Contains(got, "172.16.0.5 . tcp . 80 . 10.1.0.5 . 8080") {
		t.Error("the leaving real server is no longer masqueraded although the write that removes it failed")
	}
	// Another change: the table's state is unknown, so it is written whole.
	_, st, _ = g.change(6, joins)
	runs := log.take()
	if len(runs) == 0 || !isWhole(runs[0]) {
		t.Fatalf("the write after a failed one:\n%s\nwant it whole", strings.Join(runs, "---\n"))
	}
	for _, run := range runs[1:] {
		if !elementsOnly(run) {
			t.Errorf("once written whole, the table was written whole again:\n%s", run)
		}
	}
	if got, want := sortedDump(g.nf), wholeTable(t, stateRules(st)); got != want {
		t.Errorf("the table differs from a whole write:\n got:\n%s\nwant:\n%s", got, want)
	}
	if !g.r.CanForward() {
		t.Error("cannot forward after a good write")
	}
}

// TestWriteNFTInvalid: an entry the table cannot express is left out and
// named, by a change as by a whole write, and the rest is written.
func TestWriteNFTInvalid(t *testing.T) {
	log := &nftLog{Fake: knftables.NewFake(nft.Family, nft.Table)}
	r := NewReconciler("n0", Kernel{NFT: log})
	vip := ipvs.Key{Address: addr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80}
	good := nft.Rules{SNAT: []nft.SNAT{{Virtual: vip, Reals: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:30080")}}}, Guard: nft.Guard{VIPs: []netip.Addr{vip.Address}}}
	if err := r.writeNFT(t.Context(), good, false); err != nil || r.nftInvalid != nil {
		t.Fatal(err, r.nftInvalid)
	}
	bad := good
	bad.SNAT = append(slices.Clone(good.SNAT),
		nft.SNAT{Virtual: vip, Reals: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.2:30080"), netip.AddrPortFrom(addr("fe80::1%eth0"), 30080)}})
	log.take()
	if err := r.writeNFT(t.Context(), bad, false); err != nil {
		t.Fatal(err)
	}
	if r.nftInvalid == nil || !strings.Contains(r.nftInvalid.Error(), "real server address with a zone") {
		t.Errorf("entries left out: %v; want the zoned real server named", r.nftInvalid)
	}
	if runs := log.take(); len(runs) != 1 || !elementsOnly(runs[0]) || strings.Contains(runs[0], "%") {
		t.Errorf("the change:\n%s\nwant element operations without the zoned address", strings.Join(runs, "---\n"))
	}
	if got, want := sortedDump(log.Fake), wholeTable(t, bad); got != want {
		t.Errorf("the table differs from a whole write:\n got:\n%s\nwant:\n%s", got, want)
	}
}

// TestGuardCounterKept: a change of elements keeps the guard's counter,
// so nothing is carried over; a whole write recreates it, and what it
// counted is carried over.
func TestGuardCounterKept(t *testing.T) {
	g, log := newLoggedRig(t, 20, true)
	setDrops := func(n uint64) {
		c := g.nf.Table.Counters[nft.CounterGuard]
		if c == nil {
			t.Fatalf("no counter %s", nft.CounterGuard)
		}
		c.Packets = &n
	}
	setDrops(5)
	g.change(3, joins)
	if runs := log.take(); len(runs) == 0 || isWhole(runs[0]) {
		t.Fatalf("want a change of elements, got:\n%s", strings.Join(runs, "---\n"))
	}
	if got, ok := g.r.GuardDropped(); !ok || got != 5 {
		t.Errorf("after a change of elements GuardDropped = %d, %v; want 5 (the counter kept, nothing carried)", got, ok)
	}
	leaves(g.in.Slices[4])
	g.in.Slices[4].ResourceVersion = "left"
	st, _, _ := g.ca.Compute(g.in, "n0")
	if _, err := g.r.Sync(t.Context(), st); err != nil {
		t.Fatal(err)
	}
	if runs := log.take(); len(runs) == 0 || !isWhole(runs[0]) {
		t.Fatalf("want a whole write, got:\n%s", strings.Join(runs, "---\n"))
	}
	setDrops(2)
	if got, ok := g.r.GuardDropped(); !ok || got != 7 {
		t.Errorf("after a whole write GuardDropped = %d, %v; want 5 + 2", got, ok)
	}
}
