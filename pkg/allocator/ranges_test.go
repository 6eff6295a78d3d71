package allocator

import (
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
	s := newRangeSet(mustRanges(t, "192.0.2.8-192.0.2.15", "192.0.2.0/29", "192.0.2.20-192.0.2.30", "192.0.2.25-192.0.2.40"))
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

func TestWithoutBuggy(t *testing.T) {
	got := withoutBuggy(mustRanges(t, "192.0.2.250-192.0.3.2", "198.51.100.0/31", "198.51.100.255/32", "2001:db8::/126"))
	parts := []string{}
	for _, r := range got {
		parts = append(parts, r.String())
	}
	if want := "192.0.2.250-192.0.2.254,192.0.3.1-192.0.3.2,198.51.100.1-198.51.100.1,2001:db8::/126"; strings.Join(parts, ",") != want {
		t.Fatalf("withoutBuggy = %s, want %s", strings.Join(parts, ","), want)
	}
	all := withoutBuggy(mustRanges(t, "255.255.255.0/24"))
	if len(all) != 1 || all[0].String() != "255.255.255.1-255.255.255.254" {
		t.Fatalf("top of the address space: %v", all)
	}
}

// TestRangeSetAgainstModel drives a rangeSet and a plain set with the same
// random operations and checks they agree after each.
func TestRangeSetAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := netip.MustParseAddr("192.0.2.0")
	addr := func(i int) netip.Addr {
		a := base
		for range i {
			a = a.Next()
		}
		return a
	}
	s := newRangeSet(mustRanges(t, "192.0.2.0/26"))
	model := map[int]bool{}
	for i := range 64 {
		model[i] = true
	}
	cursor := netip.Addr{}
	for step := range 5000 {
		i := rng.IntN(64)
		switch rng.IntN(3) {
		case 0:
			if got := s.remove(addr(i)); got != model[i] {
				t.Fatalf("step %d: remove(%d) = %v, model %v", step, i, got, model[i])
			}
			delete(model, i)
		case 1:
			s.add(addr(i))
			model[i] = true
		case 2:
			a, ok := s.takeFrom(cursor)
			if ok != (len(model) > 0) {
				t.Fatalf("step %d: takeFrom ok=%v with %d free", step, ok, len(model))
			}
			if ok {
				j := int(a.As4()[3])
				if !model[j] {
					t.Fatalf("step %d: took %s which was not free", step, a)
				}
				delete(model, j)
				cursor = a.Next()
			}
		}
		for j := range 64 {
			if s.contains(addr(j)) != model[j] {
				t.Fatalf("step %d: contains(%d) = %v, model %v (%s)", step, j, !model[j], model[j], spansString(s))
			}
		}
		for k := 1; k < len(s.spans); k++ {
			if !s.spans[k-1].Last.Next().Less(s.spans[k].First) {
				t.Fatalf("step %d: spans not disjoint and separated: %s", step, spansString(s))
			}
		}
	}
}
