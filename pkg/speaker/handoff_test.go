package speaker

import (
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	cbtestutil "k8s.io/component-base/metrics/testutil"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/handoff"
	hostnettesting "github.com/keeplb/keeplb/pkg/hostnet/testing"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nft"
)

// TestAdoption runs the syncs of a speaker adopting a hand-off, on fakes:
// the adopted VIPs stay on the node and out of keepalived.conf until
// their instance is MASTER, then go back in; an adopted VIP no instance
// of this node has is taken off at once; the speaker is not ready while
// it adopts. After the deadline, or once keepalived had time to take
// over and did not (another node is master: "outranked"), what
// keepalived does not hold is taken off the node.
func TestAdoption(t *testing.T) {
	held := netip.MustParsePrefix("192.0.2.1/32")
	gone := netip.MustParsePrefix("192.0.2.99/32") // in the pool, in no instance
	for _, tc := range []string{"adopted", "expired", "outranked"} {
		expired := tc != "adopted"
		s, k, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
		net := k.Net.(*hostnettesting.Fake)
		net.AddAddress("eth0", held)
		net.AddAddress("eth0", gone)
		// As the leaving speaker left it: bounded by the deadline.
		if err := net.SetAddressLifetime("eth0", held, time.Hour); err != nil {
			t.Fatal(err)
		}
		begun, deadline := time.Now(), time.Now().Add(time.Hour)
		switch tc {
		case "expired":
			deadline = time.Now().Add(-time.Millisecond)
		case "outranked":
			begun = time.Now().Add(-time.Hour) // keepalived had time
		}
		s.adoption.start([]netip.Prefix{held, gone}, begun, deadline)
		s.health.synced = time.Now() // as run sets it before the first sync
		if err := s.sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if tc == "outranked" {
			// keepalived reports BACKUP: another node is master. The
			// first sync set when keepalived should have taken over.
			s.statesMu.Lock()
			for _, in := range s.lastVRRP.instances {
				s.states[in] = keepalived.StateBackup
			}
			s.statesMu.Unlock()
			if err := s.sync(t.Context()); err != nil {
				t.Fatal(err)
			}
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
			t.Errorf("%s: %v, adopted but in no instance of this node, is still on it", tc, gone)
		}
		if expired {
			if onNode(held) || !inConf() || s.adoption.pending() != 0 {
				t.Errorf("%s: %v on the node %v, in keepalived.conf %v, still adopted %d; want off, in, 0", tc, held, onNode(held), inConf(), s.adoption.pending())
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
		if got, _ := cbtestutil.GetCounterMetricValue(s.metrics.HandoffAdopted.WithLabelValues("held")); got != 1 {
			t.Errorf("keeplb_speaker_handoff_adopted_vips_total{result=held} = %v, want 1", got)
		}
		if at, bounded := net.Expires(held); bounded {
			t.Errorf("MASTER: %v still goes at %v, the hand-off's deadline; keepalived holds it now", held, at)
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

// TestHandOffExit runs a speaker's hand-off exit on fakes: keepalived is
// killed (not stopped) after loading a configuration that announces the
// patient advert interval, the VIP stays on the node, bounded by the
// timeout, and the record names the instance it mastered.
func TestHandOffExit(t *testing.T) {
	s, k, proc := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	s.opts.Handoff, s.opts.HandoffDir, s.opts.HandoffTimeout = HandoffAlways, t.TempDir(), 30*time.Second
	s.since = time.Now().Add(-time.Hour).Truncate(time.Second)
	net := k.Net.(*hostnettesting.Fake)
	vip := netip.MustParsePrefix("192.0.2.1/32")
	net.AddAddress("eth0", vip) // keepalived's doing, as master
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	name := ""
	for _, in := range s.lastVRRP.keepalivedConfig.Instances {
		if slices.Contains(in.VIPs, vip) {
			name = in.Name
		}
	}
	if name == "" {
		t.Fatalf("no instance of n1 has %v", vip)
	}
	s.statesMu.Lock()
	s.states[name] = keepalived.StateMaster
	s.statesMu.Unlock()
	done := make(chan struct{})
	go func() { defer close(done); s.sup.Run(t.Context()) }()
	for !proc.Running() {
		time.Sleep(time.Millisecond)
	}

	if !s.handOff(t.Context()) {
		t.Fatal("no hand-off")
	}
	<-done
	if !proc.Killed() {
		t.Error("keepalived was not killed: a clean stop sends priority-0 adverts")
	}
	// 31 s: the timeout, and the second keepalived runs after the reload.
	if !strings.Contains(string(proc.Config()), "advert_int 10.34") {
		t.Errorf("keepalived's last configuration does not announce 10.34 s adverts:\n%s", proc.Config())
	}
	if at, bounded := net.Expires(vip); !bounded || time.Until(at) > 28*time.Second || time.Until(at) < 26*time.Second {
		t.Errorf("%v left with lifetime until %v (bounded %v), want 28 s: 2 s before the backups take over", vip, at, bounded)
	}
	boot, _ := handoff.BootID()
	rec, ok, why := handoff.Take(s.opts.HandoffDir, "n1", boot, time.Now())
	if !ok || !slices.Equal(rec.Instances[name], []netip.Prefix{vip}) {
		t.Errorf("record %+v (valid %v, %v), want %s with %v", rec, ok, why, name, vip)
	}
	if want := s.dp.programmed(); len(want) == 0 || !slices.Equal(rec.VirtualServers, want) {
		t.Errorf("record's virtual servers %v, want the %d programmed", rec.VirtualServers, len(want))
	}
	if !rec.Since.Equal(s.since) {
		t.Errorf("record's since %v, want the speaker's %v: the replacement's failback holds count from it", rec.Since, s.since)
	}

	// The replacement takes Since over, so that it is not held down on
	// the instances it adopts.
	if err := handoff.Write(s.opts.HandoffDir, rec); err != nil {
		t.Fatal(err)
	}
	next, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	next.opts.HandoffDir = s.opts.HandoffDir
	next.since = time.Now()
	if vips := next.adoptHandoff(t.Context()); len(vips) == 0 || !next.since.Equal(rec.Since) {
		t.Errorf("the replacement adopted %v and counts its holds from %v, want %v", vips, next.since, rec.Since)
	}
}

// TestExpiredHandoffVirtualServers: a replacement that comes after the
// hand-off's deadline adopts no VIP, but takes over the IPVS virtual
// servers the record names, and deletes those no Service wants any more;
// the virtual servers of a record from another boot stay another
// program's. A real cluster's uninstall found a slow replacement's
// virtual servers left behind for good.
func TestExpiredHandoffVirtualServers(t *testing.T) {
	boot, err := handoff.BootID()
	if err != nil {
		t.Skip("no boot ID here:", err)
	}
	gone := ipvs.Key{Address: netip.MustParseAddr("192.0.2.99"), Protocol: "TCP", Port: 80}
	for _, tc := range []struct {
		name   string
		boot   string
		cleans bool
	}{
		{"expired, this boot", boot, true},
		{"another boot", "another-boot", false},
	} {
		s, k, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
		s.opts.HandoffDir = t.TempDir()
		fake := k.IPVS.(*ipvstesting.Fake)
		fake.Seed(ipvs.VirtualServer{Address: gone.Address, Protocol: gone.Protocol, Port: gone.Port, Scheduler: "rr"},
			ipvs.RealServer{Address: netip.MustParseAddr("10.0.0.2"), Port: 30099, Weight: 1})
		now := time.Now()
		rec := handoff.Record{Node: "n1", BootID: tc.boot, Written: now.Add(-2 * time.Minute), Deadline: now.Add(-time.Minute),
			Instances: map[string][]netip.Prefix{"kl_p_v4_b03": {netip.MustParsePrefix("192.0.2.99/32")}}, VirtualServers: []ipvs.Key{gone}}
		if err := handoff.Write(s.opts.HandoffDir, rec); err != nil {
			t.Fatal(err)
		}
		if vips := s.adoptHandoff(t.Context()); len(vips) != 0 {
			t.Errorf("%s: adopted VIPs %v of a void record", tc.name, vips)
		}
		if err := s.sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		_, left := fake.Table()[gone]
		if left == tc.cleans {
			t.Errorf("%s: virtual server %s left %v, want %v", tc.name, gone, left, !tc.cleans)
		}
	}
}
