package speaker

import (
	"math"
	"runtime/debug"
	"runtime/metrics"

	"k8s.io/klog/v2"
)

// memoryLimitShare is the share of GOMEMLIMIT past which the live heap
// makes the speaker warn: the collector then runs ever more often to stay
// under the limit, and past it without pause (up to half the CPU).
const memoryLimitShare = 0.8

// nearMemoryLimit says whether a live heap of live bytes is close enough to
// the soft memory limit to warn about (never without a limit).
func nearMemoryLimit(live, limit uint64) bool {
	return limit != 0 && limit != math.MaxInt64 && float64(live) > memoryLimitShare*float64(limit)
}

// warnMemoryLimit logs a warning when the live heap (as of the last
// collection) passes memoryLimitShare of GOMEMLIMIT, naming the fix. The
// DaemonSet's limit suits clusters up to about 10,000 Services
// (docs/scale.md#memory); a larger one needs a larger limit, which nothing
// else would tell the operator short of the speaker's CPU going up.
func warnMemoryLimit(logger klog.Logger) {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return
	}
	live, limit := s[0].Value.Uint64(), debug.SetMemoryLimit(-1)
	if limit < 0 || !nearMemoryLimit(live, uint64(limit)) {
		return
	}
	logger.Info("Warning: the live heap is close to GOMEMLIMIT, and the collector runs ever more often to stay under it; raise GOMEMLIMIT (the Helm value speaker.goMemLimit) to about 1.35 times the live heap (docs/scale.md#memory)",
		"liveHeapMiB", live>>20, "goMemLimitMiB", uint64(limit)>>20)
}
