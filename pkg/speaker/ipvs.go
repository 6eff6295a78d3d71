package speaker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
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

// ipvsSysctls returns the sysctls IPVS forwarding needs on every node.
// They exist only once the ip_vs module is loaded.
func ipvsSysctls() []hostnet.Requirement {
	return []hostnet.Requirement{
		{Name: "net.ipv4.vs.conntrack", Value: "1", Why: "lets netfilter see IPVS connections, so forwarded traffic can be masqueraded"},
		{Name: "net.ipv4.ip_forward", Value: "1", Why: "lets the replies of IPVS-forwarded IPv4 traffic pass through this node"},
		{Name: "net.ipv4.vs.expire_nodest_conn", Value: "1", Why: "makes IPVS drop its connection entries to a removed real server on their next packet, so clients (UDP ones above all) are rescheduled instead of sending into the void"},
	}
}

// ipv6Sysctls returns the sysctl IPv6 VIPs need. It is set only once an
// IPv6 virtual server is wanted, not at start: forwarding on all interfaces
// makes the kernel ignore router advertisements (unless accept_ra is 2),
// which would cost a node that configures IPv6 by SLAAC its default route.
func ipv6Sysctls() []hostnet.Requirement {
	return []hostnet.Requirement{
		{Name: "net.ipv6.conf.all.forwarding", Value: "1", Why: "lets the replies of IPVS-forwarded IPv6 traffic pass through this node"},
	}
}

// openIPVS opens IPVS in the speaker's node-side network namespace: the
// one named by --netns, else the current one.
func openIPVS(netns string) (ipvs.Interface, error) {
	h, err := ipvs.NewAt(netnsPath(netns))
	if err != nil {
		return nil, err // not a typed nil in an interface
	}
	return h, nil
}

// ipvsStep is the speaker's IPVS dataplane: after the VRRP step of every
// sync it brings this node's IPVS table to dataplane.Desired, then writes
// keeplb's nftables table (package nft: masquerading for what IPVS
// forwards, loadBalancerSourceRanges); on exit it deletes keeplb's virtual
// servers and the table. Only the runner calls sync and exit, one call at
// a time; the metrics scrape reads the kernel's counters through the same
// IPVS handle meanwhile (see stats), so kernel calls hold mu.
type ipvsStep struct {
	node string
	// desired remembers each Service's part of the desired state, so a
	// sync recomputes only the Services whose objects changed.
	desired dataplane.Cache
	// mu serializes the use of h (a netlink socket, not safe for
	// concurrent use) and guards owners.
	mu sync.Mutex
	// owners maps each virtual server keeplb programmed in the last sync to
	// its Service: the virtual servers whose counters are exported.
	owners map[ipvs.Key]string
	// h is nil when the kernel has no IPVS: every call is then a no-op and
	// the speaker only holds VIPs.
	h ipvs.Interface
	// noIPVS is true when h is nil because the kernel has no IPVS;
	// unavailableWarned holds the Services ("namespace/name") already
	// told so by an IPVSUnavailable event, so each gets one per process.
	noIPVS            bool
	unavailableWarned map[string]bool
	// sysctls is nil with --skip-sysctls.
	sysctls    hostnet.Interface
	keepOnExit bool
	metrics    *metrics.Speaker
	recorder   record.EventRecorder

	// programmed is what the last sync left in the kernel of the virtual
	// servers in its scope: a virtual server that then leaves the scope
	// (its pool deleted, its Service now forwarded by kube-proxy) is still
	// deleted, if nobody changed it since.
	programmed ipvs.Table
	// problems are the last sync's, so each is logged and recorded once.
	problems       map[dataplane.Problem]bool
	loggedProblems string
	ipv6Ready      bool // ipv6Sysctls hold

	// nft is keeplb's nftables table, in the node-side namespace; nil when
	// nft is unusable there (see openNFT), and the IPVS step then runs
	// without masquerading or source ranges.
	nft knftables.Interface
	// ct clears the conntrack entries of UDP real servers that leave a
	// virtual server; nil when it could not be opened (see openConntrack).
	ct conntrack.Interface

	// nftApplied is the text of the last transaction nft ran successfully:
	// a sync that renders the same text skips running nft. Cleared by
	// exit and by a failed run.
	nftApplied string
	// nftFailed is set while the last nft run failed: keeplb's table is
	// missing or stale, so this node cannot forward (see canForward).
	nftFailed bool
	// nftInvalid names the entries the last transaction left out (see
	// nft.Transaction), for the sync's error.
	nftInvalid error
	// snatApplied is the masquerading that transaction wrote, and
	// rangesApplied its source ranges: a filtered virtual server whose
	// filter a later write could not change keeps its state only while
	// its ranges are these (see withhold).
	snatApplied   []nft.SNAT
	rangesApplied map[ipvs.Key][]netip.Prefix

	// guardMu guards guardDrops, the packets the VIP port guard dropped
	// in the tables this speaker replaced (each write recreates the
	// table's counter, so the total is kept here; see guardDropped), and
	// guardTable, set while a table this speaker wrote is in place.
	guardMu    sync.Mutex
	guardDrops uint64
	guardTable bool

	// guardOnly is set with --ipvs=false: kube-proxy forwards, and the
	// step writes keeplb's table with the VIP port guard alone.
	guardOnly bool

	// foreign are the virtual servers in the pools' ranges that keeplb
	// did not program and no Service of keeplb's wants, as last reported:
	// they are left alone (see apply).
	foreign []ipvs.Key
}

// newIPVSStep opens IPVS with open and checks the sysctls it needs. A
// kernel without IPVS is no error: the step is then inert, and the speaker
// goes on holding VIPs with VRRP.
func newIPVSStep(ctx context.Context, o *Options, open func() (ipvs.Interface, error), net hostnet.Interface, m *metrics.Speaker) (*ipvsStep, error) {
	m.RegisterIPVS()
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, programmed: ipvs.Table{}, problems: map[dataplane.Problem]bool{}}
	h, err := open()
	if errors.Is(err, ipvs.ErrNoIPVS) {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) is off on this node: the kernel has no IPVS. Load the ip_vs module (modprobe ip_vs) and delete the speaker's pod (its init container sets the IPVS sysctls); meanwhile it only holds VIPs with VRRP")
		m.IPVSAvailable.Set(0)
		d.noIPVS, d.unavailableWarned = true, map[string]bool{}
		// The node still holds VIPs (kube-proxy forwards some of them), so
		// it still needs the VIP port guard: the table, with nothing else.
		d.nft = openNFT(ctx, o)
		m.RegisterGuardDrops(d.guardDropped)
		return d, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open IPVS: %w", err)
	}
	if !o.SkipSysctls {
		if err := hostnet.Ensure(net, ipvsSysctls()); err != nil {
			closeHandle(h)
			return nil, fmt.Errorf("IPVS forwarding (--ipvs) needs these sysctls, which the speaker DaemonSet's init container (keeplb prepare-node) sets once ip_vs is loaded; see that container's log, or delete this pod to run it again: %w", err)
		}
		d.sysctls = net
	}
	d.h = h
	m.RegisterIPVSStats(d.stats)
	d.nft = openNFT(ctx, o)
	m.RegisterGuardDrops(d.guardDropped)
	d.ct = openConntrack(ctx, o)
	m.IPVSAvailable.Set(1)
	return d, nil
}

// newGuardStep is the step of a speaker run with --ipvs=false. It never
// touches IPVS, but the VIPs this node holds are addresses of the node like
// any other, and without the guard every host-network listener would answer
// on them: it writes keeplb's table with the guard alone.
func newGuardStep(ctx context.Context, o *Options, m *metrics.Speaker) *ipvsStep {
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, programmed: ipvs.Table{}, problems: map[dataplane.Problem]bool{}, guardOnly: true}
	d.nft = openNFT(ctx, o)
	m.RegisterGuardDrops(d.guardDropped)
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
	if d.h != nil {
		closeHandle(d.h)
	}
	if d.ct != nil {
		closeHandle(d.ct)
	}
}

// sync brings this node's IPVS table to what in asks for.
func (d *ipvsStep) sync(ctx context.Context, in Inputs) error {
	if d.h == nil {
		var st dataplane.State
		switch {
		case d.noIPVS:
			st = d.warnUnavailable(in)
		case d.guardOnly:
			st, _ = d.desired.Desired(dataplane.Inputs(in), d.node)
		default:
			return nil
		}
		// Nothing is forwarded here, so nothing to masquerade or filter;
		// the guard alone.
		if err := d.writeNFT(ctx, nft.Rules{Guard: st.Guard}, nil); err != nil {
			d.metrics.NFTSyncErrors.Inc()
			return err
		}
		return d.nftInvalid
	}
	start := time.Now()
	st, problems := d.desired.Desired(dataplane.Inputs(in), d.node)
	rules := nft.Rules{SNAT: st.SNAT, SourceRanges: st.SourceRanges, Guard: st.Guard}
	var errs []error
	if err := d.ensureIPv6(st.IPVS); err != nil {
		errs = append(errs, err) // IPv4 is unaffected: program anyway
	}
	// Masquerading must be in place before IPVS sends a connection to a
	// new real server (its replies would bypass this node otherwise), and
	// must stay for a leaving one until IPVS no longer schedules to it:
	// first the table for the union of what was and what will be, then
	// IPVS, then the table for what is.
	preErr := d.writeNFT(ctx, rules, d.snatApplied)
	if preErr != nil {
		d.metrics.NFTSyncErrors.Inc()
	}
	// Fail closed: a virtual server whose source ranges are not in the
	// kernel's table must not forward unfiltered.
	desired := st.IPVS
	if d.nft == nil || preErr != nil {
		var withheld []string
		desired, withheld = d.withhold(st)
		for _, owner := range withheld {
			problems = append(problems, dataplane.Problem{Service: owner, Field: "spec.loadBalancerSourceRanges", Message: fmt.Sprintf(
				"node %s cannot write the nftables filter for these source ranges, so it does not forward the Service's ports whose filter it has not written (failing closed), and ranks below the nodes that can for its VIPs; see the keeplb speaker's log there", d.node)})
		}
	}
	// Adopt only what a Service of keeplb's wants: any other virtual
	// server in the pools' ranges that this speaker did not program is
	// somebody else's (kube-proxy's for externalIPs, an operator's).
	adopt := func(k ipvs.Key) bool {
		_, want := st.IPVS[k]
		return want && st.Owns(k)
	}
	d.mu.Lock()
	res, err := d.apply(ctx, desired, adopt, st.Owns)
	d.owners = map[ipvs.Key]string{}
	for k := range d.programmed {
		if owner, ok := st.Owners[k]; ok {
			d.owners[k] = owner
		}
	}
	d.mu.Unlock()
	if err != nil {
		errs = append(errs, err)
	}
	// What the kernel refused is told to the Services it belongs to, as
	// the desired state's own problems are.
	for _, k := range slices.SortedFunc(maps.Keys(res.Errors), ipvs.Key.Compare) {
		if owner, ok := st.Owners[k]; ok {
			problems = append(problems, dataplane.KernelProblem(d.node, owner, st.IPVS[k].Virtual, res.Errors[k]))
		}
	}
	d.report(ctx, in, problems)
	if res.Changes() > 0 || res.Failed > 0 {
		klog.FromContext(ctx).V(2).Info("IPVS table changed", "result", res)
	}
	d.metrics.IPVSSyncDuration.Observe(time.Since(start).Seconds())
	reals := 0
	for _, e := range st.IPVS {
		reals += len(e.Reals)
	}
	d.metrics.IPVSVirtualServers.Set(float64(len(st.IPVS)))
	d.metrics.IPVSRealServers.Set(float64(reals))
	if err = errors.Join(errs...); err != nil {
		d.metrics.IPVSSyncErrors.Inc()
		err = fmt.Errorf("IPVS sync: %w", err)
	}
	// The table after IPVS, even when IPVS failed in part: it follows the
	// desired state alone, and what IPVS did program needs it.
	if nftErr := d.writeNFT(ctx, rules, nil); nftErr != nil {
		d.metrics.NFTSyncErrors.Inc()
		err = errors.Join(err, nftErr)
	}
	return errors.Join(preErr, err, d.nftInvalid)
}

// canForward reports whether this node can forward what keeplb forwards
// with IPVS: the speaker runs the IPVS step (d is not nil: --ipvs), the
// kernel has IPVS, and keeplb's nftables table is open and its last write
// succeeded (without it, replies from other nodes' NodePorts and pods
// bypass this node). The VRRP step lowers the node's priority for such
// VIPs while it cannot (vrrp.TrackValues).
func (d *ipvsStep) canForward() bool {
	return d != nil && d.h != nil && d.nft != nil && !d.nftFailed
}

// writeNFT rewrites keeplb's nftables table with rules, masquerading also
// what keep lists, unless the transaction is the one last run.
func (d *ipvsStep) writeNFT(ctx context.Context, rules nft.Rules, keep []nft.SNAT) error {
	if d.nft == nil {
		return nil
	}
	if len(keep) > 0 {
		rules.SNAT = unionSNAT(rules.SNAT, keep)
	}
	tx := d.nft.NewTransaction()
	// Entries the table cannot express are left out of tx, not allowed to
	// stop it: the rest of the table still follows every other Service.
	d.nftInvalid = nil
	if err := nft.Transaction(tx, rules); err != nil {
		d.nftInvalid = fmt.Errorf("nftables table %s %s, entries left out: %w", nft.Family, nft.Table, err)
	}
	text := tx.String()
	if text == d.nftApplied {
		return nil
	}
	// The write recreates the guard's counter: keep what it counted.
	var dropped uint64
	if d.nftApplied != "" {
		dropped, _ = nft.GuardDrops(ctx, d.nft)
	}
	d.nftApplied = ""
	if err := d.nft.Run(ctx, tx); err != nil {
		d.nftFailed = true
		return fmt.Errorf("writing nftables table %s %s: %w", nft.Family, nft.Table, err)
	}
	d.guardMu.Lock()
	d.guardDrops += dropped
	d.guardTable = true
	d.guardMu.Unlock()
	d.nftFailed = false
	d.nftApplied, d.snatApplied, d.rangesApplied = text, rules.SNAT, rules.SourceRanges
	klog.FromContext(ctx).V(2).Info("nftables table written", "snat", len(rules.SNAT), "sourceRanges", len(rules.SourceRanges))
	return nil
}

// unionSNAT returns a and b merged, sorted, without duplicates.
func unionSNAT(a, b []nft.SNAT) []nft.SNAT {
	out := append(slices.Clone(a), b...)
	slices.SortFunc(out, func(x, y nft.SNAT) int {
		if c := x.Virtual.Compare(y.Virtual); c != 0 {
			return c
		}
		return x.Real.Compare(y.Real)
	})
	return slices.Compact(out)
}

// exit deletes keeplb's virtual servers (those of its pools, and those it
// programmed), unless --keep-ipvs-on-exit.
func (d *ipvsStep) exit(ctx context.Context, in Inputs) error {
	logger := klog.FromContext(ctx)
	if d.h == nil {
		if d.nft == nil || d.keepOnExit {
			return nil
		}
		return d.cleanupNFT(ctx, logger)
	}
	if d.keepOnExit {
		logger.Info("Leaving IPVS virtual servers and the nftables table in place (--keep-ipvs-on-exit)", "programmed", len(d.programmed))
		return nil
	}
	st, _ := dataplane.Desired(dataplane.Inputs(in), d.node)
	d.mu.Lock()
	// Only what this speaker programmed (adopted ones included) goes.
	res, err := d.apply(ctx, ipvs.Table{}, func(ipvs.Key) bool { return false }, st.Owns)
	d.owners = nil
	d.mu.Unlock()
	logger.Info("Removed IPVS virtual servers", "deleted", res.VirtualDeleted, "failed", res.Failed)
	if err != nil {
		err = fmt.Errorf("remove IPVS virtual servers: %w", err)
	}
	// The table after the virtual servers: no window where IPVS forwards
	// a VIP's traffic unmasqueraded or unfiltered.
	if d.nft != nil {
		err = errors.Join(err, d.cleanupNFT(ctx, logger))
	}
	return err
}

// cleanupNFT deletes keeplb's table, on exit.
func (d *ipvsStep) cleanupNFT(ctx context.Context, logger klog.Logger) error {
	d.nftApplied, d.snatApplied, d.rangesApplied = "", nil, nil
	d.guardMu.Lock()
	d.guardTable = false
	d.guardMu.Unlock()
	if err := nft.Cleanup(ctx, d.nft); err != nil {
		d.metrics.NFTSyncErrors.Inc()
		return err
	}
	logger.Info("Removed the nftables table", "table", nft.Family+" "+nft.Table)
	return nil
}

// apply brings the virtual servers in scope to desired: one dump, a diff,
// the changes. In scope are those this speaker programmed (the set it
// remembers across syncs) and those it may adopt (adopt: wanted by a
// Service of keeplb's, so a virtual server a previous speaker left is
// taken over). Nothing else is ever changed or deleted, even in the pools'
// ranges: IPVS records no owner, and a virtual server there that keeplb
// did not program and does not want may be kube-proxy's (externalIPs) or
// an operator's; those (pooled tells which addresses are keeplb's) are
// logged, once per change, and left alone.
//
// A virtual server this speaker programmed that is no longer wanted is
// deleted only if the kernel still has it as programmed: if another
// program (kube-proxy in IPVS mode, for a Service switched to kube-proxy
// forwarding) has changed it since, it is that program's now.
func (d *ipvsStep) apply(ctx context.Context, desired ipvs.Table, adopt, pooled func(ipvs.Key) bool) (dataplane.Result, error) {
	var foreign []ipvs.Key
	current, err := ipvs.Dump(d.h, func(k ipvs.Key) bool {
		if _, before := d.programmed[k]; before || adopt(k) {
			return true
		}
		if pooled(k) {
			foreign = append(foreign, k)
		}
		return false
	})
	if err != nil {
		return dataplane.Result{}, err
	}
	d.reportForeign(ctx, foreign)
	taken := map[ipvs.Key]bool{}
	for k, e := range current {
		if prev, before := d.programmed[k]; before && !adopt(k) && !e.Equal(prev) {
			taken[k] = true
			klog.FromContext(ctx).Info("Leaving alone an IPVS virtual server keeplb no longer owns: another program changed it", "virtualServer", k)
		}
	}
	scope := func(k ipvs.Key) bool {
		if taken[k] {
			return false
		}
		_, before := d.programmed[k]
		return before || adopt(k)
	}
	res, err := dataplane.Apply(d.h, dataplane.Diff(current, desired, scope))
	d.clearUDP(ctx, res.Removed)
	// Remember what the kernel now has in scope: desired, unless something
	// failed, then what a fresh dump shows.
	next := ipvs.Table{}
	if err == nil {
		for k, e := range desired {
			if scope(k) {
				next[k] = e
			}
		}
	} else if after, dumpErr := ipvs.Dump(d.h, scope); dumpErr == nil {
		next = after
	} else {
		for k, e := range d.programmed {
			if !taken[k] {
				next[k] = e
			}
		}
		for k, e := range desired {
			if scope(k) {
				next[k] = e
			}
		}
	}
	d.programmed = next
	return res, err
}

// reportForeign logs the virtual servers in the pools' ranges that keeplb
// leaves alone, when they change.
func (d *ipvsStep) reportForeign(ctx context.Context, foreign []ipvs.Key) {
	slices.SortFunc(foreign, ipvs.Key.Compare)
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

// withhold returns st's IPVS table without the filtered virtual servers
// whose filter is not in the kernel's table, for a sync whose nftables
// write failed (or a node without nft), and the Services they belong to.
// A filtered virtual server keeps the state this speaker last programmed
// when the last table written holds its ranges unchanged (the kernel
// still filters it as asked); any other is not created, or is removed:
// unfiltered forwarding would admit clients its ranges exclude.
func (d *ipvsStep) withhold(st dataplane.State) (ipvs.Table, []string) {
	if len(st.SourceRanges) == 0 {
		return st.IPVS, nil
	}
	out := maps.Clone(st.IPVS)
	owners := map[string]bool{}
	for k, want := range st.SourceRanges {
		if _, ok := out[k]; !ok {
			continue
		}
		if have, written := d.rangesApplied[k]; written && slices.Equal(have, want) {
			if prev, ok := d.programmed[k]; ok {
				out[k] = prev
				continue
			}
		}
		delete(out, k)
		owners[st.Owners[k]] = true
	}
	return out, slices.Sorted(maps.Keys(owners))
}

// guardDropped returns the packets the VIP port guard dropped since this
// speaker started: those of the tables it replaced, plus the current
// table's counter. False while there is no table to read.
func (d *ipvsStep) guardDropped() (uint64, bool) {
	d.guardMu.Lock()
	table := d.guardTable
	d.guardMu.Unlock()
	if d.nft == nil || !table {
		return 0, false
	}
	n, err := nft.GuardDrops(context.Background(), d.nft)
	d.guardMu.Lock()
	defer d.guardMu.Unlock()
	if err != nil {
		return 0, false
	}
	return d.guardDrops + n, true
}

// stats returns the kernel's counters of the virtual servers keeplb
// programmed in the last sync, for the metrics scrape. It reads them when
// asked rather than keeping the last sync's dump: syncs can be minutes
// apart. Virtual servers of others (kube-proxy's, an operator's) are left
// out. A failed read returns nothing: the series are missing from that
// scrape rather than wrong.
func (d *ipvsStep) stats() []metrics.VirtualServerStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.h == nil || len(d.owners) == 0 {
		return nil
	}
	vss, err := d.h.VirtualServers()
	if err != nil {
		return nil
	}
	var out []metrics.VirtualServerStats
	for _, vs := range vss {
		if owner, ok := d.owners[vs.Key()]; ok {
			out = append(out, metrics.VirtualServerStats{Service: owner, Key: vs.Key(), Stats: vs.Stats})
		}
	}
	return out
}

// clearUDP deletes the conntrack entries of the UDP flows to each removed
// real server through its VIP:port, as kube-proxy does: UDP has no
// connection to end, so a client that keeps its source port would go on
// sending to the dead backend until the entry times out. A failure is
// logged, not returned: the real server is gone already, and a retry of
// the sync would not see it again.
func (d *ipvsStep) clearUDP(ctx context.Context, removed []dataplane.Removal) {
	if d.ct == nil {
		return
	}
	logger := klog.FromContext(ctx)
	for _, r := range removed {
		if r.Virtual.Protocol != ipvs.UDP {
			continue
		}
		n, err := d.ct.DeleteUDP(netip.AddrPortFrom(r.Virtual.Address, r.Virtual.Port), r.Real)
		if err != nil {
			logger.Error(err, "Clearing the conntrack entries of a removed UDP real server failed; its clients keep sending to it until the entries time out", "removed", r)
			continue
		}
		if n > 0 {
			logger.V(2).Info("Cleared conntrack entries of a removed UDP real server", "removed", r, "entries", n)
		}
	}
}

// ensureIPv6 sets the IPv6 forwarding sysctl once t has an IPv6 virtual
// server.
func (d *ipvsStep) ensureIPv6(t ipvs.Table) error {
	if d.sysctls == nil || d.ipv6Ready {
		return nil
	}
	for k := range t {
		if !k.Address.Is6() {
			continue
		}
		if err := hostnet.Ensure(d.sysctls, ipv6Sysctls()); err != nil {
			return fmt.Errorf("IPv6 VIPs need these sysctls: %w", err)
		}
		d.ipv6Ready = true
		return nil
	}
	return nil
}

// report logs the dataplane's problems when they change, and records a
// Warning event on the Service of each problem not reported by the last
// sync.
func (d *ipvsStep) report(ctx context.Context, in Inputs, problems []dataplane.Problem) {
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
// the speaker restarts, and repeating it would only add noise. It returns
// the desired state it computed, for the guard.
func (d *ipvsStep) warnUnavailable(in Inputs) dataplane.State {
	st, _ := d.desired.Desired(dataplane.Inputs(in), d.node)
	if d.recorder == nil {
		return st
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
	return st
}

// serviceByKey returns the Service "namespace/name" of in, or nil.
func serviceByKey(in Inputs, key string) *v1.Service {
	for _, svc := range in.Services {
		if svc.Namespace+"/"+svc.Name == key {
			return svc
		}
	}
	return nil
}
