package vrrp

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/rendezvous"
)

// Compute returns the cluster's VRRP plan. It is pure and deterministic: the
// same Input, in any order, gives a reflect.DeepEqual Plan.
func Compute(in Input) Plan {
	c := &computer{}
	pools := c.pools(in.Pools)
	byPool := c.vips(in.VIPs, pools)
	nodes := slices.Clone(in.Nodes)
	slices.SortFunc(nodes, func(a, b Node) int {
		// Names are unique in a cluster; the rest only makes a duplicate's
		// fate independent of input order. Not in one cmp.Or, which would
		// format both nodes at every comparison (its arguments are all
		// evaluated): 51 MB and 124 ms a plan at 1,000 nodes.
		if c := cmp.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return cmp.Compare(fmt.Sprint(a), fmt.Sprint(b))
	})

	names := make([]string, 0, len(byPool))
	for name := range byPool {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		p := pools[name]
		for _, fam := range []allocator.Family{allocator.IPv4, allocator.IPv6} {
			var vs []*address
			for _, a := range byPool[name] {
				if allocator.FamilyOf(a.addr) == fam {
					vs = append(vs, a)
				}
			}
			if len(vs) > 0 {
				c.group(p, fam, vs, nodes)
			}
		}
	}

	slices.SortFunc(c.plan.Instances, func(a, b Instance) int { return cmp.Compare(a.Name, b.Name) })
	slices.SortFunc(c.plan.Problems, func(a, b Problem) int {
		return cmp.Or(cmp.Compare(a.Pool, b.Pool), cmp.Compare(b.Severity, a.Severity),
			cmp.Compare(a.Reason, b.Reason), cmp.Compare(a.Message, b.Message))
	})
	c.plan.Problems = slices.Compact(c.plan.Problems)
	return c.plan
}

type computer struct {
	plan Plan
}

func (c *computer) problem(sev Severity, reason, pool, format string, args ...any) {
	c.plan.Problems = append(c.plan.Problems, Problem{Severity: sev, Reason: reason, Pool: pool, Message: fmt.Sprintf(format, args...)})
}

// pool is a validated Pool with the VRIDs it may use after overlaps.
type pool struct {
	Pool
	vrids  vridRange
	usable []int
}

// pools validates the pools and settles VRID overlaps: of two pools whose
// ranges overlap and that may share an interface, the older (lower Order,
// then name) keeps the overlap and the other uses the rest of its range.
// Pools with an unusable range are left out; their VIPs are reported.
func (c *computer) pools(in []Pool) map[string]*pool {
	sorted := slices.Clone(in)
	slices.SortFunc(sorted, func(a, b Pool) int {
		if c := cmp.Or(cmp.Compare(a.Order, b.Order), cmp.Compare(a.Name, b.Name)); c != 0 {
			return c
		}
		return cmp.Compare(fmt.Sprint(a), fmt.Sprint(b)) // only for a duplicate, see Compute
	})
	out := make(map[string]*pool, len(sorted))
	var kept []*pool
	for _, sp := range sorted {
		if _, dup := out[sp.Name]; dup {
			c.problem(Warning, ReasonDuplicatePool, sp.Name, "IPPool %s is listed twice; the speakers use the entry with the lower Order", sp.Name)
			continue
		}
		p := &pool{Pool: sp, vrids: vridRange{sp.FirstVRID, sp.LastVRID}}
		out[sp.Name] = p
		if sp.FirstVRID < 1 || sp.LastVRID > 255 || sp.FirstVRID > sp.LastVRID {
			c.problem(Error, ReasonInvalidVRIDs, sp.Name,
				"IPPool %s has VRID range %d-%d, which is not within 1-255 first-last; its VIPs are not announced until spec.vrrp.virtualRouterIDs is fixed",
				sp.Name, sp.FirstVRID, sp.LastVRID)
			continue
		}
		p.Advert = c.advert(sp)
		taken := make([]bool, 256)
		for _, o := range kept {
			if !o.vrids.overlaps(p.vrids) || !mayShareInterface(o.Interface, p.Interface) {
				continue
			}
			ov := o.vrids.intersect(p.vrids)
			for v := ov.first; v <= ov.last; v++ {
				taken[v] = true
			}
			c.problem(Warning, ReasonVRIDOverlap, sp.Name,
				"IPPools %s and %s both use VRIDs %s %s; %s, the older, keeps them and %s uses the rest of %s. Give each pool its own spec.vrrp.virtualRouterIDs range%s",
				o.Name, sp.Name, ov, interfaceClause(o.Interface, sp.Interface), o.Name, sp.Name, p.vrids, interfaceHint(o.Interface, sp.Interface))
		}
		for v := p.vrids.first; v <= p.vrids.last; v++ {
			if !taken[v] {
				p.usable = append(p.usable, v)
			}
		}
		kept = append(kept, p)
	}
	return out
}

func (c *computer) advert(p Pool) time.Duration {
	a := p.Advert
	if a == 0 {
		return DefaultAdvert
	}
	r := a.Round(10 * time.Millisecond)
	switch {
	case a < MinAdvert:
		r = MinAdvert
	case a > MaxAdvert:
		r = MaxAdvert
	}
	if r != a {
		c.problem(Warning, ReasonAdvertInterval, p.Name,
			"IPPool %s asks for advertisement interval %s; VRRPv3 carries 10ms steps from %s to %s, so the speakers use %s",
			p.Name, a, MinAdvert, MaxAdvert, r)
	}
	return r
}

// mayShareInterface reports whether pools with these interfaces can put
// instances on the same interface of some node. An empty interface is chosen
// per node, so it may meet any other.
func mayShareInterface(a, b string) bool { return a == "" || b == "" || a == b }

func interfaceClause(a, b string) string {
	if a != "" && a == b {
		return "on interface " + a
	}
	return "and may meet on one interface (a pool without spec.vrrp.interface picks it per node)"
}

func interfaceHint(a, b string) string {
	if a != "" && a == b {
		return ""
	}
	return ", or pin them to different interfaces with spec.vrrp.interface"
}

// address is one VIP address with what the plan needs of its owners.
type address struct {
	addr      netip.Addr
	local     bool
	forwarded bool
	created   time.Time
}

// vips groups the VIPs by pool, one entry per address. An address is Local
// when any owner is Local (the allocator lets only Services with the same
// pod selector share a Local address, so its endpoints are theirs too).
func (c *computer) vips(in []VIP, pools map[string]*pool) map[string][]*address {
	sorted := slices.Clone(in)
	for i := range sorted {
		sorted[i].Addr = sorted[i].Addr.Unmap().WithZone("")
	}
	slices.SortFunc(sorted, func(a, b VIP) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Pool, b.Pool), cmp.Compare(a.Service, b.Service))
	})
	byPool := make(map[string][]*address)
	var cur *address
	var curPool string
	for _, v := range sorted {
		if !v.Addr.IsValid() {
			c.problem(Warning, ReasonInvalidVIP, v.Pool, "Service %s has an invalid VIP; it is ignored", v.Service)
			continue
		}
		if cur != nil && cur.addr == v.Addr {
			if v.Pool != curPool {
				c.problem(Warning, ReasonAddressConflict, v.Pool,
					"VIP %s is given to Service %s from IPPool %s but is announced with IPPool %s", v.Addr, v.Service, v.Pool, curPool)
			}
			cur.local = cur.local || v.Local
			cur.forwarded = cur.forwarded || v.Forwarded
			if cur.created.IsZero() || !v.Created.IsZero() && v.Created.Before(cur.created) {
				cur.created = v.Created
			}
			continue
		}
		cur, curPool = nil, v.Pool
		p, ok := pools[v.Pool]
		switch {
		case !ok:
			c.problem(Error, ReasonUnknownPool, v.Pool,
				"VIP %s of Service %s belongs to IPPool %q, which does not exist; it is not announced", v.Addr, v.Service, v.Pool)
			continue
		case p.usable == nil:
			continue // reported once per pool below
		}
		cur = &address{addr: v.Addr, local: v.Local, forwarded: v.Forwarded, created: v.Created}
		byPool[v.Pool] = append(byPool[v.Pool], cur)
	}
	for name, p := range pools {
		if p.usable != nil {
			continue
		}
		n := 0
		for i, v := range sorted {
			if v.Pool == name && (i == 0 || sorted[i-1].Addr != v.Addr) {
				n++
			}
		}
		if n > 0 && p.vrids.first >= 1 && p.vrids.last <= 255 && p.vrids.first <= p.vrids.last {
			c.problem(Error, ReasonVRIDsExhausted, name,
				"IPPool %s has no VRID left: older pools that may share its interface use all of %s; its %d VIPs are not announced. Give it a spec.vrrp.virtualRouterIDs range of its own",
				name, p.vrids, n)
		}
	}
	return byPool
}

// group lays out the VIPs of one pool and family: shared instances on the
// first usable VRIDs, one instance per Local address on the rest.
func (c *computer) group(p *pool, fam allocator.Family, vs []*address, nodes []Node) {
	members, eligible, unready := candidates(p, fam, nodes)
	k := bucketCount(len(p.usable))
	slots := p.usable[k:]
	fs := familySuffix(fam)
	if FailStatic(len(members), len(unready)) {
		for _, n := range members {
			eligible[n] = true
		}
		c.problem(Warning, ReasonFailStatic, p.Name,
			"%d of the %d nodes that may hold the %s VIPs of IPPool %s are not Ready (%s). So many at once points to the control plane (an overloaded API server, kubelets cut off from it, expired kubelet certificates) rather than to the nodes, so the speakers ignore Ready for this pool and VRRP alone decides which live node holds each VIP. Check the API server and the kubelets; Ready counts again once at most half are not Ready",
			len(unready), len(members), fam, p.Name, list(unready, 10))
	}
	if len(eligible) == 0 {
		c.problem(Error, ReasonNoEligibleNode, p.Name,
			"no Ready node may hold the %d %s VIPs of IPPool %s: check its spec.vrrp.nodeSelector, the %s label%s",
			len(vs), fam, p.Name, ExcludeLabel, unicastHint(p, fam))
	} else if len(members) > 2*k {
		fix := "narrow spec.vrrp.nodeSelector to the nodes that should hold VIPs"
		if k < maxBuckets {
			fix = fmt.Sprintf("give spec.vrrp.virtualRouterIDs at least %d usable VRIDs, or %s", 2*maxBuckets, fix)
		}
		c.problem(Warning, ReasonLimitedSpread, p.Name,
			"IPPool %s has %d shared %s instances for %d nodes, so masters cannot spread evenly: %s",
			p.Name, k, fam, len(members), fix)
	}

	// Local addresses take VRIDs oldest first, each the free one it scores
	// highest: adding a younger address never displaces an older one.
	var locals []*address
	for _, a := range vs {
		if a.local {
			locals = append(locals, a)
		}
	}
	slices.SortFunc(locals, func(a, b *address) int {
		return cmp.Or(a.created.Compare(b.created), a.addr.Compare(b.addr))
	})
	slotNames := make([]string, len(slots))
	for i, v := range slots {
		slotNames[i] = strconv.Itoa(v)
	}
	used := make([]bool, len(slots))
	free := len(slots)
	vridOf := make(map[netip.Addr]int, len(locals))
	var overflow []string
	for _, a := range locals {
		if free == 0 {
			overflow = append(overflow, a.addr.String())
			continue
		}
		key := p.Name + "/" + a.addr.String()
		best, bestScore := -1, uint64(0)
		for i := range slots {
			if used[i] {
				continue
			}
			if s := rendezvous.Score(key, slotNames[i]); best < 0 || s > bestScore {
				best, bestScore = i, s
			}
		}
		used[best] = true
		free--
		vridOf[a.addr] = slots[best]
	}
	if len(overflow) > 0 {
		need := len(p.usable)
		for need-bucketCount(need) < len(locals) {
			need++
		}
		fix := fmt.Sprintf("give spec.vrrp.virtualRouterIDs at least %d usable VRIDs", need)
		if need > 255 {
			fix = "move some Local Services to another IPPool"
		}
		c.problem(Error, ReasonVRIDsExhausted, p.Name,
			"IPPool %s has %d usable %s VRIDs (of %s) for %d shared instances and %d Local VIPs, one instance each; %s are held as if their Services were not Local. To fix, %s",
			p.Name, len(p.usable), fam, p.vrids, k, len(locals), list(overflow, 10), fix)
	}

	buckets := make([][]netip.Addr, k)
	for _, a := range vs {
		if _, ok := vridOf[a.addr]; !ok {
			b := bucketOf(a.addr, k)
			buckets[b] = append(buckets[b], a.addr)
		}
	}
	keys := make([]string, k)
	for b := range k {
		keys[b] = fmt.Sprintf("%s/%s/%d", p.Name, fs, b)
	}
	orders := balancedOrders(keys, members)
	forwarded := make(map[netip.Addr]bool)
	for _, a := range vs {
		if a.forwarded {
			forwarded[a.addr] = true
		}
	}
	delay, never := p.preempt()
	base := func(name string, vrid int, vips []netip.Addr, prio map[string]int, local bool) Instance {
		return Instance{
			Name: name, Pool: p.Name, Family: fam, VRID: vrid, Version: Version,
			Advert: p.Advert, Unicast: p.Unicast, Interface: p.Interface,
			VIPs: vips, Priorities: prio, Local: local, HoldDown: delay, NoPreempt: never,
			TrackFile: local || slices.ContainsFunc(vips, func(a netip.Addr) bool { return forwarded[a] }),
		}
	}
	for b, vips := range buckets {
		if len(vips) == 0 {
			continue
		}
		name := instanceName(p.Name, fs, fmt.Sprintf("b%02d", b))
		c.plan.Instances = append(c.plan.Instances,
			base(name, p.usable[b], vips, priorities(orders[b], eligible, TopPriority), false))
	}
	for _, a := range locals {
		vrid, ok := vridOf[a.addr]
		if !ok {
			continue
		}
		order := rendezvous.Order(p.Name+"/"+a.addr.String(), members)
		name := instanceName(p.Name, fs, addrName(a.addr))
		c.plan.Instances = append(c.plan.Instances,
			base(name, vrid, []netip.Addr{a.addr}, priorities(order, eligible, LocalTopPriority), true))
	}
}

// candidates returns the members of a pool and family (sorted), the nodes
// whose preference orders are computed: they match the node selector, lack
// ExcludeLabel, and for unicast have an InternalIP of the family. Those are
// durable facts; Ready is not, so eligible (members that are Ready) decides
// who takes part without reshuffling the orders. unready lists the members
// that are not Ready, for the FailStatic rule.
func candidates(p *pool, fam allocator.Family, nodes []Node) (members []string, eligible map[string]bool, unready []string) {
	eligible = make(map[string]bool)
	for _, n := range nodes {
		if n.Name == "" || slices.Contains(members, n.Name) {
			continue
		}
		if !p.Admits(n.Labels) {
			continue
		}
		if p.Unicast && !firstOf(n.InternalIPs, fam).IsValid() {
			continue
		}
		members = append(members, n.Name)
		if n.Ready {
			eligible[n.Name] = true
		} else {
			unready = append(unready, n.Name)
		}
	}
	return members, eligible, unready
}

func unicastHint(p *pool, fam allocator.Family) string {
	if p.Unicast {
		return fmt.Sprintf(", Ready conditions, and (unicast) %s InternalIPs", fam)
	}
	return " and Ready conditions"
}

// bucketOf maps an address to a shared instance: its value (the low 64 bits
// for IPv6) modulo k, so that consecutive addresses, which the allocator
// hands out, go round-robin.
func bucketOf(a netip.Addr, k int) int {
	if a.Is4() {
		b := a.As4()
		return int(uint64(binary.BigEndian.Uint32(b[:])) % uint64(k))
	}
	b := a.As16()
	return int(binary.BigEndian.Uint64(b[8:]) % uint64(k))
}

func familySuffix(f allocator.Family) string {
	if f == allocator.IPv6 {
		return "v6"
	}
	return "v4"
}

// firstOf returns the first address of family f in as.
func firstOf(as []netip.Addr, f allocator.Family) netip.Addr {
	for _, a := range as {
		if a.IsValid() && allocator.FamilyOf(a) == f {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// instanceName is kl_<pool>_<family>_<what>, unless that is too long for
// keepalived: then the pool's part is cut short and followed by a hash of
// the whole name, and the end, which tells a pool's instances apart, stays
// (keepalived.FitName). Names that fit never change, so an upgrade renames
// no instance: a rename would move its VIPs.
func instanceName(pool, fam, what string) string {
	tail := "_" + fam + "_" + what
	return keepalived.FitName("kl_"+sanitize(pool)+tail, len(tail))
}

// sanitize keeps a pool name usable in instance and file names. IPPool
// names (DNS subdomains) pass unchanged; anything else gets a hash suffix so
// that two names never map to one.
func sanitize(s string) string {
	clean := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '.':
			return r
		}
		return '_'
	}, s)
	if clean == s && s != "" {
		return s
	}
	return fmt.Sprintf("%s_%08x", clean, uint32(rendezvous.Score("name", s)))
}

// addrName spells an address with '-' for '.' and ':', which no address
// contains otherwise.
func addrName(a netip.Addr) string {
	return strings.NewReplacer(".", "-", ":", "-").Replace(a.String())
}

// list joins up to n items, saying how many more there are.
func list(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:n], ", "), len(items)-n)
}
