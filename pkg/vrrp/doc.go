// Package vrrp computes the VRRP plan of a keeplb cluster: which VRRP
// instances hold which VIPs, with which VRIDs, and each node's priority in
// each. It is pure: no API, kernel or keepalived calls, and no package state.
//
// The plan has two parts. Compute takes cluster-wide data only (Nodes,
// IPPools, VIPs) and returns the same Plan on every speaker, whatever the
// order of its input. The per-node part works on that Plan: Plan.For (the
// instances a node renders), TrackValues (its track-file values),
// UnicastPeers, and ChooseInterface / Place (its interfaces, given as data).
//
// # Instances and VRIDs
//
// VIPs are grouped per pool and address family (one family per instance;
// VRIDs are per interface and family, so both families of a pool reuse the
// same numbers). A pool whose range leaves s usable VRIDs gets
// k = min(32, ceil(s/2)) shared instances on its first k VRIDs; a VIP joins
// shared instance "address value mod k" (the low 64 bits for IPv6), so the
// consecutive addresses the allocator hands out go round-robin. k depends on
// the range only, so more than 255 VIPs simply share instances, and adding or
// removing a VIP never moves another one: its instance, VRID and priorities
// are functions of itself and the range, not of the other VIPs. Names are
// kl_<pool>_<v4|v6>_b<NN>.
//
// Every Local address (externalTrafficPolicy Local) gets an instance of its
// own on the remaining VRIDs, named kl_<pool>_<v4|v6>_<address>, because its
// master must follow its endpoints. Addresses take VRIDs oldest Service
// first (Created), each the free VRID it scores highest by rendezvous
// hashing, so a new Local Service never displaces an existing one. The one
// way removing a VIP moves another: a Local address that lost its best VRID
// to an older one takes it over when that one goes (and possibly a chain of
// such, each taking the VRID the previous freed); with VRIDs plentiful this
// is rare, and the test suite pins it down exactly. A Service that turns
// Local late ranks by its creation time and may displace a younger one.
//
// Every instance is VRRPv3 (RFC 5798): IPv6 needs it, sub-second adverts
// need its centisecond field, and one version keeps one code path and config
// shape; the only peers are other keeplb speakers, so VRRPv2 interop is not
// needed.
//
// # Priorities and spread
//
// The members of a pool and family are the nodes that match its
// nodeSelector, lack the exclude-from-external-load-balancers label, and
// (for unicast) have an InternalIP of the family: durable facts. Each shared
// instance gets a preference order over the members; the eligible members
// (the Ready ones) get priorities 254, 253, then 220, 219, ... in that
// order (never below 1; BackupGap separates the second choice from the
// rest, for graceful handovers), and the first is the master. Ready is deliberately not part of the
// order: a node going NotReady moves exactly the instances it mastered, to
// their next choice, and coming back moves exactly those back. A membership
// change (a Node deleted or added, labels changed) recomputes the orders and
// may also move a few other instances (one of 25 when deleting one of five
// nodes, in the tests).
//
// Fail-static: when more than half of a pool's members are not Ready at
// once (FailStatic), the plan treats all of them as eligible, which gives
// exactly the all-Ready plan. Ready is the node lifecycle controller's view
// of kubelet heartbeats; most nodes losing it together means the control
// plane is in trouble (an overloaded API server, expired kubelet
// certificates), not the data path, and withdrawing every VIP would make
// that an outage. VRRP still finds the live nodes: a dead one sends no
// adverts. The plan reports a FailStatic warning for the pool meanwhile.
//
// The orders are rendezvous hashing of instance x node, with a balancing
// step for the first two places: first places are taken by descending score,
// at most ceil(k/N) per node, and the instances first-placed on a node spread
// their second places over the others the same way, so a node going down
// does not dump its instances on one peer. Pure hashing would give a node
// Binomial(k, 1/N) instances and exceed twice the fair share regularly.
//
// No stable scheme can keep every node within twice its fair share for every
// VIP set: when VIPs never move as others come and go, a VIP's node is a
// function of the VIP alone, and VIPs with no structure fall on nodes like
// balls in random bins. The bound holds for the sets the allocator produces:
// in the tests over random inputs (2-7 eligible nodes, 20-2000 VIPs, 1-3
// pools), never exceeded for VIPs in allocation order with all nodes Ready or
// one down, and from 100 VIPs also with two down or after heavy churn; sets
// with no structure need about 300 VIPs. Pools with more than 64 members
// cannot spread over all of them (a LimitedSpread warning says so).
//
// # Anti-flap
//
// A node that comes back ranks where it ranked before, so it would take its
// instances back at once, and a node flapping Ready would drag VIPs (and the
// connections through its IPVS) back and forth. Every instance therefore
// carries HoldDown (keepalived preempt_delay, 60 s; the instance must start
// in state BACKUP): a node outranking the current master waits that long
// before taking over, which covers Ready flapping at the node-monitor grace
// period and speaker crash loops; failover of a dead master is not delayed.
// keepalived restarts the delay at every reload, which every VIP change
// causes, so the speaker keeps its clock (Hold) and reloads without the
// delay when it has run out. The price is one planned move per instance 60
// s after a node returns. nopreempt would avoid even that but never restores
// balance: after a rolling reboot every VIP would sit on the node rebooted
// last. A pool chooses (Pool.Failback, from spec.vrrp.failback): Delayed
// (the default, with its own delay if it sets one), Immediate (no delay) or
// Never (nopreempt); every instance of the pool carries it. A new instance
// starts on its planned master: the other nodes defer it (Hold.Deferred).
//
// # Local Services without reloads
//
// A Local instance lists every eligible member with a base priority of at
// most 127 and TrackFile set: the renderer adds a track_file with weight 1
// whose value the speaker writes from TrackValues. A node with a ready local
// endpoint writes LocalLift (127), which puts it above every node without;
// a node without writes TrackFault (-254) while any eligible node has one,
// which puts the instance in FAULT there (keepalived faults below -253), or
// 0 when none has one, so that every eligible node may then hold the VIP.
// Endpoint churn thus changes file contents only, never the config: Compute
// ignores LocalNodes. The fault, rather than the lift alone, is what lets
// Local instances keep their HoldDown: a master without endpoints steps down
// at once instead of waiting to be preempted. The lift still guards against a
// speaker whose view of the endpoints lags.
//
// # Nodes that cannot forward
//
// A VIP the speakers forward with IPVS (VIP.Forwarded: nodeport or pod
// forwarding) is black-holed by a holder that cannot forward: its kernel
// lacks IPVS, keeplb's nftables table failed to load, or it runs without
// --ipvs. Its instances (Local ones, and shared ones with such a VIP) carry
// TrackFile, and TrackValues lowers such a node's value by the number of
// nodes taking part: it then ranks below every node that can forward,
// keeps its order among those that cannot, and never faults, so that a
// cluster where no node can forward still holds its VIPs where the plan
// puts them. A node that can forward writes 0 (its priority unchanged), so
// the track file added to shared instances moves nothing. A node needs no
// word about the others: lowering its own priority is enough. The lowered
// priority stops a node from taking a VIP (at start, for instance); a
// master that loses the ability is replaced only when its peers' preempt
// delay has passed, as any lower-priority master.
//
// # Interfaces and unicast
//
// A pool's spec.vrrp.interface, if set, carries its VIPs; otherwise each
// node puts a VIP on the interface with the most specific subnet containing
// it, else on its default-route interface of the family. VIPs are added as
// /32 or /128. Unicast instances advertise from the node's first InternalIP
// of the family to those of the other eligible nodes.
//
// # Problems
//
// Configuration problems become Plan.Problems, never panics, and affect only
// what they name: VRID ranges outside 1-255; overlapping ranges of pools that
// may share an interface (the older pool keeps the overlap, the other uses
// the rest of its range; pools that pick their interface per node may share
// any); too few VRIDs for the Local addresses (the newest fall back to shared
// instances, held without regard to their endpoints); VIPs of unknown pools;
// pools no Ready node may serve; advert intervals VRRPv3 cannot carry.
//
// The hash, the layout and the priority scheme are a contract between the
// speakers of a cluster: every speaker must compute the same plan, so any
// change to them moves VIPs cluster-wide and must be rolled out with care.
package vrrp
