package speaker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/conntrack"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
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

// openIPVS opens IPVS in the speaker's node-side network namespace: the
// one named by --netns, else the current one.
func openIPVS(netns string) (ipvs.Interface, error) {
	h, err := ipvs.NewAt(netnsPath(netns))
	if err != nil {
		return nil, err // not a typed nil in an interface
	}
	return h, nil
}

// ipvsStep is the speaker's forwarding step: before the VRRP step of every
// sync it computes this node's dataplane.State and has the
// dataplane.Reconciler bring the kernel there (keeplb's nftables table and
// IPVS), then reports what it could not do as events and metrics; on exit
// it has the Reconciler delete what it programmed. Only the runner calls
// sync and exit, one call at a time.
type ipvsStep struct {
	node string
	// desired remembers each Service's part of the desired state, so a
	// sync recomputes only the Services whose objects changed.
	desired dataplane.Cache
	r       *dataplane.Reconciler
	// closers release the kernel handles the step opened.
	closers []any
	// noIPVS is true when the kernel has no IPVS; unavailableWarned holds
	// the Services ("namespace/name") already told so by an
	// IPVSUnavailable event, so each gets one per process.
	noIPVS            bool
	unavailableWarned map[string]bool
	keepOnExit        bool
	metrics           *metrics.Speaker
	recorder          record.EventRecorder

	// problems are the last sync's, so each is logged and recorded once.
	problems       map[dataplane.Problem]bool
	loggedProblems string

	// guardOnly is set with --ipvs=false: kube-proxy forwards, and the
	// step writes keeplb's table with the VIP port guard alone.
	guardOnly bool

	// foreign are the virtual servers in the pools' ranges that keeplb
	// did not program and no Service of keeplb's wants, as last reported:
	// they are left alone.
	foreign []ipvs.Key
}

// newIPVSStep opens IPVS with open and checks the sysctls it needs. A
// kernel without IPVS is no error: the step then writes only the VIP port
// guard, and the speaker goes on holding VIPs with VRRP.
func newIPVSStep(ctx context.Context, o *Options, open func() (ipvs.Interface, error), net hostnet.Interface, m *metrics.Speaker) (*ipvsStep, error) {
	m.RegisterIPVS()
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, problems: map[dataplane.Problem]bool{}}
	h, err := open()
	if errors.Is(err, ipvs.ErrNoIPVS) {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) is off on this node: the kernel has no IPVS. Load the ip_vs module (modprobe ip_vs) and delete the speaker's pod (its init container sets the IPVS sysctls); meanwhile it only holds VIPs with VRRP")
		m.IPVSAvailable.Set(0)
		d.noIPVS, d.unavailableWarned = true, map[string]bool{}
		// The node still holds VIPs (kube-proxy forwards some of them), so
		// it still needs the VIP port guard: the table, with nothing else.
		d.r = dataplane.NewReconciler(o.NodeName, dataplane.Kernel{NFT: openNFT(ctx, o)})
		m.RegisterGuardDrops(d.r.GuardDropped)
		return d, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open IPVS: %w", err)
	}
	k := dataplane.Kernel{IPVS: h}
	if !o.SkipSysctls {
		if err := hostnet.Ensure(net, dataplane.IPVSSysctls()); err != nil {
			closeHandle(h)
			return nil, fmt.Errorf("IPVS forwarding (--ipvs) needs these sysctls, which the speaker DaemonSet's init container (keeplb prepare-node) sets once ip_vs is loaded; see that container's log, or delete this pod to run it again: %w", err)
		}
		k.Sysctls = net
	}
	k.NFT = openNFT(ctx, o)
	k.Conntrack = openConntrack(ctx, o)
	d.closers = []any{h, k.Conntrack}
	d.r = dataplane.NewReconciler(o.NodeName, k)
	m.RegisterIPVSStats(d.stats)
	m.RegisterGuardDrops(d.r.GuardDropped)
	m.IPVSAvailable.Set(1)
	return d, nil
}

// newGuardStep is the step of a speaker run with --ipvs=false. It never
// touches IPVS, but the VIPs this node holds are addresses of the node like
// any other, and without the guard every host-network listener would answer
// on them: it writes keeplb's table with the guard alone.
func newGuardStep(ctx context.Context, o *Options, m *metrics.Speaker) *ipvsStep {
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, problems: map[dataplane.Problem]bool{}, guardOnly: true}
	d.r = dataplane.NewReconciler(o.NodeName, dataplane.Kernel{NFT: openNFT(ctx, o)})
	m.RegisterGuardDrops(d.r.GuardDropped)
	return d
}

// openNFT opens keeplb's nftables table in the speaker's node-side network
// namespace (the one named by --netns, else the current one), or returns
// nil, having logged why and how to fix it: IPVS forwarding goes on
// without masquerading and without loadBalancerSourceRanges, as it goes on
// without IPVS.
func openNFT(ctx context.Context, o *Options) knftables.Interface {
	open := o.openNFT
	if open == nil {
		open = nft.NewAt
	}
	n, err := open(netnsPath(o.NetNS))
	if err != nil {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) runs without keeplb's nftables table: nothing is masqueraded (replies from other nodes' NodePorts and pods get lost) and loadBalancerSourceRanges are not enforced. Install nft v1.0.1 or later in the speaker's image, make sure the kernel has nftables (modprobe nf_tables) and the speaker has CAP_NET_ADMIN, and restart it")
		return nil
	}
	return n
}

// openConntrack opens the conntrack table of the speaker's node-side
// network namespace, or returns nil, having logged why: IPVS forwarding
// goes on, but UDP clients of a removed real server keep sending to it
// until their conntrack entries time out.
func openConntrack(ctx context.Context, o *Options) conntrack.Interface {
	open := o.openConntrack
	if open == nil {
		open = func(nsPath string) (conntrack.Interface, error) {
			c, err := conntrack.NewAt(nsPath)
			if err != nil {
				return nil, err // not a typed nil in an interface
			}
			return c, nil
		}
	}
	c, err := open(netnsPath(o.NetNS))
	if err != nil {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) runs without clearing conntrack: UDP clients of a removed real server keep sending to it until their entries time out. Make sure the kernel has nf_conntrack and the speaker has CAP_NET_ADMIN, and restart it")
		return nil
	}
	return c
}

// netnsPath returns the path of the network namespace --netns names, or ""
// for the speaker's own.
func netnsPath(netns string) string {
	if netns == "" {
		return ""
	}
	return "/run/netns/" + netns
}

// closeHandle closes h if it can be closed.
func closeHandle(h any) {
	if c, ok := h.(interface{ Close() }); ok {
		c.Close()
	}
}

// close releases the IPVS and conntrack handles.
func (d *ipvsStep) close() {
	for _, c := range d.closers {
		if c != nil {
			closeHandle(c)
		}
	}
}

// sync brings this node's dataplane to what in asks for.
func (d *ipvsStep) sync(ctx context.Context, in dataplane.Inputs) error {
	start := time.Now()
	st, problems := d.desired.Desired(in, d.node)
	if d.noIPVS {
		d.warnUnavailable(in, st)
	}
	rep, err := d.r.Sync(ctx, st)
	d.metrics.NFTSyncErrors.Add(float64(rep.NFTFailures))
	if d.noIPVS || d.guardOnly {
		return err
	}
	d.reportForeign(ctx, rep.Foreign)
	d.report(ctx, in, append(problems, rep.Problems...))
	if res := rep.Result; res.Changes() > 0 || res.Failed > 0 {
		klog.FromContext(ctx).V(2).Info("IPVS table changed", "result", res)
	}
	d.metrics.IPVSSyncDuration.Observe(time.Since(start).Seconds())
	reals := 0
	for _, e := range st.IPVS {
		reals += len(e.Reals)
	}
	d.metrics.IPVSVirtualServers.Set(float64(len(st.IPVS)))
	d.metrics.IPVSRealServers.Set(float64(reals))
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

// exit deletes keeplb's virtual servers (those it programmed) and its
// table, unless --keep-ipvs-on-exit.
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
	var out []metrics.VirtualServerStats
	for _, c := range d.r.Stats() {
		out = append(out, metrics.VirtualServerStats{Service: c.Service, Key: c.Key, Stats: c.Stats})
	}
	return out
}

// report logs the dataplane's problems when they change, and records a
// Warning event on the Service of each problem not reported by the last
// sync.
func (d *ipvsStep) report(ctx context.Context, in dataplane.Inputs, problems []dataplane.Problem) {
	logger := klog.FromContext(ctx)
	logged := fmt.Sprint(problems)
	seen := make(map[dataplane.Problem]bool, len(problems))
	for _, p := range problems {
		if logged != d.loggedProblems {
			logger.Info("Forwarding problem", "service", p.Service, "field", p.Field, "message", p.Message)
		}
		seen[p] = true
		if d.problems[p] || d.recorder == nil {
			continue
		}
		if svc := serviceByKey(in, p.Service); svc != nil {
			d.recorder.Eventf(svc, v1.EventTypeWarning, EventForwardingProblem, "%s: %s", p.Field, p.Message)
		}
	}
	d.loggedProblems = logged
	d.problems = seen
}

// warnUnavailable records an IPVSUnavailable Warning on each Service this
// node would forward (those st.Owners names: Services of pools whose VIPs
// it may hold, not forwarded by kube-proxy) that has not had one from this
// process yet. Once per Service, not per sync: the condition lasts until
// the speaker restarts, and repeating it would only add noise.
func (d *ipvsStep) warnUnavailable(in dataplane.Inputs, st dataplane.State) {
	if d.recorder == nil {
		return
	}
	for _, owner := range slices.Sorted(maps.Values(st.Owners)) {
		if d.unavailableWarned[owner] {
			continue
		}
		svc := serviceByKey(in, owner)
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
