package dataplane

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/conntrack"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// Kernel is the part of a node's kernel the dataplane writes. Each field
// may be nil: the Reconciler then does without it, as the field says.
type Kernel struct {
	// IPVS is the node's IPVS table. Nil when the kernel has no IPVS or
	// forwarding is off (kube-proxy forwards): only the VIP port guard is
	// written then.
	IPVS ipvs.Interface
	// NFT is keeplb's nftables table. Nil when nft is unusable: nothing is
	// masqueraded, and virtual servers with source ranges are withheld
	// (failing closed).
	NFT knftables.Interface
	// Conntrack clears the conntrack entries of UDP real servers that
	// leave a virtual server. Nil: their clients keep sending to them
	// until the entries time out.
	Conntrack conntrack.Interface
	// Sysctls sets IPv6 forwarding once an IPv6 virtual server is wanted.
	// Nil leaves the sysctls alone.
	Sysctls hostnet.Interface
}

// IPVSSysctls returns the sysctls IPVS forwarding needs on every node.
// They exist only once the ip_vs module is loaded.
func IPVSSysctls() []hostnet.Requirement {
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

// Reconciler brings a node's kernel to the State that Desired computes,
// sync after sync: keeplb's nftables table and the virtual servers of its
// IPVS table. It remembers what it programmed, so that it changes and
// deletes only that, and what it may adopt (see Sync).
//
// Only one goroutine calls Sync and Exit, one call at a time; Stats and
// GuardDropped may be called meanwhile (the metrics scrape).
type Reconciler struct {
	node string
	k    Kernel

	// mu serializes the use of k.IPVS (a netlink socket, not safe for
	// concurrent use) and guards owners.
	mu sync.Mutex
	// owners maps each virtual server programmed by the last sync to its
	// Service: the virtual servers whose counters Stats reads.
	owners map[ipvs.Key]string

	// programmed is what the last sync left in the kernel of the virtual
	// servers in its scope: a virtual server that then leaves the scope
	// (its pool deleted, its Service now forwarded by kube-proxy) is still
	// deleted, if nobody changed it since.
	programmed ipvs.Table
	ipv6Ready  bool // ipv6Sysctls hold

	// clean is set while the last sync succeeded in whole, and base and
	// baseGen say which Cache's State it brought the kernel to (nil after
	// a plain Sync): SyncDelta may then change only what a Delta names.
	clean   bool
	base    *Cache
	baseGen uint64
	// foreign are the virtual servers the last dump found in the pools
	// that were neither programmed nor wanted (see Report.Foreign),
	// sorted.
	foreign []ipvs.Key

	// nftWritten is what the last successful write left in keeplb's
	// table's sets (its masquerading is what a write before IPVS keeps),
	// nil before the first and after Exit. While the table is known to be
	// as written, a write sends only the elements that differ from it.
	nftWritten *nft.Elements
	// nftUnknown is set after a failed write: the table's state is
	// unknown, so the next write rewrites it whole, even unchanged.
	nftUnknown bool
	// nftResync is set during a full sync (Sync, or SyncDelta of a Full
	// Delta): a write that changes anything then rewrites the table
	// whole, which also heals what was done to it behind keeplb's back.
	nftResync bool
	// nftFailed is set while the last nft run failed: keeplb's table is
	// missing or stale, so this node cannot forward (see CanForward).
	nftFailed bool
	// nftInvalid names the entries the last write left out (see
	// nft.Transaction), for the sync's error.
	nftInvalid error
	// rangesApplied are the source ranges of the last successful write: a
	// filtered virtual server whose filter a later write could not change
	// keeps its state only while its ranges are these (see withhold).
	rangesApplied map[ipvs.Key][]netip.Prefix
	// nodeAddrs are this node's addresses of the last State synced
	// (State.NodeAddresses): the flows from a VIP to them are kube-proxy's,
	// which forgetFlows keeps.
	nodeAddrs []netip.Addr
	// flowsForgotten is set once the VIPs' flows of the default zone were
	// deleted after the first table whose masquerade follows the VIP
	// (see forgetFlows).
	flowsForgotten bool

	// guardMu guards guardDrops, the packets the VIP port guard dropped
	// in the tables this reconciler replaced (a whole write recreates the
	// table's counter, so the total is kept here; see GuardDropped), and
	// guardTable, set while a table it wrote is in place.
	guardMu    sync.Mutex
	guardDrops uint64
	guardTable bool
}

// NewReconciler returns a Reconciler of node's kernel k that has programmed
// nothing yet.
func NewReconciler(node string, k Kernel) *Reconciler {
	return &Reconciler{node: node, k: k, programmed: ipvs.Table{}}
}

// Report says what one Sync did, beyond its error: for the caller's logs,
// events and metrics.
type Report struct {
	// Result counts the IPVS changes, and lists the real servers removed.
	Result Result
	// Problems are the Services this node does not forward as their
	// State asks: virtual servers withheld because their filter could not
	// be written (failing closed), and those the kernel refused.
	Problems []Problem
	// Foreign are the virtual servers in keeplb's pools that keeplb did
	// not program and no Service of keeplb's wants, sorted: another
	// program's (kube-proxy's for externalIPs, an operator's), or left by
	// an earlier speaker. They are left alone.
	Foreign []ipvs.Key
	// NFTFailures counts the writes of keeplb's table that failed.
	NFTFailures int
	// IPVSFailed is set when programming IPVS (or its IPv6 sysctl) failed,
	// in part or in whole.
	IPVSFailed bool
}

// Sync brings the kernel to st, in this order, so that no packet is
// forwarded unmasqueraded or unfiltered:
//
//  1. keeplb's table for the union of what was and what will be
//     masqueraded: masquerading must be in place before IPVS sends a
//     connection to a new real server (its replies would bypass this node
//     otherwise), and must stay for a leaving one until IPVS no longer
//     schedules to it;
//  2. IPVS: one dump of the virtual servers in scope, a diff, the changes
//     (Apply), then the conntrack entries of removed UDP real servers;
//  3. the table for what is, even when IPVS failed in part: it follows st
//     alone, and what IPVS did program needs it.
//
// Fail closed: when the table could not be written (or there is no nft),
// a virtual server with source ranges is programmed only as the last
// table that holds its ranges unchanged filters it, else withheld.
//
// In scope are the virtual servers this Reconciler programmed and those
// it may adopt: wanted by st, in a pool and not kube-proxy's (st.Owns), so
// that a virtual server an earlier speaker left is taken over. Nothing
// else is changed or deleted, even in the pools' ranges: IPVS records no
// owner. A virtual server it programmed that st no longer wants is deleted
// only if the kernel still has it as programmed: if another program
// (kube-proxy in IPVS mode, for a Service switched to kube-proxy
// forwarding) has changed it since, it is that program's now.
//
// Without IPVS only the VIP port guard is written: nothing is forwarded,
// so nothing is masqueraded or filtered, but the node may hold VIPs.
//
// Sync's first write of keeplb's table that changes anything rewrites it
// whole, so that what was done to the table behind keeplb's back is
// healed; a later one changes only the elements that differ. A sync that
// changes nothing in the table does not write it.
func (r *Reconciler) Sync(ctx context.Context, st State) (Report, error) {
	r.nodeAddrs = st.NodeAddresses
	r.nftResync = true
	rep, err := r.sync(ctx, st)
	r.nftResync = false
	r.clean, r.base = err == nil, nil
	return rep, err
}

func (r *Reconciler) sync(ctx context.Context, st State) (Report, error) {
	if r.k.IPVS == nil {
		return r.guardOnly(ctx, st)
	}
	var rep Report
	rules := rulesOf(st)
	var errs []error
	if err := r.ensureIPv6(st.IPVS); err != nil {
		errs = append(errs, err) // IPv4 is unaffected: program anyway
	}
	preErr := r.writeNFT(ctx, rules, true)
	if preErr != nil {
		rep.NFTFailures++
	}
	desired := st.IPVS
	if r.k.NFT == nil || preErr != nil {
		var withheld []string
		desired, withheld = withhold(st, r.programmed, r.rangesApplied)
		for _, owner := range withheld {
			rep.Problems = append(rep.Problems, Problem{Service: owner, Field: "spec.loadBalancerSourceRanges", Message: fmt.Sprintf(
				"node %s cannot write the nftables filter for these source ranges, so it does not forward the Service's ports whose filter it has not written (failing closed), and ranks below the nodes that can for its VIPs; see the keeplb speaker's log there", r.node)})
		}
	}
	adopt := func(k ipvs.Key) bool {
		_, want := st.IPVS[k]
		return want && st.Owns(k)
	}
	r.mu.Lock()
	res, foreign, err := r.apply(ctx, desired, adopt, st.Owns)
	r.owners = map[ipvs.Key]string{}
	for k := range r.programmed {
		if owner, ok := st.Owners[k]; ok {
			r.owners[k] = owner
		}
	}
	r.mu.Unlock()
	rep.Foreign = foreign
	err = r.outcome(&rep, st, res, append(errs, err))
	if nftErr := r.writeNFT(ctx, rules, false); nftErr != nil {
		rep.NFTFailures++
		err = errors.Join(err, nftErr)
	}
	return rep, errors.Join(preErr, err, r.nftInvalid)
}

// guardOnly is a sync without IPVS: only the VIP port guard is written.
func (r *Reconciler) guardOnly(ctx context.Context, st State) (Report, error) {
	var rep Report
	if err := r.writeNFT(ctx, nft.Rules{Guard: st.Guard}, false); err != nil {
		rep.NFTFailures++
		return rep, err
	}
	return rep, r.nftInvalid
}

// SyncDelta brings the kernel to st as Sync does, but, when it may, only
// for the virtual servers d names: no dump, a diff of those virtual
// servers against what this Reconciler programmed, and only their
// changes, so that its work grows with what changed. keeplb's nftables
// table is written around the changes, as in Sync, only when d says the
// masquerading, source ranges or guard changed, and then only the set
// elements that differ from the last write are sent, unless the table's
// state is unknown (after a failed write) or d is Full: the table is then
// rewritten whole, as by Sync.
//
// Without IPVS, only the guard is written, when d says it changed.
//
// It runs Sync instead (one dump of the whole scope, then the full diff)
// when d is Full; when it does not follow the State of the last sync (of
// another Cache, or a State in between was not synced); when the last
// sync failed in any way (so a failure is always followed by a full
// sync); without nftables, or when writing the table fails (Sync then
// withholds what it must); when a virtual server this Reconciler
// programmed leaves keeplb's ownership (Sync checks whether another
// program took it); and when one it is to create was foreign at the last
// dump (Sync adopts it). A virtual server it programmed that no Service
// wants any more, but that is still keeplb's, is deleted as remembered.
//
// The kernel can change behind its back (an operator, another program):
// the caller still runs a full Sync now and then.
func (r *Reconciler) SyncDelta(ctx context.Context, st State, d Delta) (Report, error) {
	r.nodeAddrs = st.NodeAddresses
	r.nftResync = d.Full
	var rep Report
	var err error
	if r.incremental(st, d) {
		rep, err = r.syncDelta(ctx, st, d)
	} else {
		rep, err = r.sync(ctx, st)
	}
	r.nftResync = false
	r.clean, r.base, r.baseGen = err == nil, d.cache, d.gen
	return rep, err
}

// incremental reports whether SyncDelta may change only what d names.
func (r *Reconciler) incremental(st State, d Delta) bool {
	if d.Full || d.cache == nil || d.cache != r.base || d.gen != r.baseGen+1 || !r.clean || r.k.NFT == nil {
		return false
	}
	for _, k := range d.Virtuals {
		_, was := r.programmed[k]
		_, want := st.IPVS[k]
		switch {
		case was && !st.Owns(k):
			return false
		case !was && want:
			if _, found := slices.BinarySearchFunc(r.foreign, k, ipvs.Key.Compare); found {
				return false
			}
		}
	}
	return true
}

// syncDelta is SyncDelta's own path; see there.
func (r *Reconciler) syncDelta(ctx context.Context, st State, d Delta) (Report, error) {
	if r.k.IPVS == nil {
		if !d.NFT {
			return Report{}, r.nftInvalid
		}
		return r.guardOnly(ctx, st)
	}
	var rep Report
	ops, desired := diffDelta(r.programmed, st, d)
	rules := rulesOf(st)
	var errs []error
	if err := r.ensureIPv6(desired); err != nil {
		errs = append(errs, err)
	}
	if d.NFT {
		if err := r.writeNFT(ctx, rules, true); err != nil {
			full, ferr := r.sync(ctx, st)
			full.NFTFailures++
			return full, errors.Join(err, ferr)
		}
	}
	r.mu.Lock()
	res, err := Apply(r.k.IPVS, ops)
	r.clearUDP(ctx, res.Removed)
	for _, k := range d.Virtuals {
		if _, failed := res.Errors[k]; failed {
			continue // as it was: the full sync that follows sorts it out
		}
		if e, ok := desired[k]; ok {
			r.programmed[k] = e
			r.owners[k] = st.Owners[k]
		} else {
			delete(r.programmed, k)
			delete(r.owners, k)
		}
	}
	r.mu.Unlock()
	rep.Foreign = r.foreign
	err = r.outcome(&rep, st, res, append(errs, err))
	if d.NFT {
		if nftErr := r.writeNFT(ctx, rules, false); nftErr != nil {
			rep.NFTFailures++
			err = errors.Join(err, nftErr)
		}
	}
	return rep, errors.Join(err, r.nftInvalid)
}

// outcome puts an IPVS apply's result in rep, what the kernel refused
// as problems of the Services it belongs to, and returns the sync's IPVS
// error, errs joined.
func (r *Reconciler) outcome(rep *Report, st State, res Result, errs []error) error {
	rep.Result = res
	for _, k := range slices.SortedFunc(maps.Keys(res.Errors), ipvs.Key.Compare) {
		if owner, ok := st.Owners[k]; ok {
			rep.Problems = append(rep.Problems, KernelProblem(r.node, owner, st.IPVS[k].Virtual, res.Errors[k]))
		}
	}
	err := errors.Join(errs...)
	if err != nil {
		rep.IPVSFailed = true
		err = fmt.Errorf("IPVS sync: %w", err)
	}
	return err
}

// diffDelta is the diff SyncDelta applies: the virtual servers d names,
// from what was programmed to what st wants of them (those keeplb owns).
// It returns the wanted entries too, for what to remember. It is pure and
// walks only what d names.
func diffDelta(programmed ipvs.Table, st State, d Delta) ([]Op, ipvs.Table) {
	named := make(map[ipvs.Key]bool, len(d.Virtuals))
	desired, current := ipvs.Table{}, ipvs.Table{}
	for _, k := range d.Virtuals {
		named[k] = true
		if e, ok := st.IPVS[k]; ok && st.Owns(k) {
			desired[k] = e
		}
		if e, ok := programmed[k]; ok {
			current[k] = e
		}
	}
	return Diff(current, desired, func(k ipvs.Key) bool { return named[k] }), desired
}

// Exit deletes what this Reconciler programmed (adopted virtual servers
// included), then keeplb's table: no window where IPVS forwards a VIP's
// traffic unmasqueraded or unfiltered. Where the table's masquerade
// followed the VIP, the conntrack entries of the flows opened to the VIPs
// go in between (see forgetFlows). owns tells keeplb's addresses,
// as State.Owns, for Report.Foreign.
func (r *Reconciler) Exit(ctx context.Context, owns func(ipvs.Key) bool) (Report, error) {
	var rep Report
	var err error
	if r.k.IPVS != nil {
		r.mu.Lock()
		rep.Result, rep.Foreign, err = r.apply(ctx, ipvs.Table{}, func(ipvs.Key) bool { return false }, owns)
		r.owners = nil
		r.clean = false
		r.mu.Unlock()
		if err != nil {
			err = fmt.Errorf("remove IPVS virtual servers: %w", err)
		}
	}
	if r.k.NFT == nil {
		return rep, err
	}
	r.forgetFlows(ctx, r.nftWritten.FollowedVIPs(), "exit", 0)
	r.nftWritten, r.rangesApplied = nil, nil
	r.guardMu.Lock()
	r.guardTable = false
	r.guardMu.Unlock()
	if cerr := nft.Cleanup(ctx, r.k.NFT); cerr != nil {
		rep.NFTFailures++
		return rep, errors.Join(err, cerr)
	}
	return rep, err
}

// rulesOf returns the rules of keeplb's table for st. With FollowVIP, the
// virtual servers that masquerade every real server they have (a Cluster
// Service's) are masqueraded whatever the real server (nft.Rules.Whole):
// after a move, the connections the old holder sent to its own pods reach
// this node by the sync daemon, with real servers this node does not have
// (nodeport forwarding), and must be masqueraded to the VIP all the same,
// or those pods would reply past this node.
func rulesOf(st State) nft.Rules {
	rules := nft.Rules{SNAT: st.SNAT, SourceRanges: st.SourceRanges, Guard: st.Guard, Sync: st.Sync, FollowVIP: st.FollowVIP}
	if !st.FollowVIP {
		return rules
	}
	for _, sn := range st.SNAT {
		e, ok := st.IPVS[sn.Virtual]
		if !ok || len(e.Reals) != len(sn.Reals) {
			continue
		}
		all := true
		for _, r := range e.Reals {
			if _, found := slices.BinarySearchFunc(sn.Reals, r.AddrPort(), netip.AddrPort.Compare); !found {
				all = false
				break
			}
		}
		if all {
			rules.Whole = append(rules.Whole, sn.Virtual)
		}
	}
	return rules
}

// Programmed returns the virtual servers this Reconciler programmed or
// adopted: what a speaker that hands off passes on, so that its
// replacement owns them too (AdoptProgrammed).
func (r *Reconciler) Programmed() []ipvs.Key {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.SortedFunc(maps.Keys(r.programmed), ipvs.Key.Compare)
}

// AdoptProgrammed takes the virtual servers keys, which a previous
// speaker programmed and handed off, as programmed by this Reconciler, as
// the kernel has them now: the first sync then deletes those no Service
// wants any more (their Services went while no speaker ran), instead of
// leaving them alone as another program's. Call it before the first
// Sync.
func (r *Reconciler) AdoptProgrammed(keys []ipvs.Key) error {
	if r.k.IPVS == nil || len(keys) == 0 {
		return nil
	}
	want := map[ipvs.Key]bool{}
	for _, k := range keys {
		want[k] = true
	}
	current, err := ipvs.Dump(r.k.IPVS, func(k ipvs.Key) bool { return want[k] })
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	maps.Copy(r.programmed, current)
	return nil
}

// KeepFlows keeps the conntrack entries of the VIPs' flows at the first
// table write, which deletes them otherwise (see forgetFlows): the
// speaker calls it before its first sync when it adopts a hand-off, whose
// entries are current; deleting them would reset every connection the
// hand-off keeps.
func (r *Reconciler) KeepFlows() {
	r.flowsForgotten = true
}

// forgetFlows deletes the conntrack entries of the VIPs' flows
// (conntrack.OfVIPs) in each of zones, where the masquerade follows the
// VIP (nft.Rules.FollowVIP). when says why, for the log:
//
//   - "start", after the first write of the table, both zones: a node
//     that held no table (its speaker restarting) routed the flows of
//     VIPs held elsewhere to its pods in the default zone. Such an entry
//     holds the tuple this node's NAT needs once it holds the VIP itself,
//     so the NAT would pick another port and the pod reset the
//     connection. The transit zone's entries are a previous speaker's,
//     their TCP windows stale (see Acquired). This node holds no VIP yet
//     (keepalived starts after the first write).
//   - "exit", the default zone, before the table and its transit zone
//     go: this node's pods keep replying to VIPs now held elsewhere. With
//     the entries of the flows it held they would be de-NATed here and
//     sent to the client from the pod's address; without them they are
//     routed to the VIP's new holder, which owns the flow now.
//   - "acquired", the transit zone (see Acquired); "released", the
//     default zone (see Released).
//
// A failure is logged: the flows it concerns may be lost, nothing else
// (docs/connections.md).
func (r *Reconciler) forgetFlows(ctx context.Context, vips []netip.Addr, when string, zones ...uint16) {
	if len(vips) == 0 || r.k.Conntrack == nil {
		return
	}
	logger := klog.FromContext(ctx)
	for _, zone := range zones {
		n, err := r.k.Conntrack.DeleteOfVIPs(vips, zone, r.nodeAddrs)
		if err != nil {
			logger.Error(err, "Deleting the conntrack entries of the VIPs' flows failed; connections that move with a VIP to or from this node may be reset", "at", when, "zone", zone, "deleted", n)
			continue
		}
		logger.Info("Deleted the conntrack entries of the VIPs' flows, so that connections moving with a VIP find none of this node's stale ones", "at", when, "zone", zone, "entries", n, "vips", len(vips))
	}
}

// Acquired tells r that this node has just become the holder of vips. Where
// the masquerade follows the VIP, it deletes their flows' entries in the
// transit zone: while this node holds a VIP its pods' replies to it take
// the default zone, and a transit entry left alone would keep the TCP
// window of the moment the node took the VIP over. Once the node gives
// the VIP up, the flows take the transit zone again, and conntrack would
// find their packets far outside that window: invalid, which the VIP
// guard's and kube-proxy's rules drop. Deleted, the first packet after
// makes a new entry from mid-stream. Only one goroutine calls it, as
// Sync.
func (r *Reconciler) Acquired(ctx context.Context, vips []netip.Addr) {
	r.forgetFlows(ctx, r.followed(vips), "acquired", nft.TransitZone)
}

// Released tells r that this node has just stopped holding vips. Where the
// masquerade follows the VIP, it deletes their flows' entries in the
// default zone: the flows this node forwarded as the holder. Their
// clients' packets go to the new holder now, this node's pods' replies to
// the transit zone; left alone, an entry would outlive its connection (it
// never sees the connection close) and meet a new connection of the same
// client port, with a stale TCP window and another real server, once the
// VIP comes back here.
func (r *Reconciler) Released(ctx context.Context, vips []netip.Addr) {
	r.forgetFlows(ctx, r.followed(vips), "released", 0)
}

// followed returns those of vips whose masquerade follows the VIP in the
// table last written, unmapped.
func (r *Reconciler) followed(vips []netip.Addr) []netip.Addr {
	set := map[netip.Addr]bool{}
	for _, v := range r.nftWritten.FollowedVIPs() {
		set[v] = true
	}
	var out []netip.Addr
	for _, v := range vips {
		if set[v.Unmap()] {
			out = append(out, v.Unmap())
		}
	}
	return out
}

// CanForward reports whether this node can forward what keeplb forwards
// with IPVS: the kernel has IPVS, and keeplb's nftables table is open and
// its last write succeeded (without it, replies from other nodes'
// NodePorts and pods bypass this node). The VRRP plan lowers the node's
// priority for such VIPs while it cannot (vrrp.TrackValues).
func (r *Reconciler) CanForward() bool {
	return r != nil && r.k.IPVS != nil && r.k.NFT != nil && !r.nftFailed
}

// writeNFT brings keeplb's table to rules, masquerading also what the
// last write masqueraded when keep is set (the write before IPVS changes).
// While the table is known to be as last written it sends only the
// elements that differ, nothing when none does. It rewrites the table
// whole on the first write and after a failed one (even unchanged), in a
// full sync when anything differs, and when nft refuses the change (the
// table was not as written: someone flushed or edited it). A write that
// fails leaves the table as it was (nft runs a transaction whole or not
// at all), and the next one whole.
func (r *Reconciler) writeNFT(ctx context.Context, rules nft.Rules, keep bool) error {
	if r.k.NFT == nil {
		return nil
	}
	// Entries the table cannot express are left out, not allowed to stop
	// the write: the rest of the table still follows every other Service.
	want, err := nft.Compute(rules)
	r.nftInvalid = nil
	if err != nil {
		r.nftInvalid = fmt.Errorf("nftables table %s %s, entries left out: %w", nft.Family, nft.Table, err)
	}
	if keep {
		want = want.KeepSNAT(r.nftWritten)
	}
	logger := klog.FromContext(ctx)
	if r.nftWritten != nil && !r.nftUnknown {
		tx := r.k.NFT.NewTransaction()
		n := nft.Update(tx, r.nftWritten, want)
		if n == 0 {
			return nil
		}
		if !r.nftResync {
			err := r.k.NFT.Run(ctx, tx)
			if err == nil {
				r.nftDone(want, rules)
				logger.V(2).Info("nftables table changed", "elements", n, "snat", want.SNATs(), "sourceRanges", len(rules.SourceRanges))
				return nil
			}
			logger.Info("keeplb's nftables table is not as keeplb last wrote it (flushed or edited by something else?); rewriting it whole", "err", err)
		}
	}

	// A whole write recreates the guard's counter: keep what it counted.
	// A failed write changes nothing, so the counter is read again then.
	r.guardMu.Lock()
	table := r.guardTable
	r.guardMu.Unlock()
	var dropped uint64
	if table {
		dropped, _ = nft.GuardDrops(ctx, r.k.NFT)
	}
	if err := nft.Whole(ctx, r.k.NFT, want); err != nil {
		r.nftFailed, r.nftUnknown = true, true
		return fmt.Errorf("writing nftables table %s %s: %w", nft.Family, nft.Table, err)
	}
	r.guardMu.Lock()
	r.guardDrops += dropped
	r.guardTable = true
	r.guardMu.Unlock()
	if !r.flowsForgotten && len(want.FollowedVIPs()) > 0 {
		// The first table of this speaker whose masquerade follows the
		// VIP: before it, with no table or another speaker's, this
		// node's routed VIP flows went to the default zone.
		r.flowsForgotten = true
		r.forgetFlows(ctx, want.FollowedVIPs(), "start", 0, nft.TransitZone)
	}
	r.nftDone(want, rules)
	logger.V(2).Info("nftables table written", "snat", want.SNATs(), "sourceRanges", len(rules.SourceRanges))
	return nil
}

// nftDone records a successful write of want, from rules: the table is as
// written.
func (r *Reconciler) nftDone(want *nft.Elements, rules nft.Rules) {
	r.nftFailed, r.nftUnknown, r.nftResync = false, false, false
	// A Cache changes its State in place at its next call; want is a copy
	// already.
	r.nftWritten, r.rangesApplied = want, maps.Clone(rules.SourceRanges)
}

// apply brings the virtual servers in scope to desired: one dump, a diff,
// the changes; then it remembers what the kernel has in scope. It returns
// the virtual servers in the pools (pooled) left alone as foreign. r.mu
// is held.
func (r *Reconciler) apply(ctx context.Context, desired ipvs.Table, adopt, pooled func(ipvs.Key) bool) (Result, []ipvs.Key, error) {
	var foreign []ipvs.Key
	current, err := ipvs.Dump(r.k.IPVS, func(k ipvs.Key) bool {
		if _, before := r.programmed[k]; before || adopt(k) {
			return true
		}
		if pooled(k) {
			foreign = append(foreign, k)
		}
		return false
	})
	if err != nil {
		return Result{}, nil, err
	}
	slices.SortFunc(foreign, ipvs.Key.Compare)
	r.foreign = foreign
	taken := map[ipvs.Key]bool{}
	for k, e := range current {
		if prev, before := r.programmed[k]; before && !adopt(k) && !e.Equal(prev) {
			taken[k] = true
			klog.FromContext(ctx).Info("Leaving alone an IPVS virtual server keeplb no longer owns: another program changed it", "virtualServer", k)
		}
	}
	scope := func(k ipvs.Key) bool {
		if taken[k] {
			return false
		}
		_, before := r.programmed[k]
		return before || adopt(k)
	}
	res, err := Apply(r.k.IPVS, Diff(current, desired, scope))
	r.clearUDP(ctx, res.Removed)
	r.programmed = r.remember(desired, scope, taken, err)
	return res, foreign, err
}

// remember returns what the kernel has in scope after an apply: desired,
// unless something failed, then what a fresh dump shows, or at worst what
// was programmed before merged with desired.
func (r *Reconciler) remember(desired ipvs.Table, scope func(ipvs.Key) bool, taken map[ipvs.Key]bool, applyErr error) ipvs.Table {
	next := ipvs.Table{}
	if applyErr == nil {
		for k, e := range desired {
			if scope(k) {
				next[k] = e
			}
		}
		return next
	}
	if after, err := ipvs.Dump(r.k.IPVS, scope); err == nil {
		return after
	}
	for k, e := range r.programmed {
		if !taken[k] {
			next[k] = e
		}
	}
	for k, e := range desired {
		if scope(k) {
			next[k] = e
		}
	}
	return next
}

// withhold returns st's IPVS table without the filtered virtual servers
// whose filter is not in the kernel's table, for a sync whose nftables
// write failed (or a node without nft), and the Services they belong to.
// A filtered virtual server keeps the state last programmed when the last
// table written holds its ranges unchanged (the kernel still filters it as
// asked); any other is not created, or is removed: unfiltered forwarding
// would admit clients its ranges exclude.
func withhold(st State, programmed ipvs.Table, rangesApplied map[ipvs.Key][]netip.Prefix) (ipvs.Table, []string) {
	if len(st.SourceRanges) == 0 {
		return st.IPVS, nil
	}
	out := maps.Clone(st.IPVS)
	owners := map[string]bool{}
	for k, want := range st.SourceRanges {
		if _, ok := out[k]; !ok {
			continue
		}
		if have, written := rangesApplied[k]; written && slices.Equal(have, want) {
			if prev, ok := programmed[k]; ok {
				out[k] = prev
				continue
			}
		}
		delete(out, k)
		owners[st.Owners[k]] = true
	}
	return out, slices.Sorted(maps.Keys(owners))
}

// clearUDP deletes the conntrack entries of the UDP flows to each removed
// real server through its VIP:port, as kube-proxy does: UDP has no
// connection to end, so a client that keeps its source port would go on
// sending to the dead backend until the entry times out. A failure is
// logged, not returned: the real server is gone already, and a retry of
// the sync would not see it again.
func (r *Reconciler) clearUDP(ctx context.Context, removed []Removal) {
	if r.k.Conntrack == nil {
		return
	}
	logger := klog.FromContext(ctx)
	for _, rm := range removed {
		if rm.Virtual.Protocol != ipvs.UDP {
			continue
		}
		n, err := r.k.Conntrack.DeleteUDP(netip.AddrPortFrom(rm.Virtual.Address, rm.Virtual.Port), rm.Real)
		if err != nil {
			logger.Error(err, "Clearing the conntrack entries of a removed UDP real server failed; its clients keep sending to it until the entries time out", "removed", rm)
			continue
		}
		if n > 0 {
			logger.V(2).Info("Cleared conntrack entries of a removed UDP real server", "removed", rm, "entries", n)
		}
	}
}

// ensureIPv6 sets the IPv6 forwarding sysctl once t has an IPv6 virtual
// server.
func (r *Reconciler) ensureIPv6(t ipvs.Table) error {
	if r.k.Sysctls == nil || r.ipv6Ready {
		return nil
	}
	for k := range t {
		if !k.Address.Is6() {
			continue
		}
		if err := hostnet.Ensure(r.k.Sysctls, ipv6Sysctls()); err != nil {
			return fmt.Errorf("IPv6 VIPs need these sysctls: %w", err)
		}
		r.ipv6Ready = true
		return nil
	}
	return nil
}

// GuardDropped returns the packets the VIP port guard dropped since this
// Reconciler started: those of the tables it replaced, plus the current
// table's counter. False while there is no table to read.
func (r *Reconciler) GuardDropped() (uint64, bool) {
	r.guardMu.Lock()
	table := r.guardTable
	r.guardMu.Unlock()
	if r.k.NFT == nil || !table {
		return 0, false
	}
	n, err := nft.GuardDrops(context.Background(), r.k.NFT)
	r.guardMu.Lock()
	defer r.guardMu.Unlock()
	if err != nil {
		return 0, false
	}
	return r.guardDrops + n, true
}

// Counters are the kernel's counters of one virtual server keeplb
// programmed, and its Service.
type Counters struct {
	// Service is "namespace/name".
	Service string
	Key     ipvs.Key
	Stats   ipvs.Stats
}

// Stats reads the kernel's counters of the virtual servers the last sync
// programmed, when asked rather than kept from the last sync's dump: syncs
// can be minutes apart. Others' virtual servers are left out. A failed
// read returns nothing: the series are missing from a scrape rather than
// wrong.
func (r *Reconciler) Stats() []Counters {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.k.IPVS == nil || len(r.owners) == 0 {
		return nil
	}
	vss, err := r.k.IPVS.VirtualServers()
	if err != nil {
		return nil
	}
	out := make([]Counters, 0, min(len(vss), len(r.owners)))
	for _, vs := range vss {
		if owner, ok := r.owners[vs.Key()]; ok {
			out = append(out, Counters{Service: owner, Key: vs.Key(), Stats: vs.Stats})
		}
	}
	return out
}
