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
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/keeplb/keeplb/pkg/nlattr"
	"github.com/keeplb/keeplb/pkg/nsthread"
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
	// SetAddressLifetime makes the kernel remove p from the named
	// interface once valid has passed (whole seconds, rounded up), or
	// never (valid 0), as `ip addr change ... valid_lft` does. p must be
	// there. A hand-off bounds the VIPs it leaves with it.
	SetAddressLifetime(link string, p netip.Prefix, valid time.Duration) error
	// Sysctl reads a sysctl such as "net/ipv4/ip_nonlocal_bind".
	Sysctl(name string) (string, error)
	// SetSysctl writes a sysctl.
	SetSysctl(name, value string) error
}

// Netlink implements Interface with netlink, in the network namespace of
// its handle.
type Netlink struct {
	h *netlink.Handle
	// addrs is a route socket of the handle's namespace of our own, for
	// the address dump that Links parses itself (see addresses).
	addrs      map[int]*nl.SocketHandle
	sysctlRoot string
	// nsPath is the namespace NewAt opened, "" for the process's own:
	// /proc/sys/net shows the namespace of the thread that reads it, so
	// its sysctls are read and written on a thread inside (nsthread).
	nsPath string
}

var _ Interface = (*Netlink)(nil)

// New returns an Interface for the current network namespace.
func New() (*Netlink, error) {
	return open(netns.None(), "")
}

// open opens the handle and the address socket in ns (netns.None(): the
// calling thread's); where names it for errors.
func open(ns netns.NsHandle, where string) (*Netlink, error) {
	// Only rtnetlink: without a family list netlink opens xfrm and
	// netfilter sockets too, which fail on kernels without those modules.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink%s: %w", where, err)
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("open netlink%s: %w", where, err)
	}
	return &Netlink{h: h, addrs: map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}, sysctlRoot: "/proc/sys"}, nil
}

// Close releases the netlink sockets.
func (n *Netlink) Close() {
	n.h.Close()
	n.addrs[unix.NETLINK_ROUTE].Socket.Close()
}

// NewAt returns an Interface for the network namespace at nsPath (such as
// /run/netns/NAME). Its sysctls are still those of the calling process's
// namespace, so it is meant for tests and tools, not for the speaker.
func NewAt(nsPath string) (*Netlink, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
	}
	defer func() { _ = ns.Close() }() // the sockets keep the namespace alive
	n, err := open(ns, " in "+nsPath)
	if err != nil {
		return nil, err
	}
	n.nsPath = nsPath
	return n, nil
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
	var union linkUnion
	for range dumpAttempts {
		links, err := n.links()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
		union.add(links)
	}
	return union.links, nil
}

// linkUnion is the union of reads of the links: every link and prefix
// any of them had. The prefixes of each link are indexed, because a link
// holds every VIP of the node (10,000 at scale), and a read is unioned
// while keepalived adds them: a search of the list per prefix was 100
// million comparisons per read, seconds of CPU.
type linkUnion struct {
	links []Link
	seen  []map[netip.Prefix]bool // by index in links
}

// add adds to u every link and prefix of b it lacks.
func (u *linkUnion) add(b []Link) {
	for _, l := range b {
		i := slices.IndexFunc(u.links, func(x Link) bool { return x.Name == l.Name })
		if i < 0 {
			seen := make(map[netip.Prefix]bool, len(l.Prefixes))
			for _, p := range l.Prefixes {
				seen[p] = true
			}
			u.links = append(u.links, l)
			u.seen = append(u.seen, seen)
			continue
		}
		a := &u.links[i]
		for _, p := range l.Prefixes {
			if !u.seen[i][p] {
				u.seen[i][p] = true
				a.Prefixes = append(a.Prefixes, p)
			}
		}
		a.DefaultRoute4 = a.DefaultRoute4 || l.DefaultRoute4
		a.DefaultRoute6 = a.DefaultRoute6 || l.DefaultRoute6
	}
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
	err = n.addresses(func(index int, p netip.Prefix) {
		if l := byIndex[index]; l != nil {
			l.Prefixes = append(l.Prefixes, p)
		}
	})
	if err := partial(err); err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		// The main table only, which is what netlink keeps without a
		// table filter: it skips every other table's routes before
		// parsing them, where a filter on the main table parses them all
		// first. The local table holds a route per address, so that was
		// every VIP's route parsed at every sync (at 10,000 VIPs most of
		// what a sync allocated).
		routes, err := n.h.RouteListFiltered(fam, &netlink.Route{}, 0)
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

// addresses dumps every address of the namespace, of both families,
// calling add with each one's interface index and prefix. It parses the
// kernel's messages itself, keeping nothing but the prefix, because a
// speaker holding VIPs has that many addresses on its link and reads them
// all at every sync: netlink's AddrList copied every message and made
// each address a struct of slices and strings, about 1.5 KB apiece, 15 MB
// per sync at 10,000 VIPs (BenchmarkLinks).
func (n *Netlink) addresses(add func(index int, p netip.Prefix)) error {
	req := nl.NewNetlinkRequest(unix.RTM_GETADDR, unix.NLM_F_DUMP)
	req.AddData(nl.NewIfAddrmsg(unix.AF_UNSPEC))
	req.Sockets = n.addrs
	return req.ExecuteIter(unix.NETLINK_ROUTE, unix.RTM_NEWADDR, func(m []byte) bool {
		if index, p, ok := parseAddrMsg(m); ok {
			add(index, p)
		}
		return true
	})
}

// parseAddrMsg reads an RTM_NEWADDR message's payload (struct ifaddrmsg
// and its attributes): the interface index and the address with its prefix
// length. The address is IFA_LOCAL where there is one (on a point-to-point
// link IFA_ADDRESS is the peer's), else IFA_ADDRESS, as netlink's AddrList
// chose. An IPv4-mapped IPv6 address stays IPv6: the kernel holds it as an
// IPv6 address, not as the IPv4 address a VIP would be, and unmapped its
// prefix length would not fit. ok is false for a message too short, of
// another family, or whose address does not fit its family or its prefix
// length.
func parseAddrMsg(m []byte) (index int, p netip.Prefix, ok bool) {
	if len(m) < unix.SizeofIfAddrmsg {
		return 0, netip.Prefix{}, false
	}
	family, bits := m[0], int(m[1])
	index = int(nl.NativeEndian().Uint32(m[4:8]))
	var local, address []byte
	if err := nlattr.Walk(m[unix.SizeofIfAddrmsg:], func(typ uint16, v []byte) {
		switch typ {
		case unix.IFA_LOCAL:
			local = v
		case unix.IFA_ADDRESS:
			address = v
		}
	}); err != nil {
		return 0, netip.Prefix{}, false
	}
	raw := local
	if raw == nil {
		raw = address
	}
	a, ok := netip.AddrFromSlice(raw)
	switch {
	case !ok, family != unix.AF_INET && family != unix.AF_INET6, (family == unix.AF_INET) != a.Is4(), bits > a.BitLen():
		return 0, netip.Prefix{}, false
	}
	return index, netip.PrefixFrom(a, bits), true
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

// infiniteLifetime is the kernel's INFINITY_LIFE_TIME: an address that
// never expires.
const infiniteLifetime = 0xFFFFFFFF

// SetAddressLifetime is part of Interface: RTM_NEWADDR with NLM_F_REPLACE
// of the address as it is (its label, scope and flags), with new
// lifetimes (IFA_CACHEINFO), the preferred one equal to the valid one.
func (n *Netlink) SetAddressLifetime(link string, p netip.Prefix, valid time.Duration) error {
	l, err := n.h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find interface %s: %w", link, err)
	}
	family := unix.AF_INET
	if p.Addr().Is6() {
		family = unix.AF_INET6
	}
	addrs, err := n.h.AddrList(l, family)
	if err != nil {
		return fmt.Errorf("list the addresses of %s: %w", link, err)
	}
	for _, a := range addrs {
		ap, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if !ok || netip.PrefixFrom(ap.Unmap(), ones) != p {
			continue
		}
		lft := infiniteLifetime
		if valid > 0 {
			lft = int((valid + time.Second - 1) / time.Second)
		}
		a.ValidLft, a.PreferedLft = lft, lft
		if err := n.h.AddrReplace(l, &a); err != nil {
			return fmt.Errorf("set the lifetime of %s on %s: %w", p, link, err)
		}
		return nil
	}
	return fmt.Errorf("set the lifetime of %s on %s: no such address", p, link)
}

// Sysctl is part of Interface. The sysctls of /proc/sys/net are those of
// the handle's network namespace: NewAt's, read from inside it.
func (n *Netlink) Sysctl(name string) (string, error) {
	return n.inNamespace(func() (string, error) {
		b, err := os.ReadFile(n.sysctlPath(name))
		if err != nil {
			return "", err
		}
		return strings.TrimSpace(string(b)), nil
	})
}

// SetSysctl is part of Interface.
func (n *Netlink) SetSysctl(name, value string) error {
	_, err := n.inNamespace(func() (string, error) {
		return "", os.WriteFile(n.sysctlPath(name), []byte(value), 0o644)
	})
	return err
}

// inNamespace runs f on a thread in the handle's namespace (NewAt's), or
// where it is for the process's own.
func (n *Netlink) inNamespace(f func() (string, error)) (string, error) {
	if n.nsPath == "" {
		return f()
	}
	return nsthread.Call(n.nsPath, f)
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
