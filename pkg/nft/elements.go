package nft

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// Elements are what keeplb's table holds beyond its structure, which is
// the same for every Rules: the elements of its sets. Compute makes them
// from Rules; Write rewrites the table whole to hold them, Update changes
// only the elements in which two Elements differ. A caller keeps the
// Elements it last wrote, rather than the script's text, to know what the
// table holds.
//
// Every entry is validated, its addresses unmapped (an IPv4-mapped IPv6
// address is its IPv4 address, as nft would read it), and each list is
// sorted without duplicates. netip.Addr.Compare puts IPv4 before IPv6, so
// each list is its IPv4 elements then its IPv6 ones. The zero value holds
// nothing. Elements are not changed once made: Compute copies what it is
// given, so the caller's Rules may change afterwards, except the real
// server lists of Rules.SNAT, which it keeps (see SNAT.Reals): a caller
// replaces such a list, never changes it.
//
// The masquerading is kept by virtual server (SNAT), sorted by virtual
// server, each real server list sorted and non-empty; nsnat counts the
// real servers. Elements share those real server lists with the Rules
// they came from and with each other (KeepSNAT), so that the lists a sync
// left alone cost neither a copy nor, in Update, a comparison.
type Elements struct {
	snat     []SNAT
	nsnat    int
	filtered []ipvs.Key
	allowed  []allowed
	vips     []netip.Addr
	ports    []ipvs.Key
	echo     []netip.Addr
	// The sync guard's: ports sorted without 0, peers as the guard's VIPs.
	syncPorts []uint16
	syncPeers []netip.Addr
	// whole are Rules.Whole, sorted; in the snat-vip-whole sets with
	// followVIP only.
	whole []ipvs.Key
	// followVIP puts snat in the snat-vip sets, and vips in the transit
	// sets too (Rules.FollowVIP).
	followVIP bool
}

// allowed is one source range of a filtered virtual server.
type allowed struct {
	virtual ipvs.Key
	source  netip.Prefix
}

func compareSNAT(a, b SNAT) int { return a.Virtual.Compare(b.Virtual) }

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func compareAllowed(a, b allowed) int {
	return cmp.Or(a.virtual.Compare(b.virtual), comparePrefix(a.source, b.source))
}

// SNATs returns how many real servers e masquerades, for logs.
func (e *Elements) SNATs() int {
	if e == nil {
		return 0
	}
	return e.nsnat
}

// FollowedVIPs returns the VIPs whose masquerade e has follow the VIP
// (Rules.FollowVIP): every VIP of the guard with it, none without. Their
// flows' conntrack entries are what a node leaving them must delete.
func (e *Elements) FollowedVIPs() []netip.Addr {
	if e == nil {
		return nil
	}
	return e.transit()
}

// KeepSNAT returns e with the masquerading of keep added to its own: the
// table a sync writes before IPVS changes, which must still masquerade the
// real servers IPVS forwards to until IPVS has let go of them. e and keep
// are left as they are.
func (e *Elements) KeepSNAT(keep *Elements) *Elements {
	if keep == nil || len(keep.snat) == 0 {
		return e
	}
	out := *e
	out.snat, out.nsnat = unionSNAT(e.snat, keep.snat)
	out.whole = union(e.whole, keep.whole, ipvs.Key.Compare)
	return &out
}

// unionSNAT merges two lists of masquerading into a new one, and counts
// its real servers. A virtual server's real servers are shared, not
// copied, where only one list has it or both have the same.
func unionSNAT(a, b []SNAT) ([]SNAT, int) {
	out := make([]SNAT, 0, max(len(a), len(b)))
	n := 0
	for len(a) > 0 && len(b) > 0 {
		var s SNAT
		switch c := compareSNAT(a[0], b[0]); {
		case c < 0:
			s, a = a[0], a[1:]
		case c > 0:
			s, b = b[0], b[1:]
		default:
			s = a[0]
			if !sameReals(a[0].Reals, b[0].Reals) {
				s.Reals = union(a[0].Reals, b[0].Reals, netip.AddrPort.Compare)
			}
			a, b = a[1:], b[1:]
		}
		out = append(out, s)
		n += len(s.Reals)
	}
	for _, s := range slices.Concat(a, b) {
		out = append(out, s)
		n += len(s.Reals)
	}
	return out, n
}

// sameReals reports whether a and b hold the same real servers; at once
// when they are the same slice, the usual case for a virtual server a
// sync left alone.
func sameReals(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 || &a[0] == &b[0] {
		return true
	}
	return slices.Equal(a, b)
}

// diffSNAT calls gone with each real server of from missing from to,
// and added with each of to missing from from.
func diffSNAT(from, to []SNAT, gone, added func(ipvs.Key, netip.AddrPort)) {
	each := func(s SNAT, f func(ipvs.Key, netip.AddrPort)) {
		for _, r := range s.Reals {
			f(s.Virtual, r)
		}
	}
	for len(from) > 0 && len(to) > 0 {
		switch c := compareSNAT(from[0], to[0]); {
		case c < 0:
			each(from[0], gone)
			from = from[1:]
		case c > 0:
			each(to[0], added)
			to = to[1:]
		default:
			if v := to[0].Virtual; !sameReals(from[0].Reals, to[0].Reals) {
				diff(from[0].Reals, to[0].Reals, netip.AddrPort.Compare,
					func(r netip.AddrPort) { gone(v, r) }, func(r netip.AddrPort) { added(v, r) })
			}
			from, to = from[1:], to[1:]
		}
	}
	for _, s := range from {
		each(s, gone)
	}
	for _, s := range to {
		each(s, added)
	}
}

// union merges two sorted lists without duplicates into a new one.
func union[T any](a, b []T, compare func(T, T) int) []T {
	out := make([]T, 0, max(len(a), len(b)))
	for len(a) > 0 && len(b) > 0 {
		switch c := compare(a[0], b[0]); {
		case c < 0:
			out, a = append(out, a[0]), a[1:]
		case c > 0:
			out, b = append(out, b[0]), b[1:]
		default:
			out, a, b = append(out, a[0]), a[1:], b[1:]
		}
	}
	return append(append(out, a...), b...)
}

// diff calls gone with each element of from missing from to, and added
// with each of to missing from from; both lists sorted by compare,
// without duplicates.
func diff[T any](from, to []T, compare func(T, T) int, gone, added func(T)) {
	for len(from) > 0 && len(to) > 0 {
		switch c := compare(from[0], to[0]); {
		case c < 0:
			gone(from[0])
			from = from[1:]
		case c > 0:
			added(to[0])
			to = to[1:]
		default:
			from, to = from[1:], to[1:]
		}
	}
	for _, v := range from {
		gone(v)
	}
	for _, v := range to {
		added(v)
	}
}

// sortCompact sorts s and removes duplicates, in one pass when s is
// sorted without duplicates already, the usual case: the dataplane's
// lists come sorted.
func sortCompact[T any](s []T, compare func(T, T) int) []T {
	for i := 1; i < len(s); i++ {
		if compare(s[i-1], s[i]) >= 0 {
			slices.SortFunc(s, compare)
			return slices.CompactFunc(s, func(a, b T) bool { return compare(a, b) == 0 })
		}
	}
	return s
}

// Update adds to tx the element operations that bring keeplb's table from
// holding from to holding to, and returns how many; none when they hold
// the same. The deletes come first, so that a source range replaced by
// one that contains it (an interval set rejects overlapping elements) is
// gone before its successor arrives.
//
// tx is right only if the table holds from exactly. nft fails the whole
// transaction, changing nothing, when it deletes an element the table
// lacks or adds one to a set that is gone (someone flushed or deleted
// the table), so such a table is never left half-written; the caller
// must then take the table's state as unknown and rewrite it whole. Some
// changes go unseen (an element someone deleted that to still holds
// stays missing): only a whole rewrite heals every change made behind
// keeplb's back. Update uses no "destroy": nft 1.0.6 (Debian 12) lacks
// it, and a delete that fails is how a table not as written shows.
func Update(tx *knftables.Transaction, from, to *Elements) int {
	if from == nil {
		from = &Elements{}
	}
	if to == nil {
		to = &Elements{}
	}
	n := 0
	var adds []*knftables.Element
	op := func(set string, key []string) *knftables.Element {
		n++
		return &knftables.Element{Family: Family, Table: Table, Set: set, Key: key}
	}
	del := func(set string, key []string) { tx.Delete(op(set, key)) }
	add := func(set string, key []string) { adds = append(adds, op(set, key)) }
	if from.followVIP == to.followVIP {
		diffSNAT(from.snat, to.snat, func(v ipvs.Key, r netip.AddrPort) { del(from.snatKey(v, r)) }, func(v ipvs.Key, r netip.AddrPort) { add(to.snatKey(v, r)) })
	} else {
		// Every real server changes set: out of one, into the other.
		diffSNAT(from.snat, nil, func(v ipvs.Key, r netip.AddrPort) { del(from.snatKey(v, r)) }, nil)
		diffSNAT(nil, to.snat, nil, func(v ipvs.Key, r netip.AddrPort) { add(to.snatKey(v, r)) })
	}
	diff(from.followedWhole(), to.followedWhole(), ipvs.Key.Compare, func(k ipvs.Key) { del(wholeKey(k)) }, func(k ipvs.Key) { add(wholeKey(k)) })
	diff(from.transit(), to.transit(), netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.transitSet)) }, func(a netip.Addr) { add(addrKey(a, family.transitSet)) })
	diff(from.filtered, to.filtered, ipvs.Key.Compare, func(k ipvs.Key) { del(filteredKey(k)) }, func(k ipvs.Key) { add(filteredKey(k)) })
	diff(from.allowed, to.allowed, compareAllowed, func(a allowed) { del(allowedKey(a)) }, func(a allowed) { add(allowedKey(a)) })
	diff(from.vips, to.vips, netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.vipsSet)) }, func(a netip.Addr) { add(addrKey(a, family.vipsSet)) })
	diff(from.ports, to.ports, ipvs.Key.Compare, func(k ipvs.Key) { del(portsKey(k)) }, func(k ipvs.Key) { add(portsKey(k)) })
	diff(from.echo, to.echo, netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.echoSet)) }, func(a netip.Addr) { add(addrKey(a, family.echoSet)) })
	diff(from.syncPeers, to.syncPeers, netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.syncPeersSet)) }, func(a netip.Addr) { add(addrKey(a, family.syncPeersSet)) })
	diff(from.syncPorts, to.syncPorts, cmp.Compare[uint16], func(p uint16) { del(syncPortKey(p)) }, func(p uint16) { add(syncPortKey(p)) })
	for _, e := range adds {
		tx.Add(e)
	}
	return n
}

// addElements adds every element of e to tx.
func addElements(tx *knftables.Transaction, e *Elements) {
	eachElement(e, func(set string, key []string) {
		tx.Add(&knftables.Element{Family: Family, Table: Table, Set: set, Key: key})
	})
}

// eachElement calls add with every element of e, by family then set, in
// the order a whole write has always used: the one walk of a whole write,
// built as a transaction (addElements) or streamed (writeElements).
func eachElement(e *Elements, add func(set string, key []string)) {
	for _, f := range families() {
		for _, s := range ofFamily(e.snat, f, func(s SNAT) netip.Addr { return s.Virtual.Address }) {
			for _, r := range s.Reals {
				add(e.snatKey(s.Virtual, r))
			}
		}
		for _, k := range ofFamily(e.filtered, f, func(k ipvs.Key) netip.Addr { return k.Address }) {
			add(filteredKey(k))
		}
		for _, a := range ofFamily(e.allowed, f, func(a allowed) netip.Addr { return a.virtual.Address }) {
			add(allowedKey(a))
		}
		for _, a := range ofFamily(e.vips, f, func(a netip.Addr) netip.Addr { return a }) {
			add(addrKey(a, family.vipsSet))
		}
		for _, k := range ofFamily(e.ports, f, func(k ipvs.Key) netip.Addr { return k.Address }) {
			add(portsKey(k))
		}
		for _, a := range ofFamily(e.echo, f, func(a netip.Addr) netip.Addr { return a }) {
			add(addrKey(a, family.echoSet))
		}
		for _, a := range ofFamily(e.syncPeers, f, func(a netip.Addr) netip.Addr { return a }) {
			add(addrKey(a, family.syncPeersSet))
		}
		for _, a := range ofFamily(e.transit(), f, func(a netip.Addr) netip.Addr { return a }) {
			add(addrKey(a, family.transitSet))
		}
		for _, k := range ofFamily(e.followedWhole(), f, func(k ipvs.Key) netip.Addr { return k.Address }) {
			add(wholeKey(k))
		}
	}
	for _, p := range e.syncPorts {
		add(syncPortKey(p))
	}
}

// ofFamily returns the IPv4 or the IPv6 part of a sorted list.
func ofFamily[T any](s []T, f family, addr func(T) netip.Addr) []T {
	i := slices.IndexFunc(s, func(v T) bool { return addr(v).Is6() })
	if i < 0 {
		i = len(s)
	}
	if f.v6 {
		return s[i:]
	}
	return s[:i]
}

func familyOf(a netip.Addr) family { return families()[familyIndex(a)] }

// The element keys. Every address in them is a validated netip.Addr or
// netip.Prefix without a zone, so the key text is digits, dots, colons
// and a slash: nothing nft could read as syntax.

func virtualKey(k ipvs.Key) []string {
	return []string{k.Address.String(), nftProtocol(k.Protocol), port(k.Port)}
}

// snatKey is the element of a masqueraded real server, in the set that
// e's FollowVIP says.
func (e *Elements) snatKey(v ipvs.Key, r netip.AddrPort) (string, []string) {
	set := familyOf(v.Address).snatSet()
	if e.followVIP {
		set = familyOf(v.Address).snatVIPSet()
	}
	return set, append(virtualKey(v), r.Addr().String(), port(r.Port()))
}

// transit returns the VIPs whose routed flows go to the transit conntrack
// zone: every VIP with FollowVIP, none without.
func (e *Elements) transit() []netip.Addr {
	if !e.followVIP {
		return nil
	}
	return e.vips
}

// followedWhole returns the virtual servers whose flows to any real
// server are masqueraded to the VIP: Rules.Whole with FollowVIP, none
// without.
func (e *Elements) followedWhole() []ipvs.Key {
	if !e.followVIP {
		return nil
	}
	return e.whole
}

func wholeKey(k ipvs.Key) (string, []string) {
	return familyOf(k.Address).snatWholeSet(), virtualKey(k)
}

func filteredKey(k ipvs.Key) (string, []string) {
	return familyOf(k.Address).filteredSet(), virtualKey(k)
}

func allowedKey(a allowed) (string, []string) {
	return familyOf(a.virtual.Address).allowedSet(), append(virtualKey(a.virtual), a.source.String())
}

func portsKey(k ipvs.Key) (string, []string) {
	return familyOf(k.Address).portsSet(), virtualKey(k)
}

func addrKey(a netip.Addr, set func(family) string) (string, []string) {
	return set(familyOf(a)), []string{a.String()}
}

func syncPortKey(p uint16) (string, []string) { return syncPortsSet, []string{port(p)} }

// Compute validates in and returns its set elements, and an error naming
// the entries it left out (see Transaction).
func Compute(in Rules) (*Elements, error) {
	var e Elements
	var errs []error

	errs = e.masquerade(in.SNAT, errs)

	for _, k := range slices.SortedFunc(maps.Keys(in.SourceRanges), ipvs.Key.Compare) {
		vip, err := virtual(k)
		if err != nil {
			errs = append(errs, fmt.Errorf("source ranges of %s: %w", k, err))
			continue
		}
		ranges, err := outermost(in.SourceRanges[k], vip.Address.Is6())
		if err != nil {
			// Filtered with the valid ranges only: closed to the
			// clients of the invalid one, never opened.
			errs = append(errs, fmt.Errorf("source ranges of %s: %w", k, err))
		}
		e.filtered = append(e.filtered, vip)
		for _, p := range ranges {
			e.allowed = append(e.allowed, allowed{virtual: vip, source: p})
		}
	}
	e.filtered = sortCompact(e.filtered, ipvs.Key.Compare)
	e.allowed = sortCompact(e.allowed, compareAllowed)

	for _, k := range in.Whole {
		vip, err := virtual(k)
		if err != nil {
			errs = append(errs, fmt.Errorf("whole masquerade of %s: %w", k, err))
			continue
		}
		e.whole = append(e.whole, vip)
	}
	e.whole = sortCompact(e.whole, ipvs.Key.Compare)

	errs = append(errs, e.guard(in.Guard)...)
	errs = append(errs, e.sync(in.Sync)...)
	e.followVIP = in.FollowVIP
	return &e, errors.Join(errs...)
}

// sync sets the sync guard's elements of e from g and returns errors
// naming what it left out. A peer left out is a node whose messages are
// dropped, never one admitted.
func (e *Elements) sync(g SyncGuard) []error {
	var errs []error
	for _, p := range sortCompact(slices.Clone(g.Ports), cmp.Compare[uint16]) {
		if p == 0 {
			errs = append(errs, errors.New("sync guard: port 0"))
			continue
		}
		e.syncPorts = append(e.syncPorts, p)
	}
	for _, a := range g.Peers {
		a = a.Unmap()
		switch {
		case !a.IsValid():
			errs = append(errs, errors.New("sync guard: invalid peer address"))
			continue
		case a.Zone() != "":
			errs = append(errs, fmt.Errorf("sync guard: peer %s with a zone", a))
			continue
		}
		e.syncPeers = append(e.syncPeers, a)
	}
	e.syncPeers = sortCompact(e.syncPeers, netip.Addr.Compare)
	return errs
}

// masquerade sets the masquerading of e from in, and returns errs with
// errors naming the entries left out. The real server lists of in are
// kept, not copied, when they are valid, unmapped and sorted.
func (e *Elements) masquerade(in []SNAT, errs []error) []error {
	// Sorted before validating, so that the errors come in a stable order
	// and a virtual server given twice is named once. Stable, so that its
	// lists merge in the order given.
	runs := slices.Clone(in)
	if !slices.IsSortedFunc(runs, compareSNAT) {
		slices.SortStableFunc(runs, compareSNAT)
	}
	e.snat = runs[:0] // in place: each entry is written after it is read
	unmapped := false
	for i := 0; i < len(runs); {
		v, reals := runs[i].Virtual, runs[i].Reals
		for i++; i < len(runs) && runs[i].Virtual == v; i++ {
			reals = slices.Concat(reals, runs[i].Reals)
		}
		vip, err := virtual(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("SNAT %s: %w", v, err))
			continue
		}
		reals, errs = validReals(vip, reals, errs)
		if len(reals) == 0 {
			continue
		}
		unmapped = unmapped || vip != v
		e.snat = append(e.snat, SNAT{Virtual: vip, Reals: reals})
	}
	if unmapped { // which may have reordered or merged virtual servers
		slices.SortStableFunc(e.snat, compareSNAT)
		merged := e.snat[:0]
		for _, s := range e.snat {
			if n := len(merged); n > 0 && merged[n-1].Virtual == s.Virtual {
				merged[n-1].Reals = union(merged[n-1].Reals, s.Reals, netip.AddrPort.Compare)
				continue
			}
			merged = append(merged, s)
		}
		e.snat = merged
	}
	for _, s := range e.snat {
		e.nsnat += len(s.Reals)
	}
	return errs
}

// validReals returns the real servers of the virtual server vip that nft
// can express, unmapped, sorted and without duplicates: reals itself
// when they are all that already, else a copy; and errs with an error for
// each one left out.
func validReals(vip ipvs.Key, reals []netip.AddrPort, errs []error) ([]netip.AddrPort, []error) {
	ok := func(r netip.AddrPort) error {
		a := r.Addr()
		switch {
		case !a.IsValid():
			return errors.New("invalid real server address")
		case a.Zone() != "":
			return errors.New("real server address with a zone")
		case a.Unmap().Is6() != vip.Address.Is6():
			return errors.New("real server and VIP are of different address families")
		case r.Port() == 0:
			return errors.New("real server port 0")
		}
		return nil
	}
	clean := true
	for i, r := range reals {
		if ok(r) != nil || r.Addr().Is4In6() || (i > 0 && reals[i-1].Compare(r) >= 0) {
			clean = false
			break
		}
	}
	if clean {
		return reals, errs
	}
	out := make([]netip.AddrPort, 0, len(reals))
	for _, r := range reals {
		if err := ok(r); err != nil {
			errs = append(errs, fmt.Errorf("SNAT %s -> %s: %w", vip, r, err))
			continue
		}
		out = append(out, netip.AddrPortFrom(r.Addr().Unmap(), r.Port()))
	}
	return sortCompact(out, netip.AddrPort.Compare), errs
}

// guard sets the guard's elements of e and returns errors naming the
// entries left out. A VIP left out is not guarded (its address is
// invalid, so no node holds it); a port left out is dropped by the guard.
func (e *Elements) guard(g Guard) []error {
	var errs []error
	addrs := func(what string, as []netip.Addr) []netip.Addr {
		as = sortCompact(slices.Clone(as), netip.Addr.Compare)
		out := as[:0]
		for _, a := range as {
			a = a.Unmap()
			switch {
			case !a.IsValid():
				errs = append(errs, fmt.Errorf("guard: invalid %s", what))
				continue
			case a.Zone() != "":
				errs = append(errs, fmt.Errorf("guard: %s %s with a zone", what, a))
				continue
			}
			out = append(out, a)
		}
		return sortCompact(out, netip.Addr.Compare)
	}
	e.vips = addrs("VIP", g.VIPs)
	e.echo = addrs("echo VIP", g.Echo)
	ports := sortCompact(slices.Clone(g.Ports), ipvs.Key.Compare)
	e.ports = ports[:0]
	for _, k := range ports {
		vip, err := virtual(k)
		if err != nil {
			errs = append(errs, fmt.Errorf("guard: port %s: %w", k, err))
			continue
		}
		e.ports = append(e.ports, vip)
	}
	e.ports = sortCompact(e.ports, ipvs.Key.Compare)
	return errs
}

// virtual validates a virtual server and returns it with its address
// unmapped.
func virtual(k ipvs.Key) (ipvs.Key, error) {
	k.Address = k.Address.Unmap()
	switch {
	case !k.Address.IsValid():
		return k, errors.New("invalid VIP")
	case k.Address.Zone() != "":
		return k, errors.New("VIP with a zone")
	case k.Port == 0:
		return k, errors.New("port 0")
	case nftProtocol(k.Protocol) == "":
		return k, fmt.Errorf("unknown protocol %q", k.Protocol)
	}
	return k, nil
}

// nftProtocol returns an IPVS protocol's name in nft, "" for one the
// table cannot express.
func nftProtocol(p string) string {
	switch p {
	case ipvs.TCP:
		return "tcp"
	case ipvs.UDP:
		return "udp"
	case ipvs.SCTP:
		return "sctp"
	}
	return ""
}
