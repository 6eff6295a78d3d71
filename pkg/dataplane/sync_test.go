package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

// foreign are virtual servers that belong to others: a ClusterIP, a
// NodePort on the node address, and a VIP port kube-proxy forwards.
var foreign = table(
	entry(vs("10.96.0.1", "TCP", 443, "rr"), rs("10.0.0.1", 6443, 1)),
	entry(vs("10.0.0.1", "TCP", 30080, "rr"), rs("10.1.1.1", 8080, 1)),
	entry(vs("192.0.2.9", "TCP", 443, "rr"), rs("10.1.9.9", 8443, 1)),
)

func syncInputs() Inputs {
	in := cluster(v1alpha1.ForwardingNodePort)
	in.Slices = append(webSlices(), slice("pods", "pods-4", discoveryv1.AddressTypeIPv4, httpPort(8080),
		ep{"10.1.4.1", "n2", "ready"}, ep{"10.1.4.2", "n3", "ready"}, ep{"10.1.4.3", "n3", "terminating"}))
	in.Services = []*v1.Service{
		service("web", []string{"192.0.2.1", "2001:db8::1"}),
		service("pods", []string{"192.0.2.2"}, annotate("keeplb.io/forwarding", "pod"), affinity(60)),
		service("kp", []string{"192.0.2.9"}, annotate("keeplb.io/forwarding", "kube-proxy"), ports(v1.ServicePort{Port: 443})),
	}
	return in
}

func merge(ts ...ipvs.Table) ipvs.Table {
	out := ipvs.Table{}
	for _, t := range ts {
		for k, e := range t {
			out[k] = e
		}
	}
	return out
}

func TestSyncFromStartingStates(t *testing.T) {
	st, _ := Desired(syncInputs(), "n1")
	if len(st.IPVS) != 3 {
		t.Fatalf("fixture: desired has %d virtual servers, want 3:\n%s", len(st.IPVS), st.IPVS)
	}
	for k, e := range st.IPVS {
		if len(e.Reals) < 3 {
			t.Fatalf("fixture: %s has %d real servers, want at least 3", k, len(e.Reals))
		}
	}
	web := st.IPVS[ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}]
	pods := st.IPVS[ipvs.Key{Address: addr("192.0.2.2"), Protocol: "TCP", Port: 80}]
	stale := func(e ipvs.Entry, extra ...ipvs.RealServer) ipvs.Entry {
		e.Reals = append(append([]ipvs.RealServer(nil), e.Reals[1:]...), extra...)
		return e
	}
	tests := []struct {
		name  string
		start ipvs.Table
	}{
		{"empty", nil},
		{"already right", st.IPVS},
		{"partially right", table(web)},
		{"stale and missing real servers", table(stale(web, rs("10.0.0.7", 30080, 1)), stale(pods, rs("10.1.7.7", 8080, 1)))},
		{"wrong weights, scheduler, persistence and method", table(
			entry(vs("192.0.2.1", "TCP", 80, "wlc"), rs("10.0.0.1", 30080, 5), rs("10.0.0.2", 30080, 1), ipvs.RealServer{Address: addr("10.0.0.3"), Port: 30080, Weight: 1, Method: ipvs.Route}),
			entry(vs("192.0.2.2", "TCP", 80, "rr"), pods.Reals...),
		)},
		{"stale virtual servers of ours", table(
			entry(vs("192.0.2.1", "TCP", 8080, "rr"), rs("10.0.0.1", 31111, 1)),
			entry(vs("192.0.2.1", "UDP", 80, "rr")),
			entry(vs("192.0.2.77", "TCP", 80, "rr"), rs("10.0.0.1", 30000, 1)),
			entry(vs("2001:db8::1", "TCP", 81, "rr")),
		)},
		{"foreign virtual servers", foreign},
		{"foreign and stale together", merge(foreign, table(stale(web), entry(vs("192.0.2.3", "SCTP", 9, "sh"))))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := ipvstesting.New()
			f.SeedTable(tt.start)
			f.SeedTable(foreign) // always present, never ours
			res, err := diffApply(f, st.IPVS, st.Owns)
			if err != nil {
				t.Fatalf("Sync: %v", err)
			}
			want := merge(foreign, st.IPVS)
			if got := f.Table(); !got.Equal(want) {
				t.Fatalf("after Sync (%s) table =\n%s\nwant\n%s", res, got, want)
			}
			for _, c := range f.Writes() {
				if _, isForeign := foreign[c.Virtual]; isForeign {
					t.Errorf("Sync touched a foreign virtual server: %s", c)
				}
			}
			for _, c := range f.Calls() {
				if _, isForeign := foreign[c.Virtual]; isForeign && c.Method == "RealServers" {
					t.Errorf("Sync read the real servers of a foreign virtual server: %s", c)
				}
			}
			if res.Changes() != len(f.Writes()) {
				t.Errorf("Result counts %d changes, the fake saw %d writes", res.Changes(), len(f.Writes()))
			}

			f.ResetCalls()
			res, err = diffApply(f, st.IPVS, st.Owns)
			if err != nil || res.Changes() != 0 || len(f.Writes()) != 0 {
				t.Errorf("second Sync = %s, %v; writes %v; want nothing", res, err, f.Writes())
			}
		})
	}
}

func TestDiffInPlace(t *testing.T) {
	ours := func(ipvs.Key) bool { return true }
	cur := table(entry(vs("192.0.2.1", "TCP", 80, "rr"), rs("10.0.0.1", 1, 1), rs("10.0.0.2", 1, 1)))
	pv := vs("192.0.2.1", "TCP", 80, "rr")
	pv.Persistent, pv.Timeout = true, time.Minute
	want := table(entry(pv, rs("10.0.0.1", 1, 0), rs("10.0.0.2", 1, 1)))
	ops := Diff(cur, want, ours)
	got := fmt.Sprint(ops)
	wantOps := "[UpdateVirtual TCP/192.0.2.1:80 rr persistent 1m0s UpdateReal TCP/192.0.2.1:80 -> 10.0.0.1:1 w0 masq]"
	if got != wantOps {
		t.Errorf("Diff =\n%s\nwant\n%s", got, wantOps)
	}
	// Current entries outside the scope are never deleted, even when the
	// caller dumped everything.
	st, _ := Desired(syncInputs(), "n1")
	if ops := Diff(merge(foreign, st.IPVS), st.IPVS, st.Owns); len(ops) != 0 {
		t.Errorf("Diff touches foreign virtual servers: %v", ops)
	}
	// Desired entries outside the scope are ignored, too.
	if ops := Diff(nil, want, func(ipvs.Key) bool { return false }); len(ops) != 0 {
		t.Errorf("Diff created out-of-scope virtual servers: %v", ops)
	}
}

func TestDiffOrderIsSafe(t *testing.T) {
	ours := func(ipvs.Key) bool { return true }
	cur := table(
		entry(vs("192.0.2.1", "TCP", 80, "rr"), rs("10.0.0.1", 1, 1)),
		entry(vs("192.0.2.5", "TCP", 80, "rr"), rs("10.0.0.1", 1, 1)),
	)
	want := table(
		entry(vs("192.0.2.1", "TCP", 80, "rr"), rs("10.0.0.2", 1, 1)), // replace the only backend
		entry(vs("192.0.2.3", "TCP", 80, "rr"), rs("10.0.0.3", 1, 1)),
	)
	ops := Diff(cur, want, ours)
	last := OpKind(0)
	for _, op := range ops {
		if op.Kind < last {
			t.Fatalf("ops out of phase order: %v", ops)
		}
		last = op.Kind
	}
	// Replaying against a fake that checks the virtual server never runs empty.
	f := ipvstesting.New()
	f.SeedTable(cur)
	for _, op := range ops {
		if _, err := Apply(f, []Op{op}); err != nil {
			t.Fatal(err)
		}
		if e, ok := f.Table()[ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}]; ok && len(e.Reals) == 0 {
			t.Fatalf("after %s the virtual server has no real server", op)
		}
	}
}

func TestApplyGoesOnAfterFailure(t *testing.T) {
	st, _ := Desired(syncInputs(), "n1")
	bad := ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}
	f := ipvstesting.New()
	f.FailWith(func(c ipvstesting.Call) error {
		if c.Method == "AddVirtualServer" && c.Virtual == bad {
			return syscall.ENOMEM
		}
		return nil
	})
	res, err := diffApply(f, st.IPVS, st.Owns)
	if !errors.Is(err, syscall.ENOMEM) {
		t.Fatalf("Sync error = %v, want ENOMEM", err)
	}
	if res.Failed != 1+len(st.IPVS[bad].Reals) || res.VirtualAdded != len(st.IPVS)-1 {
		t.Errorf("Result = %s; want the bad virtual server and its %d real servers failed, the others added", res, len(st.IPVS[bad].Reals))
	}
	for _, c := range f.Writes() {
		if c.Method == "AddRealServer" && c.Virtual == bad {
			t.Errorf("real servers were sent for a virtual server that could not be created")
		}
	}
	f.FailWith(nil)
	if _, err := diffApply(f, st.IPVS, st.Owns); err != nil {
		t.Fatal(err)
	}
	if got := f.Table(); !got.Equal(st.IPVS) {
		t.Errorf("the retry did not converge:\n%s\nwant\n%s", got, st.IPVS)
	}
}

func TestApplyDeleteOfMissingIsDone(t *testing.T) {
	f := ipvstesting.New()
	v := vs("192.0.2.1", "TCP", 80, "rr")
	f.Seed(v)
	res, err := Apply(f, []Op{
		{Kind: DeleteReal, Virtual: v, Real: rs("10.0.0.1", 1, 1)},
		{Kind: DeleteVirtual, Virtual: vs("192.0.2.2", "TCP", 80, "rr")},
	})
	if err != nil || res.RealDeleted != 1 || res.VirtualDeleted != 1 {
		t.Errorf("Apply = %s, %v; deleting what is gone should count as done", res, err)
	}
}

// TestEndpointChurn walks a pod-forwarded Service through a rollout: a new
// pod appears, the old one terminates (weight 0, kept), then leaves.
func TestEndpointChurn(t *testing.T) {
	in := cluster(v1alpha1.ForwardingPod)
	kp := service("kp", []string{"192.0.2.9"}, annotate("keeplb.io/forwarding", "kube-proxy"), ports(v1.ServicePort{Port: 443}))
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1"}), kp}
	k := ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}
	f := ipvstesting.New()
	f.SeedTable(foreign)
	steps := []struct {
		name   string
		eps    []ep
		reals  []ipvs.RealServer
		writes []string
	}{
		{"one pod", []ep{{"10.1.1.1", "n1", "ready"}}, []ipvs.RealServer{rs("10.1.1.1", 8080, 1)}, []string{"AddVirtualServer", "AddRealServer"}},
		{"surge", []ep{{"10.1.1.1", "n1", "ready"}, {"10.1.2.1", "n2", "notready"}}, []ipvs.RealServer{rs("10.1.1.1", 8080, 1)}, nil},
		{"new ready", []ep{{"10.1.1.1", "n1", "ready"}, {"10.1.2.1", "n2", "ready"}}, []ipvs.RealServer{rs("10.1.1.1", 8080, 1), rs("10.1.2.1", 8080, 1)}, []string{"AddRealServer"}},
		{"old terminating", []ep{{"10.1.1.1", "n1", "terminating"}, {"10.1.2.1", "n2", "ready"}}, []ipvs.RealServer{rs("10.1.1.1", 8080, 0), rs("10.1.2.1", 8080, 1)}, []string{"UpdateRealServer"}},
		{"old stops serving", []ep{{"10.1.1.1", "n1", "gone"}, {"10.1.2.1", "n2", "ready"}}, []ipvs.RealServer{rs("10.1.2.1", 8080, 1)}, []string{"DeleteRealServer"}},
		{"old gone", []ep{{"10.1.2.1", "n2", "ready"}}, []ipvs.RealServer{rs("10.1.2.1", 8080, 1)}, nil},
		{"no endpoints", nil, nil, []string{"DeleteRealServer"}},
		{"service deleted", nil, nil, []string{"DeleteVirtualServer"}},
	}
	for _, step := range steps {
		in.Slices = []*discoveryv1.EndpointSlice{slice("web", "w", discoveryv1.AddressTypeIPv4, httpPort(8080), step.eps...)}
		if step.name == "service deleted" {
			in.Services = []*v1.Service{kp}
		}
		st, _ := Desired(in, "n1")
		f.ResetCalls()
		if _, err := diffApply(f, st.IPVS, st.Owns); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		got := f.Table()
		e, ok := got[k]
		if step.name == "service deleted" {
			if ok {
				t.Errorf("%s: virtual server still there", step.name)
			}
		} else if !ok || !e.Equal(ipvs.Entry{Virtual: vs("192.0.2.1", "TCP", 80, "rr"), Reals: step.reals}) {
			t.Errorf("%s: entry = %v, want reals %v", step.name, e, step.reals)
		}
		var methods []string
		for _, c := range f.Writes() {
			methods = append(methods, c.Method)
		}
		if fmt.Sprint(methods) != fmt.Sprint(step.writes) {
			t.Errorf("%s: writes %v, want %v", step.name, methods, step.writes)
		}
		if !merge(foreign).Equal(filter(got, func(k ipvs.Key) bool { _, ok := foreign[k]; return ok })) {
			t.Errorf("%s: foreign virtual servers changed", step.name)
		}
	}
}

func filter(t ipvs.Table, keep func(ipvs.Key) bool) ipvs.Table {
	out := ipvs.Table{}
	for k, e := range t {
		if keep(k) {
			out[k] = e
		}
	}
	return out
}

// benchTables builds n virtual servers with 10 real servers each, and a
// current table with every tenth real server's weight off.
func benchTables(n int) (cur, want ipvs.Table) {
	cur, want = ipvs.Table{}, ipvs.Table{}
	for i := range n {
		v := ipvs.VirtualServer{Address: netip.AddrFrom4([4]byte{192, 0, byte(i >> 8), byte(i)}), Protocol: "TCP", Port: 80, Scheduler: "rr"}
		var a, b []ipvs.RealServer
		for j := range 10 {
			r := ipvs.RealServer{Address: netip.AddrFrom4([4]byte{10, byte(j), byte(i >> 8), byte(i)}), Port: 30080, Weight: 1}
			a = append(a, r)
			if (i*10+j)%10 == 0 {
				r.Weight = 2
			}
			b = append(b, r)
		}
		want[v.Key()] = ipvs.Entry{Virtual: v, Reals: a}
		cur[v.Key()] = ipvs.Entry{Virtual: v, Reals: b}
	}
	return cur, want
}

func BenchmarkDiff1000x10(b *testing.B) {
	cur, want := benchTables(1000)
	ours := func(ipvs.Key) bool { return true }
	b.ReportAllocs()
	for b.Loop() {
		if ops := Diff(cur, want, ours); len(ops) != 1000 {
			b.Fatalf("%d ops, want 1000", len(ops))
		}
	}
}

// BenchmarkNaivePerService is the baseline Diff replaces: for each desired
// virtual server, ask the table for it and for its real servers (as a
// per-Service kernel lookup would), and scan for each real server.
func BenchmarkNaivePerService1000x10(b *testing.B) {
	cur, want := benchTables(1000)
	f := ipvstesting.New()
	f.SeedTable(cur)
	b.ReportAllocs()
	for b.Loop() {
		changes := 0
		for k, e := range want {
			vss, _ := f.VirtualServers()
			for _, v := range vss {
				if v.Key() != k {
					continue
				}
				have, _ := f.RealServers(k)
				for _, r := range e.Reals {
					for _, h := range have {
						if h.AddrPort() == r.AddrPort() && h.Weight != r.Weight {
							changes++
						}
					}
				}
			}
		}
		if changes != 1000 {
			b.Fatalf("%d changes, want 1000", changes)
		}
		f.ResetCalls()
	}
}

// TestSyncReportsRemovedReals checks Result.Removed: the real servers
// deleted from a virtual server, and those deleted with one; not those
// whose weight changed, nor those of virtual servers that are not ours.
func TestSyncReportsRemovedReals(t *testing.T) {
	f := ipvstesting.New()
	f.SeedTable(foreign)
	dns := vs("192.0.2.5", "UDP", 53, "rr")
	gone := vs("192.0.2.6", "UDP", 53, "rr")
	f.Seed(dns, rs("10.1.1.1", 53, 1), rs("10.1.1.2", 53, 1), rs("10.1.1.3", 53, 1))
	f.Seed(gone, rs("10.1.2.1", 53, 1))
	ours := func(k ipvs.Key) bool { return k.Address == dns.Address || k.Address == gone.Address }
	want := ipvs.Table{dns.Key(): entry(dns, rs("10.1.1.1", 53, 1), rs("10.1.1.2", 53, 0))}
	res, err := diffApply(f, want, ours)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(res.Removed)
	if wantRemoved := "[UDP/192.0.2.5:53 -> 10.1.1.3:53 UDP/192.0.2.6:53 -> 10.1.2.1:53]"; got != wantRemoved {
		t.Errorf("Removed = %s, want %s", got, wantRemoved)
	}
	if res, err := diffApply(f, want, ours); err != nil || len(res.Removed) != 0 {
		t.Errorf("a second Sync removed %v (%v), want nothing", res.Removed, err)
	}
}

// diffApply runs the Reconciler's core on h with a fixed scope: one dump
// of what ours selects, Diff, Apply. The tests of Diff and Apply use it to
// start from any kernel state; reconciler_test.go tests the scope the
// Reconciler itself keeps.
func diffApply(h ipvs.Interface, desired ipvs.Table, ours func(ipvs.Key) bool) (Result, error) {
	current, err := ipvs.Dump(h, ours)
	if err != nil {
		return Result{}, err
	}
	return Apply(h, Diff(current, desired, ours))
}
