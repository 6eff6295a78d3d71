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
	var runs atomic.Int32
	release := make(chan struct{})
	r := New(func(context.Context) error {
		if runs.Add(1) == 1 {
			<-release // hold the first run while triggers pile up
		}
		return nil
	}, 0, time.Hour, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	waitFor(t, "first run", func() bool { return runs.Load() == 1 })
	for range 100 {
		r.Trigger()
	}
	close(release)
	waitFor(t, "second run", func() bool { return runs.Load() == 2 })
	// No third run may follow from the 100 triggers.
	time.Sleep(50 * time.Millisecond)
	if n := runs.Load(); n != 2 {
		t.Fatalf("runs = %d, want 2: a burst of triggers must be one run", n)
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
