package vrrp

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseVRIDRange parses an IPPool's spec.vrrp.virtualRouterIDs: "first-last"
// or a single "id", within 1-255. Empty means the default, 1-255.
func ParseVRIDRange(s string) (first, last int, err error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 1, 255, nil
	}
	a, b, isRange := strings.Cut(s, "-")
	if first, err = parseVRID(a); err != nil {
		return 0, 0, fmt.Errorf("virtualRouterIDs %q: %w", s, err)
	}
	last = first
	if isRange {
		if last, err = parseVRID(b); err != nil {
			return 0, 0, fmt.Errorf("virtualRouterIDs %q: %w", s, err)
		}
	}
	if last < first {
		return 0, 0, fmt.Errorf("virtualRouterIDs %q starts after it ends; write %d-%d", s, last, first)
	}
	return first, last, nil
}

func parseVRID(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%q is not a number; want first-last, e.g. 10-20", strings.TrimSpace(s))
	}
	if n < 1 || n > 255 {
		return 0, fmt.Errorf("VRID %d is outside 1-255", n)
	}
	return n, nil
}

// vridRange is an inclusive span of VRIDs.
type vridRange struct{ first, last int }

func (r vridRange) String() string {
	if r.first == r.last {
		return strconv.Itoa(r.first)
	}
	return fmt.Sprintf("%d-%d", r.first, r.last)
}

func (r vridRange) overlaps(o vridRange) bool { return r.first <= o.last && o.first <= r.last }

func (r vridRange) intersect(o vridRange) vridRange {
	return vridRange{max(r.first, o.first), min(r.last, o.last)}
}

// bucketCount is the number of shared instances of a pool and family whose
// usable VRIDs number s. It depends on the VRID range only, never on the
// VIPs, so adding or removing a VIP never regroups the others. Half of a
// small range is kept for Local Services, which need an instance each.
func bucketCount(s int) int {
	return min(maxBuckets, (s+1)/2)
}
