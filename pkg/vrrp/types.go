package vrrp

import (
	"fmt"
	"net/netip"
	"time"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// ExcludeLabel on a Node keeps it from holding any VIP, as for cloud load
// balancers. kubeadm sets it on control-plane nodes.
const ExcludeLabel = "node.kubernetes.io/exclude-from-external-load-balancers"

// Priorities, track values and timers the plan uses. They are part of the
// contract between speakers: every speaker of a cluster must use the same.
const (
	// TopPriority is the base priority of the first choice of a shared
	// instance, the second choice one less, and the k-th (k >= 2, from 0)
	// TopPriority-k-BackupGap, never below 1. 255 is left to address
	// owners, which keepalived never lets us be.
	TopPriority = 254
	// BackupGap separates the second choice of an instance from the
	// third and later ones, so that on a graceful handover the second
	// choice's skew time is BackupGap+1 256ths of an advert shorter than
	// any other backup's (12.9 ms at 100 ms adverts, 2.6 ms at 20 ms),
	// not 1 256th (0.4 ms at 100 ms) that a busy node loses.
	BackupGap = 32
	// LocalTopPriority is the base priority of the first choice of a Local
	// instance, so that LocalLift lifts any node above every unlifted one.
	LocalTopPriority = 127
	// LocalLift is the track-file value of a node with a ready local
	// endpoint: added to its base priority, it outranks every node without.
	LocalLift = 127
	// TrackFault is the track-file value of a node without a ready local
	// endpoint while another eligible node has one. With weight 1 it is
	// below -253, which puts the instance in FAULT on that node: it neither
	// holds the VIP nor competes for it.
	TrackFault = -254
	// Version is the VRRP version of every instance (RFC 5798, VRRPv3).
	Version = 3
	// DefaultAdvert is the advertisement interval of a pool that sets none.
	DefaultAdvert = time.Second
	// MinAdvert and MaxAdvert bound the interval VRRPv3 can carry: a 12-bit
	// count of centiseconds.
	MinAdvert = 10 * time.Millisecond
	MaxAdvert = 4095 * 10 * time.Millisecond
	// PreemptDelay is failback Delayed's default wait: how long a node that
	// comes back to an instance (its speaker starts, it leaves FAULT, it
	// becomes eligible again) waits before it takes the instance over
	// (keepalived's preempt_delay; Hold keeps its clock across reloads). It
	// is the anti-flap mechanism: see the package documentation.
	PreemptDelay = 60 * time.Second
)

// maxBuckets is the number of shared instances of a pool and family when its
// VRID range has room. With 32, the instances a node masters are within
// 1.125x of the fair share for 2-7 nodes and within 2x for up to 64, and
// stay within 2x with two nodes down; 16 did not (one instance was too large
// a share for 9 nodes less two). Adverts cost per instance, so the count is
// capped; a narrow VRID range lowers it further (see bucketCount).
const maxBuckets = 32

// Node is the plan's view of a Kubernetes Node.
type Node struct {
	// Name is the Node's name.
	Name string
	// Labels are the Node's labels, for pool node selectors and ExcludeLabel.
	Labels map[string]string
	// Ready is the Node's Ready condition.
	Ready bool
	// InternalIPs are the Node's InternalIP addresses in status order; the
	// first of a family is the node's address for unicast VRRP. Package
	// nodeview keeps only addresses other nodes can send to.
	InternalIPs []netip.Addr
}

// InternalIP returns the node's first InternalIP of family f, or the zero
// Addr when it has none.
func (n Node) InternalIP(f allocator.Family) netip.Addr { return firstOf(n.InternalIPs, f) }

// Pool is the plan's view of an IPPool's spec.vrrp.
type Pool struct {
	// Name is the IPPool's name.
	Name string
	// FirstVRID and LastVRID are the inclusive VRID range the pool may use
	// (spec.vrrp.virtualRouterIDs; see ParseVRIDRange).
	FirstVRID, LastVRID int
	// Advert is the advertisement interval; zero means DefaultAdvert.
	Advert time.Duration
	// Unicast sends adverts to the other eligible nodes' InternalIPs.
	Unicast bool
	// Interface is the interface to put VIPs on; empty means choose per
	// node and VIP (see ChooseInterface).
	Interface string
	// NodeSelector restricts the nodes that may hold the pool's VIPs; nil
	// means every node.
	NodeSelector labels.Selector
	// Order settles VRID overlaps between pools: the lower Order keeps the
	// overlapping VRIDs (use creation order, as pools.Parse does); equal
	// Orders fall back to the name.
	Order int
	// Failback is when a node that outranks the master takes over
	// (spec.vrrp.failback); "" is Delayed.
	Failback v1alpha1.Failback
	// FailbackDelay is Delayed's wait (spec.vrrp.failbackDelay); 0 means
	// PreemptDelay (PoolsOf makes a Delayed pool with 0s Immediate).
	FailbackDelay time.Duration
}

// preempt returns how the pool's instances let a node that outranks the
// master take over: once it has been back for delay (the instances'
// HoldDown, keepalived's preempt_delay; 0 is at once), or never
// (keepalived's nopreempt). This is the one translation of the failback
// policy into the plan's terms.
func (p Pool) preempt() (delay time.Duration, never bool) {
	switch p.Failback {
	case v1alpha1.FailbackNever:
		return 0, true
	case v1alpha1.FailbackImmediate:
		return 0, false
	}
	if p.FailbackDelay > 0 {
		return p.FailbackDelay, false
	}
	return PreemptDelay, false
}

// VIP is one load-balancer address of one Service.
type VIP struct {
	// Addr is the address.
	Addr netip.Addr
	// Pool is the name of the IPPool the address belongs to.
	Pool string
	// Service is the owning Service as "namespace/name". Services sharing
	// an address give one VIP each.
	Service string
	// Local is set when the Service has externalTrafficPolicy Local.
	Local bool
	// LocalNodes are the nodes with a ready local endpoint of a Local
	// Service. They only change track-file values (TrackValues), never the
	// plan that Compute returns.
	LocalNodes []string
	// Created is the Service's creationTimestamp. When two Local addresses
	// want the same VRID, the older one keeps it, so that adding a Service
	// never moves an existing one.
	Created time.Time
	// Forwarded is set when the holder forwards the VIP's traffic with
	// IPVS (forwarding nodeport or pod), not kube-proxy: a node that cannot
	// forward must then not hold it while one that can exists (see
	// TrackValues).
	Forwarded bool
}

// Input is everything the plan depends on: cluster-wide data only, so that
// every speaker computes the same plan. Order of the slices does not matter.
type Input struct {
	// Nodes are all Nodes of the cluster, Ready or not.
	Nodes []Node
	// Pools are all IPPools.
	Pools []Pool
	// VIPs are the addresses of all LoadBalancer Services keeplb serves.
	VIPs []VIP
}

// Instance is one VRRP instance: a group of VIPs of one pool and family that
// moves between nodes as a whole.
type Instance struct {
	// Name is a stable keepalived instance name, also usable as a file name:
	// kl_<pool>_<v4|v6>_b<NN> for shared instances and
	// kl_<pool>_<v4|v6>_<address> for Local ones, with '-' for the dots or
	// colons of the address.
	Name string
	// Pool is the IPPool the VIPs belong to.
	Pool string
	// Family is the address family of every VIP of the instance.
	Family allocator.Family
	// VRID is the virtual router ID, unique per interface and family.
	VRID int
	// Version is the VRRP version, always Version (3).
	Version int
	// Advert is the advertisement interval, a multiple of 10ms.
	Advert time.Duration
	// Unicast sends adverts to peers (see UnicastPeers) instead of multicast.
	Unicast bool
	// Interface is the pool's interface, or empty to choose per node (see
	// Place).
	Interface string
	// VIPs are the addresses, sorted; each is added as a /32 or /128.
	VIPs []netip.Addr
	// Priorities maps every eligible node to its base priority (1-254);
	// nodes not listed take no part. The highest is the intended master.
	Priorities map[string]int
	// TrackFile is set on Local instances, on instances with a Forwarded
	// VIP and on those with a HoldDown: render a track_file with weight 1
	// whose value each node writes from TrackValues.
	TrackFile bool
	// Local is set on the instance of one Local address: TrackValues lifts
	// the nodes with a ready local endpoint.
	Local bool
	// HoldDown is failback Delayed's wait, keepalived's preempt_delay: a
	// node that outranks the master takes over once it has been back for
	// this long. The speaker renders it, but for the windows Hold.Prompt
	// names, in which keepalived preempts at once: keepalived restarts
	// the delay at every reload, Hold keeps its clock across them.
	HoldDown time.Duration
	// NoPreempt is keepalived's nopreempt: a node that outranks the master
	// never takes over from it (failback Never). HoldDown is then 0.
	NoPreempt bool
}

// Master returns the node with the highest base priority, or "" when no
// node is eligible. For a Local instance the endpoints decide at run time.
func (i *Instance) Master() string {
	best, bestPrio := "", 0
	for n, p := range i.Priorities {
		if p > bestPrio || p == bestPrio && n < best {
			best, bestPrio = n, p
		}
	}
	return best
}

// Successor returns the node that takes the instance's VIPs over from
// node, or back from it: the eligible node with the highest base priority
// but node's (ties to the smaller name, as Master), or "" when there is
// none. For the planned master that is the planned second choice, which a
// graceful handover and a crash send the VIPs to; for any other node,
// the planned master, which failback sends them back to.
func (i *Instance) Successor(node string) string {
	best, bestPrio := "", 0
	for n, p := range i.Priorities {
		if n != node && (p > bestPrio || p == bestPrio && n < best) {
			best, bestPrio = n, p
		}
	}
	return best
}

// Successors returns, for each VIP of a shared instance, its Successor
// from node. Local instances are left out: their endpoints, not their
// base priorities, decide where their VIPs go.
func (p Plan) Successors(node string) map[netip.Addr]string {
	out := map[netip.Addr]string{}
	for i := range p.Instances {
		inst := &p.Instances[i]
		if inst.Local {
			continue
		}
		if next := inst.Successor(node); next != "" {
			for _, v := range inst.VIPs {
				out[v] = next
			}
		}
	}
	return out
}

// Plan is the VRRP layout of the cluster, identical on every speaker.
type Plan struct {
	// Instances are sorted by Name.
	Instances []Instance
	// Problems are the configuration problems found, sorted. A problem
	// affects only the pools and VIPs it names.
	Problems []Problem
}

// Severity says how bad a Problem is.
type Severity int

const (
	// Warning means everything is announced, but not as configured or not as
	// well as it could be.
	Warning Severity = iota
	// Error means some VIPs are not announced, or not with their Local policy.
	Error
)

// String returns "Warning" or "Error", as Kubernetes event types spell them.
func (s Severity) String() string {
	if s == Error {
		return "Error"
	}
	return "Warning"
}

// Reasons of Problems, CamelCase for events and conditions.
const (
	// ReasonInvalidVRIDs: a pool's VRID range is not within 1-255.
	ReasonInvalidVRIDs = "InvalidVRIDs"
	// ReasonVRIDOverlap: two pools that may share an interface have
	// overlapping VRID ranges.
	ReasonVRIDOverlap = "VRIDOverlap"
	// ReasonVRIDsExhausted: a pool has fewer usable VRIDs than instances.
	ReasonVRIDsExhausted = "VRIDsExhausted"
	// ReasonAdvertInterval: an advert interval VRRPv3 cannot carry.
	ReasonAdvertInterval = "AdvertInterval"
	// ReasonDuplicatePool: one pool name given twice.
	ReasonDuplicatePool = "DuplicatePool"
	// ReasonUnknownPool: a VIP names a pool that does not exist.
	ReasonUnknownPool = "UnknownPool"
	// ReasonAddressConflict: one address given from two pools.
	ReasonAddressConflict = "AddressConflict"
	// ReasonInvalidVIP: a VIP without a valid address.
	ReasonInvalidVIP = "InvalidVIP"
	// ReasonNoEligibleNode: no Ready node may hold a pool's VIPs.
	ReasonNoEligibleNode = "NoEligibleNode"
	// ReasonLimitedSpread: a pool has too few shared instances to spread
	// masters over its nodes.
	ReasonLimitedSpread = "LimitedSpread"
	// ReasonFailStatic: more than half of a pool's members are not Ready,
	// so the plan ignores Ready for that pool (see FailStatic).
	ReasonFailStatic = "FailStatic"
)

// Problem is one configuration problem, phrased for the user: what is wrong,
// what the speakers do about it, and what to change.
type Problem struct {
	// Severity says whether VIPs are affected (Error) or not (Warning).
	Severity Severity
	// Reason is one of the Reason constants.
	Reason string
	// Pool is the IPPool to look at; empty when none is known.
	Pool string
	// Message says what is wrong, what the speakers do, and what to change.
	Message string
}

// String formats p for logs.
func (p Problem) String() string {
	return fmt.Sprintf("%s %s: %s", p.Severity, p.Reason, p.Message)
}
