package speaker

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/reference"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/metrics"
)

// Holder writer bounds.
const (
	// holderRetryBase and holderRetryMax bound the backoff of a Service
	// whose holder write failed (a conflict with another writer, the API
	// server unreachable): the informer's fresher copy usually arrives
	// within the first retries.
	holderRetryBase = 50 * time.Millisecond
	holderRetryMax  = time.Minute
	// holderEventTries is how often a VIPAcquired event is tried before it
	// is counted as dropped.
	holderEventTries = 3
)

// holderWriter writes the holder annotations, and the VIPAcquired events
// that go with them, that the syncs decide (set), off the sync path: a
// rate-limited work queue keyed by Service, where the latest claim wins, a
// write that failed is retried with backoff, and a value written lately is
// held back (holderWrites). At the client's rate a node taking over 10,000
// VIPs writes for minutes; the syncs, and so every forwarding change, must
// not wait for that.
type holderWriter struct {
	node   string
	client kubernetes.Interface
	// service returns the informer's latest copy of a Service, or nil: its
	// resourceVersion is the write's compare-and-swap, and the fresher, the
	// fewer conflicts.
	service func(key string) *v1.Service
	metrics *metrics.Speaker
	clock   clock.Clock
	queue   workqueue.TypedRateLimitingInterface[string]

	// mu guards want: the VIPs of each Service this node masters, from
	// the last sync, which the worker reads when it writes.
	mu   sync.Mutex
	want map[string][]netip.Addr

	// limits, lastForget and lastEvent (the last event's name stamp) are
	// the worker's alone.
	limits     holderWrites
	lastForget time.Time
	lastEvent  int64
}

// newHolderWriter returns the holder writer of node; service looks
// Services up in the informer's cache; clk is the real clock but in tests.
func newHolderWriter(node string, client kubernetes.Interface, service func(string) *v1.Service, m *metrics.Speaker, clk clock.WithTicker) *holderWriter {
	return &holderWriter{node: node, client: client, service: service, metrics: m, clock: clk, want: map[string][]netip.Addr{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](holderRetryBase, holderRetryMax),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "keeplb_speaker_holder", Clock: clk}),
	}
}

// holderValue is the holder annotation svc should carry once this node
// records itself as the holder of vips, and the VIPs whose entries that
// changes: only these VIPs' entries change (see annotations.Holders), and
// none when they name node already.
func holderValue(svc *v1.Service, node string, vips []netip.Addr) (string, []netip.Addr) {
	all := ingressAddrs(svc)
	h := annotations.ParseHolders(svc.Annotations[annotations.Holder], all)
	var claimed []netip.Addr
	for _, vip := range vips {
		if h[vip] != node {
			h[vip] = node
			claimed = append(claimed, vip)
		}
	}
	if len(claimed) == 0 {
		return "", nil
	}
	return h.Format(all), claimed
}

// set replaces the claims the writer works on with a sync's (the VIPs this
// node masters, by Service) and queues each Service whose annotation, as
// the informer has it, does not name this node for them yet. It only
// compares in memory: the writes are the worker's.
func (w *holderWriter) set(claims map[string][]netip.Addr) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for key := range w.want {
		if _, ok := claims[key]; !ok {
			delete(w.want, key)
		}
	}
	pending := 0
	for key, vips := range claims {
		svc := w.service(key)
		if svc == nil {
			delete(w.want, key)
			continue
		}
		if _, claimed := holderValue(svc, w.node, vips); len(claimed) == 0 {
			delete(w.want, key)
			continue
		}
		// Queued again even when the claim is the one queued: the queue
		// holds a key once, and a value held back or overwritten since
		// (a split brain) must be looked at again.
		w.want[key] = vips
		w.queue.Add(key)
		pending++
	}
	w.metrics.HolderPending.Set(float64(pending))
}

// run writes until ctx is done, then stops: what is still queued is left
// to the next speaker (every sync computes the claims again).
func (w *holderWriter) run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	for w.next(ctx) {
	}
	n := 0
	w.mu.Lock()
	for key, vips := range w.want {
		if svc := w.service(key); svc != nil {
			if _, claimed := holderValue(svc, w.node, vips); len(claimed) > 0 {
				n++
			}
		}
	}
	w.mu.Unlock()
	if n > 0 {
		klog.FromContext(ctx).Info("Stopping with holder annotations not written; the next speaker writes them", "services", n)
	}
}

// next writes the next Service of the queue, waiting for one; false once
// the queue is shut down.
func (w *holderWriter) next(ctx context.Context) bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	if ctx.Err() != nil {
		return true // stopping: only emptying the queue
	}
	wait, err := w.write(ctx, key)
	switch {
	case err != nil && ctx.Err() != nil:
		// Stopping: the write failed for that, and the queue takes nothing
		// more.
	case err != nil:
		w.metrics.HolderWriteErrors.Inc()
		w.queue.AddRateLimited(key)
	case wait > 0:
		w.queue.AddAfter(key, wait)
	default:
		w.queue.Forget(key)
	}
	return true
}

// write records this node in the holder annotation of the Service key as
// the last claim says, with a VIPAcquired event for each entry written. It
// returns how long to wait when the same value went out lately (a split
// brain: see holderWrites), or the error of a write to retry.
func (w *holderWriter) write(ctx context.Context, key string) (time.Duration, error) {
	logger := klog.FromContext(ctx)
	w.mu.Lock()
	vips, ok := w.want[key]
	w.mu.Unlock()
	if !ok {
		return 0, nil // no longer claimed, or written and seen
	}
	svc := w.service(key)
	if svc == nil {
		return 0, nil
	}
	value, claimed := holderValue(svc, w.node, vips)
	if len(claimed) == 0 {
		return 0, nil
	}
	now := w.clock.Now()
	if now.Sub(w.lastForget) >= holderMinRewrite {
		w.limits.forget(now)
		w.lastForget = now
	}
	if wait := w.limits.allow(key, value, now); wait > 0 {
		logger.V(2).Info("Holder annotation written with this value lately; waiting before writing it again", "service", key, "value", value, "wait", wait)
		return wait, nil
	}
	// The resourceVersion makes this a compare-and-swap: another speaker's
	// entries written since this node's informer saw the Service are not
	// overwritten; the retry reads them.
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": svc.ResourceVersion,
		"annotations":     map[string]string{annotations.Holder: value},
	}})
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	if _, err := w.client.CoreV1().Services(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: Component}); err != nil {
		w.limits.failed(key)
		switch {
		case apierrors.IsNotFound(err):
			return 0, nil
		case ctx.Err() != nil:
			// Stopping: next retries nothing.
		case apierrors.IsConflict(err):
			logger.V(2).Info("Service changed since this node read it; recording the VIP holder again", "service", key)
		default:
			logger.Error(err, "Recording the VIP holder failed; retrying", "service", key)
		}
		return 0, err
	}
	for _, vip := range claimed {
		w.acquired(ctx, svc, vip)
	}
	return 0, nil
}

// acquired writes a VIPAcquired event on svc for vip, as client-go's
// recorder would, but itself: the recorder's queue drops events past 1,000
// with only a log line, and a takeover writes one per VIP. Retried a few
// times; an event still not written is counted in
// keeplb_speaker_holder_events_dropped_total and logged.
func (w *holderWriter) acquired(ctx context.Context, svc *v1.Service, vip netip.Addr) {
	ref, err := reference.GetReference(scheme.Scheme, svc)
	if err != nil {
		w.metrics.HolderEventsDropped.Inc()
		return
	}
	now := metav1.NewTime(w.clock.Now())
	// Named as the recorder names them, by the time in nanoseconds; two
	// names alike (two VIPs of one Service in one tick, another node at
	// the same nanosecond) move on by one.
	stamp := max(now.UnixNano(), w.lastEvent+1)
	ev := &v1.Event{
		ObjectMeta:          metav1.ObjectMeta{Namespace: svc.Namespace},
		InvolvedObject:      *ref,
		Reason:              EventVIPAcquired,
		Message:             fmt.Sprintf("Node %s holds %s", w.node, vip),
		Source:              v1.EventSource{Component: Component, Host: w.node},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		Type:                v1.EventTypeNormal,
		ReportingController: Component,
		ReportingInstance:   Component + "-" + w.node,
	}
	backoff := wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: holderEventTries}
	var last error
	_ = wait.ExponentialBackoffWithContext(ctx, backoff, func(ctx context.Context) (bool, error) {
		ev.Name = fmt.Sprintf("%v.%x", svc.Name, stamp)
		w.lastEvent = stamp
		stamp++
		_, last = w.client.CoreV1().Events(svc.Namespace).Create(ctx, ev, metav1.CreateOptions{})
		// Refused (a namespace being deleted, an invalid event): trying
		// again cannot help.
		return last == nil || apierrors.IsInvalid(last) || apierrors.IsForbidden(last), nil
	})
	if last != nil {
		w.metrics.HolderEventsDropped.Inc()
		klog.FromContext(ctx).Error(last, "VIPAcquired event not written", "service", svc.Namespace+"/"+svc.Name, "vip", vip)
	}
}
