package conntrack

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Netlink implements Interface with conntrack netlink messages, in the
// network namespace it was opened in.
type Netlink struct {
	h *netlink.Handle
}

var _ Interface = (*Netlink)(nil)

// NewAt returns an Interface for the network namespace at nsPath (such as
// /run/netns/NAME); "" means the current one.
func NewAt(nsPath string) (*Netlink, error) {
	if nsPath == "" {
		h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
		if err != nil {
			return nil, fmt.Errorf("open conntrack netlink socket: %w", err)
		}
		return &Netlink{h: h}, nil
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
	}
	defer func() { _ = ns.Close() }() // the socket keeps the namespace alive
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("open conntrack netlink socket in %s: %w", nsPath, err)
	}
	return &Netlink{h: h}, nil
}

// Close releases the netlink socket.
func (n *Netlink) Close() { n.h.Close() }

// DeleteUDP is part of Interface. The kernel has no filter for reply
// tuples, so the library dumps the family's table and deletes the
// matching entries one by one.
func (n *Netlink) DeleteUDP(vip, real netip.AddrPort) (int, error) {
	family := netlink.InetFamily(unix.AF_INET)
	if vip.Addr().Unmap().Is6() {
		family = unix.AF_INET6
	}
	deleted, err := n.h.ConntrackDeleteFilters(netlink.ConntrackTable, family, filter{vip: vip, real: real})
	if err != nil {
		return int(deleted), fmt.Errorf("delete UDP conntrack entries to %s from %s: %w", vip, real, err)
	}
	return int(deleted), nil
}

// DeleteOfVIPs is part of Interface. It dumps each family's table that
// vips have addresses of.
func (n *Netlink) DeleteOfVIPs(vips []netip.Addr, zone uint16, node []netip.Addr) (int, error) {
	match := ofVIPs{vips: AddrSet(vips), node: AddrSet(node), zone: zone}
	families := map[netlink.InetFamily]bool{}
	for v := range match.vips {
		if v.Is6() {
			families[unix.AF_INET6] = true
		} else {
			families[unix.AF_INET] = true
		}
	}
	total := 0
	for _, family := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		if !families[family] {
			continue
		}
		deleted, err := n.h.ConntrackDeleteFilters(netlink.ConntrackTable, family, match)
		total += int(deleted)
		if err != nil {
			return total, fmt.Errorf("delete conntrack entries of %d VIPs in zone %d: %w", len(match.vips), zone, err)
		}
	}
	return total, nil
}

// ofVIPs is a netlink.CustomConntrackFilter for OfVIPs.
type ofVIPs struct {
	vips, node map[netip.Addr]bool
	zone       uint16
}

// MatchConntrackFlow is part of netlink.CustomConntrackFilter.
func (o ofVIPs) MatchConntrackFlow(c *netlink.ConntrackFlow) bool {
	return OfVIPs(fromNetlink(c), o.vips, o.node, o.zone)
}

// filter is a netlink.CustomConntrackFilter for Matches.
type filter struct{ vip, real netip.AddrPort }

// MatchConntrackFlow is part of netlink.CustomConntrackFilter.
func (f filter) MatchConntrackFlow(c *netlink.ConntrackFlow) bool {
	return Matches(fromNetlink(c), f.vip, f.real)
}

func fromNetlink(c *netlink.ConntrackFlow) Flow {
	return Flow{
		Protocol: c.Forward.Protocol,
		Original: Tuple{Src: addrPort(c.Forward.SrcIP, c.Forward.SrcPort), Dst: addrPort(c.Forward.DstIP, c.Forward.DstPort)},
		Reply:    Tuple{Src: addrPort(c.Reverse.SrcIP, c.Reverse.SrcPort), Dst: addrPort(c.Reverse.DstIP, c.Reverse.DstPort)},
		Zone:     c.Zone,
	}
}

func addrPort(ip net.IP, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}
