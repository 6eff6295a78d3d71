package allocator

import (
	"fmt"
	"math/big"
	"net/netip"
	"sort"
	"strings"
)

// Range is an inclusive span of addresses of one family.
type Range struct {
	First, Last netip.Addr
}

// String formats r as "first-last", or a single address.
func (r Range) String() string {
	if r.First == r.Last {
		return r.First.String()
	}
	return r.First.String() + "-" + r.Last.String()
}

// Contains reports whether a lies in r.
func (r Range) Contains(a netip.Addr) bool {
	return a.BitLen() == r.First.BitLen() && r.First.Compare(a) <= 0 && a.Compare(r.Last) <= 0
}

// Size returns the number of addresses in r.
func (r Range) Size() *big.Int {
	f, l := r.First.As16(), r.Last.As16()
	n := new(big.Int).SetBytes(l[:])
	n.Sub(n, new(big.Int).SetBytes(f[:]))
	return n.Add(n, big.NewInt(1))
}

// ParseRange parses a pool address entry: a CIDR ("192.0.2.0/28") or an
// inclusive range ("192.0.2.10-192.0.2.20"). A CIDR must have no host bits
// set, so that a typo does not silently become a different network.
func ParseRange(s string) (Range, error) {
	s = strings.TrimSpace(s)
	if first, last, ok := strings.Cut(s, "-"); ok {
		a, err := netip.ParseAddr(strings.TrimSpace(first))
		if err != nil {
			return Range{}, fmt.Errorf("%q: start of range: %w", s, err)
		}
		b, err := netip.ParseAddr(strings.TrimSpace(last))
		if err != nil {
			return Range{}, fmt.Errorf("%q: end of range: %w", s, err)
		}
		a, b = a.Unmap(), b.Unmap()
		if a.Is4() != b.Is4() {
			return Range{}, fmt.Errorf("%q: range mixes IPv4 and IPv6", s)
		}
		if b.Less(a) {
			return Range{}, fmt.Errorf("%q: range starts after it ends", s)
		}
		return Range{a, b}, nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return Range{}, fmt.Errorf("%q is neither a CIDR nor a range first-last", s)
	}
	if p.Masked() != p {
		return Range{}, fmt.Errorf("%q has host bits set; did you mean %s?", s, p.Masked())
	}
	p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-(p.Addr().BitLen()-p.Addr().Unmap().BitLen()))
	return Range{p.Addr(), lastOf(p)}, nil
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

// rangeSet is a sorted list of disjoint, non-adjacent ranges of one family.
// Free addresses of a pool are kept this way, so that taking the next free
// address is a binary search and not a scan over what is already taken.
type rangeSet struct {
	spans []Range
}

// newRangeSet builds a set from possibly overlapping ranges.
func newRangeSet(rs []Range) *rangeSet {
	spans := append([]Range(nil), rs...)
	sort.Slice(spans, func(i, j int) bool { return spans[i].First.Less(spans[j].First) })
	out := spans[:0]
	for _, r := range spans {
		if n := len(out); n > 0 && touches(out[n-1], r) {
			if out[n-1].Last.Less(r.Last) {
				out[n-1].Last = r.Last
			}
			continue
		}
		out = append(out, r)
	}
	return &rangeSet{spans: out}
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

// contains reports whether a is in the set.
func (s *rangeSet) contains(a netip.Addr) bool {
	i := s.search(a)
	return i < len(s.spans) && s.spans[i].Contains(a)
}

// empty reports whether the set has no address.
func (s *rangeSet) empty() bool { return len(s.spans) == 0 }

// takeFrom removes and returns the first address at or after from, wrapping
// around to the lowest address when none is left after it.
func (s *rangeSet) takeFrom(from netip.Addr) (netip.Addr, bool) {
	if len(s.spans) == 0 {
		return netip.Addr{}, false
	}
	i := 0
	if from.IsValid() {
		i = s.search(from)
		if i == len(s.spans) {
			i = 0
		}
	}
	a := s.spans[i].First
	if from.IsValid() && s.spans[i].Contains(from) {
		a = from
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

// removeAt removes a, which lies in span i.
func (s *rangeSet) removeAt(i int, a netip.Addr) {
	sp := &s.spans[i]
	switch {
	case sp.First == a && sp.Last == a:
		if i == 0 {
			s.spans = s.spans[1:]
		} else {
			s.spans = append(s.spans[:i], s.spans[i+1:]...)
		}
	case sp.First == a:
		sp.First = a.Next()
	case sp.Last == a:
		sp.Last = a.Prev()
	default:
		right := Range{a.Next(), sp.Last}
		sp.Last = a.Prev()
		s.spans = append(s.spans, Range{})
		copy(s.spans[i+2:], s.spans[i+1:])
		s.spans[i+1] = right
	}
}

// add puts a back into the set, merging with its neighbours.
func (s *rangeSet) add(a netip.Addr) {
	i := s.search(a)
	if i < len(s.spans) && s.spans[i].Contains(a) {
		return
	}
	joinLeft := i > 0 && s.spans[i-1].Last.Next() == a
	joinRight := i < len(s.spans) && s.spans[i].First.Prev() == a
	switch {
	case joinLeft && joinRight:
		s.spans[i-1].Last = s.spans[i].Last
		s.spans = append(s.spans[:i], s.spans[i+1:]...)
	case joinLeft:
		s.spans[i-1].Last = a
	case joinRight:
		s.spans[i].First = a
	default:
		s.spans = append(s.spans, Range{})
		copy(s.spans[i+1:], s.spans[i:])
		s.spans[i] = Range{a, a}
	}
}

// subtract returns the parts of rs not covered by the set.
func (s *rangeSet) subtract(rs []Range) []Range {
	var out []Range
	for _, r := range rs {
		cur := r
		done := false
		for i := s.search(r.First); i < len(s.spans) && !done; i++ {
			sp := s.spans[i]
			if cur.Last.Less(sp.First) {
				break
			}
			if cur.First.Less(sp.First) {
				out = append(out, Range{cur.First, sp.First.Prev()})
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

// size returns the number of addresses in the set.
func (s *rangeSet) size() *big.Int {
	n := new(big.Int)
	for _, sp := range s.spans {
		n.Add(n, sp.Size())
	}
	return n
}

// withoutBuggy splits IPv4 ranges so that no address ending in .0 or .255
// remains; IPv6 ranges pass unchanged.
func withoutBuggy(rs []Range) []Range {
	var out []Range
	for _, r := range rs {
		if !r.First.Is4() {
			out = append(out, r)
			continue
		}
		lo, hi := v4(r.First), v4(r.Last)
		for block := lo &^ 0xff; ; block += 256 {
			s, e := max(lo, block+1), min(hi, block+254)
			if s <= e {
				out = append(out, Range{fromV4(s), fromV4(e)})
			}
			if block+255 >= hi {
				break
			}
		}
	}
	return out
}

func v4(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func fromV4(u uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)})
}
