// Package streams checks that long-lived TCP connections survive an event:
// a VIP's failover, failback or handover, a speaker's rollout. A Checker
// holds a number of streams open to one address; on each, every Interval,
// it sends a numbered message and checks that the reply echoes that number.
// A stream fails at its first error, wrong reply or reply later than
// Timeout, and is not reopened: a connection that the event reset is what
// the checker exists to count. Serve is the other end, which names itself in
// every reply so that a test knows which backend served each stream (a
// stream served by a backend that died with its node cannot survive, and is
// counted apart).
//
// The protocol is a line each way: the client sends "SEQ\n", the server
// answers "SEQ ID\n". Replies come in order, one per message.
package streams

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Options say how to check.
type Options struct {
	// Addr is the host:port to connect to.
	Addr string
	// Streams is how many connections to hold open.
	Streams int
	// Interval is the time between two messages of a stream, from the
	// reply to one to the sending of the next.
	Interval time.Duration
	// Timeout is how long a reply may take before the stream fails.
	Timeout time.Duration
	// Dial opens a connection; nil means net.Dialer's.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Checker holds the streams. Start opens them; Stop ends them and reports.
type Checker struct {
	opts    Options
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	streams []*stream

	mu              sync.Mutex // guards replies and failed, the progress
	replies, failed int
}

// Progress returns how many replies have been checked so far, on all
// streams, and how many streams have failed: for a test to wait until
// the streams flow before it starts an event, and until its event has
// played out.
func (c *Checker) Progress() (replies, failed int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replies, c.failed
}

// Stalled returns the streams that have had no reply for longer than d
// (and not failed yet), with their client end and backend, for a test to
// look at them while they stall.
func (c *Checker) Stalled(d time.Duration) []Failure {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Failure
	for _, s := range c.streams {
		if !s.lastSeen.IsZero() && time.Since(s.lastSeen) > d {
			out = append(out, Failure{Local: s.local, Backend: s.backend, At: s.lastSeen})
		}
	}
	return out
}

// Locals returns the client's end of every stream, for a test that looks
// for the streams' entries in a kernel's tables.
func (c *Checker) Locals() []netip.AddrPort {
	out := make([]netip.AddrPort, 0, len(c.streams))
	for _, s := range c.streams {
		out = append(out, s.local)
	}
	return out
}

// stream is one connection's record, written by its goroutine only until
// Stop has waited for it.
type stream struct {
	local    netip.AddrPort // the client's end
	backend  string         // the ID in its first reply
	replies  int
	stall    time.Duration // the longest time between two replies
	last     time.Time     // of the last reply
	lastSeen time.Time     // the same, under the Checker's mu, for Stalled
	err      error         // why it failed; nil while it lives
	failedAt time.Time
}

// Start opens opts.Streams connections and starts the exchange on each. It
// fails if any connection cannot be opened or answered once: the check
// must start from streams that work.
func Start(ctx context.Context, opts Options) (*Checker, error) {
	if opts.Streams <= 0 || opts.Interval <= 0 || opts.Timeout <= 0 {
		return nil, fmt.Errorf("streams: Streams, Interval and Timeout must be positive: %+v", opts)
	}
	if opts.Dial == nil {
		opts.Dial = (&net.Dialer{}).DialContext
	}
	ctx, cancel := context.WithCancel(ctx)
	c := &Checker{opts: opts, cancel: cancel}
	conns := make([]net.Conn, 0, opts.Streams)
	closeAll := func() {
		for _, conn := range conns {
			_ = conn.Close()
		}
		cancel()
	}
	for i := range opts.Streams {
		dctx, dcancel := context.WithTimeout(ctx, opts.Timeout)
		conn, err := opts.Dial(dctx, "tcp", opts.Addr)
		dcancel()
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("streams: open stream %d to %s: %w", i, opts.Addr, err)
		}
		conns = append(conns, conn)
	}
	for _, conn := range conns {
		s := &stream{}
		if a, ok := conn.LocalAddr().(*net.TCPAddr); ok {
			s.local = a.AddrPort()
		}
		c.streams = append(c.streams, s)
		r := bufio.NewReader(conn)
		// The first exchange names the backend and proves the stream
		// works before the event.
		if err := exchange(conn, r, 0, opts.Timeout, s); err != nil {
			closeAll()
			return nil, fmt.Errorf("streams: first exchange on %s: %w", conn.LocalAddr(), err)
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.run(ctx, conn, r, s)
		}()
	}
	return c, nil
}

// run exchanges messages on conn until ctx is done or the stream fails.
func (c *Checker) run(ctx context.Context, conn net.Conn, r *bufio.Reader, s *stream) {
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	defer func() { _ = conn.Close() }()
	last := time.Now()
	t := time.NewTimer(c.opts.Interval)
	defer t.Stop()
	s.last = last
	c.mu.Lock()
	s.lastSeen = last
	c.mu.Unlock()
	for seq := 1; ; seq++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := exchange(conn, r, seq, c.opts.Timeout, s)
		if ctx.Err() != nil {
			return // Stop's deadline, not the stream's failure
		}
		now := time.Now()
		c.mu.Lock()
		if err != nil {
			c.failed++
			s.lastSeen = time.Time{}
		} else {
			c.replies++
			s.lastSeen = now
		}
		c.mu.Unlock()
		if err != nil {
			s.err, s.failedAt = err, now
			return
		}
		s.stall = max(s.stall, now.Sub(last))
		last, s.last = now, now
		t.Reset(c.opts.Interval)
	}
}

// exchange sends message seq and reads its reply, within timeout.
func exchange(conn net.Conn, r *bufio.Reader, seq int, timeout time.Duration, s *stream) error {
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := fmt.Fprintf(conn, "%d\n", seq); err != nil {
		return fmt.Errorf("send %d: %w", seq, err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("reply to %d: %w", seq, err)
	}
	got, id, ok := strings.Cut(strings.TrimSuffix(line, "\n"), " ")
	if n, err := strconv.Atoi(got); !ok || err != nil || n != seq {
		return fmt.Errorf("reply to %d: %q", seq, line)
	}
	switch {
	case s.backend == "":
		s.backend = id
	case id != s.backend:
		return fmt.Errorf("reply to %d from backend %s, the stream's is %s", seq, id, s.backend)
	}
	s.replies++
	return nil
}

// Report is what the streams went through.
type Report struct {
	// Streams is how many were opened; Survived how many were still
	// working at Stop.
	Streams, Survived int
	// Replies is how many replies were checked, on all streams.
	Replies int
	// LongestStall is the longest time between two replies of a stream
	// that survived, or from its last reply to Stop: what its client felt
	// of the event. A stream that had no reply for a while when stopped
	// did not fail yet, but stalled that long.
	LongestStall time.Duration
	// Stalls is the longest stall of the surviving streams, by backend.
	Stalls map[string]time.Duration
	// Failed are the streams that failed, with their backend and why.
	Failed []Failure
	// Backends counts the streams by the backend that served them.
	Backends map[string]int
}

// Failure is one stream that failed.
type Failure struct {
	// Local is the client's end of the stream.
	Local   netip.AddrPort
	Backend string
	At      time.Time
	Err     error
}

// SurvivedExcept returns how many streams survived of those not served by
// a backend in gone (backends that died with their node, whose streams
// cannot survive), and how many those are.
func (r Report) SurvivedExcept(gone ...string) (survived, of int) {
	lost := 0
	for _, f := range r.Failed {
		if !slices.Contains(gone, f.Backend) {
			lost++
		}
	}
	of = r.Streams
	for b, n := range r.Backends {
		if slices.Contains(gone, b) {
			of -= n
		}
	}
	return of - lost, of
}

// LongestStallExcept returns the longest stall of the streams that
// survived, of those not served by a backend in gone.
func (r Report) LongestStallExcept(gone ...string) time.Duration {
	return longestExcept(r.Stalls, gone)
}

// longestExcept returns the longest of the durations by backend, but
// those of the backends in gone.
func longestExcept(by map[string]time.Duration, gone []string) time.Duration {
	var out time.Duration
	for b, d := range by {
		if !slices.Contains(gone, b) {
			out = max(out, d)
		}
	}
	return out
}

// String summarises r in one line, for a test's log.
func (r Report) String() string {
	return fmt.Sprintf("%d of %d streams survived, %d replies checked, longest stall %s, backends %v",
		r.Survived, r.Streams, r.Replies, r.LongestStall.Round(time.Millisecond), r.Backends)
}

// Stop ends every stream and reports.
func (c *Checker) Stop() Report {
	stopped := time.Now()
	c.cancel()
	c.wg.Wait()
	r := Report{Streams: len(c.streams), Backends: map[string]int{}, Stalls: map[string]time.Duration{}}
	for _, s := range c.streams {
		r.Backends[s.backend]++
		r.Replies += s.replies
		if s.err != nil {
			r.Failed = append(r.Failed, Failure{Local: s.local, Backend: s.backend, At: s.failedAt, Err: s.err})
			continue
		}
		r.Survived++
		stall := s.stall
		if !s.last.IsZero() {
			stall = max(stall, stopped.Sub(s.last))
		}
		r.LongestStall = max(r.LongestStall, stall)
		r.Stalls[s.backend] = max(r.Stalls[s.backend], stall)
	}
	return r
}

// Serve answers streams on l until it is closed, naming itself id in
// every reply. It returns nil once l is closed.
func Serve(l net.Listener, id string) error {
	for {
		conn, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		go func() {
			defer func() { _ = conn.Close() }()
			r := bufio.NewScanner(conn)
			for r.Scan() {
				if _, err := fmt.Fprintf(conn, "%s %s\n", r.Text(), id); err != nil {
					return
				}
			}
		}()
	}
}
