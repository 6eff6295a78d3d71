package runner

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBurstCollapses(t *testing.T) {
	var runs, finished atomic.Int32
	release := make(chan struct{})
	r := New(func(context.Context) error {
		if runs.Add(1) == 1 {
			<-release // hold the first run while triggers pile up
		}
		finished.Add(1)
		return nil
	}, 0, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	waitFor(t, "first run", func() bool { return runs.Load() == 1 })
	for range 100 {
		r.Trigger()
	}
	if n := len(r.dirty); n != 1 {
		t.Fatalf("%d pending marks after 100 triggers, want 1", n)
	}
	close(release)
	waitFor(t, "second run to finish", func() bool { return finished.Load() == 2 })
	// Nothing is left to start a third run: the burst was one run.
	if n, pending := runs.Load(), len(r.dirty); n != 2 || pending != 0 {
		t.Fatalf("runs = %d, pending marks = %d; want 2 and 0", n, pending)
	}
}

func TestRetryAfterFailureAndResync(t *testing.T) {
	var runs atomic.Int32
	r := New(func(context.Context) error {
		if runs.Add(1) == 1 {
			return errors.New("boom")
		}
		return nil
	}, 0, 10*time.Millisecond, 30*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	waitFor(t, "retry and periodic runs", func() bool { return runs.Load() >= 4 })
}

func TestMinInterval(t *testing.T) {
	var times []time.Time
	done := make(chan struct{})
	r := New(func(context.Context) error {
		times = append(times, time.Now())
		if len(times) == 3 {
			close(done)
		}
		return nil
	}, 40*time.Millisecond, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	go func() {
		for {
			select {
			case <-done:
				return
			default:
				r.Trigger()
				time.Sleep(time.Millisecond)
			}
		}
	}()
	<-done
	cancel()
	for i := 1; i < len(times); i++ {
		if gap := times[i].Sub(times[i-1]); gap < 40*time.Millisecond {
			t.Fatalf("runs %d and %d were %s apart, below the 40ms minimum", i-1, i, gap)
		}
	}
}

func TestRetryDelay(t *testing.T) {
	for _, tc := range []struct {
		retry, resync time.Duration
		failures      int
		want          time.Duration
	}{
		{time.Second, 5 * time.Minute, 1, time.Second},
		{time.Second, 5 * time.Minute, 2, 2 * time.Second},
		{time.Second, 5 * time.Minute, 4, 8 * time.Second},
		{time.Second, 5 * time.Minute, 6, 32 * time.Second},
		{time.Second, 5 * time.Minute, 7, 32 * time.Second}, // MaxRetryFactor
		{time.Second, 5 * time.Minute, 1000, 32 * time.Second},
		{time.Second, 10 * time.Second, 5, 10 * time.Second}, // never beyond resync
		{time.Second, 0, 9, 32 * time.Second},                // no resync
		{5 * time.Second, 5 * time.Minute, 3, 20 * time.Second},
	} {
		if got := RetryDelay(tc.retry, tc.resync, tc.failures); got != tc.want {
			t.Errorf("RetryDelay(%s, %s, %d) = %s, want %s", tc.retry, tc.resync, tc.failures, got, tc.want)
		}
	}
}

// A trigger runs at once even while a failing sync backs off: a change
// that may fix it is tried without waiting.
func TestTriggerDuringBackoff(t *testing.T) {
	var runs atomic.Int32
	r := New(func(context.Context) error {
		runs.Add(1)
		return errors.New("boom")
	}, 0, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	waitFor(t, "first run", func() bool { return runs.Load() == 1 })
	r.Trigger()
	waitFor(t, "the triggered run, well before the hour of backoff", func() bool { return runs.Load() == 2 })
}
