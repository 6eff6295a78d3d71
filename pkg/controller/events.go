package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/tools/reference"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/lru"

	"github.com/keeplb/keeplb/pkg/metrics"
)

// Bounds of the event writer.
const (
	// maxPendingEvents bounds the distinct events waiting to be written:
	// four for each of 2,500 Services created at once. Repeats of a waiting
	// event only raise its count.
	maxPendingEvents = 10000
	// writtenEvents is how many written events the writer remembers, so
	// that a repeat raises the count of the Event object instead of adding
	// one (client-go's correlator remembers as many).
	writtenEvents = 4096
	// eventWriters is how many events are written at once.
	eventWriters = 4
	// eventTries is how often an event is tried when the API server cannot
	// be reached, or is overloaded.
	eventTries = 3
)

// eventKey identifies repeats of one event: the same object, type, reason
// and message, from the same component.
type eventKey struct {
	namespace, kind, name, component, eventType, reason, message string
	uid                                                          types.UID
}

func keyOf(ev *v1.Event) eventKey {
	o := ev.InvolvedObject
	return eventKey{namespace: ev.Namespace, kind: o.Kind, name: o.Name, uid: o.UID, component: ev.Source.Component,
		eventType: ev.Type, reason: ev.Reason, message: ev.Message}
}

// writtenEvent is the Event object an eventKey was last written as.
type writtenEvent struct {
	name  string
	count int32
}

// eventWriter writes the controller's events, and the upstream service
// controller's, behind the controller's work and never in its way: with a
// client (and a client-side rate limit) of its own, from a queue that the
// recorders only add to. client-go's broadcaster instead queues at most
// 1,000 events and drops the rest without a trace, and writes them one at
// a time through the client it is given, which for the upstream
// controller is the client of its status writes.
//
// Nothing is dropped silently: the queue holds up to maxPendingEvents
// distinct events, a repeat of a waiting one only raises its count, and
// whatever is not written (queue full, refused, unreachable, shutdown) is
// counted in keeplb_controller_events_dropped_total and logged.
type eventWriter struct {
	client  typedcorev1.EventsGetter
	metrics *metrics.Events
	max     int
	logger  klog.Logger

	mu      sync.Mutex
	pending map[eventKey]*v1.Event
	queue   workqueue.TypedRateLimitingInterface[eventKey]
	// written is used by the workers only; a key is never written by two
	// workers at once (the queue's guarantee), and lru.Cache locks.
	written *lru.Cache
}

// newEventWriter returns a writer through client; run starts it.
func newEventWriter(client typedcorev1.EventsGetter, m *metrics.Events, logger klog.Logger) *eventWriter {
	return &eventWriter{
		client:  client,
		metrics: m,
		max:     maxPendingEvents,
		logger:  logger,
		pending: map[eventKey]*v1.Event{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[eventKey](100*time.Millisecond, 5*time.Second),
			workqueue.TypedRateLimitingQueueConfig[eventKey]{Name: "keeplb-events"},
		),
		written: lru.New(writtenEvents),
	}
}

// add queues one occurrence of ev; it never waits for the API server.
func (w *eventWriter) add(ev *v1.Event) {
	k := keyOf(ev)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.queue.ShuttingDown() {
		w.metrics.Dropped.WithLabelValues(metrics.EventDropShutdown).Inc()
		return
	}
	if p, ok := w.pending[k]; ok {
		p.Count++
		p.LastTimestamp = ev.LastTimestamp
		return
	}
	if len(w.pending) >= w.max {
		w.metrics.Dropped.WithLabelValues(metrics.EventDropQueueFull).Inc()
		w.logger.Error(nil, "Dropped event: too many events wait to be written", "pending", len(w.pending),
			"object", klog.KRef(ev.InvolvedObject.Namespace, ev.InvolvedObject.Name), "type", ev.Type, "reason", ev.Reason, "message", ev.Message)
		return
	}
	cp := ev.DeepCopy()
	cp.Count = 1
	w.pending[k] = cp
	w.metrics.Pending.Set(float64(len(w.pending)))
	w.queue.Add(k)
}

// run writes events with eventWriters workers until ctx is done; what is
// still queued then is counted as dropped.
func (w *eventWriter) run(ctx context.Context) {
	var wg sync.WaitGroup
	for range eventWriters {
		wg.Go(func() {
			for w.next(ctx) {
			}
		})
	}
	<-ctx.Done()
	w.mu.Lock()
	n := 0
	for _, ev := range w.pending {
		n += int(ev.Count)
	}
	w.pending = map[eventKey]*v1.Event{}
	w.metrics.Pending.Set(0)
	w.mu.Unlock()
	w.queue.ShutDown()
	wg.Wait()
	if n > 0 {
		w.metrics.Dropped.WithLabelValues(metrics.EventDropShutdown).Add(float64(n))
		w.logger.Info("Dropped events not written before the controller stopped", "events", n)
	}
}

// next writes the next event; false once the queue is shut down.
func (w *eventWriter) next(ctx context.Context) bool {
	k, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(k)
	w.mu.Lock()
	ev := w.pending[k]
	delete(w.pending, k)
	w.metrics.Pending.Set(float64(len(w.pending)))
	w.mu.Unlock()
	if ev == nil {
		// Written meanwhile (a retry), or dropped at shutdown.
		return true
	}
	err := w.write(ctx, ev)
	switch {
	case err == nil:
		w.queue.Forget(k)
	case ctx.Err() != nil:
		w.queue.Forget(k)
		w.metrics.Dropped.WithLabelValues(metrics.EventDropShutdown).Add(float64(ev.Count))
	case retriable(err) && w.queue.NumRequeues(k) < eventTries-1:
		w.requeue(k, ev)
	default:
		w.queue.Forget(k)
		reason := metrics.EventDropRejected
		if retriable(err) {
			reason = metrics.EventDropFailed
		}
		w.metrics.Dropped.WithLabelValues(reason).Add(float64(ev.Count))
		w.logger.Error(err, "Dropped event: the API server did not take it", "object", klog.KRef(ev.InvolvedObject.Namespace, ev.InvolvedObject.Name),
			"type", ev.Type, "reason", ev.Reason, "message", ev.Message, "count", ev.Count)
	}
	return true
}

// requeue puts back ev, merged with any repeat that arrived meanwhile.
func (w *eventWriter) requeue(k eventKey, ev *v1.Event) {
	w.mu.Lock()
	if p, ok := w.pending[k]; ok {
		p.Count += ev.Count
		p.FirstTimestamp = ev.FirstTimestamp
	} else {
		w.pending[k] = ev
	}
	w.metrics.Pending.Set(float64(len(w.pending)))
	w.mu.Unlock()
	w.queue.AddRateLimited(k)
}

// retriable reports whether writing again may succeed: the server was not
// reached, or was overloaded or failing; not when it refused the event.
func retriable(err error) bool {
	var st apierrors.APIStatus
	if !errors.As(err, &st) {
		return true
	}
	code := st.Status().Code
	return code == http.StatusTooManyRequests || code >= http.StatusInternalServerError || code == 0
}

// write creates ev, or raises the count of the Event object its key was
// last written as.
func (w *eventWriter) write(ctx context.Context, ev *v1.Event) error {
	k := keyOf(ev)
	events := w.client.Events(ev.Namespace)
	if v, ok := w.written.Get(k); ok {
		prev := v.(writtenEvent)
		patch, err := json.Marshal(map[string]any{"count": prev.count + ev.Count, "lastTimestamp": ev.LastTimestamp})
		if err != nil {
			return err
		}
		out, err := events.Patch(ctx, prev.name, types.StrategicMergePatchType, patch, metav1.PatchOptions{})
		if err == nil {
			w.written.Add(k, writtenEvent{name: out.Name, count: out.Count})
			return nil
		}
		if !apierrors.IsNotFound(err) {
			return err
		}
		// Expired or deleted: a new Event object.
	}
	create := ev.DeepCopy()
	create.Name = fmt.Sprintf("%v.%x", ev.InvolvedObject.Name, time.Now().UnixNano())
	create.ResourceVersion = ""
	out, err := events.Create(ctx, create, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	w.written.Add(k, writtenEvent{name: out.Name, count: out.Count})
	return nil
}

// eventRecorder is the controller's record.EventRecorder: events made as
// client-go's recorder makes them, handed to an eventWriter.
type eventRecorder struct {
	w      *eventWriter
	source v1.EventSource
	logger klog.Logger
}

var _ record.EventRecorder = eventRecorder{}

// Event is part of record.EventRecorder.
func (r eventRecorder) Event(obj runtime.Object, eventType, reason, message string) {
	r.record(obj, nil, eventType, reason, message)
}

// Eventf is part of record.EventRecorder.
func (r eventRecorder) Eventf(obj runtime.Object, eventType, reason, messageFmt string, args ...any) {
	r.record(obj, nil, eventType, reason, fmt.Sprintf(messageFmt, args...))
}

// AnnotatedEventf is part of record.EventRecorder.
func (r eventRecorder) AnnotatedEventf(obj runtime.Object, annotations map[string]string, eventType, reason, messageFmt string, args ...any) {
	r.record(obj, annotations, eventType, reason, fmt.Sprintf(messageFmt, args...))
}

func (r eventRecorder) record(obj runtime.Object, annotations map[string]string, eventType, reason, message string) {
	ref, err := reference.GetReference(scheme.Scheme, obj)
	if err != nil {
		r.logger.Error(err, "Could not make a reference for an event; not recorded", "reason", reason, "message", message)
		return
	}
	ns := ref.Namespace
	if ns == "" {
		ns = metav1.NamespaceDefault
	}
	now := metav1.Now()
	r.logger.V(3).Info("Event occurred", "object", klog.KRef(ref.Namespace, ref.Name), "kind", ref.Kind, "type", eventType, "reason", reason, "message", message)
	r.w.add(&v1.Event{
		ObjectMeta:          metav1.ObjectMeta{Namespace: ns, Annotations: annotations},
		InvolvedObject:      *ref,
		Reason:              reason,
		Message:             message,
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		Type:                eventType,
		Source:              r.source,
		ReportingController: r.source.Component,
		ReportingInstance:   r.source.Host,
	})
}

// eventsTo is the client handed to the upstream service controller: its
// writes go through client, its events to w. The upstream controller
// records through a broadcaster of its own, made from the client it is
// given; that broadcaster now hands each event to w without waiting on the
// API server, so its 1,000-event queue never fills, and the events neither
// wait for nor take the budget of the status writes.
type eventsTo struct {
	kubernetes.Interface
	w *eventWriter
}

// CoreV1 is part of kubernetes.Interface.
func (c eventsTo) CoreV1() typedcorev1.CoreV1Interface {
	return coreEventsTo{CoreV1Interface: c.Interface.CoreV1(), w: c.w}
}

type coreEventsTo struct {
	typedcorev1.CoreV1Interface
	w *eventWriter
}

// Events is part of typedcorev1.CoreV1Interface.
func (c coreEventsTo) Events(ns string) typedcorev1.EventInterface {
	return eventSink{EventInterface: c.CoreV1Interface.Events(ns), w: c.w}
}

// eventSink takes the writes of client-go's record.EventSinkImpl: each is
// one occurrence of its event. The broadcaster's own correlation (counts,
// names) is redone by the writer, which sees the events of both
// reconcilers.
type eventSink struct {
	typedcorev1.EventInterface
	w *eventWriter
}

// CreateWithEventNamespace is part of typedcorev1.EventInterface.
func (s eventSink) CreateWithEventNamespace(ev *v1.Event) (*v1.Event, error) {
	return s.take(ev)
}

// UpdateWithEventNamespace is part of typedcorev1.EventInterface.
func (s eventSink) UpdateWithEventNamespace(ev *v1.Event) (*v1.Event, error) {
	return s.take(ev)
}

// PatchWithEventNamespace is part of typedcorev1.EventInterface.
func (s eventSink) PatchWithEventNamespace(ev *v1.Event, _ []byte) (*v1.Event, error) {
	return s.take(ev)
}

// CreateWithEventNamespaceWithContext is part of typedcorev1.EventInterface.
func (s eventSink) CreateWithEventNamespaceWithContext(_ context.Context, ev *v1.Event) (*v1.Event, error) {
	return s.take(ev)
}

// UpdateWithEventNamespaceWithContext is part of typedcorev1.EventInterface.
func (s eventSink) UpdateWithEventNamespaceWithContext(_ context.Context, ev *v1.Event) (*v1.Event, error) {
	return s.take(ev)
}

// PatchWithEventNamespaceWithContext is part of typedcorev1.EventInterface.
func (s eventSink) PatchWithEventNamespaceWithContext(_ context.Context, ev *v1.Event, _ []byte) (*v1.Event, error) {
	return s.take(ev)
}

// take queues ev and answers as the API server would have: the broadcaster
// remembers the answer to correlate repeats, which the writer redoes.
func (s eventSink) take(ev *v1.Event) (*v1.Event, error) {
	s.w.add(ev)
	return ev, nil
}
