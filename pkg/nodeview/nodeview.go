// Package nodeview is keeplb's one translation of Nodes and EndpointSlices
// into what the VRRP plan and the IPVS dataplane need of them: a Node's
// name, labels, Ready condition and InternalIP addresses (as a vrrp.Node),
// and per Service and address family, the weight of each endpoint and the
// nodes with ready endpoints (which externalTrafficPolicy Local forwards
// to and holds VIPs on).
//
// A Node's status.addresses are written by its kubelet (or a cloud
// controller), and the API server does not validate them: an address with
// a zone, a loopback or link-local address, or text that is no address at
// all reaches every speaker as it was written. Used as a NodePort real
// server or a unicast VRRP peer on every other node, such an address sends
// traffic nowhere; written into an nftables script, it could make nft
// reject the whole transaction. So Of keeps only the addresses other nodes
// can send to: global unicast, without a zone (an IPv4-mapped IPv6 address
// counts as its IPv4 address), and reports every InternalIP it leaves out,
// naming the field, so that the speaker can tell the user what to fix.
package nodeview

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/vrrp"
)

// Ignored is one InternalIP of a Node that Of left out.
type Ignored struct {
	// Field is the entry's path in the Node, e.g. "status.addresses[2]".
	Field string
	// Value is the address as the Node gives it.
	Value string
	// Reason says what is wrong with it.
	Reason string
}

// String returns e.g. `status.addresses[2] "fe80::1%eth0": it has a zone`.
func (i Ignored) String() string { return fmt.Sprintf("%s %q: %s", i.Field, i.Value, i.Reason) }

// Of returns keeplb's view of n, and the InternalIPs it ignored (in
// status order). Other address types (ExternalIP, Hostname) are not used,
// so they are neither kept nor reported. A Node without a Ready condition
// is not Ready.
func Of(n *v1.Node) (vrrp.Node, []Ignored) {
	vn := vrrp.Node{Name: n.Name, Labels: n.Labels}
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeReady {
			vn.Ready = c.Status == v1.ConditionTrue
		}
	}
	var ignored []Ignored
	for i, a := range n.Status.Addresses {
		if a.Type != v1.NodeInternalIP {
			continue
		}
		ip, reason := Address(a.Address)
		if reason != "" {
			ignored = append(ignored, Ignored{Field: fmt.Sprintf("status.addresses[%d]", i), Value: a.Address, Reason: reason})
			continue
		}
		vn.InternalIPs = append(vn.InternalIPs, ip)
	}
	return vn, ignored
}

// Same reports whether a and b give the same view and ignore the same
// addresses: whether a change from a to b matters to keeplb. Most Node
// updates do not (a kubelet's status heartbeat, its image list), and at
// a thousand nodes they arrive several times a second.
func Same(a, b *v1.Node) bool {
	va, ia := Of(a)
	vb, ib := Of(b)
	return va.Name == vb.Name && va.Ready == vb.Ready && maps.Equal(va.Labels, vb.Labels) &&
		slices.Equal(va.InternalIPs, vb.InternalIPs) && slices.Equal(ia, ib)
}

// Address parses s as an address other nodes can send traffic to, and
// returns it (IPv4-mapped IPv6 unmapped), or the reason it is not one.
func Address(s string) (netip.Addr, string) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, "it is not an IP address"
	case a.Zone() != "":
		return netip.Addr{}, fmt.Sprintf("it has a zone (%%%s), which names an interface of the node itself, meaningless to other nodes", a.Zone())
	}
	a = a.Unmap()
	switch {
	case a.IsUnspecified():
		return netip.Addr{}, "it is the unspecified address"
	case a.IsLoopback():
		return netip.Addr{}, "it is a loopback address"
	case a.IsLinkLocalUnicast():
		return netip.Addr{}, "it is a link-local address, which other nodes cannot route to"
	case a.IsMulticast():
		return netip.Addr{}, "it is a multicast address"
	case !a.IsGlobalUnicast():
		return netip.Addr{}, "it is not a unicast address other nodes can send to"
	}
	return a, ""
}
