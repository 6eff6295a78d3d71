// Package conntrack is keeplb's boundary to the kernel's connection
// tracking table, for two jobs. When a UDP real server leaves a virtual
// server, it deletes the conntrack entries of flows to that VIP:port whose
// replies come from that real server: UDP has no connection to close, so
// without this a client that keeps sending from the same port stays bound
// to the dead backend until its entry times out (kube-proxy clears the
// same entries for the same reason). And where keeplb's masquerade
// follows the VIP, it deletes the entries of the VIPs' flows in the
// default zone when a speaker starts and leaves, so that no stale entry
// de-NATs a pod's reply to a VIP that moved, or holds the tuple a new
// holder's NAT needs (docs/connections.md); but not those of flows from a
// VIP to the node's own address, which are kube-proxy's: the holder's
// nodeport forwarding sent them to this node's NodePort, and kube-proxy's
// DNAT to a pod lives in that entry.
//
// Flow and Matches are pure; Netlink implements Interface over
// github.com/vishvananda/netlink for one network namespace; package
// conntracktesting has a fake that models the table.
package conntrack

import "net/netip"

// Protocol numbers of the flows Interface deals with.
const (
	// UDP is IPPROTO_UDP.
	UDP uint8 = 17
	// TCP is IPPROTO_TCP.
	TCP uint8 = 6
)

// Tuple is one direction of a flow.
type Tuple struct {
	Src, Dst netip.AddrPort
}

// Flow is a conntrack entry: the tuple of its first packet (Original) and
// the tuple replies are expected to carry (Reply). For a flow IPVS or a
// DNAT forwarded, Original.Dst is the VIP:port and Reply.Src the real
// server.
type Flow struct {
	Protocol        uint8
	Original, Reply Tuple
	// Zone is the flow's conntrack zone, 0 the default.
	Zone uint16
}

// Matches reports whether f is a UDP flow opened to vip whose replies come
// from real: the flows DeleteUDP deletes. Addresses compare unmapped, so
// an IPv4-mapped IPv6 address matches its IPv4 form.
func Matches(f Flow, vip, real netip.AddrPort) bool {
	return f.Protocol == UDP && same(f.Original.Dst, vip) && same(f.Reply.Src, real)
}

// OfVIPs reports whether f is a flow of zone whose original tuple has one
// of vips at either end, any protocol and port: opened to a VIP (by a
// client, or by a pod's reply no entry matched), or sent from one (the
// holder's NAT, routed to a pod here), but not sent from one to an
// address in node. These are the flows DeleteOfVIPs deletes. node are the
// node's own addresses: a flow from a VIP to one of them is the holder's
// nodeport forwarding to this node's NodePort, whose entry carries
// kube-proxy's DNAT to the pod that serves the connection; deleted, the
// next segment would be DNATed afresh, to another pod, or masqueraded
// from another port, and the connection reset. vips and node must be
// unmapped.
func OfVIPs(f Flow, vips, node map[netip.Addr]bool, zone uint16) bool {
	if f.Zone != zone {
		return false
	}
	dst := f.Original.Dst.Addr().Unmap()
	return vips[dst] || vips[f.Original.Src.Addr().Unmap()] && !node[dst]
}

// AddrSet returns addrs, unmapped, as a set: what OfVIPs takes.
func AddrSet(addrs []netip.Addr) map[netip.Addr]bool {
	out := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		out[a.Unmap()] = true
	}
	return out
}

func same(a, b netip.AddrPort) bool {
	return a.Port() == b.Port() && a.Addr().Unmap() == b.Addr().Unmap()
}

// Interface is what keeplb needs from connection tracking.
type Interface interface {
	// DeleteUDP deletes the UDP flows opened to vip whose replies come
	// from real (see Matches), and returns how many it deleted.
	DeleteUDP(vip, real netip.AddrPort) (int, error)
	// DeleteOfVIPs deletes the flows of zone with any of vips at either
	// end of their original tuple, but those from a VIP to an address in
	// node, the node's own (see OfVIPs), and returns how many it deleted.
	DeleteOfVIPs(vips []netip.Addr, zone uint16, node []netip.Addr) (int, error)
}
