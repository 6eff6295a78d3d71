package streams

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// listen returns a loopback listener, closed at the end of the test.
func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// puppet is a server whose connections a test can break one by one: it
// echoes like Serve until told otherwise.
type puppet struct {
	mu    sync.Mutex
	conns []*puppetConn
	ready chan struct{} // one send per accepted connection
}

type puppetConn struct {
	conn  *net.TCPConn
	pause chan time.Duration // stop answering for a while
	lie   chan struct{}      // answer the next message with another number
}

func servePuppet(t *testing.T, l net.Listener, id string) *puppet {
	p := &puppet{ready: make(chan struct{}, 100)}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			pc := &puppetConn{conn: c.(*net.TCPConn), pause: make(chan time.Duration, 1), lie: make(chan struct{}, 1)}
			p.mu.Lock()
			p.conns = append(p.conns, pc)
			p.mu.Unlock()
			p.ready <- struct{}{}
			go pc.serve(id)
		}
	}()
	t.Cleanup(func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, pc := range p.conns {
			_ = pc.conn.Close()
		}
	})
	return p
}

func (pc *puppetConn) serve(id string) {
	r := bufio.NewScanner(pc.conn)
	for r.Scan() {
		line := r.Text()
		select {
		case d := <-pc.pause:
			time.Sleep(d) // the server's behaviour under test, not an assertion
		case <-pc.lie:
			line += "0"
		default:
		}
		if _, err := fmt.Fprintf(pc.conn, "%s %s\n", line, id); err != nil {
			return
		}
	}
}

func (p *puppet) conn(i int) *puppetConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns[i]
}

// reset closes the connection with a TCP reset, as a node that lost the
// flow's state answers it.
func (pc *puppetConn) reset() {
	_ = pc.conn.SetLinger(0)
	_ = pc.conn.Close()
}

// waitReplies waits until the streams have had at least n replies in all.
func waitReplies(t *testing.T, c *Checker, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, _ := c.Progress()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d replies after 10 s; want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func opts(l net.Listener, n int) Options {
	return Options{Addr: l.Addr().String(), Streams: n, Interval: 5 * time.Millisecond, Timeout: 5 * time.Second}
}

// TestStreamsSurvive: with nothing happening, every stream survives and
// every reply is checked.
func TestStreamsSurvive(t *testing.T) {
	l := listen(t)
	go func() { _ = Serve(l, "pod-a") }()
	c, err := Start(t.Context(), opts(l, 8))
	if err != nil {
		t.Fatal(err)
	}
	waitReplies(t, c, 8*10)
	r := c.Stop()
	if r.Streams != 8 || r.Survived != 8 || len(r.Failed) != 0 || r.Backends["pod-a"] != 8 || r.Replies < 80 {
		t.Fatalf("report %s, failed %v; want 8 of 8 on pod-a, at least 80 replies", r, r.Failed)
	}
	if r.LongestStall <= 0 {
		t.Errorf("longest stall %s: the stalls are not measured", r.LongestStall)
	}
}

// TestStreamFailures: a reset, a wrong reply and a stall longer than the
// timeout each fail their stream alone; a stall shorter than the timeout
// is survived and measured.
func TestStreamFailures(t *testing.T) {
	l := listen(t)
	p := servePuppet(t, l, "pod-a")
	o := opts(l, 5)
	o.Timeout = 2 * time.Second
	c, err := Start(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		<-p.ready
	}
	waitReplies(t, c, 5*5)
	p.conn(0).reset()
	p.conn(1).lie <- struct{}{}
	p.conn(2).pause <- 5 * time.Second // past the timeout
	p.conn(3).pause <- 300 * time.Millisecond
	// Until every stream has seen its event: the failures are at their
	// next exchange, the long pause after the timeout.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, failed := c.Progress(); failed >= 3 {
			break
		}
		if time.Now().After(deadline) {
			_, failed := c.Progress()
			t.Fatalf("%d streams failed after 20 s; want 3", failed)
		}
		time.Sleep(10 * time.Millisecond)
	}
	replies, _ := c.Progress()
	waitReplies(t, c, replies+2*5) // the survivors go on
	r := c.Stop()
	if r.Survived != 2 || len(r.Failed) != 3 {
		t.Fatalf("report %s, failed %v; want 2 survivors and 3 failures", r, r.Failed)
	}
	var why []string
	for _, f := range r.Failed {
		why = append(why, f.Err.Error())
	}
	all := strings.Join(why, "\n")
	for _, want := range [][]string{
		{"reset by peer", "broken pipe"}, // the reset, seen by a read or a write
		{`0 pod-a\n"`},                   // the wrong number, quoted
		{"i/o timeout"},                  // the stall past the timeout
	} {
		if !slices.ContainsFunc(want, func(w string) bool { return strings.Contains(all, w) }) {
			t.Errorf("no failure says %q:\n%s", want, all)
		}
	}
	if r.LongestStall < 300*time.Millisecond {
		t.Errorf("longest stall of the survivors %s; want at least the 300 ms pause", r.LongestStall)
	}
	if s, of := r.SurvivedExcept(); s != 2 || of != 5 {
		t.Errorf("SurvivedExcept() = %d of %d; want 2 of 5", s, of)
	}
	if s, of := r.SurvivedExcept("pod-a"); s != 0 || of != 0 {
		t.Errorf(`SurvivedExcept("pod-a") = %d of %d; want 0 of 0: every stream was on pod-a`, s, of)
	}
}

// TestStartFailsOnABrokenStart: streams that cannot be opened or answered
// are an error at Start, not a failure counted against the event.
func TestStartFailsOnABrokenStart(t *testing.T) {
	l := listen(t)
	addr := l.Addr().String()
	_ = l.Close()
	if _, err := Start(t.Context(), Options{Addr: addr, Streams: 2, Interval: time.Millisecond, Timeout: time.Second}); err == nil {
		t.Error("Start succeeded with nothing listening")
	}
	silent := listen(t)
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = c.Close() })
		}
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := Start(ctx, Options{Addr: silent.Addr().String(), Streams: 1, Interval: time.Millisecond, Timeout: 200 * time.Millisecond}); err == nil || !strings.Contains(err.Error(), "first exchange") {
		t.Errorf("Start against a server that never answers: %v; want the first exchange's timeout", err)
	}
	if _, err := Start(t.Context(), Options{Addr: addr}); err == nil {
		t.Error("Start took zero Streams, Interval and Timeout")
	}
}

// TestStopCountsTheStallInProgress: a stream waiting for a reply when
// stopped has not failed, but has stalled since its last reply, and that
// counts; LongestStallExcept leaves out the backends given.
func TestStopCountsTheStallInProgress(t *testing.T) {
	paused, steady := listen(t), listen(t)
	p := servePuppet(t, paused, "pod-a")
	go func() { _ = Serve(steady, "pod-b") }()
	a, err := Start(t.Context(), opts(paused, 1))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Start(t.Context(), opts(steady, 1))
	if err != nil {
		t.Fatal(err)
	}
	waitReplies(t, a, 5)
	p.conn(0).pause <- 3 * time.Second
	// Until the pause has lasted: no reply for 600 ms.
	replies, _ := a.Progress()
	waitReplies(t, b, 5)
	deadline := time.Now().Add(600 * time.Millisecond)
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if now, _ := a.Progress(); now > replies+1 {
		t.Fatalf("%d replies during the pause; the puppet did not pause", now-replies)
	}
	ra, rb := a.Stop(), b.Stop()
	if ra.Survived != 1 || ra.LongestStall < 500*time.Millisecond || ra.Stalls["pod-a"] != ra.LongestStall {
		t.Errorf("paused stream: %s, stalls %v; want it alive, stalled at least 500 ms", ra, ra.Stalls)
	}
	if got := ra.LongestStallExcept("pod-a"); got != 0 {
		t.Errorf("LongestStallExcept(pod-a) = %s; want 0: its only stream is pod-a's", got)
	}
	if rb.LongestStall >= 500*time.Millisecond {
		t.Errorf("steady stream stalled %s", rb.LongestStall)
	}
}
