package speaker

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/nft"
)

// EventForwardingProblem is recorded as a Warning on a Service when the
// IPVS dataplane cannot forward it as asked and does the closest safe thing
// instead (see dataplane.Problem).
const EventForwardingProblem = "ForwardingProblem"

// EventIPVSUnavailable is recorded as a Warning on each Service a node
// would forward with IPVS when that node's kernel has no IPVS: the node
// may hold the Service's VIP, but nothing forwards its traffic.
const EventIPVSUnavailable = "IPVSUnavailable"

// EventForeignVirtualServer is recorded as a Warning on this node's Node
// when IPVS holds virtual servers in keeplb's pools that keeplb did not
// program and no Service of keeplb's wants: they are left alone.
const EventForeignVirtualServer = "ForeignVirtualServer"

// ipvsStep is the speaker's forwarding step: compute gives this node's
// dataplane.State; apply has the dataplane.Reconciler bring the kernel
// there (keeplb's nftables table and IPVS) and reports what it could not
// do as events and metrics; exit has the Reconciler delete what it
// programmed. Only the runner calls them, one call at a time.
type ipvsStep struct {
	node string
	// desired remembers each Service's part of the desired state, so a
	// sync recomputes only the Services whose objects changed.
	desired dataplane.Cache
	r       *dataplane.Reconciler
	// noIPVS is true when the kernel has no IPVS; unavailableWarned holds
	// the Services ("namespace/name") already told so by an
	// IPVSUnavailable event, so each gets one per process.
	noIPVS            bool
	unavailableWarned map[string]bool
	keepOnExit        bool
	metrics           *metrics.Speaker
	recorder          record.EventRecorder

	// problems are the last sync's, so each is logged and recorded once
	// while it lasts.
	problems lasting

	// guardOnly is set with --ipvs=false: kube-proxy forwards, and the
	// step writes keeplb's table with the VIP port guard alone.
	guardOnly bool

	// foreign are the virtual servers in the pools' ranges that keeplb
	// did not program and no Service of keeplb's wants, as last reported:
	// they are left alone.
	foreign []ipvs.Key
}

// newIPVSStep is the forwarding step on k: with --ipvs and a kernel with
// IPVS, the whole dataplane; otherwise only the VIP port guard, which a
// node needs whenever it may hold VIPs (they are addresses of the node like
// any other, and without the guard every host-network listener would
// answer on them). recorder records the step's events.
func newIPVSStep(o *Options, k Kernel, m *metrics.Speaker, recorder record.EventRecorder) *ipvsStep {
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, recorder: recorder}
	dk := dataplane.Kernel{IPVS: k.IPVS, NFT: k.NFT, Conntrack: k.Conntrack}
	switch {
	case !o.IPVS:
		d.guardOnly = true
		dk = dataplane.Kernel{NFT: k.NFT}
	case k.IPVS == nil:
		m.RegisterIPVS()
		m.IPVSAvailable.Set(0)
		d.noIPVS, d.unavailableWarned = true, map[string]bool{}
		dk = dataplane.Kernel{NFT: k.NFT}
	default:
		m.RegisterIPVS()
		m.IPVSAvailable.Set(1)
		if !o.skipSysctls() {
			dk.Sysctls = k.Net
		}
	}
	d.r = dataplane.NewReconciler(o.NodeName, dk)
	if dk.IPVS != nil {
		m.RegisterIPVSStats(d.stats)
	}
	m.RegisterGuardDrops(d.r.GuardDropped)
	return d
}

// compute returns this node's desired dataplane state from every object,
// with the problems found and how it differs from the last one. Without
// IPVS only its guard is written.
func (d *ipvsStep) compute(in dataplane.Inputs) (dataplane.State, []dataplane.Problem, dataplane.Delta) {
	return d.desired.Compute(in, d.node)
}

// update returns this node's desired dataplane state after the Services
// in changed changed, recomputing those alone (see dataplane.Cache.Update).
// Only after a compute.
func (d *ipvsStep) update(changed map[string]dataplane.ServiceInputs, successors map[netip.Addr]string) (dataplane.State, []dataplane.Problem, dataplane.Delta) {
	st, problems, delta, ok := d.desired.Update(changed, successors)
	if !ok {
		panic("speaker: the forwarding step's update before its first compute") // observe makes the first sync full
	}
	return st, problems, delta
}

// apply brings this node's dataplane to st, changing what delta names
// (see dataplane.Reconciler.SyncDelta), and reports problems, st's and the
// kernel's, on the Services service looks up.
func (d *ipvsStep) apply(ctx context.Context, service func(string) *v1.Service, st dataplane.State, problems []dataplane.Problem, delta dataplane.Delta) error {
	start := time.Now()
	if d.noIPVS {
		d.warnUnavailable(service, st, delta)
	}
	rep, err := d.r.SyncDelta(ctx, st, delta)
	d.metrics.NFTSyncErrors.Add(float64(rep.NFTFailures))
	if d.noIPVS || d.guardOnly {
		return err
	}
	d.reportForeign(ctx, rep.Foreign)
	d.report(ctx, service, append(problems, rep.Problems...))
	if res := rep.Result; res.Changes() > 0 || res.Failed > 0 {
		klog.FromContext(ctx).V(2).Info("IPVS table changed", "result", res)
	}
	d.metrics.IPVSSyncDuration.Observe(time.Since(start).Seconds())
	d.metrics.IPVSVirtualServers.Set(float64(len(st.IPVS)))
	d.metrics.IPVSRealServers.Set(float64(d.desired.RealServers()))
	if rep.IPVSFailed {
		d.metrics.IPVSSyncErrors.Inc()
	}
	return err
}

// canForward reports whether this node can forward what keeplb forwards
// with IPVS (see dataplane.Reconciler.CanForward): never without the IPVS
// step (d nil) or with --ipvs=false.
func (d *ipvsStep) canForward() bool {
	return d != nil && d.r.CanForward()
}

// keepFlows keeps the conntrack entries the first table write would
// delete (dataplane.Reconciler.KeepFlows): they belong to a hand-off this
// speaker adopts.
func (d *ipvsStep) keepFlows() {
	if d != nil && d.r != nil {
		d.r.KeepFlows()
	}
}

// programmed returns the virtual servers the forwarding step programmed,
// for a hand-off's record.
func (d *ipvsStep) programmed() []ipvs.Key {
	if d == nil || d.r == nil {
		return nil
	}
	return d.r.Programmed()
}

// adoptProgrammed takes over a hand-off's virtual servers (see
// dataplane.Reconciler.AdoptProgrammed).
func (d *ipvsStep) adoptProgrammed(keys []ipvs.Key) error {
	if d == nil || d.r == nil {
		return nil
	}
	return d.r.AdoptProgrammed(keys)
}

// exit deletes keeplb's virtual servers (those it programmed) and its
// table, unless --keep-ipvs-on-exit.
// holding passes on the VIPs this node has just become the holder of and
// those it has just stopped holding (dataplane.Reconciler.Acquired and
// Released).
func (d *ipvsStep) holding(ctx context.Context, acquired, released []netip.Addr) {
	if d == nil || d.r == nil {
		return
	}
	if len(acquired) > 0 {
		d.r.Acquired(ctx, acquired)
	}
	if len(released) > 0 {
		d.r.Released(ctx, released)
	}
}

func (d *ipvsStep) exit(ctx context.Context, in dataplane.Inputs) error {
	logger := klog.FromContext(ctx)
	if d.keepOnExit {
		if !d.noIPVS && !d.guardOnly {
			logger.Info("Leaving IPVS virtual servers and the nftables table in place (--keep-ipvs-on-exit)")
		}
		return nil
	}
	st, _ := dataplane.Desired(in, d.node)
	rep, err := d.r.Exit(ctx, st.Owns)
	d.metrics.NFTSyncErrors.Add(float64(rep.NFTFailures))
	if !d.noIPVS && !d.guardOnly {
		logger.Info("Removed IPVS virtual servers", "deleted", rep.Result.VirtualDeleted, "failed", rep.Result.Failed)
	}
	if err == nil {
		logger.Info("Removed keeplb's nftables table", "table", nft.Family+" "+nft.Table)
	}
	return err
}

// reportForeign logs the virtual servers in the pools' ranges that keeplb
// leaves alone (sorted, from dataplane.Report.Foreign), when they change,
// and records a ForeignVirtualServer Warning on this node's Node.
func (d *ipvsStep) reportForeign(ctx context.Context, foreign []ipvs.Key) {
	if slices.Equal(foreign, d.foreign) {
		return
	}
	d.foreign = foreign
	if len(foreign) == 0 {
		return
	}
	klog.FromContext(ctx).Info("Leaving alone IPVS virtual servers in keeplb's pools that keeplb did not program and no Service of keeplb's wants (kube-proxy's for externalIPs, or left by an earlier speaker); delete them with ipvsadm -D if they are stale",
		"virtualServers", foreign)
	if d.recorder == nil {
		return
	}
	names := make([]string, len(foreign))
	for i, k := range foreign {
		names[i] = k.String()
	}
	if len(names) > 10 {
		names = append(names[:10], fmt.Sprintf("and %d more", len(names)-10))
	}
	// On the Node: the virtual servers are this node's, and no Service of
	// keeplb's owns them. (A Node's events name it by name; its UID is
	// its name, as the kubelet records them.)
	node := &v1.ObjectReference{Kind: "Node", Name: d.node, UID: types.UID(d.node)}
	d.recorder.Eventf(node, v1.EventTypeWarning, EventForeignVirtualServer,
		"IPVS virtual servers in keeplb's IPPools that keeplb did not program and no keeplb Service wants are left alone: %s. If another program (kube-proxy for externalIPs) owns them, take those addresses out of the IPPools; if they are stale, delete them on %s with ipvsadm -D",
		strings.Join(names, ", "), d.node)
}

// stats returns the kernel's counters of the virtual servers keeplb
// programmed, for the metrics scrape (see dataplane.Reconciler.Stats).
func (d *ipvsStep) stats() []metrics.VirtualServerStats {
	cs := d.r.Stats()
	out := make([]metrics.VirtualServerStats, 0, len(cs))
	for _, c := range cs {
		out = append(out, metrics.VirtualServerStats{Service: c.Service, Key: c.Key, Stats: c.Stats})
	}
	return out
}

// report logs the dataplane's problems, and records a Warning event on the
// Service of each, once while it lasts.
func (d *ipvsStep) report(ctx context.Context, service func(string) *v1.Service, problems []dataplane.Problem) {
	logger := klog.FromContext(ctx)
	for _, p := range problems {
		if !d.problems.fresh(p.String()) {
			continue
		}
		logger.Info("Forwarding problem", "service", p.Service, "field", p.Field, "message", p.Message)
		if d.recorder == nil {
			continue
		}
		if svc := service(p.Service); svc != nil {
			d.recorder.Eventf(svc, v1.EventTypeWarning, EventForwardingProblem, "%s: %s", p.Field, p.Message)
		}
	}
	d.problems.end()
}

// warnUnavailable records an IPVSUnavailable Warning on each Service this
// node would forward (those st.Owners names: Services of pools whose VIPs
// it may hold, not forwarded by kube-proxy) that has not had one from this
// process yet. Once per Service, not per sync: the condition lasts until
// the speaker restarts, and repeating it would only add noise. Unless
// delta is Full, only the owners of the virtual servers it names can be
// new.
func (d *ipvsStep) warnUnavailable(service func(string) *v1.Service, st dataplane.State, delta dataplane.Delta) {
	if d.recorder == nil {
		return
	}
	owners := map[string]bool{}
	if delta.Full {
		for _, o := range st.Owners {
			owners[o] = true
		}
	}
	for _, k := range delta.Virtuals {
		if o, ok := st.Owners[k]; ok {
			owners[o] = true
		}
	}
	for _, owner := range slices.Sorted(maps.Keys(owners)) {
		if d.unavailableWarned[owner] {
			continue
		}
		svc := service(owner)
		if svc == nil {
			continue
		}
		d.unavailableWarned[owner] = true
		d.recorder.Eventf(svc, v1.EventTypeWarning, EventIPVSUnavailable,
			"Node %s may hold this Service's VIP but cannot forward its traffic: the node's kernel has no IPVS. Load it (modprobe ip_vs) on %s, then delete the keeplb speaker's pod there (its init container sets the IPVS sysctls)", d.node, d.node)
	}
}

// serviceByKey returns the Service "namespace/name" of in, or nil.
func serviceByKey(in dataplane.Inputs, key string) *v1.Service {
	for _, svc := range in.Services {
		if svc.Namespace+"/"+svc.Name == key {
			return svc
		}
	}
	return nil
}
