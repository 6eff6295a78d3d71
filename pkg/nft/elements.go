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
// given, so the caller's Rules may change afterwards.
type Elements struct {
	snat     []SNAT
	filtered []ipvs.Key
	allowed  []allowed
	vips     []netip.Addr
	ports    []ipvs.Key
	echo     []netip.Addr
}

// allowed is one source range of a filtered virtual server.
type allowed struct {
	virtual ipvs.Key
	source  netip.Prefix
}

func compareSNAT(a, b SNAT) int {
	return cmp.Or(a.Virtual.Compare(b.Virtual), a.Real.Compare(b.Real))
}

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
	return len(e.snat)
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
	out.snat = union(e.snat, keep.snat, compareSNAT)
	return &out
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
	diff(from.snat, to.snat, compareSNAT, func(s SNAT) { del(snatKey(s)) }, func(s SNAT) { add(snatKey(s)) })
	diff(from.filtered, to.filtered, ipvs.Key.Compare, func(k ipvs.Key) { del(filteredKey(k)) }, func(k ipvs.Key) { add(filteredKey(k)) })
	diff(from.allowed, to.allowed, compareAllowed, func(a allowed) { del(allowedKey(a)) }, func(a allowed) { add(allowedKey(a)) })
	diff(from.vips, to.vips, netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.vipsSet)) }, func(a netip.Addr) { add(addrKey(a, family.vipsSet)) })
	diff(from.ports, to.ports, ipvs.Key.Compare, func(k ipvs.Key) { del(portsKey(k)) }, func(k ipvs.Key) { add(portsKey(k)) })
	diff(from.echo, to.echo, netip.Addr.Compare, func(a netip.Addr) { del(addrKey(a, family.echoSet)) }, func(a netip.Addr) { add(addrKey(a, family.echoSet)) })
	for _, e := range adds {
		tx.Add(e)
	}
	return n
}

// addElements adds every element of e to tx, by family then set, in the
// order a whole write has always used.
func addElements(tx *knftables.Transaction, e *Elements) {
	add := func(set string, key []string) {
		tx.Add(&knftables.Element{Family: Family, Table: Table, Set: set, Key: key})
	}
	for _, f := range families() {
		for _, s := range ofFamily(e.snat, f, func(s SNAT) netip.Addr { return s.Virtual.Address }) {
			add(snatKey(s))
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

func snatKey(s SNAT) (string, []string) {
	return familyOf(s.Virtual.Address).snatSet(), append(virtualKey(s.Virtual), s.Real.Addr().String(), port(s.Real.Port()))
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

// Compute validates in and returns its set elements, and an error naming
// the entries it left out (see Transaction).
func Compute(in Rules) (*Elements, error) {
	var e Elements
	var errs []error

	// Sorted before validating, so that the errors come in a stable order
	// and a duplicate is named once.
	snat := sortCompact(slices.Clone(in.SNAT), compareSNAT)
	e.snat = snat[:0] // in place: each entry is written after it is read
	unmapped := false
	for _, s := range snat {
		vip, err := virtual(s.Virtual)
		if err != nil {
			errs = append(errs, fmt.Errorf("SNAT %s: %w", s, err))
			continue
		}
		rip := s.Real.Addr().Unmap()
		switch {
		case !rip.IsValid():
			errs = append(errs, fmt.Errorf("SNAT %s: invalid real server address", s))
			continue
		case rip.Zone() != "":
			errs = append(errs, fmt.Errorf("SNAT %s: real server address with a zone", s))
			continue
		case rip.Is6() != vip.Address.Is6():
			errs = append(errs, fmt.Errorf("SNAT %s: real server and VIP are of different address families", s))
			continue
		case s.Real.Port() == 0:
			errs = append(errs, fmt.Errorf("SNAT %s: real server port 0", s))
			continue
		}
		unmapped = unmapped || vip.Address != s.Virtual.Address || rip != s.Real.Addr()
		e.snat = append(e.snat, SNAT{Virtual: vip, Real: netip.AddrPortFrom(rip, s.Real.Port())})
	}
	if unmapped { // which may have reordered or merged entries
		e.snat = sortCompact(e.snat, compareSNAT)
	}

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

	errs = append(errs, e.guard(in.Guard)...)
	return &e, errors.Join(errs...)
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
