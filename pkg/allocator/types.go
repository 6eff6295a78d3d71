package allocator

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/labels"
)

// Family is an IP address family.
type Family int

// The address families, in the order status lists them.
const (
	IPv4 Family = iota
	IPv6
)

// String returns "IPv4" or "IPv6", as Kubernetes spells them.
func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf returns the family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// Policy says how many families a Service needs, after spec.ipFamilyPolicy.
type Policy int

const (
	// SingleStack wants one address, of the first requested family.
	SingleStack Policy = iota
	// PreferDualStack wants one address per requested family from one pool,
	// and settles for one family when no admissible pool has both.
	PreferDualStack
	// RequireDualStack wants one address per family from one pool, or none.
	RequireDualStack
)

// Pool is the allocator's view of an IPPool.
type Pool struct {
	// Name is the IPPool's name.
	Name string
	// Ranges are the pool's parsed addresses.
	Ranges []Range
	// AutoAssign lets the pool serve Services that do not name it.
	AutoAssign bool
	// AvoidBuggyIPs skips IPv4 addresses ending in .0 and .255.
	AvoidBuggyIPs bool
	// Priority orders pools for automatic assignment, higher first.
	Priority int32
	// Namespaces, when not empty, admits only these namespaces.
	Namespaces []string
	// NamespaceSelector, when not nil, admits only matching namespaces.
	NamespaceSelector labels.Selector
	// ServiceSelector, when not nil, admits only matching Services.
	ServiceSelector labels.Selector
	// Order decides which of two overlapping pools owns the overlap: the
	// lower Order wins (the controller uses creation time, then name).
	Order int
}

// admits reports whether the pool may serve req, and why not.
func (p *Pool) admits(req *Request) (bool, string) {
	if len(p.Namespaces) > 0 && !slices.Contains(p.Namespaces, req.Namespace) {
		return false, fmt.Sprintf("IPPool %s admits only namespaces %s", p.Name, strings.Join(p.Namespaces, ", "))
	}
	if p.NamespaceSelector != nil && !p.NamespaceSelector.Matches(labels.Set(req.NamespaceLabels)) {
		return false, fmt.Sprintf("IPPool %s admits only namespaces with labels %s", p.Name, p.NamespaceSelector)
	}
	if p.ServiceSelector != nil && !p.ServiceSelector.Matches(labels.Set(req.ServiceLabels)) {
		return false, fmt.Sprintf("IPPool %s admits only Services with labels %s", p.Name, p.ServiceSelector)
	}
	return true, ""
}

// Port is a Service port as far as sharing an address is concerned.
type Port struct {
	// Protocol is TCP, UDP or SCTP.
	Protocol string
	// Port is the Service port number.
	Port int32
}

// String formats p as "TCP/80".
func (p Port) String() string { return fmt.Sprintf("%s/%d", p.Protocol, p.Port) }

// Request is what a Service asks of the allocator: everything the
// allocator needs, taken from the Service, its annotations and namespace.
type Request struct {
	// Key is "namespace/name".
	Key string
	// Namespace is the Service's namespace.
	Namespace string
	// NamespaceLabels and ServiceLabels are matched by pool selectors.
	NamespaceLabels, ServiceLabels map[string]string
	// Families are the Service's spec.ipFamilies, primary first.
	Families []Family
	// Policy is the Service's spec.ipFamilyPolicy.
	Policy Policy
	// Pool is the pool named by keeplb.io/pool, or empty.
	Pool string
	// IPs are the addresses named by keeplb.io/ips or spec.loadBalancerIP.
	IPs []netip.Addr
	// IPsSource names where IPs came from, for messages.
	IPsSource string
	// ShareKey is keeplb.io/share-key, or empty.
	ShareKey string
	// Ports are the Service's ports; sharers may not overlap.
	Ports []Port
	// KubeProxy is set when kube-proxy forwards the Service's traffic
	// (keeplb.io/forwarding: kube-proxy, published as ipMode VIP), which
	// unmanaged addresses never allow.
	KubeProxy bool
	// Backends identifies where traffic goes: "cluster" for
	// externalTrafficPolicy Cluster, else the pod selector. Sharers must
	// agree, because one VIP has one holder node.
	Backends string
}

// Allocation is the result of a successful Assign.
type Allocation struct {
	// Pool is the pool the addresses were drawn from; empty for unmanaged
	// addresses.
	Pool string
	// Addrs holds one address per family, primary family first.
	Addrs []netip.Addr
}

// Reason classifies allocation failures for events and metrics.
type Reason string

// The reasons an allocation fails.
const (
	ReasonInvalid         Reason = "InvalidAnnotation"
	ReasonPoolNotFound    Reason = "PoolNotFound"
	ReasonNotAdmitted     Reason = "NotAdmitted"
	ReasonNoPool          Reason = "NoPool"
	ReasonAddressInUse    Reason = "AddressInUse"
	ReasonOutsidePools    Reason = "AddressOutsidePools"
	ReasonExhausted       Reason = "PoolExhausted"
	ReasonFamily          Reason = "FamilyUnavailable"
	ReasonSharingConflict Reason = "SharingConflict"
)

// Error is an allocation failure, phrased for the Service's owner: which
// annotation (or field) is at fault and what to do.
type Error struct {
	// Reason classifies the failure.
	Reason Reason
	// Field is the annotation or spec field at fault, if one is.
	Field string
	// Msg says what is wrong and what to do.
	Msg string
}

// Error formats e as "<field>: <message>", the text of the event.
func (e *Error) Error() string {
	if e.Field != "" {
		return e.Field + ": " + e.Msg
	}
	return e.Msg
}

func errorf(reason Reason, field, format string, args ...any) *Error {
	return &Error{Reason: reason, Field: field, Msg: fmt.Sprintf(format, args...)}
}
