package controller

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/component-base/metrics/testutil"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/metrics"
)

func svcNamed(name string) *v1.Service {
	return &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: name, UID: types.UID("uid-" + name)}}
}

// newTestWriter returns a writer over a fake clientset (which keeps the
// Events it is given) and its recorder, not yet running.
func newTestWriter(t *testing.T) (*eventWriter, *fake.Clientset, eventRecorder) {
	t.Helper()
	client := fake.NewClientset()
	w := newEventWriter(client.CoreV1(), metrics.NewEvents(metrics.NewController()), klog.Background())
	return w, client, eventRecorder{w: w, source: v1.EventSource{Component: Component}, logger: klog.Background()}
}

func start(t *testing.T, w *eventWriter) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.run(ctx) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return stop
}

// waitEvents polls the fake API until the Events of namespace app satisfy
// ok, and returns them.
func waitEvents(t *testing.T, client *fake.Clientset, what string, ok func([]v1.Event) bool) []v1.Event {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := client.CoreV1().Events("app").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ok(list.Items) {
			return list.Items
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: events are %+v", what, list.Items)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func dropped(t *testing.T, w *eventWriter, reason string) float64 {
	t.Helper()
	v, err := testutil.GetCounterMetricValue(w.metrics.Dropped.WithLabelValues(reason))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Repeats of one event, waiting or already written, become one Event
// object whose count says how often it happened.
func TestEventWriterCountsRepeats(t *testing.T) {
	w, client, rec := newTestWriter(t)
	web := svcNamed("web")
	for range 3 {
		rec.Eventf(web, v1.EventTypeWarning, "AllocationFailed", "PoolExhausted: %s", "no address left")
	}
	rec.Event(web, v1.EventTypeNormal, "IPAllocated", "Allocated 192.0.2.1")
	start(t, w)
	waitEvents(t, client, "one Event of count 3 and one of count 1", func(evs []v1.Event) bool {
		counts := map[string]int32{}
		for _, e := range evs {
			counts[e.Reason] += e.Count
		}
		return len(evs) == 2 && counts["AllocationFailed"] == 3 && counts["IPAllocated"] == 1
	})
	rec.Eventf(web, v1.EventTypeWarning, "AllocationFailed", "PoolExhausted: %s", "no address left")
	evs := waitEvents(t, client, "the written Event's count raised to 4", func(evs []v1.Event) bool {
		for _, e := range evs {
			if e.Reason == "AllocationFailed" && e.Count == 4 {
				return len(evs) == 2
			}
		}
		return false
	})
	for _, e := range evs {
		if e.InvolvedObject.Name != "web" || e.InvolvedObject.UID != "uid-web" || e.Source.Component != Component || e.ReportingController != Component {
			t.Errorf("event %+v: want it about Service app/web, from %s", e, Component)
		}
	}
}

// An event the queue has no room for is counted, not silently lost; the
// others are written.
func TestEventWriterCountsQueueFull(t *testing.T) {
	w, client, rec := newTestWriter(t)
	w.max = 2
	for i := range 3 {
		rec.Event(svcNamed(fmt.Sprint("svc-", i)), v1.EventTypeNormal, "IPAllocated", "Allocated")
	}
	// A repeat of a waiting event takes no room.
	rec.Event(svcNamed("svc-0"), v1.EventTypeNormal, "IPAllocated", "Allocated")
	if got := dropped(t, w, metrics.EventDropQueueFull); got != 1 {
		t.Fatalf("dropped{queue-full} = %v, want 1", got)
	}
	start(t, w)
	waitEvents(t, client, "the two queued events", func(evs []v1.Event) bool { return len(evs) == 2 })
}

// An event the API server refuses is counted as rejected and not retried;
// one it fails to take is retried, then counted as failed.
func TestEventWriterCountsWhatTheServerDoesNotTake(t *testing.T) {
	w, client, rec := newTestWriter(t)
	var creates atomic.Int32
	client.PrependReactor("create", "events", func(a k8stesting.Action) (bool, runtime.Object, error) {
		creates.Add(1)
		ev := a.(k8stesting.CreateAction).GetObject().(*v1.Event)
		if ev.InvolvedObject.Name == "refused" {
			return true, nil, apierrors.NewForbidden(v1.Resource("events"), ev.Name, fmt.Errorf("namespace is being terminated"))
		}
		return true, nil, apierrors.NewServiceUnavailable("overloaded")
	})
	rec.Event(svcNamed("refused"), v1.EventTypeNormal, "IPAllocated", "Allocated")
	rec.Event(svcNamed("unavailable"), v1.EventTypeNormal, "IPAllocated", "Allocated")
	stop := start(t, w)
	deadline := time.Now().Add(10 * time.Second)
	for dropped(t, w, metrics.EventDropRejected) != 1 || dropped(t, w, metrics.EventDropFailed) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("dropped rejected=%v failed=%v, want 1 each", dropped(t, w, metrics.EventDropRejected), dropped(t, w, metrics.EventDropFailed))
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	if n := creates.Load(); n != 1+eventTries {
		t.Errorf("%d creates, want 1 for the refused event and %d for the unavailable one", n, eventTries)
	}
}

// The upstream service controller's broadcaster hands its events to the
// writer, which writes them; its other requests go to its own client.
func TestUpstreamEventsGoToTheWriter(t *testing.T) {
	w, client, _ := newTestWriter(t)
	upstream := eventsTo{Interface: client, w: w}
	ev := &v1.Event{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "web.1"}, InvolvedObject: v1.ObjectReference{Kind: "Service", Namespace: "app", Name: "web"},
		Reason: "EnsuringLoadBalancer", Type: v1.EventTypeNormal, Count: 1, Source: v1.EventSource{Component: "service-controller"}}
	// As the upstream controller's broadcaster writes: through client-go's
	// sink over the client it was given.
	sink := &typedcorev1.EventSinkImpl{Interface: upstream.CoreV1().Events("")}
	if _, err := sink.Create(ev); err != nil {
		t.Fatal(err)
	}
	// Its correlator patches a repeat; the writer counts it.
	repeat := ev.DeepCopy()
	repeat.Count = 2
	if _, err := sink.Patch(repeat, []byte(`{"count":2}`)); err != nil {
		t.Fatal(err)
	}
	if list, _ := client.CoreV1().Events("app").List(context.Background(), metav1.ListOptions{}); len(list.Items) != 0 {
		t.Fatalf("events written before the writer ran: %+v", list.Items)
	}
	start(t, w)
	waitEvents(t, client, "the upstream event, count 2", func(evs []v1.Event) bool {
		return len(evs) == 1 && evs[0].Reason == "EnsuringLoadBalancer" && evs[0].Count == 2
	})
	if _, err := upstream.CoreV1().Services("app").Create(context.Background(), svcNamed("web"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Services("app").Get(context.Background(), "web", metav1.GetOptions{}); err != nil {
		t.Fatalf("the upstream client's Service write did not reach its client: %v", err)
	}
}
