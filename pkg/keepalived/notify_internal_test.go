package keepalived

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"testing"
	"time"
)

// failingReader fails its first read, as a FIFO whose read failed.
type failingReader struct{ closed bool }

func (r *failingReader) Read([]byte) (int, error) { return 0, errors.New("input/output error") }
func (r *failingReader) Close() error             { r.closed = true; return nil }

// next receives one event or fails the test.
func next(t *testing.T, events <-chan Event) Event {
	t.Helper()
	select {
	case ev, ok := <-events:
		if !ok {
			t.Fatal("the watch ended")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	return Event{}
}

// TestWatchReopensAfterReadError: a read error no longer ends the watch: it
// opens the FIFO again and goes on delivering events.
func TestWatchReopensAfterReadError(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	var mu sync.Mutex
	opened := 0
	w := fifoWatcher{path: "notify.fifo", minBackoff: time.Millisecond, maxBackoff: time.Millisecond, maxFailures: 3,
		open: func(string) (io.ReadCloser, error) {
			mu.Lock()
			defer mu.Unlock()
			if opened++; opened == 1 {
				return nil, errors.New("no such file") // the first attempt fails too
			}
			return pr, nil
		}}
	bad := &failingReader{}
	events := w.watch(t.Context(), bad)
	if _, err := pw.WriteString("INSTANCE \"a\" MASTER 100\n"); err != nil {
		t.Fatal(err)
	}
	if got := next(t, events); got != (Event{Instance: "a", State: StateMaster, Priority: 100}) {
		t.Fatalf("got %+v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if opened != 2 || !bad.closed {
		t.Errorf("opened %d times (want 2), failed reader closed: %v", opened, bad.closed)
	}
}

// TestWatchGivesUp: when the FIFO cannot be read again, the channel closes
// while the context is still live, which the speaker reports.
func TestWatchGivesUp(t *testing.T) {
	var opened int
	w := fifoWatcher{path: "notify.fifo", minBackoff: time.Millisecond, maxBackoff: 2 * time.Millisecond, maxFailures: 4,
		open: func(string) (io.ReadCloser, error) { opened++; return &failingReader{}, nil }}
	events := w.watch(t.Context(), &failingReader{})
	select {
	case ev, ok := <-events:
		if ok {
			t.Fatalf("event %+v from a failing reader", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the watch never gave up")
	}
	if t.Context().Err() != nil || opened != 4 {
		t.Errorf("gave up after %d attempts to open again, want 4", opened)
	}
}

// TestWatchStopsWhileRetrying: cancelling during the backoff ends the watch
// at once.
func TestWatchStopsWhileRetrying(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	w := fifoWatcher{path: "notify.fifo", minBackoff: time.Hour, maxBackoff: time.Hour, maxFailures: 3,
		open: func(string) (io.ReadCloser, error) { return nil, errors.New("unused") }}
	events := w.watch(ctx, &failingReader{})
	cancel()
	select {
	case _, ok := <-events:
		if ok {
			t.Fatal("event after cancel")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the watch did not end when cancelled during its backoff")
	}
}
