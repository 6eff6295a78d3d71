package streams

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// GapOptions say how to probe.
type GapOptions struct {
	// Addr is the host:port of a UDP echo (ServeUDP).
	Addr string
	// Flows is how many UDP flows (a socket each, so a source port each)
	// to send on.
	Flows int
	// Interval is the time between two datagrams of a flow.
	Interval time.Duration
	// Dial opens a flow's socket; nil means net.Dialer's.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Gaps measures the forwarding gap of an event: on each of a few UDP
// flows it sends a numbered datagram every Interval, never waiting for
// the answer, and records the longest time between two answers. Unlike a
// TCP stream's stall, which grows with its retransmission timeout's
// backoff (a segment lost at a move is sent again after 200 ms, then 400,
// 800…), this is how long the dataplane did not forward that flow, to
// within Interval. It also counts the datagrams never answered: a TCP
// stream stalls for a retransmission timeout when it loses one, so a
// move that loses none is what keeps TCP's stall at the lab's own. A flow
// keeps its source port, so after a move it takes the connection entry
// the sync daemon gave the new holder.
type Gaps struct {
	opts GapOptions
	// stopSending ends the senders, cancel the receivers too.
	stopSending, cancel context.CancelFunc
	senders, receivers  sync.WaitGroup
	flows               []*gapFlow
}

type gapFlow struct {
	mu sync.Mutex
	// backend is the first backend that answered, before the event: a
	// flow whose backend died is answered by another once its connection
	// entry expires, which is no forwarding gap of the move's.
	backend string
	last    time.Time
	gap     time.Duration
	answers int
	// sent counts the datagrams sent, numbered 0 to sent-1; seen holds
	// the numbers answered (an answer can come twice, or out of order).
	sent int
	seen map[int]bool
}

// StartGaps opens the flows and starts sending; it fails when a flow
// cannot be opened or has no answer within a second.
func StartGaps(ctx context.Context, opts GapOptions) (*Gaps, error) {
	if opts.Dial == nil {
		var d net.Dialer
		opts.Dial = d.DialContext
	}
	ctx, cancel := context.WithCancel(ctx)
	sendCtx, stopSending := context.WithCancel(ctx)
	g := &Gaps{opts: opts, cancel: cancel, stopSending: stopSending}
	for range opts.Flows {
		conn, err := opts.Dial(ctx, "udp", opts.Addr)
		if err != nil {
			g.Stop()
			return nil, fmt.Errorf("open a UDP flow to %s: %w", opts.Addr, err)
		}
		f := &gapFlow{seen: map[int]bool{}}
		g.flows = append(g.flows, f)
		g.senders.Add(1)
		g.receivers.Add(1)
		go g.send(sendCtx, conn, f)
		go g.receive(ctx, conn, f)
	}
	deadline := time.Now().Add(time.Second)
	for _, f := range g.flows {
		for f.answered() == 0 {
			if time.Now().After(deadline) {
				g.Stop()
				return nil, fmt.Errorf("no answer from %s on a UDP flow within a second", opts.Addr)
			}
			time.Sleep(opts.Interval)
		}
	}
	return g, nil
}

func (f *gapFlow) answered() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.answers
}

// lost counts the datagrams sent and never answered.
func (f *gapFlow) lost() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent - len(f.seen)
}

func (g *Gaps) send(ctx context.Context, conn net.Conn, f *gapFlow) {
	defer g.senders.Done()
	t := time.NewTicker(g.opts.Interval)
	defer t.Stop()
	for seq := 0; ; seq++ {
		// Counted before it goes, so that its answer finds it counted.
		f.mu.Lock()
		f.sent = seq + 1
		f.mu.Unlock()
		// A failed write (an ICMP error reported on a connected socket)
		// is one datagram lost, like any other.
		_, _ = conn.Write([]byte(strconv.Itoa(seq)))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (g *Gaps) receive(ctx context.Context, conn net.Conn, f *gapFlow) {
	defer g.receivers.Done()
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	buf := make([]byte, 512)
	for {
		n, err := conn.Read(buf)
		if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
			return
		}
		if err != nil {
			continue // an ICMP error: the flow is not forwarded, for now
		}
		now := time.Now()
		num, id, _ := strings.Cut(string(buf[:n]), " ")
		seq, err := strconv.Atoi(num)
		if err != nil {
			continue // not an answer of ours
		}
		f.mu.Lock()
		if seq < f.sent {
			f.seen[seq] = true
		}
		if !f.last.IsZero() {
			f.gap = max(f.gap, now.Sub(f.last))
		}
		f.last = now
		if f.answers == 0 {
			f.backend = id
		}
		f.answers++
		f.mu.Unlock()
	}
}

// GapReport is what Stop saw.
type GapReport struct {
	// Gaps is the longest gap of the flows, by the backend that first
	// answered each, including the time from its last answer to Stop.
	Gaps map[string]time.Duration
	// Flows counts the flows by that backend.
	Flows map[string]int
	// Lost counts, by that backend, the datagrams never answered.
	Lost map[string]int
}

// LongestExcept returns the longest gap of the flows not first answered
// by a backend in gone.
func (r GapReport) LongestExcept(gone ...string) time.Duration {
	return longestExcept(r.Gaps, gone)
}

// LostExcept counts the datagrams never answered on the flows not first
// answered by a backend in gone.
func (r GapReport) LostExcept(gone ...string) int {
	n := 0
	for b, l := range r.Lost {
		if !slices.Contains(gone, b) {
			n += l
		}
	}
	return n
}

// drainWait bounds how long Stop waits for the answers to the last
// datagrams sent: an answer later than that counts as lost.
const drainWait = 500 * time.Millisecond

// Stop ends the flows and reports. A gap runs to the moment Stop is
// called; the answers to the datagrams sent before it may come until every
// flow has them all, or drainWait has passed.
func (g *Gaps) Stop() GapReport {
	now := time.Now()
	g.stopSending()
	g.senders.Wait()
	deadline := time.Now().Add(drainWait)
	for _, f := range g.flows {
		for f.lost() > 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	}
	g.cancel()
	g.receivers.Wait()
	r := GapReport{Gaps: map[string]time.Duration{}, Flows: map[string]int{}, Lost: map[string]int{}}
	for _, f := range g.flows {
		gap := f.gap
		if !f.last.IsZero() && f.last.Before(now) {
			gap = max(gap, now.Sub(f.last))
		}
		r.Gaps[f.backend] = max(r.Gaps[f.backend], gap)
		r.Flows[f.backend]++
		r.Lost[f.backend] += f.lost()
	}
	return r
}

// ServeUDP answers every datagram on c with its content, a space and id,
// until c is closed; it returns nil then.
func ServeUDP(c net.PacketConn, id string) error {
	buf := make([]byte, 512)
	for {
		n, from, err := c.ReadFrom(buf)
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		_, _ = c.WriteTo(append(buf[:n:n], " "+id...), from)
	}
}
