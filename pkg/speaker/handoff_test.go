package speaker

import (
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nft"
)

// TestAdoption runs the syncs of a speaker adopting a hand-off, on fakes:
// the adopted VIPs stay on the node and out of keepalived.conf until
// their instance is MASTER, then go back in; an adopted VIP no instance
// of this node has is taken off at once; the speaker is not ready while
// it adopts. After the deadline, what keepalived does not hold is taken
// off the node.
func TestAdoption(t *testing.T) {
	held := netip.MustParsePrefix("192.0.2.1/32")
	gone := netip.MustParsePrefix("192.0.2.99/32") // in the pool, in no instance
	for _, expired := range []bool{false, true} {
		s, k, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
		net := k.Net.(interface {
			AddAddress(string, netip.Prefix)
		})
		net.AddAddress("eth0", held)
		net.AddAddress("eth0", gone)
		deadline := time.Now().Add(time.Hour)
		if expired {
			deadline = time.Now().Add(-time.Millisecond)
		}
		s.adoption.start([]netip.Prefix{held, gone}, deadline)
		s.health.synced = time.Now() // as run sets it before the first sync
		if err := s.sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		onNode := func(p netip.Prefix) bool {
			links, _ := k.Net.Links()
			for _, ln := range links {
				if slices.Contains(ln.Prefixes, p) {
					return true
				}
			}
			return false
		}
		conf := func() string {
			data, err := os.ReadFile(s.layout.ConfigPath())
			if err != nil {
				t.Fatal(err)
			}
			return string(data)
		}
		inConf := func() bool { return strings.Contains(conf(), held.String()+" dev eth0") }
		if onNode(gone) {
			t.Errorf("expired %v: %v, adopted but in no instance of this node, is still on it", expired, gone)
		}
		if expired {
			if onNode(held) || !inConf() || s.adoption.pending() != 0 {
				t.Errorf("after the deadline: %v on the node %v, in keepalived.conf %v, still adopted %d; want off, in, 0", held, onNode(held), inConf(), s.adoption.pending())
			}
			continue
		}
		if !onNode(held) || inConf() {
			t.Fatalf("adopting: %v on the node %v, in keepalived.conf %v; want on the node, out of keepalived.conf:\n%s", held, onNode(held), inConf(), conf())
		}
		if why := unready(s.health, keepalived.Status{Running: true}, time.Now()); !strings.Contains(why, "adopting") {
			t.Errorf("readiness while adopting: %q", why)
		}

		// keepalived reports the instance MASTER (the FIFO watcher's
		// work), and the next sync puts the VIP back.
		name := ""
		for _, in := range s.lastVRRP.keepalivedConfig.Instances {
			for _, p := range s.lastVRRP.plan.For("n1") {
				if p.Name == in.Name && slices.Contains(p.VIPs, held.Addr()) {
					name = in.Name
				}
			}
		}
		if name == "" {
			t.Fatalf("no instance of n1 has %v", held)
		}
		s.statesMu.Lock()
		for _, in := range s.lastVRRP.instances {
			s.states[in] = keepalived.StateBackup
		}
		s.states[name] = keepalived.StateMaster
		s.statesMu.Unlock()
		if err := s.sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if !onNode(held) || !inConf() || s.adoption.pending() != 0 {
			t.Errorf("MASTER: %v on the node %v, in keepalived.conf %v, still adopted %d; want on, in, 0", held, onNode(held), inConf(), s.adoption.pending())
		}
		if why := unready(s.health, keepalived.Status{Running: true}, time.Now()); why != "" {
			t.Errorf("not ready once adopted and every state known: %q", why)
		}
	}
}

// TestUnready: /readyz waits for a sync, keepalived, every instance's
// state and the adoption, and fails whenever /healthz does.
func TestUnready(t *testing.T) {
	now := time.Now()
	ok := health{synced: now, applied: true}
	for _, tc := range []struct {
		h    health
		st   keepalived.Status
		want string
	}{
		{health{}, keepalived.Status{Running: true}, "starting"},
		{health{synced: now}, keepalived.Status{Running: true}, "starting"},
		{ok, keepalived.Status{}, "keepalived is not running"},
		{health{synced: now, applied: true, notReady: "keepalived has not reported the state of x"}, keepalived.Status{Running: true}, "state of x"},
		{health{synced: now, applied: true, fifoDead: true}, keepalived.Status{Running: true}, "FIFO"},
		{ok, keepalived.Status{Running: true}, ""},
	} {
		got := unready(tc.h, tc.st, now)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("unready(%+v, %+v) = %q, want %q", tc.h, tc.st, got, tc.want)
		}
	}
}
