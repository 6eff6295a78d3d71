package speaker

import (
	"math"
	"testing"
)

func TestNearMemoryLimit(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		live, limit uint64
		want        bool
	}{
		{120 * mib, 160 * mib, false},
		{129 * mib, 160 * mib, true}, // past 80%
		{128 * mib, 160 * mib, false},
		{500 * mib, math.MaxInt64, false}, // no limit (GOMEMLIMIT off)
		{500 * mib, 0, false},
	} {
		if got := nearMemoryLimit(tc.live, tc.limit); got != tc.want {
			t.Errorf("nearMemoryLimit(%d MiB, %d) = %v, want %v", tc.live/mib, tc.limit, got, tc.want)
		}
	}
}
