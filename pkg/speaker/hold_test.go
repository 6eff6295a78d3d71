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

// TestFailbackHold runs syncs of one speaker at chosen times and checks
// the track files its failback hold gives (vrrp.Hold): the node is held
// down for the pool's delay after its speaker started, not on the
// instance it masters, not after the delay, and again after its instance
// left FAULT; a sync is due when the hold ends; and a sync after it
// writes the unheld values without any other change.
func TestFailbackHold(t *testing.T) {
	s, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	t0 := time.Now()
	s.since = t0
	at := func(now time.Time, states map[string]keepalived.State) (desired, map[string]int) {
		t.Helper()
		s.statesMu.Lock()
		s.states = states
		s.statesMu.Unlock()
		obs, err := s.observe(s.pending.take(), now)
		if err != nil {
			t.Fatal(err)
		}
		want := s.compute(obs)
		if err := s.apply(t.Context(), obs, want); err != nil {
			t.Fatal(err)
		}
		return want, trackFiles(t, s, want.track[true])
	}

	want, got := at(t0.Add(time.Second), nil)
	p, in := want.plan, s.collect()
	pin, _ := PlanInput(in)
	var shared []string
	for _, inst := range p.For("n1") {
		if inst.HoldDown == vrrp.PreemptDelay && !inst.Local {
			shared = append(shared, inst.Name)
		}
	}
	if len(shared) < 2 {
		t.Fatalf("n1 takes part in %d shared Delayed instances, want 2 or more: the test proves nothing", len(shared))
	}
	all := map[string]bool{}
	for _, inst := range p.For("n1") {
		all[inst.Name] = true
	}
	held, free := vrrp.TrackValues(p, "n1", pin, true, all), vrrp.TrackValues(p, "n1", pin, true, nil)
	for _, name := range shared {
		if held[name] >= free[name] {
			t.Fatalf("%s: held value %d not below %d", name, held[name], free[name])
		}
	}
	if !mapsEqual(got, held) {
		t.Errorf("just after start: track files %v, want held %v", got, held)
	}
	if !s.holdAt.Equal(t0.Add(vrrp.PreemptDelay)) {
		t.Errorf("next sync for the hold at %v, want %v", s.holdAt, t0.Add(vrrp.PreemptDelay))
	}

	// The instance it masters is not held; the others still are.
	master := map[string]keepalived.State{shared[0]: keepalived.StateMaster}
	for _, name := range shared[1:] {
		master[name] = keepalived.StateBackup
	}
	if _, got = at(t0.Add(10*time.Second), master); got[shared[0]] != free[shared[0]] || got[shared[1]] != held[shared[1]] {
		t.Errorf("master of %s: its value %d (want %d), %s's %d (want %d, still held)", shared[0], got[shared[0]], free[shared[0]], shared[1], got[shared[1]], held[shared[1]])
	}

	// The hold's end: a sync with no other change writes the free values.
	backup := map[string]keepalived.State{}
	for _, name := range shared {
		backup[name] = keepalived.StateBackup
	}
	at(t0.Add(20*time.Second), backup)
	if want, got = at(t0.Add(vrrp.PreemptDelay), backup); want.reused || !mapsEqual(got, free) {
		t.Errorf("at the hold's end (VRRP recomputed: %v): track files %v, want %v", !want.reused, got, free)
	}
	if !s.holdAt.IsZero() || len(want.held) != 0 {
		t.Errorf("after the hold: %d held, next hold sync at %v", len(want.held), s.holdAt)
	}

	// Its link goes down and comes back: held again, for the delay.
	fault := map[string]keepalived.State{}
	for _, name := range shared {
		fault[name] = keepalived.StateFault
	}
	back := t0.Add(5 * time.Minute)
	at(back.Add(-time.Second), fault)
	if _, got = at(back, backup); !mapsEqual(got, held) {
		t.Errorf("back from FAULT: track files %v, want held %v", got, held)
	}
	// Reloads (here: syncs with the same state) do not restart it.
	for i := range 3 {
		at(back.Add(time.Duration(i+1)*10*time.Second), backup)
	}
	if _, got = at(back.Add(vrrp.PreemptDelay), backup); !mapsEqual(got, free) {
		t.Errorf("a delay after the return, syncs between: track files %v, want %v", got, free)
	}
}

// TestNewInstanceDeferred: a sync that finds instances new to the cluster
// leaves out of keepalived.conf those this node is not the planned master
// of, for vrrp.NewInstanceGrace, and a sync at the grace's end adds them.
func TestNewInstanceDeferred(t *testing.T) {
	s, _, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	t0 := time.Now().Add(-time.Hour)
	s.since = t0
	run := func(now time.Time) desired {
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
