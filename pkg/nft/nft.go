package nft

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// Family and Table name keeplb's nftables table, inet keeplb.
const (
	Family = knftables.InetFamily
	Table  = "keeplb"
)

// Chain names.
const (
	// ChainSNAT masquerades what IPVS forwards to the SNAT real servers.
	ChainSNAT = "ipvs-masquerade"
	// ChainSourceRanges drops what loadBalancerSourceRanges do not allow.
	ChainSourceRanges = "source-ranges"
	// ChainGuard sends traffic to keeplb's VIPs through the VIP port
	// guard, ChainGuard + "-v4" or "-v6", which drop what no Service of
	// the VIP asks for.
	ChainGuard = "vip-guard"
	// CounterGuard counts the packets the VIP port guard dropped since
	// the table was last written.
	CounterGuard = "vip-guard-dropped"
	// ChainSync drops IPVS connection sync messages from any address but
	// a peer's (Rules.Sync).
	ChainSync = "ipvs-sync"
	// ChainTransit puts the flows this node only routes between a VIP
	// held elsewhere and its own pods in conntrack zone TransitZone
	// (Rules.FollowVIP).
	ChainTransit = "vip-transit"
)

// TransitZone is the conntrack zone of the flows a node routes between a
// VIP it does not hold and its own pods, with Rules.FollowVIP. Their
// tuples are the holder's NAT's (VIP:client port → pod), so in the default
// zone they would block this node's NAT from choosing the same tuple once
// it holds the VIP itself, and its pods' replies would keep matching them
// after it gave the VIP up (docs/connections.md, part 2). 27500 is "kl" in
// ASCII; nothing else on a node is known to use it.
const TransitZone = 27500

// GuardPriority is the VIP port guard's priority in the prerouting hook:
// after conntrack (-200), which gives the guard the connection's state,
// and before destination NAT (dstnat, -100), where kube-proxy rewrites a
// VIP's Service ports (kube-proxy forwarding) and, in iptables mode, the
// NodePorts of every local address. The guard must see the destination
// the client sent to, so that VIP:NodePort is dropped before kube-proxy
// turns it into a pod address. IPVS comes later still (input, 98 and 99).
const GuardPriority = knftables.DNATPriority + " - 50"

// Rules is what the table expresses.
type Rules struct {
	// SNAT lists the real servers whose forwarded traffic is masqueraded,
	// by virtual server, as the dataplane computes them: in any order,
	// though Compute copies nothing when they come sorted by virtual
	// server, one entry each, with their real servers sorted.
	SNAT []SNAT
	// SourceRanges maps a virtual server to the source CIDRs allowed to
	// reach it, as the dataplane computes them. A virtual server present
	// is filtered: with no range of its VIP's family (ranges of the other
	// family are ignored), it admits no client. One absent is open to all.
	SourceRanges map[ipvs.Key][]netip.Prefix
	// Guard is what may reach keeplb's VIPs, as the dataplane computes it;
	// everything else to them is dropped.
	Guard Guard
	// Sync guards the kernel's IPVS connection sync daemons.
	Sync SyncGuard
	// FollowVIP masquerades SNAT's real servers to the VIP, keeping the
	// client's port where it is free, instead of to this node's address,
	// and keeps the flows this node only routes between a VIP and its own
	// pods in conntrack zone TransitZone: a backend then sees the same
	// tuple from whichever node holds the VIP, and its replies follow the
	// VIP, so that a connection whose IPVS entry reached the new holder
	// survives the move (docs/connections.md). Only Guard.VIPs are put in
	// the zone.
	FollowVIP bool
	// Whole lists the virtual servers that masquerade every real server
	// they have (a Cluster Service's). With FollowVIP their flows are
	// masqueraded to the VIP whatever the real server, those to a real
	// server this node does not have included: the connections the
	// kernel's sync daemon gave this node from another holder, which
	// forwarded them to its own pods (nodeport forwarding sends a node's
	// own share to its own pods, not to its NodePort). Without FollowVIP
	// it does nothing.
	Whole []ipvs.Key
}

// SyncGuard admits the kernel's IPVS connection sync messages from peers
// only. A sync daemon installs whatever connection entries reach it, from
// any sender, unauthenticated (docs/connections.md): the table drops UDP
// to Ports from every source but Peers before the daemon reads it. The
// kernel's socket is bound to the sync interface, so what arrives on
// others never reaches it. No Ports: nothing is guarded (no daemon runs).
type SyncGuard struct {
	// Ports are the UDP ports the daemons use: the group's port, and for
	// a master of several threads the ones after it.
	Ports []uint16
	// Peers are the addresses sync messages may come from: the other
	// nodes' addresses on the sync interface.
	Peers []netip.Addr
}

// Guard lists what may reach keeplb's VIPs on a node: the ports of the
// Services using each VIP, whatever their forwarding mode (kube-proxy's
// included), and which VIPs answer ping. A held VIP is a local address, so
// without the guard every host-network listener of the holder (sshd, the
// kubelet, node exporters, NodePorts) would answer on it. The guard covers
// every VIP of every pool on every node, so a VIP that moves is guarded
// before it arrives.
type Guard struct {
	// VIPs are every address keeplb holds for a Service, by the rule of
	// the VRRP plan (a Service keeplb handles, an address of its status
	// in a pool), sorted.
	VIPs []netip.Addr
	// Ports are the VIP:port/protocol of every port of those Services,
	// sorted.
	Ports []ipvs.Key
	// Echo are the VIPs whose pool answers ICMP echo requests
	// (spec.icmpEcho Allow, the default), sorted.
	Echo []netip.Addr
}

// Sort sorts and deduplicates g's lists: Services share VIPs and ports.
func (g *Guard) Sort() {
	slices.SortFunc(g.VIPs, netip.Addr.Compare)
	g.VIPs = slices.Compact(g.VIPs)
	slices.SortFunc(g.Ports, ipvs.Key.Compare)
	g.Ports = slices.Compact(g.Ports)
	slices.SortFunc(g.Echo, netip.Addr.Compare)
	g.Echo = slices.Compact(g.Echo)
}

// SNAT is the real servers of one virtual server whose forwarded traffic
// needs masquerading. They are kept by virtual server, not as one entry
// per real server, so that a list of them holds each virtual server once
// (an entry per real server held it 100,000 times at 10,000 Services) and
// a change to one virtual server replaces one slice of real servers.
type SNAT struct {
	Virtual ipvs.Key
	// Reals are the real servers, best sorted without duplicates (Compute
	// otherwise sorts a copy). The Elements Compute makes keep this slice
	// rather than copy it: give a new slice for a change, never change
	// one already given.
	Reals []netip.AddrPort
}

// String returns e.g. "TCP/192.0.2.1:80 -> [10.0.0.1:30080 10.0.0.2:30080]".
func (s SNAT) String() string { return s.Virtual.String() + " -> " + fmt.Sprint(s.Reals) }

// protocols are the port-carrying protocols IPVS forwards, in nft syntax.
const protocols = "{ tcp, udp, sctp }"

// family is what differs between the IPv4 and IPv6 halves of the table.
type family struct {
	v6     bool
	suffix string // of set names
	ip     string // payload protocol in rules
	addr   string // nft address type
}

func families() [2]family {
	return [2]family{
		{v6: false, suffix: "v4", ip: "ip", addr: "ipv4_addr"},
		{v6: true, suffix: "v6", ip: "ip6", addr: "ipv6_addr"},
	}
}

func (f family) snatSet() string      { return "snat-" + f.suffix }
func (f family) filteredSet() string  { return "filtered-" + f.suffix }
func (f family) allowedSet() string   { return "allowed-" + f.suffix }
func (f family) vipsSet() string      { return "vips-" + f.suffix }
func (f family) portsSet() string     { return "ports-" + f.suffix }
func (f family) echoSet() string      { return "echo-" + f.suffix }
func (f family) guardChain() string   { return ChainGuard + "-" + f.suffix }
func (f family) syncPeersSet() string { return "sync-peers-" + f.suffix }
func (f family) snatVIPSet() string   { return "snat-vip-" + f.suffix }
func (f family) transitSet() string   { return "transit-" + f.suffix }
func (f family) snatWholeSet() string { return "snat-vip-whole-" + f.suffix }

// syncPortsSet is the set of the sync daemons' ports, both families'.
const syncPortsSet = "sync-ports"

// icmpAccepted are the ICMP types a VIP always accepts: the errors that
// make path MTU discovery and failing connections work (also for flows
// conntrack does not know as related), and, for IPv6, neighbour
// discovery, without which a unicast neighbour solicitation to the VIP
// (a peer's reachability probe) would go unanswered. Echo requests are
// the pool's choice (spec.icmpEcho).
func (f family) icmpAccepted() string {
	if f.v6 {
		return "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-neighbor-solicit, nd-neighbor-advert }"
	}
	return "icmp type { destination-unreachable, time-exceeded, parameter-problem }"
}

func (f family) echoRequest() string {
	if f.v6 {
		return "icmpv6 type echo-request"
	}
	return "icmp type echo-request"
}

// Transaction adds to tx the operations that (re)write keeplb's table to
// express in: the table is created if missing, deleted and written anew,
// all within tx, so running tx is atomic and idempotent. It touches no
// other table.
//
// An entry of in that the table cannot express (an invalid or zoned
// address, port 0, an unknown protocol, mixed families) is left out and
// named in the returned error; the rest is written all the same, so one
// bad entry can neither stop the table from following every other
// Service nor reach nft's script text, where a single unparsable word
// makes nft reject the whole transaction. A source range left out only
// narrows what its virtual server admits: one whose ranges are all
// invalid admits no client.
//
// It is Compute, then Write.
func Transaction(tx *knftables.Transaction, in Rules) error {
	e, err := Compute(in)
	Write(tx, e)
	return err
}

// Write adds to tx the operations that rewrite keeplb's table whole to
// hold e: the table is created if missing, deleted and written anew, all
// within tx, so running tx is atomic and idempotent, and the table is as
// written whatever was done to it before (flushed, edited, deleted). The
// guard's counter starts again from zero. It touches no other table.
func Write(tx *knftables.Transaction, e *Elements) {
	if e == nil {
		e = &Elements{}
	}
	table := &knftables.Table{
		Family:  Family,
		Name:    Table,
		Comment: knftables.PtrTo("keeplb: masquerading for IPVS NAT, loadBalancerSourceRanges, VIP port guard"),
	}
	// Add then delete: deleting a missing table is an error, and nft
	// 1.0.6 has no destroy. Recreating (rather than flushing) also drops
	// whatever an older keeplb put in the table under other names.
	tx.Add(table)
	tx.Delete(&knftables.Table{Family: Family, Name: Table})
	tx.Add(table)

	tx.Add(&knftables.Chain{
		Family:   Family,
		Table:    Table,
		Name:     ChainSNAT,
		Type:     knftables.PtrTo(knftables.NATType),
		Hook:     knftables.PtrTo(knftables.PostroutingHook),
		Priority: knftables.PtrTo(knftables.SNATPriority),
		Comment:  knftables.PtrTo("masquerade connections IPVS forwarded from a VIP to a listed real server"),
	})
	tx.Add(&knftables.Chain{
		Family: Family,
		Table:  Table,
		Name:   ChainSourceRanges,
		Type:   knftables.PtrTo(knftables.FilterType),
		Hook:   knftables.PtrTo(knftables.InputHook),
		// filter (0) runs before IPVS schedules in LOCAL_IN (99).
		Priority: knftables.PtrTo(knftables.FilterPriority),
		Comment:  knftables.PtrTo("drop traffic to VIP ports from outside loadBalancerSourceRanges"),
	})

	tx.Add(&knftables.Chain{
		Family:   Family,
		Table:    Table,
		Name:     ChainGuard,
		Type:     knftables.PtrTo(knftables.FilterType),
		Hook:     knftables.PtrTo(knftables.PreroutingHook),
		Priority: knftables.PtrTo(GuardPriority),
		Comment:  knftables.PtrTo("send traffic to keeplb's VIPs through the VIP port guard, before kube-proxy's DNAT and IPVS"),
	})
	tx.Add(&knftables.Chain{
		Family:   Family,
		Table:    Table,
		Name:     ChainSync,
		Type:     knftables.PtrTo(knftables.FilterType),
		Hook:     knftables.PtrTo(knftables.InputHook),
		Priority: knftables.PtrTo(knftables.FilterPriority),
		Comment:  knftables.PtrTo("drop IPVS connection sync messages from anything but a peer node"),
	})
	tx.Add(&knftables.Chain{
		Family: Family,
		Table:  Table,
		Name:   ChainTransit,
		Type:   knftables.PtrTo(knftables.FilterType),
		Hook:   knftables.PtrTo(knftables.PreroutingHook),
		// raw (-300) runs before conntrack (-200) looks the packet up,
		// which the zone must precede.
		Priority: knftables.PtrTo(knftables.RawPriority),
		Comment:  knftables.PtrTo("keep flows routed between a VIP held elsewhere and this node's pods in a conntrack zone of their own"),
	})
	tx.Add(&knftables.Counter{
		Family:  Family,
		Table:   Table,
		Name:    CounterGuard,
		Comment: knftables.PtrTo("packets to a VIP that no Service port asks for"),
	})
	for _, f := range families() {
		tx.Add(&knftables.Chain{
			Family:  Family,
			Table:   Table,
			Name:    f.guardChain(),
			Comment: knftables.PtrTo("accept what a VIP's Services and the address itself need, drop the rest"),
		})
	}

	for _, f := range families() {
		vipPort := f.addr + " . inet_proto . inet_service"
		for _, set := range []struct {
			name, typ, comment string
			interval           bool
		}{
			{f.vipsSet(), f.addr, "keeplb's VIPs, guarded", false},
			{f.portsSet(), vipPort, "VIP . protocol . port of the Services using the VIP", false},
			{f.echoSet(), f.addr, "VIPs that answer echo requests", false},
			{f.snatSet(), vipPort + " . " + f.addr + " . inet_service", "VIP . protocol . port . real server . port to masquerade", false},
			{f.snatVIPSet(), vipPort + " . " + f.addr + " . inet_service", "VIP . protocol . port . real server . port to masquerade to the VIP", false},
			{f.transitSet(), f.addr, "VIPs whose routed flows go to the transit conntrack zone", false},
			{f.snatWholeSet(), vipPort, "VIP . protocol . port whose flows to any real server are masqueraded to the VIP", false},
			{f.filteredSet(), vipPort, "VIP . protocol . port with loadBalancerSourceRanges", false},
			{f.allowedSet(), vipPort + " . " + f.addr, "VIP . protocol . port . allowed source range", true},
			{f.syncPeersSet(), f.addr, "nodes whose IPVS connection sync messages are accepted", false},
		} {
			s := &knftables.Set{Family: Family, Table: Table, Name: set.name, Type: set.typ, Comment: knftables.PtrTo(set.comment)}
			if set.interval {
				s.Flags = []knftables.SetFlag{knftables.IntervalFlag}
			}
			tx.Add(s)
		}
	}

	tx.Add(&knftables.Set{Family: Family, Table: Table, Name: syncPortsSet, Type: "inet_service", Comment: knftables.PtrTo("UDP ports of the IPVS connection sync daemons")})

	// To this node's address, or, with FollowVIP, to the VIP the client
	// connected to (each family's rules, then the next action's).
	for _, to := range []func(family) (set, action string){
		func(f family) (string, string) { return f.snatSet(), "masquerade" },
		func(f family) (string, string) {
			return f.snatVIPSet(), knftables.Concat("snat", f.ip, "to ct original", f.ip, "daddr")
		},
	} {
		for _, f := range families() {
			set, action := to(f)
			tx.Add(&knftables.Rule{
				Family: Family,
				Table:  Table,
				Chain:  ChainSNAT,
				// nft needs the protocols to type ct original proto-dst
				// (else "variable sized data types (invalid) in concat").
				Rule: knftables.Concat(
					"meta l4proto", protocols,
					"ct original", f.ip, "daddr . meta l4proto . ct original proto-dst .",
					f.ip, "daddr . th dport",
					"@"+set, action,
				),
			})
		}
	}
	// With FollowVIP, a Cluster Service's flows to any real server, also
	// one this node does not have (a connection the sync daemon brought):
	// those IPVS forwarded, which no longer go to a VIP.
	for _, f := range families() {
		tx.Add(&knftables.Rule{
			Family: Family,
			Table:  Table,
			Chain:  ChainSNAT,
			Rule: knftables.Concat(
				"meta l4proto", protocols,
				"ct original", f.ip, "daddr . meta l4proto . ct original proto-dst",
				"@"+f.snatWholeSet(),
				f.ip, "daddr != @"+f.vipsSet(),
				"snat", f.ip, "to ct original", f.ip, "daddr",
			),
		})
	}
	for _, f := range families() {
		// From a VIP to an address not local: the holder's NAT sending a
		// flow to this node's pod. To a VIP not local: the pod's reply.
		// Both directions must be in the zone for the entry to match.
		for _, dir := range []string{"saddr", "daddr"} {
			tx.Add(&knftables.Rule{
				Family: Family,
				Table:  Table,
				Chain:  ChainTransit,
				Rule: knftables.Concat(
					f.ip, dir, "@"+f.transitSet(), "fib daddr type != local",
					"ct zone set", strconv.Itoa(TransitZone),
				),
			})
		}
	}
	for _, f := range families() {
		tx.Add(&knftables.Rule{
			Family: Family,
			Table:  Table,
			Chain:  ChainSourceRanges,
			Rule: knftables.Concat(
				f.ip, "daddr . meta l4proto . th dport", "@"+f.filteredSet(),
				f.ip, "daddr . meta l4proto . th dport .", f.ip, "saddr", "!=", "@"+f.allowedSet(),
				"counter drop",
			),
		})
	}

	for _, f := range families() {
		tx.Add(&knftables.Rule{
			Family: Family,
			Table:  Table,
			Chain:  ChainSync,
			Rule: knftables.Concat(
				"udp dport", "@"+syncPortsSet,
				f.ip, "saddr", "!=", "@"+f.syncPeersSet(), "counter drop",
			),
		})
	}

	for _, f := range families() {
		tx.Add(&knftables.Rule{
			Family: Family,
			Table:  Table,
			Chain:  ChainGuard,
			// Only where the VIP is local: a packet to a VIP held
			// elsewhere is routed, reaches no listener here, and may be
			// a pod's reply that conntrack finds out of window (the
			// flow moved), which the guard must not drop.
			Rule: knftables.Concat(f.ip, "daddr", "@"+f.vipsSet(), "fib daddr type local", "jump", f.guardChain()),
		})
	}
	for _, f := range families() {
		for _, r := range []string{
			// Host processes reach every listener on any local address
			// anyway; the guard is for traffic from elsewhere (pods too).
			`iifname "lo" accept`,
			// Replies and ICMP errors of connections conntrack knows,
			// and connections opened before a port left a Service.
			"ct state established,related accept",
			knftables.Concat(f.ip, "daddr . meta l4proto . th dport", "@"+f.portsSet(), "accept"),
			knftables.Concat(f.icmpAccepted(), "accept"),
			knftables.Concat(f.ip, "daddr", "@"+f.echoSet(), f.echoRequest(), "accept"),
			knftables.Concat("counter name", `"`+CounterGuard+`"`, "drop"),
		} {
			tx.Add(&knftables.Rule{Family: Family, Table: Table, Chain: f.guardChain(), Rule: r})
		}
	}

	addElements(tx, e)
}

// Delete adds to tx the operations that remove keeplb's table, whether or
// not it exists.
func Delete(tx *knftables.Transaction) {
	tx.Add(&knftables.Table{Family: Family, Name: Table})
	tx.Delete(&knftables.Table{Family: Family, Name: Table})
}

// New returns a knftables.Interface for keeplb's table. It fails where
// nft is missing or nftables is unusable. It does not keep the memory of
// its largest write (see bigTransaction).
func New() (knftables.Interface, error) {
	r, err := newReleasing(func() (knftables.Interface, error) { return knftables.New(Family, Table) })
	if err != nil {
		return nil, err
	}
	// knftables.New found nft in $PATH; Whole streams to the same one.
	// Without it (it cannot be, but) Whole runs transactions.
	r.path, _ = exec.LookPath("nft")
	return r, nil
}

// Cleanup removes keeplb's table, for a clean exit.
func Cleanup(ctx context.Context, nft knftables.Interface) error {
	tx := nft.NewTransaction()
	Delete(tx)
	if err := nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("deleting nftables table %s %s: %w", Family, Table, err)
	}
	return nil
}

// GuardDrops returns the packets the VIP port guard dropped since keeplb's
// table was last written whole: Write recreates the table, and with it
// the counter (Update keeps it), so a caller that counts across writes
// adds this up before each whole write.
func GuardDrops(ctx context.Context, nft knftables.Interface) (uint64, error) {
	counters, err := nft.ListCounters(ctx)
	if err != nil {
		return 0, fmt.Errorf("reading counter %s of nftables table %s %s: %w", CounterGuard, Family, Table, err)
	}
	for _, c := range counters {
		if c != nil && c.Name == CounterGuard && c.Packets != nil {
			return *c.Packets, nil
		}
	}
	return 0, fmt.Errorf("nftables table %s %s has no counter %s", Family, Table, CounterGuard)
}

// outermost returns the valid ranges of one family, masked, sorted,
// without those another contains (interval sets with concatenated keys
// reject overlapping elements, and CIDRs overlap only by nesting), and an
// error naming the invalid ones.
func outermost(ranges []netip.Prefix, v6 bool) ([]netip.Prefix, error) {
	var ps []netip.Prefix
	var errs []error
	for _, p := range ranges {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("invalid source range %q", p))
			continue
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		if p.Addr().Is6() == v6 {
			ps = append(ps, p.Masked())
		}
	}
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	// Sorted by address then length, a range that contains a later one
	// comes first, and every range between them lies inside it too, so
	// comparing with the last kept range is enough.
	var out []netip.Prefix
	for _, p := range ps {
		if n := len(out); n > 0 && out[n-1].Contains(p.Addr()) {
			continue
		}
		out = append(out, p)
	}
	return out, errors.Join(errs...)
}

func familyIndex(a netip.Addr) int {
	if a.Is6() {
		return 1
	}
	return 0
}

func port(p uint16) string { return strconv.Itoa(int(p)) }
