// Package hostnet is the speaker's boundary to the node's network stack:
// interfaces and their addresses, default routes, and the sysctls VRRP
// needs. The real implementation uses netlink (for one network namespace);
// hostnettesting has a state-modelling fake.
package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Link is a network interface with its addresses.
type Link struct {
	Name string
	// Prefixes are the interface's addresses with their prefix length.
	Prefixes []netip.Prefix
	// DefaultRoute4 and DefaultRoute6 say whether the default route of that
	// family leaves through this interface.
	DefaultRoute4, DefaultRoute6 bool
}

// Interface is what the speaker needs from the host network.
type Interface interface {
	// Links lists the interfaces with their addresses and default routes.
	Links() ([]Link, error)
	// DeleteAddress removes p from the named interface; removing an
	// address that is not there is not an error.
	DeleteAddress(link string, p netip.Prefix) error
	// Sysctl reads a sysctl such as "net/ipv4/ip_nonlocal_bind".
	Sysctl(name string) (string, error)
	// SetSysctl writes a sysctl.
	SetSysctl(name, value string) error
}

// Netlink implements Interface with netlink, in the network namespace of
// its handle.
type Netlink struct {
	h          *netlink.Handle
	sysctlRoot string
}

var _ Interface = (*Netlink)(nil)

// New returns an Interface for the current network namespace.
func New() (*Netlink, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return &Netlink{h: h, sysctlRoot: "/proc/sys"}, nil
}

// Close releases the netlink socket.
func (n *Netlink) Close() { n.h.Close() }

// NewAt returns an Interface for the network namespace at nsPath (such as
// /run/netns/NAME). Its sysctls are still those of the calling process's
// namespace, so it is meant for tests and tools, not for the speaker.
func NewAt(nsPath string) (*Netlink, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
	}
	defer func() { _ = ns.Close() }() // the handle keeps the namespace alive
	// Only rtnetlink: without a family list netlink opens xfrm and
	// netfilter sockets too, which fail on kernels without those modules.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink in %s: %w", nsPath, err)
	}
	return &Netlink{h: h, sysctlRoot: "/proc/sys"}, nil
}

// dumpAttempts bounds the reads of Links that the kernel interrupts: a
// netlink dump is interrupted when the table changes during it, and its
// result may then miss entries that were there all along (the dump's
// position shifted) or list ones that came and went. keepalived adding
// thousands of VIPs does that for a minute, so that no read may complete
// uninterrupted for as long.
const dumpAttempts = 10

// Links is part of Interface. When the kernel interrupts a read, Links
// reads again, up to dumpAttempts times, and if every read was
// interrupted it returns their union: an address present throughout is in
// at least one of them (an interrupted dump skips entries where the table
// moved under it, not the same ones every time), and an extra address is
// harmless to every caller: it is either one keepalived is adding (a VIP
// of the plan, kept) or one being removed (deleting it again is no
// error). Failing instead would fail every sync while keepalived adds its
// VIPs, and back the speaker off for minutes.
func (n *Netlink) Links() ([]Link, error) {
	var union []Link
	for range dumpAttempts {
		links, err := n.links()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
		union = unionLinks(union, links)
	}
	return union, nil
}

// unionLinks adds to a every link and prefix of b it lacks.
func unionLinks(a, b []Link) []Link {
	for _, l := range b {
		i := slices.IndexFunc(a, func(x Link) bool { return x.Name == l.Name })
		if i < 0 {
			a = append(a, l)
			continue
		}
		for _, p := range l.Prefixes {
			if !slices.Contains(a[i].Prefixes, p) {
				a[i].Prefixes = append(a[i].Prefixes, p)
			}
		}
		a[i].DefaultRoute4 = a[i].DefaultRoute4 || l.DefaultRoute4
		a[i].DefaultRoute6 = a[i].DefaultRoute6 || l.DefaultRoute6
	}
	return a
}

// links reads the links, their addresses and the default routes: one dump
// of each. A dump the kernel interrupted still gives what it read; the
// result is then returned with netlink.ErrDumpInterrupted.
func (n *Netlink) links() ([]Link, error) {
	var interrupted error
	// partial keeps an interrupted dump's result and remembers that it was.
	partial := func(err error) error {
		if errors.Is(err, netlink.ErrDumpInterrupted) {
			interrupted = err
			return nil
		}
		return err
	}
	links, err := n.h.LinkList()
	if err := partial(err); err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	byIndex := map[int]*Link{}
	out := make([]Link, len(links))
	for i, l := range links {
		out[i] = Link{Name: l.Attrs().Name}
		byIndex[l.Attrs().Index] = &out[i]
	}
	// One dump of every address: AddrList with a link dumps them all and
	// filters in user space, so a dump per link would read the table as
	// many times as there are links.
	addrs, err := n.h.AddrList(nil, netlink.FAMILY_ALL)
	if err := partial(err); err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if l := byIndex[a.LinkIndex]; l != nil {
			if p, ok := prefixOf(a.IPNet); ok {
				l.Prefixes = append(l.Prefixes, p)
			}
		}
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := n.h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err := partial(err); err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if !isDefault(r) {
				continue
			}
			if l := byIndex[r.LinkIndex]; l != nil {
				if fam == netlink.FAMILY_V4 {
					l.DefaultRoute4 = true
				} else {
					l.DefaultRoute6 = true
				}
			}
		}
	}
	return out, interrupted
}

func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	a = a.Unmap()
	return netip.PrefixFrom(a, ones), true
}

// DeleteAddress is part of Interface.
func (n *Netlink) DeleteAddress(link string, p netip.Prefix) error {
	l, err := n.h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find interface %s: %w", link, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if err := n.h.AddrDel(l, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s from %s: %w", p, link, err)
	}
	return nil
}

// Sysctl is part of Interface. The sysctls of /proc/sys/net are those of
// the reading process's network namespace.
func (n *Netlink) Sysctl(name string) (string, error) {
	b, err := os.ReadFile(n.sysctlPath(name))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// SetSysctl is part of Interface.
func (n *Netlink) SetSysctl(name, value string) error {
	return os.WriteFile(n.sysctlPath(name), []byte(value), 0o644)
}

func (n *Netlink) sysctlPath(name string) string {
	return filepath.Join(n.sysctlRoot, filepath.FromSlash(strings.ReplaceAll(name, ".", "/")))
}

// Requirement is a sysctl the speaker needs and why.
type Requirement struct {
	Name, Value, Why string
}

// VRRPSysctls returns the sysctls VRRP needs on a node.
func VRRPSysctls() []Requirement {
	return []Requirement{
		// A backup must be able to bind the VIP before it holds it (services
		// on the node that listen on the VIP), and ARP must answer only for
		// addresses of the receiving interface so two nodes never both answer.
		{Name: "net.ipv4.ip_nonlocal_bind", Value: "1", Why: "lets services bind a VIP this node does not hold yet"},
		{Name: "net.ipv4.conf.all.arp_ignore", Value: "1", Why: "answers ARP only for addresses of the receiving interface"},
		{Name: "net.ipv4.conf.all.arp_announce", Value: "2", Why: "uses the best local source address in ARP requests"},
	}
}

// Ensure sets every requirement that does not hold, and returns one error
// naming each sysctl it could neither read as wanted nor set.
func Ensure(h Interface, reqs []Requirement) error {
	var errs []error
	for _, r := range reqs {
		if v, err := h.Sysctl(r.Name); err == nil && v == r.Value {
			continue
		}
		if err := h.SetSysctl(r.Name, r.Value); err != nil {
			errs = append(errs, fmt.Errorf("sysctl %s=%s (%s): %w; set it on the node or give the speaker the capability to", r.Name, r.Value, r.Why, err))
		}
	}
	return errors.Join(errs...)
}

// StaleVIPs returns the host addresses (/32, /128) on the node's links that
// lie in one of pools, are not among keep (the node's own addresses), and
// so can only be VIPs left behind, for example by a crashed keepalived.
// Addresses outside pools are never returned.
func StaleVIPs(links []Link, inPool func(netip.Addr) bool, keep map[netip.Addr]bool) map[string][]netip.Prefix {
	out := map[string][]netip.Prefix{}
	for _, l := range links {
		for _, p := range l.Prefixes {
			if !p.IsSingleIP() || keep[p.Addr()] || !inPool(p.Addr()) {
				continue
			}
			out[l.Name] = append(out[l.Name], p)
		}
	}
	return out
}
