package dataplane

import (
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// Cache computes Desired across syncs and keeps the State it gave, so that
// a sync recomputes, and changes in that State, only what changed. A
// Service's part of the state depends only on the Service, its
// EndpointSlices, the Nodes, the pools and this node. Compute is given
// every object and finds the Services that changed by their
// resourceVersions; Update is told which Services changed and given only
// their objects, so that its cost grows with what changed, not with the
// number of Services. Either returns a Delta naming the virtual servers
// whose entries may differ from the previous State, for
// Reconciler.SyncDelta.
//
// The State returned shares its maps with the Cache: it is valid until
// the next call. Objects without a resourceVersion (built by hand, as in
// tests) are never reused by Compute. The zero Cache is ready; it is not
// safe for concurrent use.
type Cache struct {
	// global identifies the inputs every part depends on (see globalKey),
	// and c holds them, computed, for Update.
	global string
	c      *computer
	parts  map[string]*part
	// claims lists, for each virtual server, the Services whose parts
	// have it, oldest first: the first forwards it, the others are told
	// the port is taken (as the full computation merges them in order).
	claims map[ipvs.Key][]*part
	// contested are the virtual servers with more than one claimant, and
	// withProblems the parts with problems of their own: the problems
	// are theirs alone, so only they are visited.
	contested    map[ipvs.Key]bool
	withProblems map[*part]bool
	// kubeProxy counts the Services that leave each virtual server to
	// kube-proxy.
	kubeProxy map[ipvs.Key]int
	st        State
	reals     int
	gen       uint64
	// Hits and Misses count the Services reused and recomputed by the last
	// call.
	Hits, Misses int
}

// part is one Service's share of the desired state.
type part struct {
	key     string
	created time.Time
	fp      string
	entries []partEntry
	// kubeProxy are the virtual servers the Service leaves to kube-proxy.
	kubeProxy []ipvs.Key
	problems  []Problem
	guard     nft.Guard
}

type partEntry struct {
	entry ipvs.Entry
	port  string // the Service port's name, for a problem
	// ranges are the source ranges admitted, when filtered (see
	// computer.sourceRanges).
	ranges   []netip.Prefix
	filtered bool
	// The entry's real servers are masqueraded (State.SNAT), except
	// those in unmasqueraded, or none if noneMasqueraded. Kept this way
	// rather than as the SNAT entries themselves, which would hold every
	// real server a second time (8 MB at 100,000 of them).
	unmasqueraded   []ipvs.RealServer
	noneMasqueraded bool
}

// before orders parts as the full computation does: the older Service
// keeps a contested port.
func (p *part) before(o *part) bool {
	if c := p.created.Compare(o.created); c != 0 {
		return c < 0
	}
	return p.key < o.key
}

// Delta says how a State that a Cache gave differs from the one it gave
// before.
type Delta struct {
	// Full is set when anything may have changed: the Cache's first
	// State. (After the Nodes, the pools, this node or the class changed,
	// Virtuals names every virtual server of both States.) A caller may
	// set it to have Reconciler.SyncDelta read the whole table.
	Full bool
	// Virtuals are, unless Full, the virtual servers whose entry in
	// State.IPVS may have changed (added, changed or gone), sorted.
	Virtuals []ipvs.Key
	// NFT is set when State.SNAT, State.SourceRanges or State.Guard may
	// have changed (always when Full).
	NFT bool

	// cache and gen identify the State; gen-1 is the one it differs from.
	cache *Cache
	gen   uint64
}

// ServiceInputs are one Service's own inputs, for Cache.Update.
type ServiceInputs struct {
	// Service is nil when the Service is gone.
	Service *v1.Service
	// Slices are the EndpointSlices of the Service.
	Slices []*discoveryv1.EndpointSlice
}

// Desired is Compute without the Delta.
func (ca *Cache) Desired(in Inputs, node string) (State, []Problem) {
	st, problems, _ := ca.Compute(in, node)
	return st, problems
}

// Compute is the package's Desired, reusing the parts of Services whose
// inputs are unchanged since the last call (by resourceVersion), and
// recomputing every part when the Nodes, the pools, node or the class
// changed. It reads every object it is given.
func (ca *Cache) Compute(in Inputs, node string) (State, []Problem, Delta) {
	c := newComputer(in, node)
	g := globalKey(in, node)
	first := ca.c == nil
	t := newTouched()
	if g == "" || g != ca.global || first {
		// Every part is recomputed, and every virtual server of the
		// last State and of this one may have changed.
		for k := range ca.st.IPVS {
			t.virtuals[k] = true
		}
		t.guard, t.rngs = true, true
		ca.reset(c)
	}
	ca.global = g
	c.in.Services, c.in.Slices = nil, nil // not needed past here: let them go
	ca.c = c
	ca.Hits, ca.Misses = 0, 0
	seen := make(map[string]bool, len(in.Services))
	for _, svc := range in.Services {
		if !c.ours(svc) {
			continue
		}
		key := svc.Namespace + "/" + svc.Name
		seen[key] = true
		fp := c.fingerprint(svc)
		if p, ok := ca.parts[key]; ok && fp != "" && g != "" && p.fp == fp {
			ca.Hits++
			continue
		}
		ca.Misses++
		ca.replace(key, ca.newPart(svc, fp), t)
	}
	for key := range ca.parts {
		if !seen[key] {
			ca.replace(key, nil, t)
		}
	}
	return ca.finish(t, first)
}

// Update recomputes the Services in changed (keyed "namespace/name") from
// their own inputs alone, with the Nodes, pools, node and class of the
// last Compute, and leaves every other Service's part as it is. Its cost
// grows with the Services changed and the virtual servers they have, not
// with the number of Services. It returns false, having done nothing,
// when there was no Compute before: the caller computes in full.
// successors replace Inputs.Successors for the Services in changed. The
// others keep theirs: a VIP's successor changes only with the Nodes or
// the pools (the VRRP plan's base priorities are theirs), which Compute
// recomputes every part for.
func (ca *Cache) Update(changed map[string]ServiceInputs, successors map[netip.Addr]string) (State, []Problem, Delta, bool) {
	if ca.c == nil {
		return State{}, nil, Delta{}, false
	}
	c := ca.c
	c.in.Successors = successors
	c.slices = make(map[string][]*discoveryv1.EndpointSlice, len(changed))
	for key, si := range changed {
		c.slices[key] = si.Slices
	}
	ca.Hits, ca.Misses = 0, 0
	t := newTouched()
	for _, key := range slices.Sorted(maps.Keys(changed)) {
		svc := changed[key].Service
		if svc == nil || !c.ours(svc) || svc.Namespace+"/"+svc.Name != key {
			if _, ok := ca.parts[key]; ok {
				ca.replace(key, nil, t)
			}
			continue
		}
		ca.Misses++
		ca.replace(key, ca.newPart(svc, c.fingerprint(svc)), t)
	}
	c.slices = nil
	st, problems, d := ca.finish(t, false)
	return st, problems, d, true
}

// touched collects what one call changed.
type touched struct {
	virtuals    map[ipvs.Key]bool
	guard, rngs bool
}

func newTouched() *touched { return &touched{virtuals: map[ipvs.Key]bool{}} }

// reset forgets every part: c has new global inputs.
func (ca *Cache) reset(c *computer) {
	ca.parts = map[string]*part{}
	ca.claims = map[ipvs.Key][]*part{}
	ca.contested, ca.withProblems = map[ipvs.Key]bool{}, map[*part]bool{}
	ca.kubeProxy = map[ipvs.Key]int{}
	ca.reals = 0
	ca.st = State{
		IPVS:          ipvs.Table{},
		Owners:        map[ipvs.Key]string{},
		SourceRanges:  map[ipvs.Key][]netip.Prefix{},
		kubeProxy:     map[ipvs.Key]bool{},
		ranges:        c.st.ranges,
		NodeAddresses: c.st.NodeAddresses,
	}
}

// newPart computes svc's part with the Cache's computer.
func (ca *Cache) newPart(svc *v1.Service, fp string) *part {
	p := ca.c.part(svc)
	p.key, p.created, p.fp = svc.Namespace+"/"+svc.Name, svc.CreationTimestamp.Time, fp
	return &p
}

// replace puts p (nil: none) in place of key's part and brings the state's
// entries of the virtual servers either has up to date.
func (ca *Cache) replace(key string, p *part, t *touched) {
	old := ca.parts[key]
	if old != nil {
		for _, e := range old.entries {
			k := e.entry.Virtual.Key()
			ca.claims[k] = slices.DeleteFunc(ca.claims[k], func(q *part) bool { return q == old })
			t.virtuals[k] = true
		}
		for _, k := range old.kubeProxy {
			if ca.kubeProxy[k]--; ca.kubeProxy[k] == 0 {
				delete(ca.kubeProxy, k)
				delete(ca.st.kubeProxy, k)
			}
		}
		delete(ca.parts, key)
		delete(ca.withProblems, old)
	}
	if p != nil {
		for _, e := range p.entries {
			k := e.entry.Virtual.Key()
			cl := ca.claims[k]
			i, _ := slices.BinarySearchFunc(cl, p, func(a, b *part) int {
				if a.before(b) {
					return -1
				}
				return 1
			})
			ca.claims[k] = slices.Insert(cl, i, p)
			t.virtuals[k] = true
		}
		for _, k := range p.kubeProxy {
			ca.kubeProxy[k]++
			ca.st.kubeProxy[k] = true
		}
		ca.parts[key] = p
		if len(p.problems) > 0 {
			ca.withProblems[p] = true
		}
	}
	switch {
	case old == nil && p == nil:
	case old == nil || p == nil:
		t.guard, t.rngs = true, true
	default:
		t.guard = t.guard || !guardEqual(old.guard, p.guard)
		t.rngs = t.rngs || !rangesEqual(old.entries, p.entries)
	}
}

func guardEqual(a, b nft.Guard) bool {
	return slices.Equal(a.VIPs, b.VIPs) && slices.Equal(a.Ports, b.Ports) && slices.Equal(a.Echo, b.Echo)
}

func rangesEqual(a, b []partEntry) bool {
	return slices.EqualFunc(a, b, func(x, y partEntry) bool {
		return x.entry.Virtual.Key() == y.entry.Virtual.Key() && x.filtered == y.filtered && slices.Equal(x.ranges, y.ranges)
	})
}

// finish brings the state's entries of the touched virtual servers up to
// date (each goes to its oldest claimant), rebuilds the sorted lists that
// changed and returns the state, its problems and the Delta.
func (ca *Cache) finish(t *touched, full bool) (State, []Problem, Delta) {
	ca.gen++
	d := Delta{Full: full, cache: ca, gen: ca.gen}
	// A few virtual servers' masquerading is replaced in place; many are
	// rebuilt at once (inserting one run after another would move the
	// whole list each time).
	bulk := len(t.virtuals) > bulkSNAT
	snat := false
	for k := range t.virtuals {
		if !full {
			d.Virtuals = append(d.Virtuals, k)
		}
		winnerBefore := ca.st.Owners[k]
		if e, ok := ca.st.IPVS[k]; ok {
			ca.reals -= len(e.Reals)
		}
		cl := ca.claims[k]
		if len(cl) > 1 {
			ca.contested[k] = true
		} else {
			delete(ca.contested, k)
		}
		if len(cl) == 0 {
			delete(ca.claims, k)
			delete(ca.st.IPVS, k)
			delete(ca.st.Owners, k)
			delete(ca.st.SourceRanges, k)
			if !bulk {
				snat = ca.setSNAT(k, nil) || snat
			}
			continue
		}
		w := cl[0]
		if w.key != winnerBefore {
			t.rngs = true // another Service's filter now applies
		}
		if !bulk {
			snat = ca.setSNAT(k, w.snatOf(k)) || snat
		}
		e := w.entryOf(k)
		ca.st.IPVS[k] = e.entry
		ca.st.Owners[k] = w.key
		ca.reals += len(e.entry.Reals)
		if e.filtered {
			ca.st.SourceRanges[k] = e.ranges
		} else {
			delete(ca.st.SourceRanges, k)
		}
	}
	slices.SortFunc(d.Virtuals, ipvs.Key.Compare)
	if bulk {
		snat = ca.rebuildSNAT()
	}
	d.NFT = full || snat || t.guard || t.rngs
	if t.guard {
		ca.st.Guard = ca.guard()
	}
	return ca.st, ca.problems(), d
}

// entryOf returns p's entry of the virtual server k, which it has.
func (p *part) entryOf(k ipvs.Key) partEntry {
	for _, e := range p.entries {
		if e.entry.Virtual.Key() == k {
			return e
		}
	}
	panic("dataplane: part " + p.key + " has no virtual server " + k.String())
}

// snatOf returns p's masquerading of the virtual server k: its real
// servers, sorted, in a new slice (nft keeps it; see nft.SNAT).
func (p *part) snatOf(k ipvs.Key) []netip.AddrPort {
	e := p.entryOf(k)
	if e.noneMasqueraded {
		return nil
	}
	var out []netip.AddrPort
	for _, r := range e.entry.Reals {
		if !slices.Contains(e.unmasqueraded, r) {
			out = append(out, r.AddrPort())
		}
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return slices.Compact(out)
}

// bulkSNAT is how many virtual servers' masquerading finish replaces in
// place, at most.
const bulkSNAT = 64

// rebuildSNAT makes State.SNAT anew from every virtual server's winner,
// and reports whether it changed. A virtual server's real servers that
// did not change keep their slice, which nft then need not compare.
func (ca *Cache) rebuildSNAT() bool {
	keys := slices.SortedFunc(maps.Keys(ca.st.IPVS), ipvs.Key.Compare)
	out := make([]nft.SNAT, 0, len(keys))
	changed := false
	for _, k := range keys {
		reals := ca.claims[k][0].snatOf(k)
		old, found := ca.snatAt(k)
		switch {
		case found && slices.Equal(ca.st.SNAT[old].Reals, reals):
			reals = ca.st.SNAT[old].Reals
		case found || len(reals) > 0:
			changed = true
		}
		if len(reals) > 0 {
			out = append(out, nft.SNAT{Virtual: k, Reals: reals})
		}
	}
	if !changed && len(out) == len(ca.st.SNAT) {
		return false
	}
	ca.st.SNAT = out
	return true
}

// snatAt finds the virtual server k in State.SNAT, which is sorted: its
// index, or where it would go.
func (ca *Cache) snatAt(k ipvs.Key) (int, bool) {
	return slices.BinarySearchFunc(ca.st.SNAT, k, func(s nft.SNAT, k ipvs.Key) int { return s.Virtual.Compare(k) })
}

// setSNAT makes reals the masquerading of the virtual server k in
// State.SNAT, and reports whether it changed. State.SNAT is sorted by
// virtual server, so k's entry is found by a binary search and replaced
// in place: a change costs one slice of real servers, not a copy of all.
func (ca *Cache) setSNAT(k ipvs.Key, reals []netip.AddrPort) bool {
	i, found := ca.snatAt(k)
	switch {
	case found && len(reals) == 0:
		ca.st.SNAT = slices.Delete(ca.st.SNAT, i, i+1)
	case found:
		if slices.Equal(ca.st.SNAT[i].Reals, reals) {
			return false
		}
		ca.st.SNAT[i].Reals = reals
	case len(reals) > 0:
		ca.st.SNAT = slices.Insert(ca.st.SNAT, i, nft.SNAT{Virtual: k, Reals: reals})
	default:
		return false
	}
	return true
}

// guard returns every part's guard together.
func (ca *Cache) guard() nft.Guard {
	var g nft.Guard
	for _, p := range ca.parts {
		g.VIPs = append(g.VIPs, p.guard.VIPs...)
		g.Ports = append(g.Ports, p.guard.Ports...)
		g.Echo = append(g.Echo, p.guard.Echo...)
	}
	g.Sort()
	return g
}

// problems returns the problems of every Service, in Service order (oldest
// first): its part's, then a port another Service took first, as the full
// computation finds them. Only the Services with problems are visited.
func (ca *Cache) problems() []Problem {
	with := slices.Collect(maps.Keys(ca.withProblems))
	for k := range ca.contested {
		with = append(with, ca.claims[k][1:]...)
	}
	slices.SortFunc(with, func(a, b *part) int {
		switch {
		case a == b:
			return 0
		case a.before(b):
			return -1
		}
		return 1
	})
	with = slices.Compact(with)
	var out []Problem
	for _, p := range with {
		out = append(out, p.problems...)
		for _, e := range p.entries {
			k := e.entry.Virtual.Key()
			if w := ca.claims[k][0]; w != p {
				out = append(out, Problem{Service: p.key, Field: "spec.ports[" + e.port + "]",
					Message: k.String() + " is already forwarded for " + w.key + "; this port is not forwarded"})
			}
		}
	}
	return out
}

// RealServers returns the number of real servers in the State the last
// call gave.
func (ca *Cache) RealServers() int { return ca.reals }

// globalKey identifies what every part depends on: this node, the class
// rule, the Nodes and the pools. Empty when an object has no
// resourceVersion, which disables the cache.
func globalKey(in Inputs, node string) string {
	nodes, ok := versions(in.Nodes)
	if !ok {
		return ""
	}
	pools, ok := versions(in.Pools)
	if !ok {
		return ""
	}
	return strings.Join([]string{node, in.Class, strconv.FormatBool(in.DefaultClass), nodes, pools}, "\x00")
}

// versions lists objs as sorted name=resourceVersion pairs; false when
// one has no resourceVersion.
func versions[T metav1.Object](objs []T) (string, bool) {
	out := make([]string, 0, len(objs))
	for _, o := range objs {
		if o.GetResourceVersion() == "" {
			return "", false
		}
		out = append(out, o.GetName()+"="+o.GetResourceVersion())
	}
	slices.Sort(out)
	return strings.Join(out, ","), true
}

// fingerprint is the package's fingerprint of svc and its slices, with
// the successors of svc's VIPs (Inputs.Successors), which its part depends
// on too.
func (c *computer) fingerprint(svc *v1.Service) string {
	fp := fingerprint(svc, c.slices[svc.Namespace+"/"+svc.Name])
	if fp == "" || c.in.Successors == nil {
		return fp
	}
	var b strings.Builder
	b.WriteString(fp)
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(ing.IP); err == nil {
			b.WriteString("\x00" + c.in.Successors[a.Unmap()])
		}
	}
	return b.String()
}

// fingerprint identifies a Service's own inputs: it and its slices, by
// UID and resourceVersion. Empty when one has no resourceVersion.
func fingerprint(svc *v1.Service, ss []*discoveryv1.EndpointSlice) string {
	if svc.ResourceVersion == "" {
		return ""
	}
	ids := make([]string, 0, len(ss)+1)
	ids = append(ids, string(svc.UID)+"="+svc.ResourceVersion)
	for _, s := range ss {
		if s.ResourceVersion == "" {
			return ""
		}
		ids = append(ids, string(s.UID)+"/"+s.Name+"="+s.ResourceVersion)
	}
	slices.Sort(ids[1:])
	return strings.Join(ids, ",")
}
