package controller

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestFenceWaitsForWritesInFlight: Close returns only after a write that
// was on the wire has been answered, and every write after it is refused
// without reaching the server, while reads still pass.
func TestFenceWaitsForWritesInFlight(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	var writes atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			writes.Add(1)
			close(arrived)
			<-release
		}
		_, _ = io.WriteString(w, "ok")
	}))
	defer srv.Close()
	f := newFence(time.Minute)
	client := &http.Client{Transport: f.Wrap(http.DefaultTransport)}

	if resp, err := client.Post(srv.URL, "text/plain", strings.NewReader("x")); !errors.Is(err, errFenced) {
		closeBody(resp)
		t.Fatalf("write before Open: %v, want errFenced", err)
	}
	f.Open()
	done := make(chan error, 1)
	go func() {
		resp, err := client.Post(srv.URL, "text/plain", strings.NewReader("x"))
		if err == nil {
			_, err = io.ReadAll(resp.Body)
			_ = resp.Body.Close()
		}
		done <- err
	}()
	<-arrived
	closed := make(chan struct{})
	go func() { f.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a write was in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("write in flight: %v", err)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after the write completed")
	}
	if resp, err := client.Post(srv.URL, "text/plain", strings.NewReader("x")); !errors.Is(err, errFenced) {
		closeBody(resp)
		t.Fatalf("write after Close: %v, want errFenced", err)
	}
	resp, err := client.Get(srv.URL)
	if err != nil {
		t.Fatalf("read after Close: %v", err)
	}
	_ = resp.Body.Close()
	if n := writes.Load(); n != 1 {
		t.Errorf("server saw %d writes, want 1", n)
	}
}

// TestFenceBoundsAWrite: a write that never gets an answer stops counting
// as in flight when its time is up, so Close cannot hang on it.
func TestFenceBoundsAWrite(t *testing.T) {
	hang := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-hang }))
	defer srv.Close()
	defer close(hang) // before srv.Close, which waits for the handler
	f := newFence(200 * time.Millisecond)
	f.Open()
	client := &http.Client{Transport: f.Wrap(http.DefaultTransport)}
	if resp, err := client.Post(srv.URL, "text/plain", strings.NewReader("x")); err == nil {
		closeBody(resp)
		t.Fatal("a write the server never answered succeeded")
	}
	closed := make(chan struct{})
	go func() { f.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung on a write whose time was up")
	}
}

// closeBody closes the body of a response a test did not expect.
func closeBody(resp *http.Response) {
	if resp != nil {
		_ = resp.Body.Close()
	}
}
