package allocator

import (
	"fmt"
	"math/big"
	mbits "math/bits"
	"net/netip"
	"slices"
	"sort"
	"strings"
)

// Range is an inclusive span of addresses of one family. Build it with
// ParseRange: a Range never holds zoned or IPv4-mapped addresses.
type Range struct {
	First, Last netip.Addr
	// cidr records that the entry was written as a CIDR rather than
	// first-last: String then writes it back the same way, and the
	// allocator skips the subnet-router anycast address of an IPv6 CIDR
	// (see anycast) while it takes a first-last range literally.
	cidr bool
}

// String formats r as ParseRange reads it back: "192.0.2.0/28" for a CIDR,
// "192.0.2.10-192.0.2.20" otherwise (a single address too).
func (r Range) String() string {
	if r.cidr {
		return netip.PrefixFrom(r.First, r.bits()).String()
	}
	return r.First.String() + "-" + r.Last.String()
}

// bits returns the prefix length of a CIDR range.
func (r Range) bits() int {
	f, l := r.First.As16(), r.Last.As16()
	host := 0
	for i := 15; i >= 0; i-- {
		x := f[i] ^ l[i]
		if x == 0xff {
			host += 8
			continue
		}
		host += mbits.TrailingZeros8(^x)
		break
	}
	return r.First.BitLen() - host
}

// anycast returns the subnet-router anycast address of an IPv6 CIDR
// (RFC 4291 2.6.1: the network's all-zero host address, which every router
// of the subnet answers): its first address. A /127 has none (RFC 6164) and
// a /128 is a single host.
func (r Range) anycast() (netip.Addr, bool) {
	if !r.cidr || !r.First.Is6() || r.bits() > 126 {
		return netip.Addr{}, false
	}
	return r.First, true
}

// Contains reports whether a lies in r. A zoned address lies in no range
// (a pool's addresses belong to no one link), nor does an IPv4-mapped one
// (callers unmap it to IPv4 first).
func (r Range) Contains(a netip.Addr) bool {
	return a.Zone() == "" && a.BitLen() == r.First.BitLen() && r.First.Compare(a) <= 0 && a.Compare(r.Last) <= 0
}

// Size returns the number of addresses in r.
func (r Range) Size() *big.Int {
	f, l := r.First.As16(), r.Last.As16()
	n := new(big.Int).SetBytes(l[:])
	n.Sub(n, new(big.Int).SetBytes(f[:]))
	return n.Add(n, big.NewInt(1))
}

// The IPv4-mapped block ::ffff:0:0/96. Kubernetes and Go treat its
// addresses as IPv4, so an IPv6 pool must not contain them: the same
// address would be an IPv6 VIP here and an IPv4 one everywhere else.
var (
	mappedFirst = netip.MustParseAddr("::ffff:0:0")
	mappedLast  = netip.MustParseAddr("::ffff:ffff:ffff")
)

// ParseRange parses a pool address entry: a CIDR ("192.0.2.0/28") or an
// inclusive range ("192.0.2.10-192.0.2.20"). A CIDR must have no host bits
// set, so that a typo does not silently become a different network. An entry
// written entirely in IPv4-mapped form (::ffff:192.0.2.0/120) is the IPv4
// range it maps; zones, and IPv6 entries reaching into the IPv4-mapped block
// (::/80, say), are refused.
func ParseRange(s string) (Range, error) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "%") {
		return Range{}, fmt.Errorf("%q has a zone; a pool's addresses belong to no one link, write them without %%<zone>", s)
	}
	var r Range
	if first, last, ok := strings.Cut(s, "-"); ok {
		a, err := netip.ParseAddr(strings.TrimSpace(first))
		if err != nil {
			return Range{}, fmt.Errorf("%q: start of range: %w", s, err)
		}
		b, err := netip.ParseAddr(strings.TrimSpace(last))
		if err != nil {
			return Range{}, fmt.Errorf("%q: end of range: %w", s, err)
		}
		r = Range{First: a.Unmap(), Last: b.Unmap()}
		if r.First.Is4() != r.Last.Is4() {
			return Range{}, fmt.Errorf("%q: range mixes IPv4 and IPv6", s)
		}
		if r.Last.Less(r.First) {
			return Range{}, fmt.Errorf("%q: range starts after it ends", s)
		}
	} else {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return Range{}, fmt.Errorf("%q is neither a CIDR nor a range first-last", s)
		}
		if p.Masked() != p {
			return Range{}, fmt.Errorf("%q has host bits set; did you mean %s?", s, p.Masked())
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		r = Range{First: p.Addr(), Last: lastOf(p), cidr: true}
	}
	if r.First.Is6() && r.First.Compare(mappedLast) <= 0 && mappedFirst.Compare(r.Last) <= 0 {
		return Range{}, fmt.Errorf("%q reaches into ::ffff:0:0/96, the IPv4-mapped addresses, which Kubernetes treats as IPv4; write IPv4 addresses as IPv4 (192.0.2.0/24) and keep IPv6 entries out of ::ffff:0:0/96", s)
	}
	return r, nil
}

// lastOf returns the highest address of p.
func lastOf(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range b {
		hostBits := (i+1)*8 - bits
		switch {
		case hostBits >= 8:
			b[i] = 0xff
		case hostBits > 0:
			b[i] |= byte(1<<hostBits) - 1
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// rangeSet is a sorted list of disjoint ranges of one family. Free
// addresses of a pool are kept this way, so that taking the next free
// address is a binary search and not a scan over what is already taken.
//
// Some addresses of a span may be skipped: with avoidBuggy, the IPv4
// addresses ending in .0 and .255 stay inside the spans (a /8 is one span,
// not 65,536) and are passed over when taking and counting, so a pool costs
// the same memory whatever its size. A span is dropped as soon as it holds
// only skipped addresses, so every span has an address to take.
type rangeSet struct {
	spans []Range
	// avoidBuggy skips IPv4 addresses ending in .0 and .255.
	avoidBuggy bool
	// reserved are addresses never free however they are released: the
	// subnet-router anycast addresses of the pool's IPv6 CIDRs. They are
	// taken out of the spans when the set is built.
	reserved []netip.Addr
}

// newRangeSet builds a set from possibly overlapping ranges.
func newRangeSet(rs []Range, avoidBuggy bool) *rangeSet {
	spans := make([]Range, 0, len(rs))
	for _, r := range rs {
		spans = append(spans, Range{First: r.First, Last: r.Last})
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].First.Less(spans[j].First) })
	s := &rangeSet{avoidBuggy: avoidBuggy}
	for _, r := range spans {
		if n := len(s.spans); n > 0 && touches(s.spans[n-1], r) {
			if s.spans[n-1].Last.Less(r.Last) {
				s.spans[n-1].Last = r.Last
			}
			continue
		}
		s.spans = append(s.spans, r)
	}
	s.spans = slices.DeleteFunc(s.spans, func(r Range) bool { return !s.usable(r) })
	return s
}

// reserve takes a out of the set for good.
func (s *rangeSet) reserve(a netip.Addr) {
	s.remove(a)
	if !slices.Contains(s.reserved, a) {
		s.reserved = append(s.reserved, a)
	}
}

// skips reports whether a is never handed out from this set.
func (s *rangeSet) skips(a netip.Addr) bool {
	return s.avoidBuggy && isBuggy(a) || slices.Contains(s.reserved, a)
}

// firstUsable returns the lowest address of [a, b] that is not skipped.
// Reserved addresses are not in the spans, so only buggy ones are stepped
// over: at most two (x.255 and x+1.0).
func (s *rangeSet) firstUsable(a, b netip.Addr) (netip.Addr, bool) {
	if !s.avoidBuggy || !a.Is4() {
		return a, !b.Less(a)
	}
	u, hi := uint64(v4(a)), uint64(v4(b))
	for u <= hi && (u&0xff == 0 || u&0xff == 0xff) {
		u++
	}
	if u > hi {
		return netip.Addr{}, false
	}
	return fromV4(uint32(u)), true
}

// usable reports whether r has an address that is not skipped.
func (s *rangeSet) usable(r Range) bool {
	_, ok := s.firstUsable(r.First, r.Last)
	return ok
}

// touches reports whether b, which does not start before a, overlaps a or
// directly follows it.
func touches(a, b Range) bool {
	next := a.Last.Next()
	return !next.IsValid() || b.First.Compare(next) <= 0
}

// search returns the index of the first span whose Last is not below a.
func (s *rangeSet) search(a netip.Addr) int {
	return sort.Search(len(s.spans), func(i int) bool { return !s.spans[i].Last.Less(a) })
}

// contains reports whether a lies in a span; a skipped address may.
func (s *rangeSet) contains(a netip.Addr) bool {
	i := s.search(a)
	return i < len(s.spans) && s.spans[i].Contains(a)
}

// free reports whether a can be taken from the set.
func (s *rangeSet) free(a netip.Addr) bool {
	return s.contains(a) && !s.skips(a)
}

// empty reports whether the set has no address to take.
func (s *rangeSet) empty() bool { return len(s.spans) == 0 }

// takeFrom removes and returns the first address at or after from that is
// not skipped, wrapping around to the lowest when none is left after it.
func (s *rangeSet) takeFrom(from netip.Addr) (netip.Addr, bool) {
	if len(s.spans) == 0 {
		return netip.Addr{}, false
	}
	i, start := 0, s.spans[0].First
	if from.IsValid() {
		if i = s.search(from); i == len(s.spans) {
			i = 0
		}
		start = s.spans[i].First
		if s.spans[i].Contains(from) {
			start = from
		}
	}
	a, ok := s.firstUsable(start, s.spans[i].Last)
	if !ok {
		// Only skipped addresses follow from in its span; every span has
		// a usable address, so the next one (or the first) does.
		i = (i + 1) % len(s.spans)
		a, _ = s.firstUsable(s.spans[i].First, s.spans[i].Last)
	}
	s.removeAt(i, a)
	return a, true
}

// remove removes a from the set and reports whether it was there.
func (s *rangeSet) remove(a netip.Addr) bool {
	i := s.search(a)
	if i == len(s.spans) || !s.spans[i].Contains(a) {
		return false
	}
	s.removeAt(i, a)
	return true
}

// removeAt removes a, which lies in span i, and drops what is left of the
// span on either side when it holds only skipped addresses.
func (s *rangeSet) removeAt(i int, a netip.Addr) {
	sp := s.spans[i]
	var parts [2]Range
	keep := parts[:0]
	if sp.First != a {
		if left := (Range{First: sp.First, Last: a.Prev()}); s.usable(left) {
			keep = append(keep, left)
		}
	}
	if sp.Last != a {
		if right := (Range{First: a.Next(), Last: sp.Last}); s.usable(right) {
			keep = append(keep, right)
		}
	}
	if len(keep) == 0 && i == 0 {
		s.spans = s.spans[1:] // filling in order empties the front: no copy
		return
	}
	s.spans = slices.Replace(s.spans, i, i+1, keep...)
}

// add puts a back into the set, merging with its neighbours, and reports
// whether a is now free. A skipped address is never put back.
func (s *rangeSet) add(a netip.Addr) bool {
	if s.skips(a) {
		return false
	}
	i := s.search(a)
	if i < len(s.spans) && s.spans[i].Contains(a) {
		return true
	}
	joinLeft := i > 0 && s.spans[i-1].Last.Next() == a
	joinRight := i < len(s.spans) && s.spans[i].First.Prev() == a
	switch {
	case joinLeft && joinRight:
		s.spans[i-1].Last = s.spans[i].Last
		s.spans = slices.Delete(s.spans, i, i+1)
	case joinLeft:
		s.spans[i-1].Last = a
	case joinRight:
		s.spans[i].First = a
	default:
		s.spans = slices.Insert(s.spans, i, Range{First: a, Last: a})
	}
	return true
}

// subtract returns the parts of rs not covered by the set.
func (s *rangeSet) subtract(rs []Range) []Range {
	var out []Range
	for _, r := range rs {
		cur := Range{First: r.First, Last: r.Last}
		done := false
		for i := s.search(r.First); i < len(s.spans) && !done; i++ {
			sp := s.spans[i]
			if cur.Last.Less(sp.First) {
				break
			}
			if cur.First.Less(sp.First) {
				out = append(out, Range{First: cur.First, Last: sp.First.Prev()})
			}
			if !sp.Last.Less(cur.Last) {
				done = true
				break
			}
			cur.First = sp.Last.Next()
		}
		if !done {
			out = append(out, cur)
		}
	}
	return out
}

// size returns the number of addresses that can be taken from the set,
// counting the skipped ones out arithmetically.
func (s *rangeSet) size() *big.Int {
	n := new(big.Int)
	var buggy uint64
	for _, sp := range s.spans {
		n.Add(n, sp.Size())
		if s.avoidBuggy && sp.First.Is4() {
			lo, hi := v4(sp.First), v4(sp.Last)
			buggy += endingIn(lo, hi, 0) + endingIn(lo, hi, 0xff)
		}
	}
	return n.Sub(n, new(big.Int).SetUint64(buggy))
}

// endingIn counts the IPv4 addresses in [lo, hi] whose last byte is b.
func endingIn(lo, hi uint32, b uint32) uint64 {
	upTo := func(n int64) int64 { // how many in [0, n]
		if n < int64(b) {
			return 0
		}
		return (n-int64(b))/256 + 1
	}
	return uint64(upTo(int64(hi)) - upTo(int64(lo)-1))
}

// isBuggy reports whether a is an IPv4 address ending in .0 or .255.
func isBuggy(a netip.Addr) bool {
	if !a.Is4() {
		return false
	}
	b := a.As4()
	return b[3] == 0 || b[3] == 255
}

func v4(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func fromV4(u uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)})
}
