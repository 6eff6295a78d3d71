package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"syscall"
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/nft"
)

// deltaRig is a Cache and a Reconciler on a state-modelling IPVS fake and
// nftables fake, synced once in full from benchInputs(n).
type deltaRig struct {
	t    *testing.T
	in   Inputs
	ca   *Cache
	fake *ipvstesting.Fake
	nf   *knftables.Fake
	r    *Reconciler
	rv   int
}

func newDeltaRig(t *testing.T, n int) *deltaRig {
	g := &deltaRig{t: t, in: benchInputs(n), ca: &Cache{}, fake: ipvstesting.New(), nf: knftables.NewFake(nft.Family, nft.Table), rv: 1 << 20}
	g.r = NewReconciler("n0", Kernel{IPVS: g.fake, NFT: g.nf})
	st, _, d := g.ca.Compute(g.in, "n0")
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	return g
}

// change edits Service i's slice, as an informer would see it, and syncs
// that one Service through Update and SyncDelta. It returns the calls
// the IPVS fake got and the State.
func (g *deltaRig) change(i int, edit func(*discoveryv1.EndpointSlice)) ([]ipvstesting.Call, State, Report) {
	g.t.Helper()
	s := g.in.Slices[i]
	edit(s)
	g.rv++
	s.ResourceVersion = strconv.Itoa(g.rv)
	svc := g.in.Services[i]
	g.fake.ResetCalls()
	st, _, d, ok := g.ca.Update(map[string]ServiceInputs{svc.Namespace + "/" + svc.Name: {Service: svc, Slices: []*discoveryv1.EndpointSlice{s}}}, nil)
	if !ok {
		g.t.Fatal("Update refused")
	}
	rep, err := g.r.SyncDelta(g.t.Context(), st, d)
	if err != nil {
		g.t.Fatal(err)
	}
	return g.fake.Calls(), st, rep
}

// TestSyncDeltaExactOps: one endpoint change at 100 Services × 10
// endpoints costs the kernel exactly the real server that changed: one
// weight update, one add or one delete, and no read at all. After each,
// the kernel's table is what a full computation wants, and keeplb's
// nftables table masquerades what the State says.
func TestSyncDeltaExactOps(t *testing.T) {
	g := newDeltaRig(t, 100)
	vip := func(i int) string { return fmt.Sprintf("TCP/172.16.%d.%d:80", i>>8, i&0xff) }
	tests := []struct {
		name string
		edit func(*discoveryv1.EndpointSlice)
		want string
	}{
		{"an endpoint terminates", func(s *discoveryv1.EndpointSlice) {
			s.Endpoints[3].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		}, "UpdateRealServer " + vip(50) + " 10.4.0.50:8080"},
		{"an endpoint joins", func(s *discoveryv1.EndpointSlice) {
			s.Endpoints = append(s.Endpoints, slice("x", "x", discoveryv1.AddressTypeIPv4, nil, ep{"10.99.0.1", "n9", "ready"}).Endpoints...)
		}, "AddRealServer " + vip(50) + " 10.99.0.1:8080"},
		{"an endpoint leaves", func(s *discoveryv1.EndpointSlice) {
			s.Endpoints = slices.Delete(s.Endpoints, 0, 1)
		}, "DeleteRealServer " + vip(50) + " 10.1.0.50:8080"},
	}
	for _, tt := range tests {
		calls, st, rep := g.change(50, tt.edit)
		if got := fmt.Sprint(calls); got != "["+tt.want+"]" {
			t.Errorf("%s: kernel calls %s; want exactly [%s]", tt.name, got, tt.want)
		}
		if rep.Result.Changes() != 1 {
			t.Errorf("%s: %s; want one change", tt.name, rep.Result)
		}
		want, _ := Desired(g.in, "n0")
		if !g.fake.Table().Equal(want.IPVS) {
			t.Errorf("%s: the kernel's table differs from a full computation's", tt.name)
		}
		if got, want := elements(t, g.nf, "snat-v4"), snatElements(st); !slices.Equal(got, want) {
			t.Errorf("%s: %d masqueraded in the nftables table; want %d", tt.name, len(got), len(want))
		}
		// Every real server of a Cluster Service forwarded to pods is
		// masqueraded: State.SNAT is all of them, sorted.
		if got, all := snatPairs(st.SNAT), everyReal(want.IPVS); !slices.Equal(got, all) {
			t.Errorf("%s: State.SNAT has %d entries; want the %d real servers, sorted", tt.name, len(got), len(all))
		}
	}
}

// TestSyncDeltaFallsBackToFull: SyncDelta dumps the whole scope and diffs
// it in full when it cannot trust what it remembers.
func TestSyncDeltaFallsBackToFull(t *testing.T) {
	flip := func(s *discoveryv1.EndpointSlice) {
		c := &s.Endpoints[3].Conditions
		if *c.Ready {
			*c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		} else {
			*c = discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}
		}
	}
	dumped := func(calls []ipvstesting.Call) bool {
		return slices.ContainsFunc(calls, func(c ipvstesting.Call) bool { return c.Method == "VirtualServers" })
	}

	t.Run("after a failed sync", func(t *testing.T) {
		g := newDeltaRig(t, 20)
		g.fake.FailWith(func(c ipvstesting.Call) error {
			if c.Method == "UpdateRealServer" {
				return syscall.ENOMEM
			}
			return nil
		})
		g.fake.ResetCalls()
		s := g.in.Slices[5]
		flip(s)
		st, _, d, _ := g.ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: g.in.Services[5], Slices: []*discoveryv1.EndpointSlice{s}}}, nil)
		if _, err := g.r.SyncDelta(t.Context(), st, d); !errors.Is(err, syscall.ENOMEM) {
			t.Fatalf("SyncDelta: %v; want ENOMEM", err)
		}
		g.fake.FailWith(nil)
		calls, _, _ := g.change(6, flip)
		if !dumped(calls) {
			t.Errorf("the sync after a failure did not dump: %v", calls)
		}
		want, _ := Desired(g.in, "n0")
		if !g.fake.Table().Equal(want.IPVS) {
			t.Errorf("after the full sync, the kernel's table differs from a full computation's")
		}
		if calls, _, _ := g.change(7, flip); dumped(calls) || len(calls) != 1 {
			t.Errorf("the sync after a good one: %v; want one update, no dump", calls)
		}
	})

	t.Run("a State skipped", func(t *testing.T) {
		g := newDeltaRig(t, 20)
		flip(g.in.Slices[5])
		g.ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: g.in.Services[5], Slices: g.in.Slices[5:6]}}, nil) // never synced
		if calls, _, _ := g.change(6, flip); !dumped(calls) {
			t.Errorf("a Delta that does not follow the last synced State was applied alone: %v", calls)
		}
		want, _ := Desired(g.in, "n0")
		if !g.fake.Table().Equal(want.IPVS) {
			t.Errorf("the kernel's table differs from a full computation's")
		}
	})

	t.Run("a virtual server leaves keeplb for kube-proxy", func(t *testing.T) {
		g := newDeltaRig(t, 20)
		svc := g.in.Services[5]
		svc.Annotations = map[string]string{"keeplb.io/forwarding": string(v1alpha1.ForwardingKubeProxy)}
		g.fake.ResetCalls()
		st, _, d, _ := g.ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: svc, Slices: g.in.Slices[5:6]}}, nil)
		if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
			t.Fatal(err)
		}
		if !dumped(g.fake.Calls()) {
			t.Errorf("a virtual server leaving keeplb was deleted without the full sync's check: %v", g.fake.Calls())
		}
		if _, ok := g.fake.Table()[ipvs.Key{Address: addr("172.16.0.5"), Protocol: ipvs.TCP, Port: 80}]; ok {
			t.Error("the virtual server keeplb programmed, unchanged since, was left in place")
		}
	})

	t.Run("a foreign virtual server becomes wanted", func(t *testing.T) {
		g := newDeltaRig(t, 20)
		svc := g.in.Services[5]
		foreignVS := vs("172.16.1.1", "TCP", 80, "wrr")
		g.fake.Seed(foreignVS, rs("10.200.0.1", 80, 1))
		if _, err := g.r.Sync(context.Background(), mustDesired(g.in)); err != nil { // the dump that sees it
			t.Fatal(err)
		}
		// A plain Sync leaves no base: make one from a full Compute.
		st, _, d := g.ca.Compute(g.in, "n0")
		if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
			t.Fatal(err)
		}
		svc.Status.LoadBalancer.Ingress[0].IP = "172.16.1.1"
		g.fake.ResetCalls()
		st, _, d, _ = g.ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: svc, Slices: g.in.Slices[5:6]}}, nil)
		if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
			t.Fatal(err)
		}
		if !dumped(g.fake.Calls()) {
			t.Errorf("a foreign virtual server was not adopted through the full sync: %v", g.fake.Calls())
		}
		if got := g.fake.Table()[foreignVS.Key()]; !got.Equal(st.IPVS[foreignVS.Key()]) {
			t.Errorf("adopted virtual server %s; want %s", got, st.IPVS[foreignVS.Key()])
		}
	})
}

// everyReal lists every real server of t as masquerading, sorted by
// virtual server, then real server.
func everyReal(t ipvs.Table) []string {
	var out []string
	for _, k := range slices.SortedFunc(maps.Keys(t), ipvs.Key.Compare) {
		for _, r := range slices.SortedFunc(slices.Values(t[k].Reals), ipvs.CompareReal) {
			out = append(out, k.String()+" -> "+r.AddrPort().String())
		}
	}
	return out
}

func mustDesired(in Inputs) State {
	st, _ := Desired(in, "n0")
	return st
}

// TestSyncDeltaAfterGlobalChange: when the pools or the Nodes change,
// Compute recomputes every Service and its Delta names every virtual
// server; SyncDelta diffs them against what it programmed, with no dump.
// A pool deleted takes its virtual servers out of keeplb's ownership: that
// is the full sync's.
func TestSyncDeltaAfterGlobalChange(t *testing.T) {
	g := newDeltaRig(t, 20)
	g.in.Pools[0].Spec.Forwarding = v1alpha1.ForwardingNodePort
	g.in.Pools[0].ResourceVersion = "changed"
	st, _, d := g.ca.Compute(g.in, "n0")
	if d.Full || len(d.Virtuals) != 20 || !d.NFT {
		t.Fatalf("Delta after the pool changed: Full %v, %d virtual servers, NFT %v; want every one of 20 and NFT, not Full", d.Full, len(d.Virtuals), d.NFT)
	}
	g.fake.ResetCalls()
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	calls := g.fake.Calls()
	if slices.ContainsFunc(calls, func(c ipvstesting.Call) bool { return !c.IsWrite() }) {
		t.Errorf("the kernel was read: %v", calls)
	}
	if want := mustDesired(g.in); !g.fake.Table().Equal(want.IPVS) {
		t.Errorf("after the pool changed to nodeport, the kernel's table differs from a full computation's")
	}

	g.in.Pools = nil
	st, _, d = g.ca.Compute(g.in, "n0")
	g.fake.ResetCalls()
	if _, err := g.r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(g.fake.Calls(), func(c ipvstesting.Call) bool { return c.Method == "VirtualServers" }) {
		t.Errorf("virtual servers leaving keeplb with their pool were deleted without the full sync's check: %v", g.fake.Calls())
	}
	if len(g.fake.Table()) != 0 {
		t.Errorf("the deleted pool's virtual servers stayed:\n%s", g.fake.Table())
	}
}

// TestSyncDeltaGuardOnly: without IPVS (kube-proxy forwards) SyncDelta
// writes keeplb's table, the guard alone, only when the Delta says the
// guard may have changed.
func TestSyncDeltaGuardOnly(t *testing.T) {
	in := benchInputs(20)
	nf := knftables.NewFake(nft.Family, nft.Table)
	r := NewReconciler("n0", Kernel{NFT: nf})
	ca := &Cache{}
	st, _, d := ca.Compute(in, "n0")
	if _, err := r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if nf.LastTransaction == nil {
		t.Fatal("the first sync wrote no table")
	}
	nf.LastTransaction = nil
	in.Slices[5].Endpoints = in.Slices[5].Endpoints[1:]
	st, _, d, _ = ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: in.Services[5], Slices: in.Slices[5:6]}}, nil)
	if _, err := r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if nf.LastTransaction != nil {
		t.Errorf("an endpoint change rewrote the guard:\n%s", nf.LastTransaction)
	}
	in.Services[5].Spec.Ports[0].Port = 81
	st, _, d, _ = ca.Update(map[string]ServiceInputs{"ns/s00005": {Service: in.Services[5], Slices: in.Slices[5:6]}}, nil)
	if _, err := r.SyncDelta(t.Context(), st, d); err != nil {
		t.Fatal(err)
	}
	if got := elements(t, nf, "ports-v4"); !slices.Contains(got, "172.16.0.5 . tcp . 81") {
		t.Errorf("after a port changed, the guard admits %v; want 172.16.0.5 . tcp . 81 among them", got)
	}
}
