package speaker

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// syncAt runs one sync of s as if at now: observe, compute, apply.
func syncAt(t *testing.T, s *Speaker, now time.Time) desired {
	t.Helper()
	obs, err := s.observe(s.pending.take(), now)
	if err != nil {
		t.Fatal(err)
	}
	want := s.compute(obs)
	if err := s.apply(t.Context(), obs, want); err != nil {
		t.Fatal(err)
	}
	return want
}

// TestFailbackHold runs syncs of one speaker at chosen times and checks
// how its failback hold (vrrp.Hold) renders keepalived.conf: with
// keepalived's preempt_delay while the node is held, then, from the hold's
// end (a sync is due then, and that sync's reload ends any delay an
// earlier reload restarted), without it for a short window, then with it
// again; reloads during a hold change nothing, and a return from FAULT
// starts a hold anew.
func TestFailbackHold(t *testing.T) {
	s, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	t0 := time.Now()
	s.since = t0
	at := func(now time.Time, states map[string]keepalived.State) (desired, string) {
		t.Helper()
		s.statesMu.Lock()
		s.states = states
		s.statesMu.Unlock()
		want := syncAt(t, s, now)
		b, err := os.ReadFile(s.layout.ConfigPath())
		if err != nil {
			t.Fatal(err)
		}
		return want, string(b)
	}
	const delayed = "preempt_delay 60\n"
	want, conf := at(t0.Add(time.Second), nil)
	n := len(want.keepalivedConfig.Instances)
	if n == 0 {
		t.Fatal("n1 has no instance: the test proves nothing")
	}
	count := func(conf string) int { return strings.Count(conf, delayed) }
	if count(conf) != n || len(want.held) != n {
		t.Errorf("just after start: %d of %d instances with %q, %d held; want all", count(conf), n, delayed, len(want.held))
	}
	if !s.holdAt.Equal(t0.Add(vrrp.PreemptDelay)) {
		t.Errorf("next sync for the hold at %v, want %v", s.holdAt, t0.Add(vrrp.PreemptDelay))
	}
	backup := map[string]keepalived.State{}
	for _, in := range want.keepalivedConfig.Instances {
		backup[in.Name] = keepalived.StateBackup
	}
	// Syncs during the hold, as a reload each, change nothing of it.
	for i := range 3 {
		if _, conf = at(t0.Add(time.Duration(10+i)*time.Second), backup); count(conf) != n {
			t.Errorf("a sync during the hold: %d of %d instances with the delay", count(conf), n)
		}
	}

	// The hold's end: VRRP is recomputed although nothing else changed,
	// and keepalived.conf has no preempt_delay.
	if want, conf = at(t0.Add(vrrp.PreemptDelay), backup); want.reused || count(conf) != 0 || len(want.held) != 0 || !s.holdAt.IsZero() {
		t.Errorf("at the hold's end: recomputed %v, %d instances with the delay, %d held, next hold sync %v; want recomputed, none, none, none",
			!want.reused, count(conf), len(want.held), s.holdAt)
	}
	// After the window, the next sync that computes VRRP (here: a
	// resync) renders the delay again, for the next return.
	s.pending.everything()
	if _, conf = at(t0.Add(vrrp.PreemptDelay+time.Minute), backup); count(conf) != n {
		t.Errorf("after the window: %d of %d instances with the delay, want all", count(conf), n)
	}

	// Its link goes down and comes back: held again, from the return.
	fault := map[string]keepalived.State{}
	for name := range backup {
		fault[name] = keepalived.StateFault
	}
	back := t0.Add(5 * time.Minute)
	at(back.Add(-time.Second), fault)
	if want, _ = at(back, backup); len(want.held) != n || !s.holdAt.Equal(back.Add(vrrp.PreemptDelay)) {
		t.Errorf("back from FAULT: %d of %d held until %v, want all until %v", len(want.held), n, s.holdAt, back.Add(vrrp.PreemptDelay))
	}
	// No reload since the return: keepalived's own delay ends with the
	// hold, and the configuration keeps it (Local endpoint churn, which
	// faults and returns instances, causes no reload).
	if _, conf = at(back.Add(vrrp.PreemptDelay), backup); count(conf) != n {
		t.Errorf("a delay after a return without a reload: %d of %d instances with the delay, want all", count(conf), n)
	}

	// Again, with a reload during the hold (a VIP added to an existing
	// instance): at the hold's end, none has the delay.
	again := back.Add(10 * time.Minute)
	at(again.Add(-time.Second), fault)
	at(again, backup)
	svc := fwdService("more", "192.0.2.33", 80, 30099) // 192.0.2.1's instance (32 buckets)
	_ = s.services.GetStore().Add(svc)
	s.pending.service(svc)
	if _, conf = at(again.Add(10*time.Second), backup); !strings.Contains(conf, "192.0.2.33") || count(conf) != n {
		t.Fatalf("a VIP added during the hold: in keepalived.conf %v, %d of %d instances with the delay", strings.Contains(conf, "192.0.2.33"), count(conf), n)
	}
	if _, conf = at(again.Add(vrrp.PreemptDelay), backup); count(conf) != 0 {
		t.Errorf("a delay after a return with a reload during it: %d instances with the delay, want none", count(conf))
	}

	// Once more without a reload during the hold, but with one in the
	// sync at its end: that reload would restart the delay, so it goes
	// without.
	third := again.Add(10 * time.Minute)
	at(third.Add(-time.Second), fault)
	at(third, backup)
	svc = fwdService("most", "192.0.2.65", 80, 30098) // 192.0.2.1's instance too
	_ = s.services.GetStore().Add(svc)
	s.pending.service(svc)
	if _, conf = at(third.Add(vrrp.PreemptDelay), backup); !strings.Contains(conf, "192.0.2.65") || count(conf) != 0 {
		t.Errorf("a reload at the hold's end: VIP added %v, %d instances with the delay, want none", strings.Contains(conf, "192.0.2.65"), count(conf))
	}
}

// TestNewInstanceDeferred: a sync that finds instances new to the cluster
// leaves out of keepalived.conf those this node is not the planned master
// of, for vrrp.NewInstanceGrace, and a sync at the grace's end adds them.
func TestNewInstanceDeferred(t *testing.T) {
	s, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	t0 := time.Now().Add(-time.Hour)
	s.since = t0
	run := func(now time.Time) desired { return syncAt(t, s, now) }
	first := run(t0)
	if len(first.deferred) != 0 {
		t.Fatalf("first sync deferred %v: the instances a speaker starts with are no news", first.deferred)
	}
	before := map[string]bool{}
	for _, inst := range first.plan.Instances {
		before[inst.Name] = true
	}
	for i := range 12 {
		svc := fwdService(fmt.Sprintf("new%d", i), fmt.Sprintf("192.0.2.%d", 100+i), 80, int32(31000+i))
		_ = s.services.GetStore().Add(svc)
		s.pending.service(svc)
	}
	t1 := t0.Add(time.Minute)
	want := run(t1)
	var mine, others []string
	grace := time.Duration(0)
	for _, inst := range want.plan.For("n1") {
		if before[inst.Name] {
			continue
		}
		grace = vrrp.NewInstanceGrace(inst)
		if inst.Master() == "n1" {
			mine = append(mine, inst.Name)
		} else {
			others = append(others, inst.Name)
		}
	}
	if len(mine) == 0 || len(others) == 0 {
		t.Fatalf("new instances mastered by n1 %v, by others %v: want some of both", mine, others)
	}
	conf := func() string {
		b, err := os.ReadFile(s.layout.ConfigPath())
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, name := range mine {
		if !strings.Contains(conf(), "vrrp_instance "+name+" ") {
			t.Errorf("n1 is the planned master of %s, new, and left it out", name)
		}
	}
	for _, name := range others {
		if strings.Contains(conf(), "vrrp_instance "+name+" ") || !want.deferred[name] {
			t.Errorf("n1 configured %s, new and another node's to master, within the grace (deferred %v)", name, want.deferred[name])
		}
	}
	if !s.holdAt.Equal(t1.Add(grace)) {
		t.Errorf("next sync at %v, want the grace's end %v", s.holdAt, t1.Add(grace))
	}
	if want = run(t1.Add(grace)); want.reused || len(want.deferred) != 0 {
		t.Errorf("at the grace's end: VRRP recomputed %v, deferred %v", !want.reused, want.deferred)
	}
	for _, name := range others {
		if !strings.Contains(conf(), "vrrp_instance "+name+" ") {
			t.Errorf("after the grace, %s still left out", name)
		}
	}
}

// TestStartDeferred: a speaker that starts afresh leaves the instances it
// is not the planned master of out of keepalived.conf for the grace, and
// is not ready meanwhile; one that adopted a hand-off does not.
func TestStartDeferred(t *testing.T) {
	for _, adopted := range []bool{false, true} {
		s, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
		s.adopted = adopted
		t0 := time.Now()
		s.since = t0
		run := func(now time.Time) desired { return syncAt(t, s, now) }
		want := run(t0)
		var mine, others []string
		grace := time.Duration(0)
		for _, inst := range want.plan.For("n1") {
			grace = max(grace, vrrp.NewInstanceGrace(inst))
			if inst.Master() == "n1" {
				mine = append(mine, inst.Name)
			} else {
				others = append(others, inst.Name)
			}
		}
		if len(mine) == 0 || len(others) == 0 {
			t.Fatalf("n1 is the planned master of %v, not of %v: want some of both", mine, others)
		}
		configured := map[string]bool{}
		for _, in := range want.keepalivedConfig.Instances {
			configured[in.Name] = true
		}
		s.healthyMu.Lock()
		notReady := s.health.notReady
		s.healthyMu.Unlock()
		for _, name := range mine {
			if !configured[name] {
				t.Errorf("adopted %v: n1 left out %s, its own to master", adopted, name)
			}
		}
		for _, name := range others {
			if configured[name] == !adopted {
				t.Errorf("adopted %v: %s, another node's to master, configured %v at the start", adopted, name, configured[name])
			}
		}
		if (notReady == "") == !adopted || want.starting == adopted {
			t.Errorf("adopted %v: starting %v, not ready because %q", adopted, want.starting, notReady)
		}
		if adopted {
			continue
		}
		want = run(t0.Add(grace))
		if len(want.deferred) != 0 || want.starting || len(want.keepalivedConfig.Instances) != len(mine)+len(others) {
			t.Errorf("after the start's grace: deferred %v, starting %v, %d of %d instances configured", want.deferred, want.starting, len(want.keepalivedConfig.Instances), len(mine)+len(others))
		}
	}
}
