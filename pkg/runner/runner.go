// Package runner runs one level-triggered sync function: callers mark state
// dirty with Trigger, and the runner calls the function at most once per
// minimum interval, again after a failure (backing off while failures last),
// and at least once per resync period. Bursts of triggers collapse into one
// run.
package runner

import (
	"context"
	"time"
)

// Runner calls a sync function on demand with bounded frequency.
type Runner struct {
	sync                       func(context.Context) error
	minInterval, retry, resync time.Duration
	dirty                      chan struct{}
}

// New returns a Runner for sync. minInterval bounds how often it runs,
// retry is the delay after a failed run, doubled after each further
// consecutive failure up to MaxRetryFactor × retry (and never beyond
// resync), resync the longest time between runs (0 disables periodic
// runs). A trigger runs sync at once whatever the delay.
func New(sync func(context.Context) error, minInterval, retry, resync time.Duration) *Runner {
	return &Runner{sync: sync, minInterval: minInterval, retry: retry, resync: resync, dirty: make(chan struct{}, 1)}
}

// Trigger marks state dirty. It never blocks.
func (r *Runner) Trigger() {
	select {
	case r.dirty <- struct{}{}:
	default:
	}
}

// Run calls the sync function until ctx is done. It runs once at start.
func (r *Runner) Run(ctx context.Context) {
	r.Trigger()
	var periodic <-chan time.Time
	var retry <-chan time.Time
	failures := 0
	for {
		if r.resync > 0 {
			periodic = time.After(r.resync)
		}
		select {
		case <-ctx.Done():
			return
		case <-r.dirty:
		case <-retry:
		case <-periodic:
		}
		retry = nil
		start := time.Now()
		if err := r.sync(ctx); err != nil {
			failures++
			retry = time.After(RetryDelay(r.retry, r.resync, failures))
		} else {
			failures = 0
		}
		// Let triggers that arrive meanwhile collapse into the next run.
		if wait := r.minInterval - time.Since(start); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
	}
}

// MaxRetryFactor bounds the backoff: a sync that keeps failing (a kernel
// that refuses one virtual server, an API server that is down) is retried
// at least every MaxRetryFactor × retry, not every retry, so that it does
// not fill the log and load the node or the API server for nothing.
const MaxRetryFactor = 32

// RetryDelay returns the delay before the next run after failures
// consecutive failed runs (1 for the first): retry, doubled for each
// further failure, at most MaxRetryFactor × retry and, when resync is
// set, at most resync.
func RetryDelay(retry, resync time.Duration, failures int) time.Duration {
	limit := retry * MaxRetryFactor
	if resync > 0 && resync < limit {
		limit = resync
	}
	d := retry
	for i := 1; i < failures && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}
