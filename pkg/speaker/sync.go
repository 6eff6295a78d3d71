package speaker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/connsync"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/handoff"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nodeview"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// observed is what one sync reads before it computes anything: the
// informers' objects, the node's links, and keepalived's last reported
// state of each instance (from the notify FIFO).
//
// A sync reads only what it needs. When full, in holds every object, and
// everything is computed; resync says to read the whole IPVS table too.
// Otherwise changed holds the Services the informers saw change, with
// their EndpointSlices, and the forwarding state is updated for those
// alone; in then holds every object only when the VRRP step's inputs may
// have changed too (plan), and the Nodes and IPPools alone when not.
type observed struct {
	in      dataplane.Inputs
	full    bool
	resync  bool
	changed map[string]dataplane.ServiceInputs
	plan    bool
	links   []hostnet.Link
	states  map[string]keepalived.State
	// adopting are the VIPs of a hand-off this speaker still adopts, and
	// adoptExpired says the adoption's time is up (see adoption).
	adopting     map[netip.Prefix]bool
	adoptExpired bool
	// now is when the sync observed: the failback hold is a matter of
	// time (vrrp.Hold); lastReload is when a sync last changed
	// keepalived.conf (a reload, which restarts keepalived's delays).
	now, lastReload time.Time
	// service looks a Service up in the informer's cache, for the events
	// about it.
	service func(key string) *v1.Service
}

// desired is everything this node should have after one sync, as compute
// gives it from an observed state alone.
type desired struct {
	// forwarding is the dataplane's State (IPVS table, nftables rules),
	// forwardingProblems what it cannot do as asked, and forwardingDelta
	// how it differs from the last sync's.
	forwarding         dataplane.State
	forwardingProblems []dataplane.Problem
	forwardingDelta    dataplane.Delta

	vrrpDesired
	// reused says vrrpDesired is the last sync's: its inputs did not
	// change.
	reused bool

	// ignoredAddrs are the Nodes' InternalIPs that nodeview leaves out.
	ignoredAddrs map[string][]nodeview.Ignored

	// connSync is the connection sync daemons this node should run; their
	// guard is in forwarding (State.Sync).
	connSync connsync.Want
}

// vrrpDesired is the VRRP step's share of desired.
type vrrpDesired struct {
	// plan is the cluster's VRRP plan, the same on every node, and owners
	// maps each VIP to the Services using it.
	plan   vrrp.Plan
	owners map[netip.Addr][]string
	// successors are plan's Successors from this node, for the
	// forwarding step with --conn-sync (dataplane.Inputs.Successors).
	successors map[netip.Addr]string
	// keepalivedConf is this node's keepalived.conf, and configProblems
	// what it leaves out; renderErr, when set, says it could not be
	// rendered at all. keepalivedConfig is what it was rendered from: a
	// hand-off renders it again.
	keepalivedConf   []byte
	keepalivedConfig keepalived.Config
	// instances are the names of the instances keepalivedConf has.
	instances []string
	// adoptDone are the adopted VIPs keepalived now holds, adoptRelease
	// those to take off the node (handoff.Adopt); adopting says some were
	// still adopted, and adoptSettle is how long after the adoption began
	// keepalived has to take them over (handoff.Settle).
	adoptDone, adoptRelease map[netip.Prefix]bool
	adopting                bool
	adoptSettle             time.Duration
	configProblems          []ConfigProblem
	renderErr               error
	// renderTook is how long the plan and keepalived.conf took.
	renderTook time.Duration
	// track are the track files' values, by whether this node can
	// forward: only applying the forwarding state tells which holds.
	track map[bool]map[string]int
	// hold is this node's failback record after this sync, held the
	// instances it is held on (vrrp.Hold.Held), deferred the new instances
	// it leaves out of keepalived.conf (vrrp.Hold.Deferred), and holdUntil
	// when the first of those holds or deferrals ends (zero when none is).
	hold      vrrp.Hold
	held      map[string]bool
	deferred  map[string]bool
	holdUntil time.Time
	// starting says some instances are deferred because the speaker has
	// just started: it is not ready until they are in keepalived.conf.
	starting bool

	// claims are the VIPs this node masters, by Service, for the holder
	// annotations; vipStates the keeplb_vrrp_state value of each VIP of
	// this node's instances.
	claims    map[string][]netip.Addr
	vipStates map[netip.Addr]float64
	// services are the Services with VIPs in the plan, "namespace/name".
	services map[string]bool
}

// sync is one pass of the speaker: it observes the API's and the node's
// state, computes everything this node should have, and applies it.
func (s *Speaker) sync(ctx context.Context) (err error) {
	logger := klog.FromContext(ctx)
	defer func() {
		// The runner retries a failed sync; this says why it had to.
		if err != nil {
			// What this sync took of the changes is not lost: the next
			// one computes everything. (After a failure of its own, the
			// Reconciler reads the whole IPVS table again, too.)
			s.pending.everything()
			logger.Error(err, "Sync failed; retrying, less often while it keeps failing, and at once on any change")
		} else {
			s.metrics.LastSyncSuccess.SetToCurrentTime()
		}
	}()
	obs, err := s.observe(s.pending.take(), time.Now())
	if err != nil {
		return err
	}
	if obs.resync {
		warnMemoryLimit(logger)
	}
	return s.apply(ctx, obs, s.compute(obs))
}

// observe reads the state a sync starts from, given what the informers
// saw change: everything when ch says so (a Node or an IPPool changed, or
// the last sync failed) or resyncPeriod has passed since the last resync
// (which reads the whole IPVS table too), else only the Services that
// changed, and every object only when the VRRP step's inputs may have
// changed (see inPlan; or the node's links, or keepalived's states). Only
// reading the node's links can fail.
func (s *Speaker) observe(ch changes, now time.Time) (observed, error) {
	obs := observed{service: s.lookupService, now: now, lastReload: s.lastReload}
	links, err := s.net.Links()
	if err != nil {
		return observed{}, err
	}
	obs.links = links
	s.statesMu.Lock()
	obs.states = maps.Clone(s.states)
	s.statesMu.Unlock()
	obs.resync = now.Sub(s.lastResync) >= resyncPeriod
	obs.full = ch.all || obs.resync
	obs.adopting, obs.adoptExpired = s.adoption.observe(now)
	// While it adopts, every sync recomputes VRRP: the adoption's end is
	// a matter of time as well as of states.
	// So is a failback hold's end.
	obs.plan = obs.full || s.lastVRRP == nil || len(obs.adopting) > 0 || s.lastVRRP.adopting ||
		!s.lastVRRP.holdUntil.IsZero() && !now.Before(s.lastVRRP.holdUntil) ||
		!reflect.DeepEqual(links, s.lastLinks) || !maps.Equal(obs.states, s.lastStates)
	s.lastLinks, s.lastStates = links, obs.states
	if !obs.full {
		keys := maps.Clone(ch.services)
		if keys == nil {
			keys = map[string]bool{}
		}
		maps.Copy(keys, ch.endpoints)
		obs.changed = s.changedInputs(keys)
		for key := range keys {
			obs.plan = obs.plan || s.inPlan(key, obs.changed[key].Service, ch.services[key])
		}
	}
	if obs.resync {
		s.lastResync = now
	}
	if obs.plan {
		obs.in = s.collect()
	} else {
		obs.in = s.collectGlobal()
	}
	return obs, nil
}

// inPlan reports whether a change of the Service key (svc now, nil when
// gone; its object when object, else its endpoints) may change the VRRP
// plan: only if the plan has it (at the last computation, or by the class
// rule now), and, for endpoints, only if they place its VIPs (Local).
func (s *Speaker) inPlan(key string, svc *v1.Service, object bool) bool {
	ours := s.lastVRRP == nil || s.lastVRRP.services[key] ||
		svc != nil && annotations.Handles(svc, s.opts.LoadBalancerClass, s.opts.DefaultClass)
	return ours && (object || svc == nil || localVIPs(svc))
}

// compute is the speaker's one computation: from obs alone, with no
// kernel or API call, everything this node should have. (The forwarding
// step's Cache spares recomputing the Services that did not change, and
// the VRRP step's share is the last sync's when obs says its inputs did
// not change.)
func (s *Speaker) compute(obs observed) desired {
	node := s.opts.NodeName
	var want desired
	if obs.plan || s.lastVRRP == nil {
		start := time.Now()
		pin, owners := PlanInput(obs.in)
		v := &want.vrrpDesired
		v.plan, v.owners = vrrp.Compute(pin), owners
		v.successors = v.plan.Successors(node)
		prev := vrrp.NewHold(s.since, !s.adopted)
		if s.lastVRRP != nil {
			prev = s.lastVRRP.hold
		}
		v.hold = prev.Next(v.plan, node, obs.states, obs.now)
		v.held, v.holdUntil = v.hold.Held(v.plan, node, obs.now)
		var deferUntil time.Time
		v.deferred, v.starting, deferUntil = v.hold.Deferred(v.plan, node, pin, obs.now)
		if !deferUntil.IsZero() && (v.holdUntil.IsZero() || deferUntil.Before(v.holdUntil)) {
			v.holdUntil = deferUntil
		}
		cfg, problems := KeepalivedConfig(v.plan, node, pin, obs.links, s.layout)
		prompt := v.hold.Prompt(v.plan, node, obs.lastReload, obs.now)
		cfg = withoutPreemptDelay(withoutInstances(cfg, v.deferred), prompt)
		var still map[netip.Prefix]bool
		still, v.adoptDone, v.adoptRelease = handoff.Adopt(cfg, obs.states, obs.adopting, obs.adoptExpired)
		v.adopting, v.adoptSettle = len(obs.adopting) > 0, handoff.Settle(cfg)
		v.keepalivedConfig = handoff.WithoutAdopted(cfg, still)
		v.keepalivedConf, v.configProblems, v.renderErr = renderVRRP(v.plan, node, pin, v.keepalivedConfig, problems)
		if last := s.lastVRRP; last != nil && !bytes.Equal(v.keepalivedConf, last.keepalivedConf) {
			// This sync reloads keepalived anyway, which restarts the
			// delay of every instance whose hold has just ended: those go
			// without it too.
			if p := v.hold.Prompt(v.plan, node, obs.now, obs.now); !maps.Equal(p, prompt) {
				v.keepalivedConfig = withoutPreemptDelay(v.keepalivedConfig, p)
				v.keepalivedConf, v.configProblems, v.renderErr = renderVRRP(v.plan, node, pin, v.keepalivedConfig, problems)
			}
		}
		dropped := map[string]bool{}
		for _, p := range v.configProblems {
			if p.Dropped {
				dropped[p.Instance] = true
			}
		}
		for _, in := range cfg.Instances {
			if !dropped[in.Name] {
				v.instances = append(v.instances, in.Name)
			}
		}
		v.renderTook = time.Since(start)
		v.track = map[bool]map[string]int{
			true:  vrrp.TrackValues(v.plan, node, pin, true),
			false: vrrp.TrackValues(v.plan, node, pin, false),
		}
		v.claims, v.vipStates = holderClaims(v.plan, node, owners, obs.states)
		v.services = map[string]bool{}
		for _, keys := range owners {
			for _, k := range keys {
				v.services[k] = true
			}
		}
		last := want.vrrpDesired
		s.lastVRRP = &last
	} else {
		want.vrrpDesired, want.reused = *s.lastVRRP, true
	}

	// Forwarding after the plan: with --conn-sync, nodeport forwarding
	// sends no new connection to the NodePort of the node that would take
	// a VIP from this one (dataplane.Inputs.Successors).
	var guardChanged bool
	want.connSync, guardChanged = s.cs.compute(obs.in.Nodes, obs.links)
	var successors map[netip.Addr]string
	if want.connSync.FollowVIP {
		successors = want.vrrpDesired.successors
	}
	if obs.full {
		in := obs.in
		in.Successors = successors
		want.forwarding, want.forwardingProblems, want.forwardingDelta = s.dp.compute(in)
		// The safety net: the kernel can change behind the Reconciler.
		want.forwardingDelta.Full = want.forwardingDelta.Full || obs.resync
	} else {
		want.forwarding, want.forwardingProblems, want.forwardingDelta = s.dp.update(obs.changed, successors)
	}
	want.forwarding.Sync = want.connSync.Guard
	want.forwarding.FollowVIP = want.connSync.FollowVIP
	want.forwardingDelta.NFT = want.forwardingDelta.NFT || guardChanged

	want.ignoredAddrs = ignoredAddrs(obs.in.Nodes)
	return want
}

// apply makes the node and the API what want says, in this order:
//
//  1. forwarding (keeplb's nftables table, IPVS, the table again; see
//     dataplane.Reconciler.Sync) before VRRP, so that a new VIP comes up
//     with its virtual servers and masquerading in place instead of
//     refusing connections until the next sync. Its failure does not stop
//     VRRP: a node whose IPVS failed still holds its VIPs (with the
//     priorities of a node that cannot forward, when its table is
//     missing);
//  2. the connection sync daemons, behind the guard the table now holds
//     (or the backup stopped, if the table's write failed);
//  3. the problems found, as logs, events and metrics;
//  4. the track files, then keepalived.conf (a reload then starts with the
//     right priorities);
//  5. the VRRP state metrics and the holder annotations, which it hands to
//     the holder writer and does not wait for; a sync at the end of the
//     first failback hold still running;
//  6. the end of a hand-off's adoption: the VIPs keepalived now holds
//     leave the adopted set (this sync's keepalived.conf has them back),
//     those released are taken off the node; then readiness.
func (s *Speaker) apply(ctx context.Context, obs observed, want desired) error {
	dpErr := s.dp.apply(ctx, obs.service, want.forwarding, want.forwardingProblems, want.forwardingDelta)
	canForward := s.dp.canForward()
	s.cs.apply(ctx, nodeNamed(obs.in.Nodes, s.opts.NodeName), want.connSync, canForward)
	s.reportObserved(ctx, obs.in, want, canForward)
	err := s.applyVRRP(ctx, obs.in, want, canForward, obs.now)
	s.healthyMu.Lock()
	s.health.vrrpErr = err
	s.healthyMu.Unlock()
	if err != nil {
		s.metrics.VRRPSyncErrors.Inc()
		return errors.Join(dpErr, err)
	}
	s.applyHolders(ctx, want.claims, want.vipStates)
	s.holdUntil(want.held, want.deferred, want.holdUntil)
	if want.adopting {
		s.adoption.settleAfter(want.adoptSettle, s.runner.Trigger)
	}
	s.adoptionDone(ctx, obs.links, want.adoptDone, want.adoptRelease)
	s.setReadiness(want.instances, obs.states, want.starting)
	return dpErr
}

// holdUntil reports the instances this node is held on and those it
// defers, and has a sync run when the first of those holds or deferrals
// ends, which renders the instance without preempt_delay, or adds it
// (vrrp.Hold).
func (s *Speaker) holdUntil(held, deferred map[string]bool, until time.Time) {
	s.metrics.FailbackHeld.Set(float64(len(held)))
	s.metrics.NewInstancesDeferred.Set(float64(len(deferred)))
	s.holdMu.Lock()
	defer s.holdMu.Unlock()
	if until.Equal(s.holdAt) {
		return
	}
	if s.holdTimer != nil {
		s.holdTimer.Stop()
	}
	s.holdAt, s.holdTimer = until, nil
	if !until.IsZero() {
		s.holdTimer = time.AfterFunc(time.Until(until)+10*time.Millisecond, s.runner.Trigger)
	}
}

// reportObserved reports what a sync learned beyond the plan's own
// problems: the Nodes' InternalIPs that keeplb ignores, the pools whose
// plan ignores Ready (fail-static), and whether this node can forward.
func (s *Speaker) reportObserved(ctx context.Context, in dataplane.Inputs, want desired, canForward bool) {
	s.warnNodes(ctx, in.Nodes, want.ignoredAddrs)
	s.metrics.FailStatic.Reset()
	for _, p := range want.plan.Problems {
		if p.Reason == vrrp.ReasonFailStatic {
			s.metrics.FailStatic.WithLabelValues(p.Pool).Set(1)
		}
	}
	can := 0.0
	if canForward {
		can = 1
	}
	s.metrics.CanForward.Set(can)
}

// applyVRRP reports what this node's keepalived.conf leaves out, writes
// the track files and hands the configuration to the supervisor. It fails
// only when nothing could be applied.
func (s *Speaker) applyVRRP(ctx context.Context, in dataplane.Inputs, want desired, canForward bool, now time.Time) error {
	if want.renderErr != nil {
		return fmt.Errorf("render keepalived.conf: %w", want.renderErr)
	}
	if !want.reused {
		s.metrics.RenderDuration.Observe(want.renderTook.Seconds())
	}
	s.report(ctx, in, want.plan, want.configProblems)
	for _, name := range slices.Sorted(maps.Keys(want.track[canForward])) {
		v := want.track[canForward][name]
		if _, err := keepalived.WriteAtomic(s.layout.TrackPath(name), []byte(strconv.Itoa(v)+"\n")); err != nil {
			return err
		}
	}
	if changed, err := s.sup.Apply(want.keepalivedConf); err != nil {
		return err
	} else if changed {
		s.lastReload = now
		klog.FromContext(ctx).V(2).Info("keepalived.conf changed", "bytes", len(want.keepalivedConf))
	}
	return nil
}
