package speaker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/handoff"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
)

// handoffSettle is how long a leaving speaker lets keepalived run after
// the reload that announces the longer advert interval: a reloaded master
// sends its next advert at once, and a reload of 1,000 instances took
// 28 ms (docs/scale.md); the rest is margin for a busy node.
const handoffSettle = time.Second

// handoffAPITimeout bounds the API calls that decide a hand-off at exit:
// without an answer the speaker exits as before.
const handoffAPITimeout = 3 * time.Second

// adoption is the hand-off a speaker adopts as it starts (package
// handoff): the VIPs the leaving speaker held, which this one keeps on
// the node and out of keepalived.conf until keepalived holds them
// (handoff.Adopt), and the Record's deadline.
type adoption struct {
	mu    sync.Mutex
	vips  map[netip.Prefix]bool
	begun time.Time
	// deadline is the record's; settled, once set, is when keepalived
	// should have taken over (begun + handoff.Settle). The adoption ends
	// at the earlier one.
	deadline, settled time.Time
}

// start begins adopting vips until deadline.
func (a *adoption) start(vips []netip.Prefix, begun, deadline time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.vips = map[netip.Prefix]bool{}
	for _, p := range vips {
		a.vips[p] = true
	}
	a.begun, a.deadline, a.settled = begun, deadline, time.Time{}
}

// settleAfter sets, once, when keepalived should have taken the adopted
// VIPs over: d after the adoption began; trigger runs then.
func (a *adoption) settleAfter(d time.Duration, trigger func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.settled.IsZero() || len(a.vips) == 0 {
		return
	}
	a.settled = a.begun.Add(d)
	time.AfterFunc(time.Until(a.settled)+10*time.Millisecond, trigger)
}

// observe returns the VIPs still adopted, and whether the adoption's
// time is up at now.
func (a *adoption) observe(now time.Time) (map[netip.Prefix]bool, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.vips) == 0 {
		return nil, false
	}
	up := !now.Before(a.deadline) || !a.settled.IsZero() && !now.Before(a.settled)
	return maps.Clone(a.vips), up
}

// finish ends the adoption of the VIPs given.
func (a *adoption) finish(sets ...map[netip.Prefix]bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, set := range sets {
		for p := range set {
			delete(a.vips, p)
		}
	}
}

// pending returns how many VIPs are still adopted.
func (a *adoption) pending() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.vips)
}

// adoptHandoff reads the hand-off record a leaving speaker wrote, before
// keepalived starts, and adopts it when it is valid (handoff.Take): it
// returns the VIPs to keep on the node. The conntrack entries of the
// VIPs' flows are the leaving speaker's, current: the forwarding step
// keeps them.
func (s *Speaker) adoptHandoff(ctx context.Context) []netip.Prefix {
	logger := klog.FromContext(ctx)
	if s.opts.HandoffDir == "" {
		return nil
	}
	boot, err := handoff.BootID()
	if err != nil {
		logger.Error(err, "Cannot read the kernel's boot ID: not adopting any hand-off")
		return nil
	}
	rec, ok, why := handoff.Take(s.opts.HandoffDir, s.opts.NodeName, boot, time.Now())
	if why != nil {
		logger.Info("Not adopting the hand-off record", "reason", why.Error())
	}
	if !ok {
		// Expired (the replacement came late): the backups have the
		// VIPs, and the kernel removed them here, but the virtual
		// servers the previous speaker left are still keeplb's. Unowned,
		// they would stay for good, those of Services deleted meanwhile
		// too (a real cluster's uninstall found them).
		if rec.Ours(s.opts.NodeName, boot) && len(rec.VirtualServers) > 0 {
			if err := s.dp.adoptProgrammed(rec.VirtualServers); err != nil {
				logger.Error(err, "Taking over an expired hand-off's IPVS virtual servers failed")
			} else {
				logger.Info("Took over the IPVS virtual servers of an expired hand-off", "virtualServers", len(rec.VirtualServers))
			}
		}
		return nil
	}
	vips := rec.VIPs()
	if !rec.Since.IsZero() && !rec.Since.After(rec.Written) {
		s.since = rec.Since
	}
	s.adopted = true
	s.adoption.start(vips, time.Now(), rec.Deadline)
	s.metrics.HandoffAdopting.Set(float64(len(vips)))
	s.dp.keepFlows()
	if err := s.dp.adoptProgrammed(rec.VirtualServers); err != nil {
		// They stay as another program's (ForeignVirtualServer events)
		// unless a Service wants them.
		logger.Error(err, "Taking over the hand-off's IPVS virtual servers failed")
	}
	// The sync at the deadline releases what keepalived does not hold by
	// then.
	time.AfterFunc(time.Until(rec.Deadline)+10*time.Millisecond, s.runner.Trigger)
	logger.Info("Adopting the previous speaker's hand-off: keeping its VIPs, IPVS and nftables tables until keepalived holds them",
		"vips", len(vips), "instances", len(rec.Instances), "handedOffAgo", time.Since(rec.Written).Round(time.Millisecond), "deadline", rec.Deadline)
	return vips
}

// adoptionDone ends the adoption of the VIPs keepalived holds now (done)
// and takes those released off the node's links.
func (s *Speaker) adoptionDone(ctx context.Context, links []hostnet.Link, done, release map[netip.Prefix]bool) {
	if len(done) == 0 && len(release) == 0 {
		return
	}
	logger := klog.FromContext(ctx)
	s.adoption.finish(done, release)
	s.metrics.HandoffAdopting.Set(float64(s.adoption.pending()))
	s.metrics.HandoffAdopted.WithLabelValues("held").Add(float64(len(done)))
	s.metrics.HandoffAdopted.WithLabelValues("released").Add(float64(len(release)))
	if len(done) > 0 {
		logger.Info("keepalived holds adopted VIPs", "vips", len(done), "stillAdopting", s.adoption.pending())
	}
	for _, ln := range links {
		for _, p := range ln.Prefixes {
			if done[p] {
				// keepalived holds it now: it must outlive the hand-off's
				// deadline.
				if err := s.net.SetAddressLifetime(ln.Name, p, 0); err != nil {
					logger.Error(err, "Making an adopted VIP permanent again failed: the kernel removes it at the hand-off's deadline", "address", p, "interface", ln.Name)
				}
			}
			if !release[p] {
				continue
			}
			logger.Info("Releasing an adopted VIP: keepalived did not take it over in time (another node is master, or the hand-off's deadline passed), or no instance of this node has it", "address", p, "interface", ln.Name)
			if err := s.net.DeleteAddress(ln.Name, p); err != nil {
				logger.Error(err, "Releasing an adopted VIP", "address", p, "interface", ln.Name)
			}
		}
	}
}

// handOff ends the speaker by a hand-off when one is due (DecideHandoff):
// keepalived announces the longer advert interval, is killed, and the
// record is written. It returns false, with keepalived untouched, when
// the speaker must stop as before.
func (s *Speaker) handOff(ctx context.Context) bool {
	logger := klog.FromContext(ctx)
	ok, why := DecideHandoff(ctx, s.client, s.opts)
	if !ok {
		logger.Info("Not handing off: keepalived stops with priority-0 adverts and the VIPs move at once", "reason", why)
		return false
	}
	if s.lastVRRP == nil || s.lastVRRP.renderErr != nil {
		logger.Info("Not handing off: no keepalived configuration was applied", "reason", why)
		return false
	}
	s.statesMu.Lock()
	held := handoff.Held(s.lastVRRP.keepalivedConfig, s.states)
	s.statesMu.Unlock()
	settle := handoffSettle
	if len(held) == 0 {
		settle = 0 // no adverts to send: this node masters nothing
	}
	// The backups count from the reload's advert, settle before the kill.
	data, _, err := keepalived.RenderValid(handoff.Patient(s.lastVRRP.keepalivedConfig, s.opts.HandoffTimeout+settle))
	if err != nil {
		logger.Error(err, "Not handing off: cannot render the hand-off's keepalived configuration")
		return false
	}
	boot, err := handoff.BootID()
	if err != nil {
		logger.Error(err, "Not handing off: cannot read the kernel's boot ID")
		return false
	}
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.sup.HandOff(hctx, data, settle); err != nil {
		logger.Error(err, "Not handing off: keepalived did not take the hand-off's configuration")
		return false
	}
	now := time.Now()
	rec := handoff.Record{Node: s.opts.NodeName, BootID: boot, Written: now, Deadline: now.Add(s.opts.HandoffTimeout), Instances: held,
		VirtualServers: s.dp.programmed(), Since: s.since}
	s.boundVIPs(ctx, rec.VIPs(), handoff.Lifetime(s.opts.HandoffTimeout))
	if err := handoff.Write(s.opts.HandoffDir, rec); err != nil {
		// keepalived is gone: the backups take over after the timeout,
		// and the replacement, finding no record, deletes the VIPs.
		logger.Error(err, "Writing the hand-off record failed: the replacement will not adopt this node's VIPs")
		return true
	}
	logger.Info("Handed off: VIPs, IPVS and nftables tables and conntrack entries stay for the replacement; keepalived killed without priority-0 adverts",
		"reason", why, "instances", len(held), "vips", len(rec.VIPs()), "backupsWait", s.opts.HandoffTimeout)
	return true
}

// boundVIPs gives the VIPs a hand-off leaves on the node a lifetime of
// valid, so that the kernel removes them when the backups stop waiting,
// whether a replacement comes or not: they are never on two nodes. The
// replacement makes them permanent again once keepalived holds them
// (adoptionDone).
func (s *Speaker) boundVIPs(ctx context.Context, vips []netip.Prefix, valid time.Duration) {
	logger := klog.FromContext(ctx)
	links, err := s.net.Links()
	if err != nil {
		logger.Error(err, "Cannot bound the VIPs left to the hand-off: they stay until the replacement starts")
		return
	}
	want := map[netip.Prefix]bool{}
	for _, p := range vips {
		want[p] = true
	}
	for _, ln := range links {
		for _, p := range ln.Prefixes {
			if !want[p] {
				continue
			}
			if err := s.net.SetAddressLifetime(ln.Name, p, valid); err != nil {
				logger.Error(err, "Cannot bound a VIP left to the hand-off: it stays until the replacement starts", "address", p, "interface", ln.Name)
			}
		}
	}
}

// DecideHandoff says whether the exit of the speaker of o is a hand-off,
// and why: --handoff, then, for auto, handoff.Decide on its Pod, its
// namespace, its DaemonSet and its Node as client reads them now (with
// the speaker's permissions: its own namespace, that namespace's pods and
// daemonsets, and nodes). An
// API server that does not answer within handoffAPITimeout means no.
func DecideHandoff(ctx context.Context, client kubernetes.Interface, o *Options) (bool, string) {
	switch {
	case o.HandoffDir == "":
		return false, "no --handoff-dir"
	case o.Handoff == HandoffNever:
		return false, "--handoff=never"
	case o.Handoff == HandoffAlways:
		return true, "--handoff=always"
	}
	ctx, cancel := context.WithTimeout(ctx, handoffAPITimeout)
	defer cancel()
	var (
		pod  *v1.Pod
		ns   *v1.Namespace
		ds   *appsv1.DaemonSet
		errs []error
	)
	if o.PodName != "" && o.PodNamespace != "" {
		p, err := client.CoreV1().Pods(o.PodNamespace).Get(ctx, o.PodName, metav1.GetOptions{})
		if err == nil {
			pod = p
		}
		errs = append(errs, err)
		n, err := client.CoreV1().Namespaces().Get(ctx, o.PodNamespace, metav1.GetOptions{})
		if err == nil {
			ns = n
		}
		errs = append(errs, err)
	}
	if ref := ownerDaemonSet(pod); ref != "" {
		d, err := client.AppsV1().DaemonSets(pod.Namespace).Get(ctx, ref, metav1.GetOptions{})
		if err == nil {
			ds = d
		}
		errs = append(errs, err)
	}
	node, err := client.CoreV1().Nodes().Get(ctx, o.NodeName, metav1.GetOptions{})
	if err != nil {
		node = nil
	}
	errs = append(errs, err)
	ok, why := handoff.Decide(pod, ns, ds, node)
	if err := errors.Join(errs...); err != nil && !ok {
		why += " (API: " + err.Error() + ")"
	}
	return ok, why
}

// ownerDaemonSet returns the name of the DaemonSet that controls pod, or
// "".
func ownerDaemonSet(pod *v1.Pod) string {
	if pod == nil {
		return ""
	}
	if ref := metav1.GetControllerOfNoCopy(pod); ref != nil && ref.Kind == "DaemonSet" {
		return ref.Name
	}
	return ""
}

// setReadiness records why the speaker is not ready yet, or "": ready
// once keepalived has reported a state for every instance it runs and
// no hand-off is being adopted. A rolling update waits for it before it
// replaces the next node's speaker. keepalived may report no state for
// an instance that starts in FAULT, so missing states stop counting
// keepalivedStartGrace after the syncs began: readiness paces updates,
// and must not stop one for good.
func (s *Speaker) setReadiness(instances []string, states map[string]keepalived.State, starting bool) {
	missing := slices.DeleteFunc(slices.Clone(instances), func(name string) bool { _, ok := states[name]; return ok })
	s.healthyMu.Lock()
	defer s.healthyMu.Unlock()
	why := ""
	switch {
	case s.adoption.pending() > 0:
		why = "adopting the previous speaker's hand-off"
	case starting:
		// A rolling update must not stop the next node while this one
		// cannot take its instances yet.
		why = "leaving the instances of other planned masters to them for a few seconds after its start"
	case len(missing) > 0 && time.Since(s.health.synced) < keepalivedStartGrace:
		why = "keepalived has not reported the state of " + missing[0]
		if len(missing) > 1 {
			why += fmt.Sprintf(" and %d more instances", len(missing)-1)
		}
	}
	s.health.applied, s.health.notReady = true, why
}
