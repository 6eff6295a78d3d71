package speaker

import (
	"context"
	"encoding/json"
	"maps"
	"net/netip"
	"slices"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// holderClaims computes what the holder annotations and the state metrics
// should say for this node, from what keepalived last reported for the
// current plan: the VIPs node masters, by Service (owners maps each VIP to
// its Services), and the keeplb_vrrp_state value of each VIP of its
// instances. Every sync computes them, not only state changes: keepalived
// reports nothing when a reload adds a VIP to an instance it already
// masters.
func holderClaims(plan vrrp.Plan, node string, owners map[netip.Addr][]string, states map[string]keepalived.State) (map[string][]netip.Addr, map[netip.Addr]float64) {
	claims := map[string][]netip.Addr{}
	vipStates := map[netip.Addr]float64{}
	for _, inst := range plan.For(node) {
		st, ok := states[inst.Name]
		if !ok {
			continue
		}
		val := map[keepalived.State]float64{keepalived.StateMaster: 1, keepalived.StateFault: -1}[st]
		for _, vip := range inst.VIPs {
			vipStates[vip] = val
			if st != keepalived.StateMaster {
				continue
			}
			for _, key := range owners[vip] {
				claims[key] = append(claims[key], vip)
			}
		}
	}
	return claims, vipStates
}

// applyHolders sets the VRRP state metrics and records this node in the
// holder annotation of each Service it claims VIPs of (markHolder).
func (s *Speaker) applyHolders(ctx context.Context, claims map[string][]netip.Addr, vipStates map[netip.Addr]float64) {
	s.metrics.VRRPState.Reset()
	for vip, v := range vipStates {
		s.metrics.VRRPState.WithLabelValues(vip.String(), s.opts.NodeName).Set(v)
	}
	now := s.holders.now()
	for _, key := range slices.Sorted(maps.Keys(claims)) {
		s.markHolder(ctx, key, claims[key], now)
	}
	s.holders.forget(now)
}

// watch follows keepalived's state changes: metrics, and on MASTER the
// holder annotation and a VIPAcquired event on each Service of the VIPs.
func (s *Speaker) watch(ctx context.Context, events <-chan keepalived.Event) {
	logger := klog.FromContext(ctx)
	for ev := range events {
		s.metrics.Transitions.WithLabelValues(ev.Instance, string(ev.State)).Inc()
		s.statesMu.Lock()
		applyEvent(s.states, ev)
		s.statesMu.Unlock()
		logger.Info("VRRP state changed", "instance", ev.Instance, "state", ev.State, "priority", ev.Priority)
		// Holders, events and metrics follow in the next sync, at once.
		s.runner.Trigger()
	}
}

// applyEvent updates the instances' states with one keepalived event.
func applyEvent(states map[string]keepalived.State, ev keepalived.Event) {
	switch ev.State {
	case keepalived.StateDeleted, keepalived.StateStop:
		delete(states, ev.Instance)
	case keepalived.StateMasterRxLowerPri:
		// Still the master: keepalived saw a lower-priority advert (a
		// node that took over while this one was cut off) and forces an
		// election that this one wins. Recording this as the state would
		// stop this node from claiming the holder annotation.
		states[ev.Instance] = keepalived.StateMaster
	default:
		states[ev.Instance] = ev.State
	}
}

// markHolder records this node as the holder of vips, VIPs of the Service
// key that it masters, in the Service's holder annotation: only these VIPs'
// entries change (see annotations.Holders), and nothing is written when they
// name this node already. A VIPAcquired event goes out with each entry
// written. Writes of one value to one Service are rate-limited (see
// holderWrites), so that two nodes that both hold a VIP, in a split brain,
// cannot overwrite each other at the sync rate.
func (s *Speaker) markHolder(ctx context.Context, key string, vips []netip.Addr, now time.Time) {
	logger := klog.FromContext(ctx)
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	// The informer's latest copy, not the sync's snapshot: its
	// resourceVersion is the compare-and-swap's, and the fresher, the
	// fewer conflicts.
	obj, ok, _ := s.services.GetStore().GetByKey(key)
	if !ok {
		return
	}
	svc := obj.(*v1.Service)
	all := ingressAddrs(svc)
	h := annotations.ParseHolders(svc.Annotations[annotations.Holder], all)
	var claimed []netip.Addr
	for _, vip := range vips {
		if h[vip] != s.opts.NodeName {
			h[vip] = s.opts.NodeName
			claimed = append(claimed, vip)
		}
	}
	if len(claimed) == 0 {
		return // recorded already; the events went out with the patch
	}
	value := h.Format(all)
	if wait := s.holders.allow(key, value, now); wait > 0 {
		logger.V(2).Info("Holder annotation written with this value lately; waiting before writing it again", "service", key, "value", value, "wait", wait)
		s.holders.retryIn(wait, s.triggerSync)
		return
	}
	// The resourceVersion makes this a compare-and-swap: another speaker's
	// entries written since this node's informer saw the Service are not
	// overwritten; the next sync reads them and tries again.
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": svc.ResourceVersion,
		"annotations":     map[string]string{annotations.Holder: value},
	}})
	if _, err := s.client.CoreV1().Services(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: Component}); err != nil {
		s.holders.failed(key)
		if apierrors.IsConflict(err) {
			logger.V(2).Info("Service changed since this node read it; recording the VIP holder at the next sync", "service", key)
			return
		}
		logger.Error(err, "Recording the VIP holder failed", "service", key)
		return
	}
	for _, vip := range claimed {
		s.recorder.Eventf(svc, v1.EventTypeNormal, EventVIPAcquired, "Node %s holds %s", s.opts.NodeName, vip)
	}
}

// triggerSync asks for a sync, once the speaker's runner exists.
func (s *Speaker) triggerSync() {
	if s.runner != nil {
		s.runner.Trigger()
	}
}

// ingressAddrs returns the addresses of svc's status.loadBalancer.ingress,
// IPv4-mapped ones unmapped.
func ingressAddrs(svc *v1.Service) []netip.Addr {
	var out []netip.Addr
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(ing.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// Holder annotation write limits: a speaker writes one value to one
// Service at most once per holderMinRewrite, and while it finds that value
// overwritten again and again (another node claims the same VIP: a split
// brain) it waits twice as long each time, up to holderMaxRewrite. Entries
// of different VIPs never contend: each node writes its own.
const (
	holderMinRewrite = 10 * time.Second
	holderMaxRewrite = 5 * time.Minute
)

// holderWrites remembers, per Service, the last holder annotation value
// this speaker wrote, when, and how long it waits before writing that value
// again. The zero value is ready (on the real clock); only the runner uses
// it, one sync at a time.
type holderWrites struct {
	clock clock.WithDelayedExecution // nil: the real clock
	last  map[string]holderWrite
	// timer triggers a sync when a held-back write may go out; at is its
	// deadline.
	timer clock.Timer
	at    time.Time
}

type holderWrite struct {
	value string
	at    time.Time
	wait  time.Duration
}

func (w *holderWrites) now() time.Time {
	if w.clock == nil {
		return time.Now()
	}
	return w.clock.Now()
}

// allow records a write of value to key at now and returns 0, or returns
// how long to wait when this speaker wrote that value less than its wait
// ago. Writing the value again doubles the wait, unless the last write is
// so old (twice its wait) that the value lasted: a new holding, not a
// fight.
func (w *holderWrites) allow(key, value string, now time.Time) time.Duration {
	if w.last == nil {
		w.last = map[string]holderWrite{}
	}
	wait := holderMinRewrite
	if prev, ok := w.last[key]; ok && prev.value == value {
		since := now.Sub(prev.at)
		if since < prev.wait {
			return prev.wait - since
		}
		if since < 2*prev.wait {
			wait = min(2*prev.wait, holderMaxRewrite)
		}
	}
	w.last[key] = holderWrite{value: value, at: now, wait: wait}
	return 0
}

// failed forgets the write allow just recorded for key: it did not happen.
func (w *holderWrites) failed(key string) {
	delete(w.last, key)
}

// forget drops what no longer limits anything: writes older than twice
// their wait (deleted Services included).
func (w *holderWrites) forget(now time.Time) {
	for k, prev := range w.last {
		if now.Sub(prev.at) >= 2*prev.wait {
			delete(w.last, k)
		}
	}
}

// retryIn makes sure trigger runs in d, or sooner.
func (w *holderWrites) retryIn(d time.Duration, trigger func()) {
	at := w.now().Add(d)
	if w.timer != nil && !w.at.After(at) && w.at.After(w.now()) {
		return // one is due sooner
	}
	if w.timer != nil {
		w.timer.Stop()
	}
	var c clock.WithDelayedExecution = clock.RealClock{}
	if w.clock != nil {
		c = w.clock
	}
	w.timer, w.at = c.AfterFunc(d, trigger), at
}
