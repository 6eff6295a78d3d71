package allocator

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

func TestParseRange(t *testing.T) {
	tests := []struct {
		in          string
		first, last string
		err         string
	}{
		{in: "192.0.2.0/28", first: "192.0.2.0", last: "192.0.2.15"},
		{in: "192.0.2.7/32", first: "192.0.2.7", last: "192.0.2.7"},
		{in: "10.0.0.0/15", first: "10.0.0.0", last: "10.1.255.255"},
		{in: "2001:db8::/120", first: "2001:db8::", last: "2001:db8::ff"},
		{in: "2001:db8::/64", first: "2001:db8::", last: "2001:db8::ffff:ffff:ffff:ffff"},
		{in: " 192.0.2.10 - 192.0.2.20 ", first: "192.0.2.10", last: "192.0.2.20"},
		{in: "2001:db8::1-2001:db8::1:0", first: "2001:db8::1", last: "2001:db8::1:0"},
		{in: "192.0.2.5/24", err: "host bits set; did you mean 192.0.2.0/24"},
		{in: "192.0.2.0/33", err: "neither a CIDR nor a range"},
		{in: "foo", err: "neither a CIDR nor a range"},
		{in: "192.0.2.20-192.0.2.10", err: "starts after it ends"},
		{in: "192.0.2.1-2001:db8::1", err: "mixes IPv4 and IPv6"},
		{in: "192.0.2.1-x", err: "end of range"},
		// Written in IPv4-mapped form, an entry is the IPv4 range it maps.
		{in: "::ffff:192.0.2.0/120", first: "192.0.2.0", last: "192.0.2.255"},
		{in: "::ffff:0:0/96", first: "0.0.0.0", last: "255.255.255.255"},
		{in: "::ffff:192.0.2.1-::ffff:192.0.2.9", first: "192.0.2.1", last: "192.0.2.9"},
		{in: "::/96", first: "::", last: "::ffff:ffff"},
		// Regression: ::/80 was accepted as one IPv6 range holding all of
		// ::ffff:0:0/96, so an IPv6 pool handed out IPv4-mapped addresses.
		{in: "::/80", err: "reaches into ::ffff:0:0/96"},
		{in: "::fffe:0:0/95", err: "reaches into ::ffff:0:0/96"},
		{in: "::1-::1:0:0:0", err: "reaches into ::ffff:0:0/96"},
		{in: "::fffe:0:0-::ffff:192.0.2.1", err: "mixes IPv4 and IPv6"},
		// Regression: a zoned range bound was accepted with its zone.
		{in: "2001:db8::1%eth0-2001:db8::5", err: "has a zone"},
		{in: "2001:db8::1-2001:db8::5%eth0", err: "has a zone"},
		{in: "fe80::/64%eth0", err: "has a zone"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			r, err := ParseRange(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseRange(%q) error = %v, want it to contain %q", tc.in, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.First.String() != tc.first || r.Last.String() != tc.last {
				t.Fatalf("ParseRange(%q) = %s, want %s-%s", tc.in, r, tc.first, tc.last)
			}
			if back, err := ParseRange(r.String()); err != nil || back != r {
				t.Fatalf("ParseRange(%q) = %v, %v; want %v back from its String", r.String(), back, err, r)
			}
		})
	}
}

// TestRangeString checks that String writes an entry back the way it was
// written, so that it parses to the same range (a single address was
// written bare, which ParseRange refuses).
func TestRangeString(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.0/28":              "192.0.2.0/28",
		"192.0.2.7/32":              "192.0.2.7/32",
		"192.0.2.7-192.0.2.7":       "192.0.2.7-192.0.2.7",
		" 192.0.2.1 - 192.0.2.9":    "192.0.2.1-192.0.2.9",
		"2001:db8::/64":             "2001:db8::/64",
		"::ffff:192.0.2.0/120":      "192.0.2.0/24",
		"2001:db8::-2001:db8::ffff": "2001:db8::-2001:db8::ffff",
	} {
		r := mustRanges(t, in)[0]
		if got := r.String(); got != want {
			t.Errorf("String(ParseRange(%q)) = %q, want %q", in, got, want)
		}
	}
}

// TestRangeContainsNoZone is a regression test: a zoned address compared
// inside a range by its bits alone, so a zoned spec.loadBalancerIP was taken
// for a pool address and split the free set at zoned bounds.
func TestRangeContainsNoZone(t *testing.T) {
	r := mustRanges(t, "2001:db8::/120")[0]
	if !r.Contains(netip.MustParseAddr("2001:db8::5")) {
		t.Fatal("2001:db8::5 not in 2001:db8::/120")
	}
	for _, s := range []string{"2001:db8::5%eth0", "::ffff:192.0.2.1"} {
		if r.Contains(netip.MustParseAddr(s)) {
			t.Errorf("%s in %s", s, r)
		}
	}
	if v4 := mustRanges(t, "192.0.2.0/24")[0]; v4.Contains(netip.MustParseAddr("::ffff:192.0.2.1")) {
		t.Error("an IPv4 range contains an IPv4-mapped address; callers unmap")
	}
}

func TestRangeSize(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.0/24":        "256",
		"10.0.0.0/15":         "131072",
		"2001:db8::/64":       "18446744073709551616",
		"192.0.2.9-192.0.2.9": "1",
	} {
		r, err := ParseRange(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Size().String(); got != want {
			t.Errorf("Size(%s) = %s, want %s", in, got, want)
		}
	}
}

func mustRanges(t testing.TB, ss ...string) []Range {
	t.Helper()
	var out []Range
	for _, s := range ss {
		r, err := ParseRange(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func spansString(s *rangeSet) string {
	parts := make([]string, len(s.spans))
	for i, r := range s.spans {
		parts[i] = r.String()
	}
	return strings.Join(parts, ",")
}

func TestRangeSetMergesAndSubtracts(t *testing.T) {
	s := newRangeSet(mustRanges(t, "192.0.2.8-192.0.2.15", "192.0.2.0/29", "192.0.2.20-192.0.2.30", "192.0.2.25-192.0.2.40"), false)
	if got, want := spansString(s), "192.0.2.0-192.0.2.15,192.0.2.20-192.0.2.40"; got != want {
		t.Fatalf("merged = %s, want %s", got, want)
	}
	rest := s.subtract(mustRanges(t, "192.0.2.10-192.0.2.22", "192.0.2.41-192.0.2.50", "192.0.2.0/24"))
	parts := []string{}
	for _, r := range rest {
		parts = append(parts, r.String())
	}
	if got, want := strings.Join(parts, ","), "192.0.2.16-192.0.2.19,192.0.2.41-192.0.2.50,192.0.2.16-192.0.2.19,192.0.2.41-192.0.2.255"; got != want {
		t.Fatalf("subtract = %s, want %s", got, want)
	}
}

// TestRangeSetAvoidBuggy checks the lazy skipping of .0 and .255: they
// stay inside spans, are never taken nor counted, and a span holding only
// them is dropped.
func TestRangeSetAvoidBuggy(t *testing.T) {
	s := newRangeSet(mustRanges(t, "192.0.2.250-192.0.3.2", "198.51.100.0/31", "198.51.100.255/32"), true)
	if got, want := spansString(s), "192.0.2.250-192.0.3.2,198.51.100.0-198.51.100.1"; got != want {
		t.Fatalf("spans = %s, want %s (198.51.100.255 alone has nothing to take)", got, want)
	}
	if got := s.size().Int64(); got != 8 {
		t.Fatalf("size = %d, want 8 (7 + 2 addresses, less .255, .0 and .0)", got)
	}
	var took []string
	for a, ok := s.takeFrom(netip.Addr{}); ok; a, ok = s.takeFrom(a.Next()) {
		took = append(took, a.String())
	}
	if got, want := strings.Join(took, ","), "192.0.2.250,192.0.2.251,192.0.2.252,192.0.2.253,192.0.2.254,192.0.3.1,192.0.3.2,198.51.100.1"; got != want {
		t.Fatalf("took %s, want %s", got, want)
	}
	if !s.empty() || s.size().Sign() != 0 {
		t.Fatalf("left %s", spansString(s))
	}
	if s.add(netip.MustParseAddr("192.0.3.0")) || !s.empty() {
		t.Fatal("a released .0 went back into the set")
	}
	top := newRangeSet(mustRanges(t, "255.255.255.0/24"), true)
	if got := top.size().Int64(); got != 254 {
		t.Fatalf("size of 255.255.255.0/24 = %d, want 254", got)
	}
	if a, _ := top.takeFrom(netip.MustParseAddr("255.255.255.254").Next()); a.String() != "255.255.255.1" {
		t.Fatalf("at the top of the address space took %s, want to wrap to 255.255.255.1", a)
	}
}

// TestEndingIn checks the arithmetic that counts skipped addresses against
// counting them one by one.
func TestEndingIn(t *testing.T) {
	for _, c := range [][2]uint32{{0, 0}, {0, 255}, {0, 256}, {1, 254}, {255, 256}, {250, 1030}, {0xffffff00, 0xffffffff}, {0xfffffffe, 0xffffffff}} {
		var want [2]uint64
		for u := uint64(c[0]); u <= uint64(c[1]); u++ {
			switch u & 0xff {
			case 0:
				want[0]++
			case 0xff:
				want[1]++
			}
		}
		if got := [2]uint64{endingIn(c[0], c[1], 0), endingIn(c[0], c[1], 0xff)}; got != want {
			t.Errorf("endingIn(%#x, %#x) = %v, want %v", c[0], c[1], got, want)
		}
	}
	if got := endingIn(0, 0xffffffff, 0) + endingIn(0, 0xffffffff, 0xff); got != 1<<25 {
		t.Errorf("0.0.0.0/0 has %d buggy addresses, want 2^25", got)
	}
}

// TestRangeSetAgainstModel drives a rangeSet and a plain set of free
// addresses with the same random operations and checks they agree after
// each, with and without avoidBuggy (the 64 addresses cross a .255/.0
// boundary).
func TestRangeSetAgainstModel(t *testing.T) {
	for _, avoid := range []bool{false, true} {
		t.Run(fmt.Sprintf("avoidBuggy=%v", avoid), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, 2))
			base := netip.MustParseAddr("192.0.2.224")
			addr := func(i int) netip.Addr { return fromV4(v4(base) + uint32(i)) }
			index := func(a netip.Addr) int { return int(v4(a) - v4(base)) }
			s := newRangeSet(mustRanges(t, "192.0.2.224-192.0.3.31"), avoid)
			model := map[int]bool{}
			for i := range 64 {
				model[i] = !(avoid && isBuggy(addr(i)))
			}
			count := func() (n int64) {
				for _, ok := range model {
					if ok {
						n++
					}
				}
				return n
			}
			cursor := netip.Addr{}
			for step := range 5000 {
				i := rng.IntN(64)
				switch rng.IntN(3) {
				case 0:
					if got := s.remove(addr(i)); got != model[i] && !isBuggy(addr(i)) {
						t.Fatalf("step %d: remove(%s) = %v, model %v", step, addr(i), got, model[i])
					}
					model[i] = false
				case 1:
					if got, want := s.add(addr(i)), !(avoid && isBuggy(addr(i))); got != want {
						t.Fatalf("step %d: add(%s) = %v, want %v", step, addr(i), got, want)
					}
					model[i] = !(avoid && isBuggy(addr(i)))
				case 2:
					a, ok := s.takeFrom(cursor)
					if ok != (count() > 0) {
						t.Fatalf("step %d: takeFrom ok=%v with %d free", step, ok, count())
					}
					if ok {
						if !model[index(a)] {
							t.Fatalf("step %d: took %s which was not free (%s)", step, a, spansString(s))
						}
						model[index(a)] = false
						cursor = a.Next()
					}
				}
				for j := range 64 {
					if s.free(addr(j)) != model[j] {
						t.Fatalf("step %d: free(%s) = %v, model %v (%s)", step, addr(j), !model[j], model[j], spansString(s))
					}
				}
				if got := s.size().Int64(); got != count() {
					t.Fatalf("step %d: size = %d, model %d (%s)", step, got, count(), spansString(s))
				}
				if s.empty() != (count() == 0) {
					t.Fatalf("step %d: empty = %v with %d free", step, s.empty(), count())
				}
				for k, sp := range s.spans {
					if !s.usable(sp) {
						t.Fatalf("step %d: span %s has nothing to take", step, sp)
					}
					if k > 0 && !s.spans[k-1].Last.Next().Less(sp.First) {
						t.Fatalf("step %d: spans not disjoint and separated: %s", step, spansString(s))
					}
				}
			}
		})
	}
}
