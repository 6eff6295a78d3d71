// Package runner runs one level-triggered sync function: callers mark state
// dirty with Trigger, and the runner calls the function at most once per
// minimum interval, again after a failure, and at least once per resync
// period. Bursts of triggers collapse into one run.
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
// retry is the delay after a failed run, resync the longest time between
// runs (0 disables periodic runs).
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
			retry = time.After(r.retry)
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
