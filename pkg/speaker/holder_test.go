package speaker

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	cbtestutil "k8s.io/component-base/metrics/testutil"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

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
	s := &Speaker{opts: o, client: client, metrics: metrics.NewSpeaker(), services: inf}
	s.holders = newHolderWriter(node, client, s.lookupService, s.metrics, clk)
	t.Cleanup(s.holders.queue.ShutDown)
	return s
}

// reconcileHolders is the holders' share of one sync of s, compute the
// claims, then apply them, followed by the writer's work on what that
// queued (the writer runs on its own in the speaker).
func reconcileHolders(t *testing.T, s *Speaker, plan vrrp.Plan, owners map[netip.Addr][]string, states map[string]keepalived.State) {
	t.Helper()
	claims, vipStates := holderClaims(plan, s.opts.NodeName, owners, states)
	s.applyHolders(t.Context(), claims, vipStates)
	for s.holders.queue.Len() > 0 {
		s.holders.next(t.Context())
	}
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

// TestHolderWriterOffTheSyncPath blocks the API server's answer to the
// first holder write and checks that syncs still return, that a claim
// changed while its Service waits in the queue is written once, with the
// latest value, and that every annotation and event ends up as claimed.
func TestHolderWriterOffTheSyncPath(t *testing.T) {
	v4, v6 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")
	dual := lbService("ns", "dual", v4.String(), false, nil)
	dual.Status.LoadBalancer.Ingress = append(dual.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: v6.String()})
	objs := []runtime.Object{lbService("ns", "blocker", "192.0.2.1", false, nil), dual}
	for i := range 20 {
		objs = append(objs, lbService("ns", fmt.Sprintf("svc%d", i), fmt.Sprintf("192.0.2.%d", 100+i), false, nil))
	}
	client := fake.NewClientset(objs...)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	client.PrependReactor("patch", "services", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.(k8stesting.PatchAction).GetName() == "blocker" {
			once.Do(func() { close(entered) })
			<-release // the API server takes its time
		}
		return false, nil, nil
	})
	// The writer reads the Services as a perfectly fresh informer would.
	lookup := func(key string) *v1.Service {
		ns, name, _ := cache.SplitMetaNamespaceKey(key)
		o, err := client.Tracker().Get(v1.SchemeGroupVersion.WithResource("services"), ns, name)
		if err != nil {
			return nil
		}
		return o.(*v1.Service)
	}
	s := holderSpeaker(t, "a", client, clocktesting.NewFakeClock(time.Now()))
	s.holders = newHolderWriter("a", client, lookup, s.metrics, clock.RealClock{})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); s.holders.run(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("the writer did not stop")
		}
	}()

	// sync applies claims as a sync does, and fails the test if that
	// waits for the API server.
	sync := func(claims map[string][]netip.Addr) {
		t.Helper()
		returned := make(chan struct{})
		go func() { defer close(returned); s.applyHolders(t.Context(), claims, nil) }()
		select {
		case <-returned:
		case <-time.After(10 * time.Second):
			t.Fatal("a sync waited for the holder writes")
		}
	}
	sync(map[string][]netip.Addr{"ns/blocker": {netip.MustParseAddr("192.0.2.1")}})
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the blocker's write never reached the API server")
	}
	claims := map[string][]netip.Addr{"ns/blocker": {netip.MustParseAddr("192.0.2.1")}, "ns/dual": {v4}}
	for i := range 20 {
		claims[fmt.Sprintf("ns/svc%d", i)] = []netip.Addr{netip.MustParseAddr(fmt.Sprintf("192.0.2.%d", 100+i))}
	}
	sync(claims)
	claims["ns/dual"] = []netip.Addr{v4, v6} // this node now masters the IPv6 VIP too
	sync(claims)
	if got := testutil.ToFloat64(s.metrics.HolderPending); got != 22 {
		t.Errorf("keeplb_speaker_holder_writes_pending %v while the API server is stuck, want 22", got)
	}
	close(release)

	want := map[string]string{"blocker": "a", "dual": "a"}
	for i := range 20 {
		want[fmt.Sprintf("svc%d", i)] = "a"
	}
	got := map[string]string{}
	deadline := time.Now().Add(30 * time.Second)
	for {
		list, err := client.CoreV1().Services("ns").List(t.Context(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		clear(got)
		for _, svc := range list.Items {
			got[svc.Name] = svc.Annotations[annotations.Holder]
		}
		if maps.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("annotations %v, want %v", got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	patches := map[string]int{}
	for _, a := range client.Actions() {
		if p, ok := a.(k8stesting.PatchAction); ok && p.GetResource().Resource == "services" {
			patches[p.GetName()]++
		}
	}
	if patches["dual"] != 1 {
		t.Errorf("%d PATCHes of ns/dual, want 1: the later claim replaces the queued one", patches["dual"])
	}
	// Each event follows its annotation.
	var events *v1.EventList
	for {
		var err error
		if events, err = client.CoreV1().Events("ns").List(t.Context(), metav1.ListOptions{}); err != nil {
			t.Fatal(err)
		}
		if len(events.Items) >= 23 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	acquired := map[string]bool{}
	for _, ev := range events.Items {
		if ev.Reason == EventVIPAcquired && ev.Source.Component == Component && ev.InvolvedObject.Kind == "Service" {
			acquired[ev.InvolvedObject.Name+" "+ev.Message] = true
		}
	}
	if len(events.Items) != 23 || !acquired["dual Node a holds 192.0.2.10"] || !acquired["dual Node a holds 2001:db8::10"] || !acquired["svc7 Node a holds 192.0.2.107"] {
		t.Errorf("%d events, VIPAcquired %v; want one per VIP, 23", len(events.Items), slices.Sorted(maps.Keys(acquired)))
	}
	// Everything written, and seen: nothing pending at the next sync.
	sync(claims)
	if got := testutil.ToFloat64(s.metrics.HolderPending); got != 0 {
		t.Errorf("keeplb_speaker_holder_writes_pending %v after every write, want 0", got)
	}
	if got := testutil.ToFloat64(s.metrics.HolderEventsDropped); got != 0 {
		t.Errorf("keeplb_speaker_holder_events_dropped_total %v", got)
	}
}

// TestHolderHeldBackWriteGoesOut checks that a value this node wrote
// lately and found overwritten (a split brain) goes out again once its
// wait ends, with no sync to ask for it.
func TestHolderHeldBackWriteGoesOut(t *testing.T) {
	client := fake.NewClientset(lbService("ns", "web", "192.0.2.1", false, nil))
	t0 := time.Unix(1000, 0)
	clk := clocktesting.NewFakeClock(t0)
	s := holderSpeaker(t, "a", client, clk)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); s.holders.run(ctx) }()
	defer func() { cancel(); <-done }()
	plan, owners := holderPlan()
	master := map[string]keepalived.State{"i4": keepalived.StateMaster}
	claims, _ := holderClaims(plan, "a", owners, master)

	holder := func() string {
		svc, err := client.CoreV1().Services("ns").Get(t.Context(), "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return svc.Annotations[annotations.Holder]
	}
	waitHolder := func(want string, step time.Duration) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for holder() != want {
			if time.Now().After(deadline) {
				t.Fatalf("annotation %q, want %q", holder(), want)
			}
			clk.Step(step)
			time.Sleep(time.Millisecond)
		}
	}
	see(t, s, client)
	s.applyHolders(t.Context(), claims, nil)
	waitHolder("a", 0)
	// Node b overwrites it; this node's informer sees it, and its sync
	// wants it back, but wrote that value a moment ago.
	svc, _ := client.CoreV1().Services("ns").Get(t.Context(), "web", metav1.GetOptions{})
	svc.Annotations[annotations.Holder] = "b"
	if _, err := client.CoreV1().Services("ns").Update(t.Context(), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	see(t, s, client)
	s.applyHolders(t.Context(), claims, nil)
	waitHolder("a", 500*time.Millisecond)
	// When it went out: the time of its event, on the fake clock (written
	// after the annotation).
	var events *v1.EventList
	deadline := time.Now().Add(10 * time.Second)
	for {
		events, _ = client.CoreV1().Events("ns").List(t.Context(), metav1.ListOptions{})
		if len(events.Items) >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	var last time.Time
	for _, ev := range events.Items {
		if ev.LastTimestamp.After(last) {
			last = ev.LastTimestamp.Time
		}
	}
	if len(events.Items) != 2 || last.Sub(t0) < holderMinRewrite {
		t.Errorf("%d events, the last %s after the first write; want 2, the second at least %s after", len(events.Items), last.Sub(t0), holderMinRewrite)
	}
}

// TestVRRPStateMetricByDifference: each sync leaves keeplb_vrrp_state with
// exactly one series per VIP of this node's instances, with its value,
// however the VIPs and states changed since the last one; a VIP gone loses
// its series.
func TestVRRPStateMetricByDifference(t *testing.T) {
	s := holderSpeaker(t, "a", fake.NewClientset(), clocktesting.NewFakeClock(time.Now()))
	plan, owners := holderPlan()
	want := func(series ...string) {
		t.Helper()
		exp := "# HELP keeplb_vrrp_state [ALPHA] VRRP state of a VIP on this node: 1 MASTER, 0 BACKUP, -1 FAULT.\n# TYPE keeplb_vrrp_state gauge\n"
		for _, l := range series {
			exp += l + "\n"
		}
		if len(series) == 0 {
			exp = ""
		}
		if err := cbtestutil.CollectAndCompare(s.metrics.VRRPState, strings.NewReader(exp), "keeplb_vrrp_state"); err != nil {
			t.Error(err)
		}
	}
	v4 := `keeplb_vrrp_state{node="a",vip="` + holderV4.String() + `"}`
	v6 := `keeplb_vrrp_state{node="a",vip="` + holderV6.String() + `"}`

	reconcileHolders(t, s, plan, owners, map[string]keepalived.State{"i4": keepalived.StateMaster, "i6": keepalived.StateBackup})
	want(v4+" 1", v6+" 0")
	reconcileHolders(t, s, plan, owners, map[string]keepalived.State{"i4": keepalived.StateMaster, "i6": keepalived.StateBackup})
	want(v4+" 1", v6+" 0")
	// i6 no longer reported (keepalived stopped it), i4 in FAULT.
	reconcileHolders(t, s, plan, owners, map[string]keepalived.State{"i4": keepalived.StateFault})
	want(v4 + " -1")
	reconcileHolders(t, s, plan, owners, map[string]keepalived.State{"i6": keepalived.StateMaster})
	want(v6 + " 1")
	reconcileHolders(t, s, plan, owners, nil)
	want()
}
