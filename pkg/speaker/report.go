package speaker

import (
	"context"
	"fmt"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// lasting tells which problems to report: each once while it lasts, and
// again only after it went away and came back. A round lists the problems
// of one sync (fresh for each, then end); fresh is true for a problem
// that the previous round did not list, once per round. The zero value is
// ready.
type lasting struct {
	last, cur map[string]bool
}

// fresh records key in this round and reports whether to report it: it is
// not in the previous round, nor already in this one.
func (l *lasting) fresh(key string) bool {
	if l.cur == nil {
		l.cur = map[string]bool{}
	}
	if l.cur[key] {
		return false
	}
	l.cur[key] = true
	return !l.last[key]
}

// end closes the round: its problems are the ones the next round compares
// with.
func (l *lasting) end() {
	l.last, l.cur = l.cur, nil
}

// renderVRRP is the pure part of a sync's VRRP step: this node's
// keepalived.conf for the plan, from cfg (KeepalivedConfig's, whose
// problems are problems), without what keepalived would refuse, which it
// adds to the problems it returns. Its error is for keepalived.conf's
// global settings only, which RunWith checked: no value in the API can
// make it fail.
func renderVRRP(plan vrrp.Plan, node string, pin vrrp.Input, cfg keepalived.Config, problems []ConfigProblem) ([]byte, []ConfigProblem, error) {
	data, dropped, err := keepalived.RenderValid(cfg)
	if err != nil {
		return nil, nil, err
	}
	services := localServices(pin.VIPs)
	for _, d := range dropped {
		p := ConfigProblem{Instance: d.Instance, Dropped: true, Kind: KindIPPool,
			Message: fmt.Sprintf("node %s leaves out VRRP instance %s, which keepalived would refuse: %v", node, d.Instance, d.Err)}
		i, ok := slices.BinarySearchFunc(plan.Instances, d.Instance, func(in vrrp.Instance, name string) int { return strings.Compare(in.Name, name) })
		if !ok {
			continue // not from the plan: KeepalivedConfig makes none
		}
		inst := plan.Instances[i]
		p.Name = inst.Pool
		svcs := servicesOf(inst, services)
		if len(svcs) == 0 {
			problems = append(problems, p)
		}
		for _, svc := range svcs {
			p.Kind, p.Name = KindService, svc
			problems = append(problems, p)
		}
	}
	return data, problems, nil
}

// report logs the plan's problems and this node's ConfigProblems when they
// appear, records a VRRPConfigProblem event for each ConfigProblem on the
// object to fix, and sets their metrics. A problem that lasts is reported
// once; again only if it went away and came back.
func (s *Speaker) report(ctx context.Context, in dataplane.Inputs, plan vrrp.Plan, problems []ConfigProblem) {
	logger := klog.FromContext(ctx)
	sev := map[string]float64{"Warning": 0, "Error": 0}
	for _, p := range plan.Problems {
		sev[p.Severity.String()]++
		if s.reported.fresh(fmt.Sprintf("plan %s %s", p.Pool, p)) {
			logger.Info("VRRP plan problem", "severity", p.Severity, "reason", p.Reason, "pool", p.Pool, "message", p.Message)
		}
	}
	for k, v := range sev {
		s.metrics.Problems.WithLabelValues(k).Set(v)
	}
	dropped := map[string]bool{}
	peers := 0
	for _, p := range problems {
		if p.Dropped {
			dropped[p.Instance] = true
		}
		if p.Peer.IsValid() {
			peers++
		}
		if !s.reported.fresh(fmt.Sprintf("config %+v", p)) {
			continue
		}
		logger.Info("VRRP configuration problem", "instance", p.Instance, "dropped", p.Dropped, "kind", p.Kind, "name", p.Name, "field", p.Field, "message", p.Message)
		msg := p.Message
		if p.Field != "" {
			msg = p.Field + ": " + msg
		}
		if obj := objectOf(in, p.Kind, p.Name); obj != nil && s.recorder != nil {
			s.recorder.Event(obj, v1.EventTypeWarning, EventVRRPConfigProblem, msg)
		}
	}
	s.metrics.InstancesDropped.Set(float64(len(dropped)))
	s.metrics.PeersDropped.Set(float64(peers))
	s.reported.end()
}

// objectOf returns what an event about the object kind/name goes on, or
// nil if in does not hold it. An IPPool, read through a dynamic informer,
// is named by a reference.
func objectOf(in dataplane.Inputs, kind, name string) runtime.Object {
	switch kind {
	case KindService:
		if svc := serviceByKey(in, name); svc != nil {
			return svc
		}
	case KindNode:
		for _, n := range in.Nodes {
			if n.Name == name {
				return n
			}
		}
	case KindIPPool:
		for _, p := range in.Pools {
			if p.Name == name {
				return &v1.ObjectReference{Kind: v1alpha1.IPPoolKind, APIVersion: v1alpha1.SchemeGroupVersion.String(), Name: p.Name, UID: p.UID}
			}
		}
	}
	return nil
}
