package controller

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"
)

// errFenced is what a write gets while this replica does not lead.
var errFenced = errors.New("keeplb controller: this replica does not lead; write refused")

// fence is the one gate every API write of the leader's work passes: the
// clients of the upstream service controller, the class controller, the
// pool status writer and the event writer are all built on it. client-go's
// ReleaseOnCancel releases the Lease as soon as the election context ends,
// while those workers may still have a PATCH to send (each of them returns
// from Run without waiting for its goroutines), so a new leader could be
// allocating while the old one still writes. The fence closes first; then
// the writes already on the wire are waited for; only then is the Lease
// given up. Reads (GET, LIST, WATCH) always pass: standbys and draining
// informers need them.
type fence struct {
	// timeout bounds one write, so that after a lost lease (when nothing
	// can be released and the next leader may start once the lease
	// expires) no write of ours is still in flight by then.
	timeout time.Duration

	mu       sync.Mutex
	open     bool
	inflight int
	drained  *sync.Cond
}

func newFence(timeout time.Duration) *fence {
	f := &fence{timeout: timeout}
	f.drained = sync.NewCond(&f.mu)
	return f
}

// Open lets writes through: this replica leads.
func (f *fence) Open() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.open = true
}

// Close refuses every write from now on and waits until the writes already
// sent have completed.
func (f *fence) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.open = false
	for f.inflight > 0 {
		f.drained.Wait()
	}
}

func (f *fence) enter() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.open {
		return false
	}
	f.inflight++
	return true
}

func (f *fence) leave() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inflight--
	if f.inflight == 0 {
		f.drained.Broadcast()
	}
}

// Wrap returns rt behind the fence; it is a rest.Config WrapTransport.
func (f *fence) Wrap(rt http.RoundTripper) http.RoundTripper {
	return &fencedTransport{f: f, next: rt}
}

type fencedTransport struct {
	f    *fence
	next http.RoundTripper
}

// RoundTrip sends reads as they are, and writes only while the fence is
// open, each within the fence's timeout.
func (t *fencedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return t.next.RoundTrip(req)
	}
	if !t.f.enter() {
		return nil, errFenced
	}
	// The write counts as in flight until its answer has been read (the
	// server may apply it at any time before that) or its time is up (the
	// transport then gives up on it): whichever comes first.
	ctx, cancel := context.WithTimeout(req.Context(), t.f.timeout)
	context.AfterFunc(ctx, t.f.leave)
	resp, err := t.next.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

// Close closes the body, then ends the request's context.
func (b *cancelOnClose) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}
