package speaker

import (
	"context"
	"net/netip"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

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

// applyHolders sets the VRRP state metrics and hands the holder writer
// the Services whose annotation should name this node for claims (see
// holderWriter.set). The forwarding step learns which VIPs this node has
// just become the holder of, and which it has just stopped holding (see
// dataplane.Reconciler.Acquired and Released). It never waits for the API server: a node taking over
// 10,000 VIPs at the client's rate would hold back every sync, and so all
// forwarding changes, for minutes.
//
// The metric changes by difference with what the last sync set: series of
// VIPs gone are deleted, changed ones set, the rest left alone. Clearing
// it and setting every series again, as it once did, let a scrape in
// between see VIPs missing, and cost 10,000 new series per sync at 10,000
// VIPs.
func (s *Speaker) applyHolders(ctx context.Context, claims map[string][]netip.Addr, vipStates map[netip.Addr]float64) {
	var acquired, released []netip.Addr
	for vip, v := range vipStates {
		if v == 1 && s.vipStates[vip] != 1 {
			acquired = append(acquired, vip)
		}
	}
	for vip, v := range s.vipStates {
		if v == 1 && vipStates[vip] != 1 {
			released = append(released, vip)
		}
	}
	s.dp.holding(ctx, acquired, released)
	for vip := range s.vipStates {
		if _, ok := vipStates[vip]; !ok {
			s.metrics.VRRPState.DeleteLabelValues(vip.String(), s.opts.NodeName)
		}
	}
	for vip, v := range vipStates {
		if old, ok := s.vipStates[vip]; !ok || old != v {
			s.metrics.VRRPState.WithLabelValues(vip.String(), s.opts.NodeName).Set(v)
		}
	}
	s.vipStates = vipStates
	s.holders.set(claims)
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
// again. The zero value is ready; only the holder writer's worker uses it.
type holderWrites struct {
	last map[string]holderWrite
}

type holderWrite struct {
	value string
	at    time.Time
	wait  time.Duration
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
