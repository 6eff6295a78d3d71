// Package allocator hands out LoadBalancer VIPs from IP pools.
//
// It is pure and in memory: no API or kernel calls. The controller seeds it
// from every Service's status (Restore) before the first Assign, so a restart
// never moves or duplicates an address, and feeds it the IPPools (SetPools).
// It also tells it what every Service's status lists (SetStatus), keeplb's
// or not: an address some status lists is never handed to another Service.
// All methods are safe for concurrent use; the upstream service controller
// calls Assign from several workers at once.
//
// An address is free, that is in its pool's free set, exactly when it lies
// in a pool, no Service owns it, no Service's status lists it, and the pool
// does not skip it (avoidBuggyIPs, an IPv6 CIDR's subnet-router anycast
// address).
//
// Free addresses are kept per pool and family as sorted lists of free ranges
// with a cursor, so an allocation is a binary search over free ranges, not a
// scan over taken addresses, and a freed address is reused last.
package allocator

import (
	"fmt"
	"math/big"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// Allocator is the in-memory VIP allocator. The zero value is not usable;
// call New.
type Allocator struct {
	// unmanaged are the ranges outside every pool that keeplb.io/ips may
	// name (--allow-unmanaged-ips).
	unmanaged []netip.Prefix

	mu       sync.Mutex
	pools    map[string]*poolState
	index    []indexEntry // effective ranges of all pools, sorted
	addrs    map[netip.Addr]*addrState
	services map[string]*svcState
	pending  map[string]struct{}
	groups   map[string]map[netip.Addr]struct{} // share key -> addresses
	status   map[string][]netip.Addr            // Service -> addresses its status lists
	refs     map[netip.Addr][]string            // address -> Services whose status lists it
}

// poolState is a pool with its effective ranges and free addresses.
type poolState struct {
	Pool
	effective [2][]Range // after removing overlaps with older pools
	free      [2]*rangeSet
	cursor    [2]netip.Addr
	total     [2]*big.Int
	conflicts []string
}

type indexEntry struct {
	r    Range
	pool *poolState
}

// addrState is one allocated address.
type addrState struct {
	// pool is the pool the address was drawn from, which keeps it even when
	// pool edits put the address outside that pool or in another one, or
	// delete the pool (so re-creating it moves nothing); "" for an
	// unmanaged address, which a pool that comes to contain it adopts.
	pool     string
	inRange  bool   // whether pool contains it today
	shareKey string // "namespace/key" when owners share it
	owners   []string
}

type svcState struct {
	req   Request
	alloc Allocation
}

// New returns an empty allocator. unmanaged are the ranges outside every
// pool that keeplb.io/ips (or spec.loadBalancerIP) may name: an address
// there is checked against other Services only, so the operator chooses
// them; none by default.
func New(unmanaged ...netip.Prefix) *Allocator {
	return &Allocator{
		unmanaged: slices.Clone(unmanaged),
		pools:     map[string]*poolState{},
		addrs:     map[netip.Addr]*addrState{},
		services:  map[string]*svcState{},
		pending:   map[string]struct{}{},
		groups:    map[string]map[netip.Addr]struct{}{},
		status:    map[string][]netip.Addr{},
		refs:      map[netip.Addr][]string{},
	}
}

// SetPools replaces the set of pools. Addresses already allocated stay with
// their Services even when no pool contains them any more; SetPools returns
// the keys of the Services that had an address fall outside its pool by this
// call, so the caller can warn them.
func (a *Allocator) SetPools(pools []Pool) (orphaned []string) {
	a.mu.Lock()
	defer a.mu.Unlock()

	sorted := slices.Clone(pools)
	sort.SliceStable(sorted, func(i, j int) bool {
		if sorted[i].Order != sorted[j].Order {
			return sorted[i].Order < sorted[j].Order
		}
		return sorted[i].Name < sorted[j].Name
	})
	old := a.pools
	a.pools = make(map[string]*poolState, len(sorted))
	a.index = a.index[:0]
	var claimed [2]*rangeSet
	claimed[IPv4], claimed[IPv6] = newRangeSet(nil, false), newRangeSet(nil, false)
	var owners [2][]indexEntry // what claimed each range, for conflict names
	for _, p := range sorted {
		ps := &poolState{Pool: p}
		for f := IPv4; f <= IPv6; f++ {
			own := newRangeSet(rangesOf(p.Ranges, f), false).spans
			eff := claimed[f].subtract(own)
			if !sameRanges(eff, own) {
				for _, e := range owners[f] {
					if overlaps(e.r, own) && !slices.Contains(ps.conflicts, e.pool.Name) {
						ps.conflicts = append(ps.conflicts, e.pool.Name)
					}
				}
			}
			for _, r := range own {
				owners[f] = append(owners[f], indexEntry{r, ps})
			}
			claimed[f] = newRangeSet(append(slices.Clone(claimed[f].spans), own...), false)
			ps.effective[f] = eff
			// The .0 and .255 addresses stay in the spans and are skipped
			// when taking and counting: a /8 costs as little as a /30.
			ps.free[f] = newRangeSet(eff, p.AvoidBuggyIPs && f == IPv4)
			for _, r := range p.Ranges {
				// Where an older pool owns the address, that pool decides.
				if ac, ok := r.anycast(); ok && FamilyOf(ac) == f && ps.free[f].contains(ac) {
					ps.free[f].reserve(ac)
				}
			}
			ps.total[f] = ps.free[f].size()
			if o := old[p.Name]; o != nil {
				ps.cursor[f] = o.cursor[f]
			}
			for _, r := range eff {
				a.index = append(a.index, indexEntry{r, ps})
			}
		}
		a.pools[p.Name] = ps
	}
	sort.Slice(a.index, func(i, j int) bool { return a.index[i].r.First.Less(a.index[j].r.First) })

	seen := map[string]bool{}
	for addr, st := range a.addrs {
		wasIn := st.inRange
		ps := a.lookup(addr)
		if ps != nil {
			ps.free[FamilyOf(addr)].remove(addr)
			if st.pool == "" {
				st.pool = ps.Name // an unmanaged address that a pool now covers
			}
		}
		st.inRange = ps != nil && ps.Name == st.pool
		if wasIn && !st.inRange {
			for _, o := range st.owners {
				if !seen[o] {
					seen[o] = true
					orphaned = append(orphaned, o)
				}
			}
		}
	}
	for addr := range a.refs {
		if ps := a.lookup(addr); ps != nil {
			ps.free[FamilyOf(addr)].remove(addr)
		}
	}
	sort.Strings(orphaned)
	return orphaned
}

func rangesOf(rs []Range, f Family) []Range {
	var out []Range
	for _, r := range rs {
		if FamilyOf(r.First) == f {
			out = append(out, r)
		}
	}
	return out
}

func sameRanges(a, b []Range) bool { return slices.Equal(a, b) }

func overlaps(r Range, rs []Range) bool {
	for _, o := range rs {
		if !r.Last.Less(o.First) && !o.Last.Less(r.First) {
			return true
		}
	}
	return false
}

// lookup returns the pool whose effective ranges contain addr.
func (a *Allocator) lookup(addr netip.Addr) *poolState {
	i := sort.Search(len(a.index), func(i int) bool { return !a.index[i].r.Last.Less(addr) })
	if i < len(a.index) && a.index[i].r.Contains(addr) {
		return a.index[i].pool
	}
	return nil
}

// Restore records addresses a Service already has in its status, without
// the checks of Assign: what the API says is allocated is allocated. It
// fails only when another Service holds one of the addresses and the two
// may not share it (or an address has a zone); the caller then leaves this
// Service to Assign, which gives it a fresh address. Seed the oldest
// Services first, after SetStatus for every Service: a refused Service's
// status then still keeps its addresses from being handed out again. For a
// Service that already has an allocation it does nothing.
func (a *Allocator) Restore(req Request, addrs []netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.services[req.Key]; ok {
		return nil
	}
	addrs, err := plainAddrs(addrs, "status.loadBalancer.ingress")
	if err != nil {
		return err
	}
	for _, addr := range addrs {
		if st := a.addrs[addr]; st != nil && len(st.owners) > 0 {
			if err := a.canShare(&req, addr, st); err != nil {
				return err
			}
		}
	}
	alloc := Allocation{Addrs: slices.Clone(addrs)}
	for i, addr := range addrs {
		st := a.record(&req, addr)
		if req.Pool != "" && st.pool != req.Pool && len(st.owners) == 1 {
			// The Service asked for this pool and got this address: the
			// pool edits since (overlaps, shrinking) do not change that.
			st.pool = req.Pool
			ps := a.lookup(addr)
			st.inRange = ps != nil && ps.Name == st.pool
		}
		if i == 0 {
			alloc.Pool = st.pool
		}
		if ps := a.pools[st.pool]; ps != nil && st.inRange {
			f := FamilyOf(addr)
			if nx := addr.Next(); !ps.cursor[f].IsValid() || ps.cursor[f].Less(nx) {
				ps.cursor[f] = nx
			}
		}
	}
	a.services[req.Key] = &svcState{req: req, alloc: alloc}
	return nil
}

// Assign returns the addresses for req: the ones the Service already has
// when they still satisfy it, else new ones. On failure nothing changes,
// the Service keeps what it had, and the Service is listed by Pending until
// it succeeds or is released.
func (a *Allocator) Assign(req Request) (Allocation, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	alloc, err := a.assign(&req)
	if err != nil {
		a.pending[req.Key] = struct{}{}
		return Allocation{}, err
	}
	delete(a.pending, req.Key)
	return alloc, nil
}

// Release frees the Service's addresses (those no other Service shares)
// and reports whether any address went back to a pool. An address some
// Service's status still lists (the released Service's own, until the
// Service is gone) stays out of the pool until SetStatus drops it.
func (a *Allocator) Release(key string) (freed bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.pending, key)
	prev := a.services[key]
	if prev == nil {
		return false
	}
	delete(a.services, key)
	for _, addr := range prev.alloc.Addrs {
		if a.drop(key, addr) {
			freed = true
		}
	}
	return freed
}

// SetStatus records the addresses Service key (any Service, keeplb's or
// another implementation's) lists in status.loadBalancer.ingress, replacing
// what was recorded for key before. While any Service's status lists an
// address, the address is in no free set, so Assign never hands it to
// another Service. An empty addrs forgets key. It reports whether an address
// went back to a free set (the caller then retries pending Services).
//
// IPv4-mapped addresses count as IPv4; a zone is ignored, keeping the
// address itself out of the free sets.
func (a *Allocator) SetStatus(key string, addrs []netip.Addr) (freed bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var next []netip.Addr
	for _, addr := range addrs {
		if !addr.IsValid() {
			continue
		}
		if addr = addr.Unmap().WithZone(""); !slices.Contains(next, addr) {
			next = append(next, addr)
		}
	}
	prev := a.status[key]
	for _, addr := range next {
		if slices.Contains(prev, addr) {
			continue
		}
		a.refs[addr] = append(a.refs[addr], key)
		if ps := a.lookup(addr); ps != nil {
			ps.free[FamilyOf(addr)].remove(addr)
		}
	}
	for _, addr := range prev {
		if slices.Contains(next, addr) {
			continue
		}
		if rest := slices.DeleteFunc(a.refs[addr], func(k string) bool { return k == key }); len(rest) > 0 {
			a.refs[addr] = rest
			continue
		}
		delete(a.refs, addr)
		if a.putBack(addr) {
			freed = true
		}
	}
	if len(next) == 0 {
		delete(a.status, key)
	} else {
		a.status[key] = next
	}
	return freed
}

// Lookup returns the Service's current allocation.
func (a *Allocator) Lookup(key string) (Allocation, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.services[key]
	if s == nil {
		return Allocation{}, false
	}
	return Allocation{Pool: s.alloc.Pool, Addrs: slices.Clone(s.alloc.Addrs)}, true
}

// MarkPending lists key as pending, for failures found before Assign (an
// unparseable annotation); the next successful Assign or Release clears it.
func (a *Allocator) MarkPending(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pending[key] = struct{}{}
}

// IsPending reports whether key's last attempt failed.
func (a *Allocator) IsPending(key string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.pending[key]
	return ok
}

// ServicesOf returns the keys of the Services holding an address drawn from
// one of the named pools, sorted.
func (a *Allocator) ServicesOf(pools map[string]bool) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var keys []string
	for key, s := range a.services {
		if pools[s.alloc.Pool] {
			keys = append(keys, key)
		}
	}
	sort.Strings(keys)
	return keys
}

// Pending returns the keys of Services whose last Assign failed, sorted.
func (a *Allocator) Pending() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	keys := make([]string, 0, len(a.pending))
	for k := range a.pending {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// wanted returns the families req asks for, primary first.
func wanted(req *Request) []Family {
	fams := req.Families
	if len(fams) == 0 {
		fams = []Family{IPv4}
	}
	if req.Policy == SingleStack {
		return fams[:1]
	}
	if req.Policy == RequireDualStack && len(fams) == 1 {
		return []Family{fams[0], 1 - fams[0]}
	}
	return fams
}

// plainAddrs returns addrs with IPv4-mapped addresses written as IPv4 and
// duplicates dropped, or an error naming field if one has a zone: a zoned
// address would pass for a different key than its plain form, so recording
// one could hand the same address to two Services.
func plainAddrs(addrs []netip.Addr, field string) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(addrs))
	for _, addr := range addrs {
		if addr.Zone() != "" {
			return nil, errorf(ReasonInvalid, field, "%s has a zone; a LoadBalancer address belongs to no one link, so give it without %%%s", addr, addr.Zone())
		}
		if addr = addr.Unmap(); !slices.Contains(out, addr) {
			out = append(out, addr)
		}
	}
	return out, nil
}

// planned is one address of a plan: either a given address or one to take
// from a pool's free set at commit.
type planned struct {
	addr netip.Addr
	take *poolState
	fam  Family
}

func (a *Allocator) assign(req *Request) (Allocation, error) {
	ips, err := plainAddrs(req.IPs, req.IPsSource)
	if err != nil {
		return Allocation{}, err
	}
	req.IPs = ips
	prev := a.services[req.Key]
	var plan []planned
	switch {
	case len(req.IPs) > 0:
		plan, err = a.planExplicit(req)
	case req.ShareKey != "" && a.shareGroup(req) != nil:
		plan, err = a.planShared(req)
	default:
		plan = a.planKeep(req, prev)
		if plan == nil {
			plan = a.planAdopt(req)
		}
		if plan == nil {
			plan, err = a.planFresh(req)
		}
	}
	if err != nil {
		return Allocation{}, err
	}
	return a.commit(req, prev, plan), nil
}

func (a *Allocator) planExplicit(req *Request) ([]planned, error) {
	field := req.IPsSource
	fams := wanted(req)
	seen := map[Family]bool{}
	for _, ip := range req.IPs {
		f := FamilyOf(ip)
		if seen[f] {
			return nil, errorf(ReasonInvalid, field, "gives two %s addresses; give at most one address per family", f)
		}
		seen[f] = true
	}
	// Before the per-address family check: a SingleStack Service has one
	// family in spec.ipFamilies, so that check would blame the second
	// address's family rather than say what is wrong.
	if req.Policy == SingleStack && len(req.IPs) > 1 {
		list := make([]string, len(req.IPs))
		for i, ip := range req.IPs {
			list[i] = ip.String()
		}
		return nil, errorf(ReasonFamily, field, "gives %d addresses (%s) but the Service is SingleStack; give only its %s address, or set spec.ipFamilyPolicy to PreferDualStack or RequireDualStack", len(req.IPs), strings.Join(list, ", "), fams[0])
	}
	for _, ip := range req.IPs {
		f := FamilyOf(ip)
		if !slices.Contains(req.Families, f) && len(req.Families) > 0 && req.Policy != RequireDualStack {
			return nil, errorf(ReasonFamily, field, "%s is %s but the Service's spec.ipFamilies is %v; set spec.ipFamilies/ipFamilyPolicy to include %s or give a %s address", ip, f, req.Families, f, req.Families[0])
		}
	}
	if req.Policy == RequireDualStack && len(req.IPs) < 2 {
		return nil, errorf(ReasonFamily, field, "the Service requires dual-stack; give one IPv4 and one IPv6 address, or remove the annotation")
	}
	var plan []planned
	for _, f := range fams {
		for _, ip := range req.IPs {
			if FamilyOf(ip) != f {
				continue
			}
			st := a.addrs[ip]
			if st != nil && !onlyOwner(st, req.Key) {
				if err := a.canShare(req, ip, st); err != nil {
					return nil, err
				}
			}
			if others := a.listedBy(ip, req.Key); !owns(st, req.Key) && len(others) > 0 {
				// In use all the same: by another implementation's
				// Service, or one keeplb refused or released whose status
				// still shows it. Joining its holders would make that
				// Service's claim a conflict at the next restart.
				return nil, errorf(ReasonAddressInUse, field, "%s is listed in the status of Service %s; choose another address, or wait until no other Service's status lists it", ip, strings.Join(others, ", "))
			}
			ps := a.lookup(ip)
			switch {
			case ps != nil:
				if ok, why := ps.admits(req); !ok {
					return nil, errorf(ReasonNotAdmitted, field, "%s is in IPPool %s, which does not admit this Service (%s); pick an address of a pool that does", ip, ps.Name, why)
				}
				if req.Pool != "" && ps.Name != req.Pool {
					return nil, errorf(ReasonInvalid, field, "%s is in IPPool %s, not in the IPPool %s named by keeplb.io/pool; make them agree or drop one", ip, ps.Name, req.Pool)
				}
			case st != nil:
				// Ours already (the pool shrank): keeping it moves nothing.
			case !a.unmanagedAllowed(ip):
				if len(a.unmanaged) == 0 {
					return nil, errorf(ReasonOutsidePools, field, "%s is in no IPPool; add it to an IPPool's spec.addresses or choose an address from `kubectl get ippools`", ip)
				}
				return nil, errorf(ReasonOutsidePools, field, "%s is in no IPPool, nor in the ranges the controller allows outside them (--allow-unmanaged-ips %s); add it to an IPPool's spec.addresses or choose an address from `kubectl get ippools`", ip, prefixList(a.unmanaged))
			case req.KubeProxy:
				// With ipMode VIP every node's kube-proxy takes the address
				// over inside the cluster: outside the pools, where no
				// operator vetted it, that would let a tenant capture any
				// address (a resolver, the API server) for every pod
				// (CVE-2020-8554).
				return nil, errorf(ReasonOutsidePools, v1alpha1.AnnotationForwarding, "%s is in no IPPool, and with kube-proxy forwarding kube-proxy on every node would intercept it for the whole cluster; use nodeport or pod forwarding, or take an address from an IPPool", ip)
			}
			plan = append(plan, planned{addr: ip, fam: f})
		}
	}
	return plan, nil
}

// planKeep keeps what the Service has when it still satisfies req, adding a
// missing family from the same pool. It returns nil when a fresh allocation
// is needed.
func (a *Allocator) planKeep(req *Request, prev *svcState) []planned {
	if prev == nil {
		return nil
	}
	have := map[Family]netip.Addr{}
	for _, addr := range prev.alloc.Addrs {
		st := a.addrs[addr]
		if st == nil {
			continue
		}
		if req.Pool != "" && st.pool != req.Pool {
			return nil // the Service now names another pool
		}
		if !onlyOwner(st, req.Key) && (req.ShareKey == "" || st.shareKey != req.Namespace+"/"+req.ShareKey) {
			return nil // the Service left the group that shares this address
		}
		have[FamilyOf(addr)] = addr
	}
	if len(have) == 0 {
		return nil
	}
	return extend(req, a.pools[prev.alloc.Pool], have)
}

// planAdopt gives req the addresses its own status lists when it has no
// allocation that satisfies it, provided no other Service holds or lists
// them and they satisfy req: their pool admits it (and is the one it
// names), of families it wants, all from one pool. So a Service that lost
// its allocation while its status kept the addresses (a restart refused it,
// or it was released and is back) keeps what its clients use rather than
// taking fresh ones. It returns nil when there is nothing to adopt.
func (a *Allocator) planAdopt(req *Request) []planned {
	var ps *poolState
	have := map[Family]netip.Addr{}
	fams := wanted(req)
	for _, addr := range a.status[req.Key] {
		f := FamilyOf(addr)
		if _, dup := have[f]; dup || !slices.Contains(fams, f) {
			continue
		}
		if st := a.addrs[addr]; st != nil && !onlyOwner(st, req.Key) {
			continue // another Service holds it: the status is what is wrong
		}
		if len(a.listedBy(addr, req.Key)) > 0 {
			continue
		}
		p := a.lookup(addr)
		if p == nil || ps != nil && p != ps || req.Pool != "" && p.Name != req.Pool {
			continue
		}
		if ok, _ := p.admits(req); !ok {
			continue
		}
		ps, have[f] = p, addr
	}
	if len(have) == 0 {
		return nil
	}
	return extend(req, ps, have)
}

// extend completes have, the addresses a Service keeps, with the families
// req wants and lacks, taken from ps. It returns nil when req needs a
// family ps cannot give.
func extend(req *Request, ps *poolState, have map[Family]netip.Addr) []planned {
	var plan []planned
	for _, f := range wanted(req) {
		if addr, ok := have[f]; ok {
			plan = append(plan, planned{addr: addr, fam: f})
			continue
		}
		if ps != nil && !ps.free[f].empty() {
			plan = append(plan, planned{take: ps, fam: f})
			continue
		}
		if req.Policy == PreferDualStack {
			continue // keep what it has rather than move for a family
		}
		return nil
	}
	if len(plan) == 0 {
		return nil
	}
	return plan
}

func (a *Allocator) planFresh(req *Request) ([]planned, error) {
	var candidates []*poolState
	if req.Pool != "" {
		ps := a.pools[req.Pool]
		if ps == nil {
			return nil, errorf(ReasonPoolNotFound, v1alpha1.AnnotationPool, "IPPool %q does not exist; create it or name one of `kubectl get ippools`", req.Pool)
		}
		if ok, why := ps.admits(req); !ok {
			return nil, errorf(ReasonNotAdmitted, v1alpha1.AnnotationPool, "%s; change the pool's spec.serviceAllocation or name another pool", why)
		}
		candidates = []*poolState{ps}
	} else {
		var refusals []string
		for _, ps := range a.pools {
			if !ps.AutoAssign {
				continue
			}
			if ok, why := ps.admits(req); !ok {
				refusals = append(refusals, why)
				continue
			}
			candidates = append(candidates, ps)
		}
		if len(candidates) == 0 {
			sort.Strings(refusals)
			msg := "no IPPool with autoAssign admits this Service"
			if len(refusals) > 0 {
				msg += " (" + strings.Join(refusals, "; ") + ")"
			}
			return nil, errorf(ReasonNoPool, "", "%s; create an IPPool for namespace %s or set keeplb.io/pool", msg, req.Namespace)
		}
		sort.Slice(candidates, func(i, j int) bool {
			if candidates[i].Priority != candidates[j].Priority {
				return candidates[i].Priority > candidates[j].Priority
			}
			return candidates[i].Name < candidates[j].Name
		})
	}

	fams := wanted(req)
	// Every family from one pool: the first pool that can serve them all.
	for _, ps := range candidates {
		if ps.hasFree(fams) {
			return takeAll(ps, fams), nil
		}
	}
	hasFamilies := func(fs []Family) bool {
		for _, ps := range candidates {
			if ps.hasFamilies(fs) {
				return true
			}
		}
		return false
	}
	field := ""
	if req.Pool != "" {
		field = v1alpha1.AnnotationPool
	}
	if req.Policy == PreferDualStack && len(fams) > 1 {
		for _, f := range fams {
			for _, ps := range candidates {
				if ps.hasFree([]Family{f}) {
					return takeAll(ps, []Family{f}), nil
				}
			}
		}
		fams = fams[:1]
	}
	if !hasFamilies(fams) {
		if len(fams) > 1 {
			return nil, errorf(ReasonFamily, field, "the Service requires dual-stack but no admissible IPPool has both IPv4 and IPv6 addresses; add both families to one pool or use ipFamilyPolicy PreferDualStack")
		}
		return nil, errorf(ReasonFamily, field, "no admissible IPPool has %s addresses; add some or change spec.ipFamilies", fams[0])
	}
	names := make([]string, 0, len(candidates))
	for _, ps := range candidates {
		if ps.hasFamilies(fams) {
			names = append(names, ps.Name)
		}
	}
	return nil, errorf(ReasonExhausted, field, "IPPool %s has no free %s address; add addresses to the pool or delete an unused LoadBalancer Service (the Service is retried when one is freed)", strings.Join(names, ", "), famList(fams))
}

func famList(fs []Family) string {
	s := make([]string, len(fs))
	for i, f := range fs {
		s[i] = f.String()
	}
	return strings.Join(s, "+")
}

func (ps *poolState) hasFree(fams []Family) bool {
	for _, f := range fams {
		if ps.free[f].empty() {
			return false
		}
	}
	return true
}

func (ps *poolState) hasFamilies(fams []Family) bool {
	for _, f := range fams {
		if len(ps.effective[f]) == 0 {
			return false
		}
	}
	return true
}

func takeAll(ps *poolState, fams []Family) []planned {
	plan := make([]planned, len(fams))
	for i, f := range fams {
		plan[i] = planned{take: ps, fam: f}
	}
	return plan
}

// commit carries out a plan: takes new addresses, records owners, and
// releases what the Service had and no longer uses.
func (a *Allocator) commit(req *Request, prev *svcState, plan []planned) Allocation {
	alloc := Allocation{}
	for i, p := range plan {
		addr := p.addr
		if p.take != nil {
			addr, _ = p.take.free[p.fam].takeFrom(p.take.cursor[p.fam])
			p.take.cursor[p.fam] = addr.Next()
		}
		st := a.record(req, addr)
		if i == 0 {
			alloc.Pool = st.pool
		}
		alloc.Addrs = append(alloc.Addrs, addr)
	}
	if prev != nil {
		for _, addr := range prev.alloc.Addrs {
			if !slices.Contains(alloc.Addrs, addr) {
				a.drop(req.Key, addr)
			}
		}
	}
	a.services[req.Key] = &svcState{req: *req, alloc: alloc}
	return Allocation{Pool: alloc.Pool, Addrs: slices.Clone(alloc.Addrs)}
}

// record makes req.Key an owner of addr, taking it out of its pool's free
// set if it was free.
func (a *Allocator) record(req *Request, addr netip.Addr) *addrState {
	st := a.addrs[addr]
	if st == nil {
		st = &addrState{}
		if ps := a.lookup(addr); ps != nil {
			st.pool, st.inRange = ps.Name, true
			ps.free[FamilyOf(addr)].remove(addr)
		}
		a.addrs[addr] = st
	}
	if !slices.Contains(st.owners, req.Key) {
		st.owners = append(st.owners, req.Key)
	}
	if onlyOwner(st, req.Key) {
		key := ""
		if req.ShareKey != "" {
			key = req.Namespace + "/" + req.ShareKey
		}
		a.setShareKey(addr, st, key)
	}
	return st
}

// listedBy returns the Services other than key whose status lists addr and
// that do not own it.
func (a *Allocator) listedBy(addr netip.Addr, key string) []string {
	var out []string
	for _, k := range a.refs[addr] {
		if k != key && (a.addrs[addr] == nil || !slices.Contains(a.addrs[addr].owners, k)) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// drop removes key from addr's owners and frees addr when none is left.
func (a *Allocator) drop(key string, addr netip.Addr) bool {
	st := a.addrs[addr]
	if st == nil {
		return false
	}
	st.owners = slices.DeleteFunc(st.owners, func(o string) bool { return o == key })
	if len(st.owners) > 0 {
		return false
	}
	delete(a.addrs, addr)
	a.setShareKey(addr, st, "")
	return a.putBack(addr)
}

// putBack returns addr to its pool's free set when no Service owns it and
// no Service's status lists it, and reports whether it did.
func (a *Allocator) putBack(addr netip.Addr) bool {
	if a.addrs[addr] != nil || len(a.refs[addr]) > 0 {
		return false
	}
	if ps := a.lookup(addr); ps != nil {
		return ps.free[FamilyOf(addr)].add(addr)
	}
	return false
}

// owns reports whether key is one of the owners of an address.
func owns(st *addrState, key string) bool {
	return st != nil && slices.Contains(st.owners, key)
}

func onlyOwner(st *addrState, key string) bool {
	return len(st.owners) == 0 || len(st.owners) == 1 && st.owners[0] == key
}

// String describes an allocation for events: "192.0.2.1, 2001:db8::1 from IPPool a".
func (al Allocation) String() string {
	s := make([]string, len(al.Addrs))
	for i, a := range al.Addrs {
		s[i] = a.String()
	}
	if al.Pool == "" {
		return strings.Join(s, ", ") + " (unmanaged)"
	}
	return fmt.Sprintf("%s from IPPool %s", strings.Join(s, ", "), al.Pool)
}

// unmanagedAllowed reports whether ip, in no pool, may be named.
func (a *Allocator) unmanagedAllowed(ip netip.Addr) bool {
	return slices.ContainsFunc(a.unmanaged, func(p netip.Prefix) bool { return p.Contains(ip) })
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
