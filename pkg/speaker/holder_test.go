package speaker

import (
	"net/netip"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

var (
	holderV4 = netip.MustParseAddr("192.0.2.1")
	holderV6 = netip.MustParseAddr("2001:db8::1")
)

// holderPlan has one instance per family, i4 with the IPv4 VIP of ns/web
// and i6 with its IPv6 VIP, both on nodes a and b.
func holderPlan() (vrrp.Plan, map[netip.Addr][]string) {
	prio := map[string]int{"a": 254, "b": 253}
	return vrrp.Plan{Instances: []vrrp.Instance{
			{Name: "i4", VIPs: []netip.Addr{holderV4}, Priorities: prio},
			{Name: "i6", VIPs: []netip.Addr{holderV6}, Priorities: prio},
		}},
		map[netip.Addr][]string{holderV4: {"ns/web"}, holderV6: {"ns/web"}}
}

// holderSpeaker is a Speaker with only what reconcileHolders needs: its
// own view of the Services (fed by the test, as its informer would be),
// the shared fake API and a fake clock.
func holderSpeaker(t *testing.T, node string, client *fake.Clientset, clk *clocktesting.FakeClock) *Speaker {
	t.Helper()
	o := NewOptions()
	o.NodeName = node
	inf := cache.NewSharedIndexInformer(&cache.ListWatch{}, &v1.Service{}, 0, cache.Indexers{})
	return &Speaker{opts: o, client: client, metrics: metrics.NewSpeaker(), services: inf,
		recorder: record.NewFakeRecorder(1000), holders: holderWrites{clock: clk}}
}

// reconcileHolders is the holders' share of one sync of s: compute the
// claims, then apply them.
func reconcileHolders(t *testing.T, s *Speaker, plan vrrp.Plan, owners map[netip.Addr][]string, states map[string]keepalived.State) {
	t.Helper()
	claims, vipStates := holderClaims(plan, s.opts.NodeName, owners, states)
	s.applyHolders(t.Context(), claims, vipStates)
}

// see updates s's view of ns/web from the API, as its informer would.
func see(t *testing.T, s *Speaker, client *fake.Clientset) {
	t.Helper()
	svc, err := client.CoreV1().Services("ns").Get(t.Context(), "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.services.GetStore().Update(svc); err != nil {
		t.Fatal(err)
	}
}

// TestHolderWrites runs two speakers for 30 simulated seconds at the sync
// rate (every 100 ms, each reading the Service the other wrote) and counts
// the PATCHes of the holder annotation. With one annotation naming one
// node, a Service whose IPv4 and IPv6 VIPs have different masters was
// patched on every sync by both for as long as that lasted; two nodes that
// both hold a VIP (a split brain) did the same.
func TestHolderWrites(t *testing.T) {
	const (
		step     = 100 * time.Millisecond
		duration = 30 * time.Second
	)
	for _, tc := range []struct {
		name      string
		states    map[string]map[string]keepalived.State // node -> instance -> state
		maxWrites int
		want      string // the annotation at the end, "" for any
	}{
		{
			name: "dual-stack, a master for IPv4, b for IPv6",
			states: map[string]map[string]keepalived.State{
				"a": {"i4": keepalived.StateMaster, "i6": keepalived.StateBackup},
				"b": {"i4": keepalived.StateBackup, "i6": keepalived.StateMaster},
			},
			maxWrites: 2, want: "192.0.2.1=a,2001:db8::1=b",
		},
		{
			name: "dual-stack, a master for both",
			states: map[string]map[string]keepalived.State{
				"a": {"i4": keepalived.StateMaster, "i6": keepalived.StateMaster},
				"b": {"i4": keepalived.StateBackup, "i6": keepalived.StateBackup},
			},
			maxWrites: 1, want: "a",
		},
		{
			// Each writes its claim again only after a wait that doubles
			// (10 s, 20 s, ...): three each in 30 s, then fewer and fewer.
			name: "split brain: both master for both",
			states: map[string]map[string]keepalived.State{
				"a": {"i4": keepalived.StateMaster, "i6": keepalived.StateMaster},
				"b": {"i4": keepalived.StateMaster, "i6": keepalived.StateMaster},
			},
			maxWrites: 6,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := lbService("ns", "web", "192.0.2.1", false, nil)
			svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: "2001:db8::1"})
			client := fake.NewClientset(svc)
			clk := clocktesting.NewFakeClock(time.Unix(1000, 0))
			plan, owners := holderPlan()
			speakers := []*Speaker{holderSpeaker(t, "a", client, clk), holderSpeaker(t, "b", client, clk)}
			for elapsed := time.Duration(0); elapsed < duration; elapsed += step {
				for _, s := range speakers {
					see(t, s, client)
					reconcileHolders(t, s, plan, owners, tc.states[s.opts.NodeName])
				}
				clk.Step(step)
			}
			writes := 0
			for _, a := range client.Actions() {
				if p, ok := a.(k8stesting.PatchAction); ok && p.GetResource().Resource == "services" {
					writes++
				}
			}
			got, _ := client.CoreV1().Services("ns").Get(t.Context(), "web", metav1.GetOptions{})
			value := got.Annotations[annotations.Holder]
			t.Logf("%d holder PATCHes in %s; annotation %q", writes, duration, value)
			if writes == 0 || writes > tc.maxWrites {
				t.Errorf("%d holder PATCHes in %s, want 1 to %d", writes, duration, tc.maxWrites)
			}
			if tc.want != "" && value != tc.want {
				t.Errorf("annotation %q, want %q", value, tc.want)
			}
		})
	}
}

// TestHolderWriteLimit pins the limiter: one value to one Service at most
// once per holderMinRewrite, the wait doubling while the value keeps being
// rewritten, a new value or a value that lasted written at once.
func TestHolderWriteLimit(t *testing.T) {
	var w holderWrites
	t0 := time.Unix(1000, 0)
	at := t0.Add
	for _, step := range []struct {
		at    time.Duration
		value string
		wait  time.Duration // 0: written
	}{
		{0, "x", 0},
		{time.Second, "x", holderMinRewrite - time.Second},
		{time.Second, "y", 0},     // another value
		{2 * time.Second, "x", 0}, // x again: not the last one written
		{3 * time.Second, "x", holderMinRewrite - time.Second},
		{12 * time.Second, "x", 0},           // after 10 s: written, next wait 20 s
		{31 * time.Second, "x", time.Second}, // 19 s later: wait
		{32 * time.Second, "x", 0},           // after 20 s: written, next wait 40 s
		{71 * time.Second, "x", time.Second},
		{32*time.Second + 3*time.Minute, "x", 0}, // lasted: a new holding
		{32*time.Second + 3*time.Minute + holderMinRewrite - 1, "x", 1},
	} {
		if got := w.allow("ns/web", step.value, at(step.at)); got != step.wait {
			t.Fatalf("at %s, %q: wait %s, want %s", step.at, step.value, got, step.wait)
		}
	}
	// A failed write does not count.
	w.failed("ns/web")
	if got := w.allow("ns/web", "x", at(4*time.Minute)); got != 0 {
		t.Errorf("after a failed write: wait %s", got)
	}
	w.forget(at(time.Hour))
	if len(w.last) != 0 {
		t.Errorf("forget kept %v", w.last)
	}
}

// TestHolderRetry checks that a write held back is retried when its wait
// ends, without waiting for the next periodic resync.
func TestHolderRetry(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Unix(1000, 0))
	w := holderWrites{clock: clk}
	fired := make(chan struct{}, 4)
	trigger := func() { fired <- struct{}{} }
	w.retryIn(5*time.Second, trigger)
	w.retryIn(8*time.Second, trigger) // a later one is covered
	clk.Step(4 * time.Second)
	select {
	case <-fired:
		t.Fatal("triggered before the wait ended")
	default:
	}
	clk.Step(time.Second)
	select {
	case <-fired:
	case <-time.After(10 * time.Second):
		t.Fatal("not triggered when the wait ended")
	}
	clk.Step(10 * time.Second)
	select {
	case <-fired:
		t.Fatal("triggered twice")
	case <-time.After(100 * time.Millisecond): // a second trigger would have come at once
	}
}
