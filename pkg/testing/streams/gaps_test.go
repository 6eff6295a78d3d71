package streams

import (
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// pausingEcho is ServeUDP that answers nothing while paused.
type pausingEcho struct {
	net.PacketConn
	paused atomic.Bool
}

func (p *pausingEcho) WriteTo(b []byte, addr net.Addr) (int, error) {
	if p.paused.Load() {
		return len(b), nil
	}
	return p.PacketConn.WriteTo(b, addr)
}

// TestGaps: three flows to a UDP echo all answer, by its name; a pause of
// the echo shows as a gap at least as long on every flow and as datagrams
// lost, none are lost without one, and a gap counts up to Stop for a flow
// that never answers again.
func TestGaps(t *testing.T) {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echo := &pausingEcho{PacketConn: c}
	go func() { _ = ServeUDP(echo, "the-echo") }()
	defer c.Close()

	g, err := StartGaps(t.Context(), GapOptions{Addr: c.LocalAddr().String(), Flows: 3, Interval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	const pause = 300 * time.Millisecond
	echo.paused.Store(true)
	time.Sleep(pause) // the event measured, not a wait for a condition
	echo.paused.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for _, f := range g.flows {
		n := f.answered()
		for f.answered() == n {
			if time.Now().After(deadline) {
				t.Fatal("no answer after the pause")
			}
			time.Sleep(time.Millisecond)
		}
	}
	r := g.Stop()
	if r.Flows["the-echo"] != 3 || len(r.Flows) != 1 {
		t.Errorf("flows by backend %v; want 3 of the-echo", r.Flows)
	}
	if got := r.LongestExcept(); got < pause {
		t.Errorf("longest gap %s; want at least the pause, %s", got, pause)
	}
	if got := r.LongestExcept("the-echo"); got != 0 {
		t.Errorf("longest gap without the-echo's flows %s; want 0", got)
	}
	// The pause swallowed about 60 answers a flow; 10 a flow is what even
	// a starved ticker sends in it.
	if got := r.LostExcept(); got < 3*10 {
		t.Errorf("%d datagrams lost in a pause of %s at %s on 3 flows; want at least 30", got, pause, 5*time.Millisecond)
	}
	if got := r.LostExcept("the-echo"); got != 0 {
		t.Errorf("%d datagrams lost without the-echo's flows; want 0", got)
	}

	// Nothing happens: nothing is lost, the last datagrams' answers
	// included (Stop waits for them).
	g, err = StartGaps(t.Context(), GapOptions{Addr: c.LocalAddr().String(), Flows: 3, Interval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // datagrams to count, not a wait for a condition
	if r := g.Stop(); r.LostExcept() != 0 || r.Lost["the-echo"] != 0 {
		t.Errorf("lost %v without a pause; want none", r.Lost)
	}

	// Never answered again: the gap runs to Stop.
	g, err = StartGaps(t.Context(), GapOptions{Addr: c.LocalAddr().String(), Flows: 1, Interval: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	echo.paused.Store(true)
	time.Sleep(pause) // as above
	if got := g.Stop().LongestExcept(); got < pause {
		t.Errorf("a flow silent until Stop: gap %s, want at least %s", got, pause)
	}

	// Nothing answers at all: StartGaps fails.
	if g, err := StartGaps(t.Context(), GapOptions{Addr: c.LocalAddr().String(), Flows: 1, Interval: 5 * time.Millisecond}); err == nil {
		g.Stop()
		t.Error("StartGaps succeeded with no answer")
	}
}
