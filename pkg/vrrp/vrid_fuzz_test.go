package vrrp

import (
	"fmt"
	"testing"
)

// FuzzParseVRIDRange: an accepted spec.vrrp.virtualRouterIDs is always
// within 1-255 and in order, and its canonical form parses to the same
// range.
func FuzzParseVRIDRange(f *testing.F) {
	for _, s := range []string{"", "1-255", "50", " 10 - 20 ", "0-5", "20-10", "1-256", "-", "10-", "+5", "0x10", "1e2", "５"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, err := ParseVRIDRange(s)
		if err != nil {
			return
		}
		if first < 1 || last > 255 || first > last {
			t.Fatalf("%q parsed to %d-%d", s, first, last)
		}
		f2, l2, err := ParseVRIDRange(fmt.Sprintf("%d-%d", first, last))
		if err != nil || f2 != first || l2 != last {
			t.Fatalf("%q: %d-%d reparses to %d-%d, %v", s, first, last, f2, l2, err)
		}
	})
}
