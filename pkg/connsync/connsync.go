// Package connsync is keeplb's one home for the kernel's IPVS connection
// synchronisation on a node: which sync daemons the node runs, on which
// link, and which addresses their guard in keeplb's nftables table admits
// (Compute, pure), and bringing the kernel's daemons to that (Apply).
//
// Every node runs both daemons: a master, which sends the entries of the
// connections this node's IPVS forwards (those of the VIPs it holds), and
// a backup, which installs the entries the other nodes send, so that the
// node that takes a VIP over already has its connections' entries. The
// backup daemon installs whatever entry reaches its port, from any sender
// (docs/connections.md measures a forged one), so it runs only while
// keeplb's nftables table holds the guard that admits the peers alone: it
// is started after a successful write of the table, and stopped as soon
// as a write fails (fail closed). The master only sends; it needs no
// guard.
package connsync

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// DefaultPort is the kernel's sync port, which keeplb uses unless told.
const DefaultPort = 8848

// MaxThreads is the most sync threads the kernel runs per daemon
// (IPVS_SYNC_PORTS_MAX, net.ipv4.vs.sync_ports clamped): thread n of a
// master sends from, and of a backup listens on, port + n. The guard
// covers them all, whatever the sysctl says.
const MaxThreads = 64

// Config is the connection sync's settings: the speaker's --conn-sync
// flags.
type Config struct {
	// Enabled runs the daemons.
	Enabled bool
	// Interface is the link the daemons send and listen on; "" picks the
	// link that holds the node's InternalIP of the group's family.
	Interface string
	// SyncID tags the cluster's messages; a backup installs only those
	// with its own ID (0 takes every ID).
	SyncID uint8
	// Group is the multicast group; invalid means the kernel's,
	// 224.0.0.81. An IPv6 group syncs over IPv6 (Linux 4.3 or later), and
	// must be of wider than link-local scope: the messages must come from
	// the Nodes' InternalIPs, which the guard admits.
	Group netip.Addr
	// Port is the first UDP port; 0 means DefaultPort.
	Port uint16
}

// Validate checks what the flags give.
func (c Config) Validate() error {
	if !c.Enabled {
		return nil
	}
	d := ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: c.Interface, Group: c.Group, Port: c.Port}
	if c.Interface == "" {
		d.Interface = "placeholder" // chosen later, from the node's links
	}
	if err := d.Validate(); err != nil {
		return fmt.Errorf("--conn-sync: %w", err)
	}
	if c.Group.Is6() && c.Group.IsLinkLocalMulticast() {
		// The kernel sends to a link-local group from the link's
		// link-local address, which no Node has as an InternalIP: the
		// guard would drop every message.
		return fmt.Errorf("--conn-sync-group %s: a link-local group's messages come from link-local addresses, which the guard (the Nodes' InternalIPs) drops; use a group of wider scope, such as ff05::8848", c.Group)
	}
	if int(c.port())+MaxThreads-1 > 65535 {
		return fmt.Errorf("--conn-sync-port %d: want at most %d, so that its %d threads' ports fit", c.Port, 65535-MaxThreads+1, MaxThreads)
	}
	return nil
}

func (c Config) port() uint16 {
	if c.Port == 0 {
		return DefaultPort
	}
	return c.Port
}

func (c Config) family() allocator.Family {
	if c.Group.Is6() {
		return allocator.IPv6
	}
	return allocator.IPv4
}

// Want is what a node should have.
type Want struct {
	// Daemons are the master and the backup, in that order, or none.
	Daemons []ipvs.SyncDaemon
	// Guard admits the other nodes' messages to the daemons' ports. It is
	// what keeplb's nftables table must hold before the backup runs.
	Guard nft.SyncGuard
	// FollowVIP says keeplb's masquerade must follow the VIP
	// (nft.Rules.FollowVIP): set whenever the sync is enabled, daemons or
	// not, since a synced entry keeps no masqueraded connection without
	// it, and a node must not change what its backends see with the
	// state of its sync link.
	FollowVIP bool
	// Problem says why no daemon is wanted although the sync is enabled,
	// and what to do about it.
	Problem error
}

// Compute returns what node self should run, from the settings, the
// Nodes (as package nodeview sees them) and self's links. Peers are the
// other Nodes' first InternalIP of the group's family: the address each
// sends its sync messages from, when the link is the one that holds it.
// It is pure.
func Compute(c Config, self string, nodes []vrrp.Node, links []hostnet.Link) Want {
	if !c.Enabled {
		return Want{}
	}
	fam := c.family()
	var own netip.Addr
	var peers []netip.Addr
	for _, n := range nodes {
		a := n.InternalIP(fam)
		switch {
		case !a.IsValid():
		case n.Name == self:
			own = a
		default:
			peers = append(peers, a)
		}
	}
	slices.SortFunc(peers, netip.Addr.Compare)
	peers = slices.Compact(peers)
	iface := c.Interface
	if iface == "" {
		if !own.IsValid() {
			return Want{FollowVIP: true, Problem: fmt.Errorf("connection sync: Node %s has no %s InternalIP to find its sync link by: give --conn-sync-interface", self, fam)}
		}
		iface = linkOf(links, own)
		if iface == "" {
			return Want{FollowVIP: true, Problem: fmt.Errorf("connection sync: no link of this node holds its InternalIP %s: give --conn-sync-interface", own)}
		}
	}
	port := c.port()
	w := Want{FollowVIP: true}
	for _, s := range []ipvs.SyncState{ipvs.SyncMaster, ipvs.SyncBackup} {
		w.Daemons = append(w.Daemons, ipvs.SyncDaemon{State: s, Interface: iface, SyncID: c.SyncID, Group: c.Group, Port: c.Port})
	}
	for i := range MaxThreads {
		w.Guard.Ports = append(w.Guard.Ports, port+uint16(i))
	}
	w.Guard.Peers = peers
	return w
}

// linkOf returns the name of the link that holds address a, "" if none.
func linkOf(links []hostnet.Link, a netip.Addr) string {
	for _, l := range links {
		for _, p := range l.Prefixes {
			if p.Addr() == a {
				return l.Name
			}
		}
	}
	return ""
}

// Apply brings the kernel's daemons to want, given running (what
// k.SyncDaemons listed) and guarded, whether the last write of keeplb's
// nftables table, with want.Guard, succeeded. In this order:
//
//  1. a daemon not wanted, or wanted otherwise, is stopped; the backup
//     also when the table is not guarded (fail closed);
//  2. a wanted daemon that does not run is started: the master at once,
//     the backup only when guarded.
//
// It returns what runs afterwards and the errors, each naming its daemon.
// A kernel without the sync daemons (or one that refuses them) makes
// every start fail; forwarding is unaffected.
func Apply(k ipvs.SyncDaemons, running []ipvs.SyncDaemon, want Want, guarded bool) ([]ipvs.SyncDaemon, error) {
	wanted := map[ipvs.SyncState]ipvs.SyncDaemon{}
	for _, d := range want.Daemons {
		if d.State == ipvs.SyncBackup && !guarded {
			continue
		}
		wanted[d.State] = d
	}
	var errs []error
	now := map[ipvs.SyncState]ipvs.SyncDaemon{}
	for _, d := range running {
		if w, ok := wanted[d.State]; ok && same(w, d) {
			now[d.State] = d
			continue
		}
		if err := k.StopSyncDaemon(d.State); err != nil {
			errs = append(errs, fmt.Errorf("stop the IPVS sync %s daemon (%s): %w", d.State, d, err))
			now[d.State] = d
		}
	}
	for _, s := range []ipvs.SyncState{ipvs.SyncMaster, ipvs.SyncBackup} {
		w, ok := wanted[s]
		if _, runs := now[s]; !ok || runs {
			continue
		}
		if err := k.StartSyncDaemon(w); err != nil {
			errs = append(errs, fmt.Errorf("start the IPVS sync %s daemon (%s): %w", s, w, err))
			continue
		}
		now[s] = w
	}
	var out []ipvs.SyncDaemon
	for _, s := range []ipvs.SyncState{ipvs.SyncMaster, ipvs.SyncBackup} {
		if d, ok := now[s]; ok {
			out = append(out, d)
		}
	}
	return out, errors.Join(errs...)
}

// same reports whether a running daemon d is the wanted w: the kernel
// lists the defaults it filled in (group, port, TTL, payload size), which
// w may leave zero.
func same(w, d ipvs.SyncDaemon) bool {
	if w.Interface != d.Interface || w.SyncID != d.SyncID || w.State != d.State {
		return false
	}
	if w.Group.IsValid() && w.Group != d.Group {
		return false
	}
	if w.Port != 0 && w.Port != d.Port {
		return false
	}
	return true
}

// Stop stops every daemon in running, for a clean exit.
func Stop(k ipvs.SyncDaemons, running []ipvs.SyncDaemon) error {
	var errs []error
	for _, d := range running {
		if err := k.StopSyncDaemon(d.State); err != nil {
			errs = append(errs, fmt.Errorf("stop the IPVS sync %s daemon: %w", d.State, err))
		}
	}
	return errors.Join(errs...)
}
