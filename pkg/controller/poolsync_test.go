package controller

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
	"k8s.io/component-base/metrics/testutil"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/metrics"
)

// ippool returns an IPPool of the given generation; created orders pools
// as their creation would (the older owns an overlap).
func ippool(name string, gen int64, created int, addrs []string, mods ...func(*v1alpha1.IPPool)) *v1alpha1.IPPool {
	p := &v1alpha1.IPPool{
		ObjectMeta: metav1.ObjectMeta{Name: name, Generation: gen, CreationTimestamp: metav1.NewTime(time.Unix(int64(created), 0))},
		Spec:       v1alpha1.IPPoolSpec{Addresses: addrs},
	}
	for _, m := range mods {
		m(p)
	}
	return p
}

func forwarding(f v1alpha1.Forwarding) func(*v1alpha1.IPPool) {
	return func(p *v1alpha1.IPPool) { p.Spec.Forwarding = f }
}

// names returns the names of ps, in order.
func names(ps []*v1alpha1.IPPool) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Name)
	}
	return out
}

// settled is the state a pool sync leaves behind: an allocator given
// before's pools and then held's addresses and the pending Services, the
// IPPools with the statuses the sync wrote, and the memory it left.
type settled struct {
	alloc   *allocator.Allocator
	ippools map[string]*v1alpha1.IPPool
	memory  poolMemory
}

var (
	t0 = metav1.NewTime(time.Unix(1000, 0))
	t1 = metav1.NewTime(time.Unix(2000, 0))
)

func settle(t *testing.T, before []*v1alpha1.IPPool, held map[string]string, pending []string) settled {
	t.Helper()
	alloc := allocator.New()
	planPools(alloc, poolInput{ippools: before, now: t0})
	for key, addr := range held {
		ns, _, _ := strings.Cut(key, "/")
		if err := alloc.Restore(allocator.Request{Key: key, Namespace: ns}, []netip.Addr{netip.MustParseAddr(addr)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, key := range pending {
		alloc.MarkPending(key)
	}
	p := planPools(alloc, poolInput{ippools: before, capacity: 1, now: t0})
	s := settled{alloc: alloc, ippools: map[string]*v1alpha1.IPPool{}, memory: p.next}
	for _, ip := range before {
		s.ippools[ip.Name] = ip
	}
	for _, ip := range p.statuses {
		s.ippools[ip.Name] = ip // as written
	}
	return s
}

// next returns after as the API would hold it: each pool with the status
// the last sync wrote for it.
func (s settled) next(after []*v1alpha1.IPPool) []*v1alpha1.IPPool {
	out := make([]*v1alpha1.IPPool, len(after))
	for i, ip := range after {
		ip = ip.DeepCopy()
		if old, ok := s.ippools[ip.Name]; ok {
			ip.Status = old.Status
		}
		out[i] = ip
	}
	return out
}

// TestPlanPools: from what the last sync left and the IPPools now, the
// Services to warn and to retry, the IPPool statuses to write and the
// metrics to drop.
func TestPlanPools(t *testing.T) {
	p1 := ippool("p1", 1, 1, []string{"192.0.2.0/29"})
	p2 := ippool("p2", 1, 2, []string{"198.51.100.0/30"})
	for _, tc := range []struct {
		name          string
		before, after []*v1alpha1.IPPool
		held          map[string]string // Service key → address
		pending       []string
		capacityMoved bool

		wantOutside, wantKick, wantWrites, wantStale []string
	}{{
		name:   "nothing changed: nothing to write, warn or retry",
		before: []*v1alpha1.IPPool{p1}, after: []*v1alpha1.IPPool{p1},
		held: map[string]string{"ns/a": "192.0.2.1"},
	}, {
		name:   "a pool added: only its status is written",
		before: []*v1alpha1.IPPool{p1}, after: []*v1alpha1.IPPool{p1, p2},
		held:       map[string]string{"ns/a": "192.0.2.1"},
		wantWrites: []string{"p2"},
	}, {
		name:   "a pool's ranges shrunk under an allocated address: its Service is warned, not moved",
		before: []*v1alpha1.IPPool{p1}, after: []*v1alpha1.IPPool{ippool("p1", 2, 1, []string{"192.0.2.0/30"})},
		held:        map[string]string{"ns/a": "192.0.2.1", "ns/b": "192.0.2.5"},
		wantOutside: []string{"ns/b"}, wantWrites: []string{"p1"},
	}, {
		name:   "a pool deleted under an allocated address: its Service is warned, the pool's series stay while it has addresses",
		before: []*v1alpha1.IPPool{p1, p2}, after: []*v1alpha1.IPPool{p1},
		held:        map[string]string{"ns/b": "198.51.100.1"},
		wantOutside: []string{"ns/b"},
	}, {
		name:   "an empty pool deleted: its series go",
		before: []*v1alpha1.IPPool{p1, p2}, after: []*v1alpha1.IPPool{p1},
		wantStale: []string{"p2"},
	}, {
		name:   "a pool's forwarding changed: its Services are re-ensured for their ipMode",
		before: []*v1alpha1.IPPool{p1, p2}, after: []*v1alpha1.IPPool{ippool("p1", 2, 1, p1.Spec.Addresses, forwarding(v1alpha1.ForwardingPod)), p2},
		held:     map[string]string{"ns/a": "192.0.2.1", "ns/b": "198.51.100.1"},
		wantKick: []string{"ns/a"}, wantWrites: []string{"p1"},
	}, {
		name:   "capacity moved: the pending Services are retried",
		before: []*v1alpha1.IPPool{p1}, after: []*v1alpha1.IPPool{p1},
		pending: []string{"ns/x", "ns/y"}, capacityMoved: true,
		wantKick: []string{"ns/x", "ns/y"},
	}, {
		name:   "capacity unchanged: the pending Services are not retried again",
		before: []*v1alpha1.IPPool{p1}, after: []*v1alpha1.IPPool{p1},
		pending: []string{"ns/x"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			s := settle(t, tc.before, tc.held, tc.pending)
			capacity := s.memory.kickedAt
			if tc.capacityMoved {
				capacity++
			}
			p := planPools(s.alloc, poolInput{ippools: s.next(tc.after), capacity: capacity, last: s.memory, now: t1})
			for _, c := range []struct {
				what      string
				got, want []string
			}{
				{"warned", p.outside, tc.wantOutside},
				{"kicked", p.kick, tc.wantKick},
				{"statuses written", names(p.statuses), tc.wantWrites},
				{"series dropped", p.stale, tc.wantStale},
			} {
				if !slices.Equal(c.got, c.want) {
					t.Errorf("%s: %v, want %v", c.what, c.got, c.want)
				}
			}
			if p.pending != len(tc.pending) {
				t.Errorf("pending: %d, want %d", p.pending, len(tc.pending))
			}
			if p.next.kickedAt != capacity {
				t.Errorf("next.kickedAt: %d, want %d", p.next.kickedAt, capacity)
			}
			for _, ip := range tc.after {
				if got, want := p.next.forwarding[ip.Name], ip.Spec.ForwardingOrDefault(); got != want {
					t.Errorf("next.forwarding[%s]: %q, want %q", ip.Name, got, want)
				}
			}
		})
	}
}

// TestPlanPoolsStatus: what a planned status says of a pool that shrank
// under an address, and of a pool added beside it.
func TestPlanPoolsStatus(t *testing.T) {
	s := settle(t, []*v1alpha1.IPPool{ippool("p1", 1, 1, []string{"192.0.2.0/29"})}, map[string]string{"ns/b": "192.0.2.5"}, nil)
	after := s.next([]*v1alpha1.IPPool{ippool("p1", 2, 1, []string{"192.0.2.0/30"}), ippool("p2", 1, 2, []string{"198.51.100.0/30"})})
	p := planPools(s.alloc, poolInput{ippools: after, capacity: s.memory.kickedAt, last: s.memory, now: t1})
	got := map[string]v1alpha1.IPPoolStatus{}
	for _, ip := range p.statuses {
		got[ip.Name] = ip.Status
	}
	if st := got["p1"]; st.ObservedGeneration != 2 || st.OutOfRange != 1 || st.Used != 1 || st.Total != "4" || st.Free != "4" {
		t.Errorf("p1's status: %+v; want generation 2, 1 address out of range and used, 4 total and free", st)
	}
	if st := got["p2"]; st.ObservedGeneration != 1 || st.Used != 0 || st.Total != "4" {
		t.Errorf("p2's status: %+v; want generation 1, 4 addresses, none used", st)
	}
	wantGauges := []poolGauge{
		{pool: "p1", family: "IPv4", total: 4, free: 4, used: 1},
		{pool: "p1", family: "IPv6"},
		{pool: "p2", family: "IPv4", total: 4, free: 4},
		{pool: "p2", family: "IPv6"},
	}
	if !slices.Equal(p.gauges, wantGauges) {
		t.Errorf("gauges: %+v, want %+v", p.gauges, wantGauges)
	}
}

// TestWritePools: the writer leaves the IPPools with the planned statuses
// (one it cannot write does not stop the others), warns and retries the
// Services, and sets the metrics.
func TestWritePools(t *testing.T) {
	s := settle(t, []*v1alpha1.IPPool{ippool("p1", 1, 1, []string{"192.0.2.0/29"}), ippool("gone", 1, 2, []string{"198.51.100.0/30"})},
		map[string]string{"ns/b": "192.0.2.5"}, []string{"ns/pending"})
	after := s.next([]*v1alpha1.IPPool{ippool("p1", 2, 1, []string{"192.0.2.0/30"}), ippool("new", 1, 3, []string{"203.0.113.0/30"})})

	// The API has p1 with its last status, but not yet the new pool, as
	// when it was deleted again since the cache saw it.
	u, err := v1alpha1.ToUnstructured(after[0])
	if err != nil {
		t.Fatal(err)
	}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{v1alpha1.IPPoolResource: "IPPoolList"}, u)
	client := fake.NewClientset(lbService("b", nil, v1.ServiceTypeLoadBalancer), lbService("pending", nil, v1.ServiceTypeLoadBalancer))
	factory := informers.NewSharedInformerFactory(client, 0)
	events := record.NewFakeRecorder(10)
	c := &Controller{
		dyn: dyn, alloc: s.alloc, recorder: events, metrics: metrics.NewController(), pools: s.memory,
		services:         newKickableServices(factory.Core().V1().Services(), nil),
		upstreamServices: newKickableServices(factory.Core().V1().Services(), forUpstream),
	}
	kicked := &recorder{}
	if _, err := c.services.Informer().AddEventHandler(kicked); err != nil {
		t.Fatal(err)
	}
	factory.Start(t.Context().Done())
	factory.WaitForCacheSync(t.Context().Done())
	// The series of the pool about to go, as the last sync set them.
	c.metrics.PoolAddresses.WithLabelValues("gone", "IPv4").Set(4)

	p := planPools(s.alloc, poolInput{ippools: after, capacity: s.memory.kickedAt + 1, last: s.memory, now: t1})
	err = c.writePools(t.Context(), p)
	if err == nil || !strings.Contains(err.Error(), "update status of IPPool new") {
		t.Errorf("writePools: %v, want the error of the missing IPPool", err)
	}

	obj, err := dyn.Resource(v1alpha1.IPPoolResource).Get(t.Context(), "p1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := v1alpha1.FromUnstructured(obj)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.ObservedGeneration != 2 || got.Status.OutOfRange != 1 || len(got.Status.Conditions) != 2 {
		t.Errorf("p1's status in the API: %+v", got.Status)
	}
	select {
	case e := <-events.Events:
		if !strings.HasPrefix(e, "Warning AddressOutsidePool 192.0.2.5 ") || !strings.Contains(e, "is no longer in an IPPool") {
			t.Errorf("event %q, want the AddressOutsidePool warning", e)
		}
	default:
		t.Error("no event for the Service whose address left its pool")
	}
	// The informer's initial list came through the handler too.
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(kicked.takeAdds(), "pending") {
		if time.Now().After(deadline) {
			t.Fatal("the pending Service was not retried")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, g := range []struct {
		name string
		got  func() (float64, error)
		want float64
	}{
		{"p1 used", func() (float64, error) {
			return testutil.GetGaugeMetricValue(c.metrics.PoolAddressesUsed.WithLabelValues("p1", "IPv4"))
		}, 1},
		{"new total", func() (float64, error) {
			return testutil.GetGaugeMetricValue(c.metrics.PoolAddresses.WithLabelValues("new", "IPv4"))
		}, 4},
		{"pending", func() (float64, error) { return testutil.GetGaugeMetricValue(c.metrics.PendingServices) }, 1},
	} {
		if v, err := g.got(); err != nil || v != g.want {
			t.Errorf("%s: %v (%v), want %v", g.name, v, err, g.want)
		}
	}
	// Delete reports whether the series was there.
	if c.metrics.PoolAddresses.Delete(map[string]string{"pool": "gone", "family": "IPv4"}) {
		t.Error("the deleted pool's series is still there")
	}
	if c.pools.kickedAt != p.next.kickedAt || c.pools.forwarding["new"] != v1alpha1.ForwardingNodePort || c.pools.gauges["gone"] {
		t.Errorf("memory after the sync: %+v", c.pools)
	}
}
