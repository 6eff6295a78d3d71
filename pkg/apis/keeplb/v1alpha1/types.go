package v1alpha1

import (
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of every keeplb resource.
const GroupName = "keeplb.io"

// SchemeGroupVersion is the group and version of this package's types.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: "v1alpha1"}

// IPPoolResource is the resource of IPPool, for dynamic clients and informers.
var IPPoolResource = SchemeGroupVersion.WithResource("ippools")

// IPPoolKind is the kind of IPPool.
const IPPoolKind = "IPPool"

// Forwarding says how the node that holds a VIP carries its traffic.
type Forwarding string

const (
	// ForwardingNodePort forwards VIP traffic with IPVS to the Service's
	// NodePort on eligible nodes. The controller publishes ipMode Proxy.
	ForwardingNodePort Forwarding = "nodeport"
	// ForwardingPod forwards VIP traffic with IPVS straight to ready pod IPs.
	// The controller publishes ipMode Proxy.
	ForwardingPod Forwarding = "pod"
	// ForwardingKubeProxy only holds the VIP and lets kube-proxy forward.
	// The controller publishes ipMode VIP.
	ForwardingKubeProxy Forwarding = "kube-proxy"
)

// Valid reports whether f is one of the known forwarding modes.
func (f Forwarding) Valid() bool {
	switch f {
	case ForwardingNodePort, ForwardingPod, ForwardingKubeProxy:
		return true
	}
	return false
}

// ICMPEcho says whether a pool's VIPs answer ICMP and ICMPv6 echo
// requests (ping). The VIP port guard drops every other packet to a VIP
// that no Service port asks for, so this is the one ICMP choice left to the
// pool: errors (unreachable, time exceeded, packet too big) and IPv6
// neighbour discovery are always accepted, since the address needs them.
type ICMPEcho string

const (
	// ICMPEchoAllow answers echo requests to the pool's VIPs (the default):
	// ping tells an operator which node holds a VIP, and whether it is up.
	ICMPEchoAllow ICMPEcho = "Allow"
	// ICMPEchoDrop drops echo requests to the pool's VIPs, for networks
	// where addresses must not answer probes.
	ICMPEchoDrop ICMPEcho = "Drop"
)

// Valid reports whether e is Allow or Drop.
func (e ICMPEcho) Valid() bool { return e == ICMPEchoAllow || e == ICMPEchoDrop }

// Condition types set on IPPool status.
const (
	// ConditionReady is true when the pool's addresses parse and it can
	// allocate from at least part of them.
	ConditionReady = "Ready"
	// ConditionConflicting is true when part of the pool overlaps a pool
	// created earlier; the overlap is allocated only from the earlier pool.
	ConditionConflicting = "Conflicting"
)

// IPPool is a cluster-scoped set of addresses from which LoadBalancer
// Services get their VIPs, with the rules for which Services may use it and
// how its VIPs are announced (VRRP) and forwarded.
type IPPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   IPPoolSpec   `json:"spec"`
	Status IPPoolStatus `json:"status,omitempty"`
}

// IPPoolList is a list of IPPools.
type IPPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []IPPool `json:"items"`
}

// IPPoolSpec is the desired state of an IPPool.
type IPPoolSpec struct {
	// Addresses lists CIDRs ("192.0.2.0/28", "2001:db8::/120") and inclusive
	// ranges ("192.0.2.10-192.0.2.20"); IPv4 and IPv6 may be mixed.
	Addresses []string `json:"addresses"`

	// AutoAssign, when false, makes the pool serve only Services that name it
	// (keeplb.io/pool) or one of its addresses (keeplb.io/ips). Default true.
	AutoAssign *bool `json:"autoAssign,omitempty"`

	// AvoidBuggyIPs skips IPv4 addresses ending in .0 and .255, which some
	// old client stacks treat as network or broadcast addresses.
	AvoidBuggyIPs bool `json:"avoidBuggyIPs,omitempty"`

	// ServiceAllocation restricts which Services may draw from the pool and
	// orders pools for automatic assignment.
	ServiceAllocation *ServiceAllocation `json:"serviceAllocation,omitempty"`

	// Forwarding is the default forwarding mode for Services of this pool;
	// the keeplb.io/forwarding annotation overrides it. Default nodeport.
	Forwarding Forwarding `json:"forwarding,omitempty"`

	// ICMPEcho says whether the pool's VIPs answer ICMP echo requests:
	// Allow (the default) or Drop. Only the nodes that may hold the VIPs
	// are concerned: every speaker drops what the guard does not accept.
	ICMPEcho ICMPEcho `json:"icmpEcho,omitempty"`

	// NodePortSubsetSize is how many nodes' NodePorts each Service of the
	// pool is forwarded to under nodeport forwarding with
	// externalTrafficPolicy Cluster. Each Service gets its own subset of
	// the eligible nodes, the same on every node and stable: a node joining
	// or leaving changes only the subsets it enters or leaves. Nil means
	// DefaultNodePortSubsetSize; 0 means every eligible node.
	NodePortSubsetSize *int32 `json:"nodePortSubsetSize,omitempty"`

	// VRRP configures how speakers announce this pool's VIPs.
	VRRP *VRRP `json:"vrrp,omitempty"`
}

// DefaultNodePortSubsetSize is the nodes per Service of nodeport
// forwarding when a pool does not say: enough that losing one node moves
// a sixteenth of a Service's traffic, few enough that a node's IPVS table
// grows with its Services, not with nodes × Services.
const DefaultNodePortSubsetSize = 16

// SubsetSize returns the pool's NodePortSubsetSize with the default
// applied; 0 means every eligible node.
func (s *IPPoolSpec) SubsetSize() int {
	if s.NodePortSubsetSize == nil {
		return DefaultNodePortSubsetSize
	}
	return int(max(*s.NodePortSubsetSize, 0))
}

// ServiceAllocation restricts and orders the use of a pool.
type ServiceAllocation struct {
	// Priority orders pools for automatic assignment: higher first; pools of
	// equal priority are tried by name. Default 0.
	Priority int32 `json:"priority,omitempty"`

	// Namespaces, when set, admits only Services in these namespaces.
	Namespaces []string `json:"namespaces,omitempty"`

	// NamespaceSelector, when set, admits only Services whose namespace has
	// matching labels. With Namespaces, a namespace must satisfy both.
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`

	// ServiceSelector, when set, admits only Services with matching labels.
	ServiceSelector *metav1.LabelSelector `json:"serviceSelector,omitempty"`
}

// VRRP configures the VRRP instances that announce a pool's VIPs.
type VRRP struct {
	// Interface is the node interface VIPs are added to; empty means the
	// interface whose subnet contains the VIP, else the default-route one.
	Interface string `json:"interface,omitempty"`

	// VirtualRouterIDs is the inclusive range "first-last" (or a single
	// "id") of VRIDs this pool may use, within 1-255. Default "1-255".
	VirtualRouterIDs string `json:"virtualRouterIDs,omitempty"`

	// AdvertisementInterval is the VRRP advertisement interval, at least
	// 10ms. Default 1s. Failover takes about three intervals.
	AdvertisementInterval *metav1.Duration `json:"advertisementInterval,omitempty"`

	// Unicast sends adverts to the eligible nodes' InternalIPs instead of
	// the VRRP multicast group, for networks that filter multicast.
	Unicast bool `json:"unicast,omitempty"`

	// NodeSelector restricts which nodes may hold this pool's VIPs.
	NodeSelector *metav1.LabelSelector `json:"nodeSelector,omitempty"`

	// Failback is when a node that ranks above the VIPs' current holder
	// (it came back, or became eligible) takes them over: Delayed (the
	// default), Immediate or Never. Every move resets the connections
	// through the VIP; the failover of a failed holder is never delayed.
	Failback Failback `json:"failback,omitempty"`

	// FailbackDelay is how long Delayed waits, between 0s and 1000s in
	// whole multiples of 10ms. Default 60s. Only with failback Delayed.
	FailbackDelay *metav1.Duration `json:"failbackDelay,omitempty"`
}

// Failback is when a pool's VIPs return to the node the plan ranks first
// for them, once it can hold them again, from the node that took them over.
type Failback string

const (
	// FailbackDelayed returns the VIPs once the node has ranked first for
	// failbackDelay (60 s by default), which covers a node flapping Ready
	// and a speaker in a crash loop: they move once, not back and forth.
	FailbackDelayed Failback = "Delayed"
	// FailbackImmediate returns the VIPs at once: for pools that value
	// balance over the connections that a move resets.
	FailbackImmediate Failback = "Immediate"
	// FailbackNever leaves the VIPs on the node that holds them until it
	// fails or leaves the pool (keepalived's nopreempt): no move but those a
	// failure forces. Balance is not restored: after a rolling reboot the
	// VIPs sit on the nodes rebooted first.
	FailbackNever Failback = "Never"
)

// DefaultFailbackDelay is the failback delay of a Delayed pool that sets
// none.
const DefaultFailbackDelay = 60 * time.Second

// MaxFailbackDelay is the longest failback delay keepalived takes
// (preempt_delay, at most 1000 s).
const MaxFailbackDelay = 1000 * time.Second

// Valid reports whether f is one of the three policies; "" (unset) is
// not.
func (f Failback) Valid() bool {
	return f == FailbackDelayed || f == FailbackImmediate || f == FailbackNever
}

// IPPoolStatus is the observed state of an IPPool, kept by the controller.
//
// Address counts that can exceed 2^63 (IPv6 pools) are decimal strings.
type IPPoolStatus struct {
	// ObservedGeneration is the spec generation this status describes.
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Total is the number of addresses the pool may allocate from, after
	// conflicts and avoidBuggyIPs, all families together.
	Total string `json:"total,omitempty"`
	// Used is the number of addresses held by Services drawn from this pool,
	// including those outside its current addresses (see OutOfRange).
	Used int64 `json:"used"`
	// Free is the number of addresses still available.
	Free string `json:"free,omitempty"`

	// IPv4 and IPv6 break the counts down per family.
	IPv4 *FamilyStatus `json:"ipv4,omitempty"`
	IPv6 *FamilyStatus `json:"ipv6,omitempty"`

	// OutOfRange counts addresses that Services keep although the pool no
	// longer contains them (the pool shrank or conflicts); they are never
	// moved silently.
	OutOfRange int64 `json:"outOfRange,omitempty"`

	// Conditions are Ready and Conflicting.
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// FamilyStatus counts one address family of a pool.
type FamilyStatus struct {
	// Total is the number of allocatable addresses of this family.
	Total string `json:"total"`
	// Used is the number of addresses of this family in use.
	Used int64 `json:"used"`
	// Free is the number of addresses of this family still available.
	Free string `json:"free"`
}

// AutoAssignEnabled reports whether the pool takes part in automatic
// assignment, applying the default.
func (s *IPPoolSpec) AutoAssignEnabled() bool {
	return s.AutoAssign == nil || *s.AutoAssign
}

// ForwardingOrDefault returns the pool's forwarding mode, applying the default.
func (s *IPPoolSpec) ForwardingOrDefault() Forwarding {
	if s.Forwarding == "" {
		return ForwardingNodePort
	}
	return s.Forwarding
}
