package handoff

import (
	"net/netip"
	"slices"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

// Patient returns c with every instance announcing Patience(wait, its
// advert interval): the configuration a leaving speaker reloads
// keepalived with, so that its backups wait at least wait after the
// reload's advert. It does not change c.
func Patient(c keepalived.Config, wait time.Duration) keepalived.Config {
	c.Instances = slices.Clone(c.Instances)
	for i := range c.Instances {
		c.Instances[i].AdvertInterval = Patience(wait, c.Instances[i].AdvertInterval)
	}
	return c
}

// lifetimeMargin is how much earlier than the backups' takeover the
// kernel removes a VIP left by a hand-off: the kernel checks IPv4
// address lifetimes on whole-second timers, up to a second late.
const lifetimeMargin = 2 * time.Second

// Lifetime returns the address lifetime a leaving speaker gives the VIPs
// it leaves, timeout being how long after its kill the backups wait: in
// whole seconds, ending lifetimeMargin before they take over, so that
// the VIP is never on two nodes when no replacement comes (it is on none
// for that margin then), and at least a second.
func Lifetime(timeout time.Duration) time.Duration {
	return max(time.Second, (timeout - lifetimeMargin).Truncate(time.Second))
}

// WithoutAdopted returns c without the VIPs in adopting, which the
// speaker keeps on the node itself until their instances are master: a
// starting keepalived deletes its instances' addresses, which would cut
// the traffic the hand-off keeps. It does not change c.
func WithoutAdopted(c keepalived.Config, adopting map[netip.Prefix]bool) keepalived.Config {
	if len(adopting) == 0 {
		return c
	}
	c.Instances = slices.Clone(c.Instances)
	for i := range c.Instances {
		c.Instances[i].VIPs = slices.DeleteFunc(slices.Clone(c.Instances[i].VIPs), func(p netip.Prefix) bool { return adopting[p] })
	}
	return c
}

// Held returns the instances of c that states says are MASTER, with
// their VIPs: the Record's Instances.
func Held(c keepalived.Config, states map[string]keepalived.State) map[string][]netip.Prefix {
	out := map[string][]netip.Prefix{}
	for _, in := range c.Instances {
		if states[in.Name] == keepalived.StateMaster {
			out[in.Name] = slices.Clone(in.VIPs)
		}
	}
	return out
}

// Adopt sorts the VIPs a replacement adopts, given its keepalived
// configuration c (before WithoutAdopted), keepalived's states, and
// whether the Record's Deadline has passed: done are those whose
// instance is MASTER (keepalived holds them now: they go back in its
// configuration), release those to take off the node (no instance of
// this node has them any more, or the deadline passed: the backups are
// taking over), and still the rest, which the speaker keeps on the node
// and out of keepalived's configuration.
func Adopt(c keepalived.Config, states map[string]keepalived.State, adopting map[netip.Prefix]bool, expired bool) (still, done, release map[netip.Prefix]bool) {
	still, done, release = map[netip.Prefix]bool{}, map[netip.Prefix]bool{}, map[netip.Prefix]bool{}
	instance := map[netip.Prefix]string{}
	for _, in := range c.Instances {
		for _, p := range in.VIPs {
			instance[p] = in.Name
		}
	}
	for p := range adopting {
		name, ok := instance[p]
		switch {
		case ok && states[name] == keepalived.StateMaster:
			done[p] = true
		case !ok || expired:
			release[p] = true
		default:
			still[p] = true
		}
	}
	return still, done, release
}

// settleGrace is what Settle allows beyond keepalived's own election:
// starting keepalived after the first sync, and the sync that follows
// its report.
const settleGrace = 5 * time.Second

// Settle returns how long after a replacement begins adopting its
// keepalived should be master of the adopted instances: four advert
// intervals of c's slowest instance (the Master_Down_Interval is three
// and a skew under one) and settleGrace. An instance that is not master
// by then has found another master (one that ranks higher, or a backup
// that did not wait): its adopted VIPs must leave the node.
func Settle(c keepalived.Config) time.Duration {
	var slowest time.Duration
	for _, in := range c.Instances {
		slowest = max(slowest, in.AdvertInterval)
	}
	return 4*slowest + settleGrace
}
