package vrrp

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/keeplb/keeplb/pkg/allocator"
)

// For returns the instances node takes part in, sorted by name: those that
// list it in Priorities. A speaker renders exactly these.
func (p Plan) For(node string) []Instance {
	var out []Instance
	for _, inst := range p.Instances {
		if _, ok := inst.Priorities[node]; ok {
			out = append(out, inst)
		}
	}
	return out
}

// TrackValues returns the track-file value node writes for each tracked
// instance it takes part in (those with TrackFile), by instance name. For
// a Local instance, from the endpoints in in:
//
//   - LocalLift when node has a ready local endpoint;
//   - TrackFault when it has none but another eligible node has one, so the
//     instance faults here and only endpoint nodes compete;
//   - 0 when no eligible node has one: every eligible node may hold the VIP.
//
// Endpoints change these values only, never Compute's plan, so endpoint
// churn needs no keepalived reload. When Services share a Local address, the
// nodes with endpoints of all of them count, or of any if no node has all.
//
// canForward says whether this node can forward with IPVS now (its kernel
// has IPVS, keeplb's nftables table is loaded). A node that cannot must not
// hold a Forwarded VIP while a node that can is up, so for an instance
// with a Forwarded VIP its value is lowered by forwardPenalty(n), n the
// number of nodes taking part: a shared instance gets -n-BackupGap instead
// of 0, and a Local one LocalLift-n-BackupGap instead of LocalLift. Base
// priorities of the nodes taking part span n-1+BackupGap (see
// priorities), so every node that cannot forward ranks below every node
// that can, the order among them is kept (up to 95 nodes for Local
// instances), and none faults: when no node can forward, the VIP is still
// held where the plan puts it. A node needs no word from the others:
// lowering its own priority is enough. A node that can forward writes 0
// for a shared instance, its base priority unchanged.
func TrackValues(p Plan, node string, in Input, canForward bool) map[string]int {
	owners := localOwners(in)
	forwarded := make(map[netip.Addr]bool)
	for _, v := range in.VIPs {
		if v.Forwarded {
			forwarded[v.Addr.Unmap().WithZone("")] = true
		}
	}
	out := make(map[string]int)
	for _, inst := range p.For(node) {
		if !inst.TrackFile {
			continue
		}
		penalty := 0
		if !canForward && slices.ContainsFunc(inst.VIPs, func(a netip.Addr) bool { return forwarded[a] }) {
			penalty = forwardPenalty(len(inst.Priorities))
		}
		if !inst.Local {
			out[inst.Name] = -penalty
			continue
		}
		endpoints := localEndpoints(inst, owners)
		switch {
		case endpoints[node]:
			out[inst.Name] = LocalLift - penalty
		case len(endpoints) > 0:
			out[inst.Name] = TrackFault
		default:
			// Nothing to forward to anywhere: nothing to prefer.
			out[inst.Name] = 0
		}
	}
	return out
}

// localOwners returns the Local VIPs of in by address: the Services whose
// endpoints place it.
func localOwners(in Input) map[netip.Addr][]VIP {
	owners := make(map[netip.Addr][]VIP)
	for _, v := range in.VIPs {
		if v.Local {
			a := v.Addr.Unmap().WithZone("")
			owners[a] = append(owners[a], v)
		}
	}
	return owners
}

// localEndpoints returns the eligible nodes of a Local instance that have
// a ready endpoint of every Service of its address, or of any of them if
// no node has all: the nodes that may hold it while any is up.
func localEndpoints(inst Instance, owners map[netip.Addr][]VIP) map[string]bool {
	var every, some map[string]bool
	for _, a := range inst.VIPs {
		for _, v := range owners[a] {
			has := make(map[string]bool, len(v.LocalNodes))
			for _, n := range v.LocalNodes {
				if _, eligible := inst.Priorities[n]; eligible {
					has[n] = true
				}
			}
			if some == nil {
				every, some = has, make(map[string]bool)
			} else {
				for n := range every {
					if !has[n] {
						delete(every, n)
					}
				}
			}
			for n := range has {
				some[n] = true
			}
		}
	}
	if len(every) == 0 {
		return some
	}
	return every
}

// UnicastPeers returns the addresses node self uses for a unicast instance:
// its first InternalIP of the instance's family as unicast_src_ip, and that
// of every other node taking part, sorted, as unicast_peer. Nodes without an
// address of the family are left out (Compute already makes them ineligible
// for unicast instances).
func UnicastPeers(inst Instance, self string, nodes []Node) (src netip.Addr, peers []netip.Addr) {
	for _, n := range nodes {
		if _, ok := inst.Priorities[n.Name]; !ok {
			continue
		}
		a := firstOf(n.InternalIPs, inst.Family)
		switch {
		case !a.IsValid():
		case n.Name == self:
			src = a
		default:
			peers = append(peers, a)
		}
	}
	slices.SortFunc(peers, netip.Addr.Compare)
	return src, slices.Compact(peers)
}

// Interface describes one network interface of this node.
type Interface struct {
	// Name is the interface name.
	Name string
	// Prefixes are the interface's addresses with their prefix lengths.
	Prefixes []netip.Prefix
	// DefaultRoute4 and DefaultRoute6 are set when the default route of
	// that family leaves through this interface.
	DefaultRoute4, DefaultRoute6 bool
}

// ErrNoInterface is returned (wrapped) when no interface of this node can
// carry a VIP.
var ErrNoInterface = errors.New("no interface for VIP")

// ChooseInterface picks the interface of this node that vip goes on: the
// pool's explicit interface if set (it must exist); else the interface with
// the most specific subnet containing vip; else the one holding the default
// route of vip's family. Host prefixes (/32, /128), such as a VIP already
// added, do not count as subnets. Ties go to the lower name.
func ChooseInterface(explicit string, vip netip.Addr, ifaces []Interface) (string, error) {
	vip = vip.Unmap().WithZone("")
	sorted := slices.Clone(ifaces)
	slices.SortFunc(sorted, func(a, b Interface) int { return cmp.Compare(a.Name, b.Name) })
	if explicit != "" {
		for _, i := range sorted {
			if i.Name == explicit {
				return explicit, nil
			}
		}
		return "", fmt.Errorf("%w %s: the IPPool's spec.vrrp.interface %s does not exist on this node", ErrNoInterface, vip, explicit)
	}
	best, bestBits := "", -1
	for _, i := range sorted {
		for _, p := range i.Prefixes {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-(p.Addr().BitLen()-p.Addr().Unmap().BitLen()))
			if p.Bits() < p.Addr().BitLen() && p.Bits() > bestBits && p.Contains(vip) {
				best, bestBits = i.Name, p.Bits()
			}
		}
	}
	if best != "" {
		return best, nil
	}
	six := allocator.FamilyOf(vip) == allocator.IPv6
	for _, i := range sorted {
		if six && i.DefaultRoute6 || !six && i.DefaultRoute4 {
			return i.Name, nil
		}
	}
	return "", fmt.Errorf("%w %s: no interface has a subnet containing it or an %s default route; set spec.vrrp.interface on its IPPool",
		ErrNoInterface, vip, allocator.FamilyOf(vip))
}

// Placement is where this node puts one instance.
type Placement struct {
	// Interface carries the instance's adverts: that of its first VIP that
	// has one.
	Interface string
	// Devs[i] is the interface of inst.VIPs[i], or "" if it has none.
	Devs []string
}

// Place chooses the interfaces of every VIP of inst on this node (see
// ChooseInterface). The error lists the VIPs that have none; the others are
// placed all the same.
func Place(inst Instance, ifaces []Interface) (Placement, error) {
	pl := Placement{Devs: make([]string, len(inst.VIPs))}
	var errs []error
	for i, v := range inst.VIPs {
		dev, err := ChooseInterface(inst.Interface, v, ifaces)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pl.Devs[i] = dev
		if pl.Interface == "" {
			pl.Interface = dev
		}
	}
	return pl, errors.Join(errs...)
}

// MasterDown is RFC 5798's Master_Down_Interval for a backup of the given
// priority: 3 x advert + Skew_Time, Skew_Time = (256 - priority) x advert /
// 256. A backup takes over this long after the master's last advert, so a
// keepalived reload must never stall adverts for longer.
func MasterDown(advert time.Duration, priority int) time.Duration {
	return 3*advert + time.Duration(256-priority)*advert/256
}

// forwardPenalty is what a node that cannot forward takes off an
// instance's priority where n nodes take part: more than the span of their
// base priorities (n-1, and the gap after the second choice), so that it
// ranks below every node that can.
func forwardPenalty(n int) int {
	if n <= 2 {
		return n
	}
	return n + BackupGap
}
