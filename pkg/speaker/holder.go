package speaker

import (
	"context"
	"encoding/json"
	"net/netip"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// reconcileHolders makes the state metrics and the holder annotations
// follow what keepalived last reported, for the current plan: keepalived
// reports nothing when a reload adds a VIP to an instance it already
// masters, so this runs on every sync, not only on state changes.
func (s *Speaker) reconcileHolders(ctx context.Context, plan vrrp.Plan, owners map[netip.Addr][]string, states map[string]keepalived.State) {
	s.metrics.VRRPState.Reset()
	for _, inst := range plan.For(s.opts.NodeName) {
		st, ok := states[inst.Name]
		if !ok {
			continue
		}
		val := map[keepalived.State]float64{keepalived.StateMaster: 1, keepalived.StateFault: -1}[st]
		for _, vip := range inst.VIPs {
			s.metrics.VRRPState.WithLabelValues(vip.String(), s.opts.NodeName).Set(val)
			if st != keepalived.StateMaster {
				continue
			}
			for _, key := range owners[vip] {
				s.markHolder(ctx, key, vip)
			}
		}
	}
}

// watch follows keepalived's state changes: metrics, and on MASTER the
// holder annotation and a VIPAcquired event on each Service of the VIPs.
func (s *Speaker) watch(ctx context.Context, events <-chan keepalived.Event) {
	logger := klog.FromContext(ctx)
	for ev := range events {
		s.metrics.Transitions.WithLabelValues(ev.Instance, string(ev.State)).Inc()
		s.mu.Lock()
		applyEvent(s.states, ev)
		s.mu.Unlock()
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

// markHolder records this node as the holder of vip on the Service.
func (s *Speaker) markHolder(ctx context.Context, key string, vip netip.Addr) {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	obj, ok, _ := s.services.GetStore().GetByKey(key)
	if !ok {
		return
	}
	svc := obj.(*v1.Service)
	if svc.Annotations[annotations.Holder] == s.opts.NodeName {
		return // recorded already; the event went out with the patch
	}
	s.recorder.Eventf(svc, v1.EventTypeNormal, EventVIPAcquired, "Node %s holds %s", s.opts.NodeName, vip)
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{annotations.Holder: s.opts.NodeName}}})
	if _, err := s.client.CoreV1().Services(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: Component}); err != nil {
		klog.FromContext(ctx).Error(err, "Recording the VIP holder failed", "service", key)
	}
}
