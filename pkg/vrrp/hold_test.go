package vrrp

import (
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/keepalived"
)

// TestHold walks one node's Hold through the ways a node comes back to an
// instance and the ways that are not a return, checking Held after each.
func TestHold(t *testing.T) {
	const delay = 60 * time.Second
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	nodes := readyNodes(3)
	pools := []Pool{{Name: "d", FirstVRID: 1, LastVRID: 4}, {Name: "i", FirstVRID: 5, LastVRID: 8, Failback: v1alpha1.FailbackImmediate}}
	in := Input{Nodes: nodes, Pools: pools, VIPs: append(shared("d", seq("192.0.2.1", 2)), shared("i", seq("198.51.100.1", 2))...)}
	p := Compute(in)
	const node = "node-0"
	var delayed, immediate []string
	for _, inst := range p.For(node) {
		if inst.Pool == "d" {
			delayed = append(delayed, inst.Name)
		} else {
			immediate = append(immediate, inst.Name)
		}
	}
	if len(delayed) != 2 || len(immediate) != 2 {
		t.Fatalf("instances of %s: delayed %v, immediate %v; want 2 each", node, delayed, immediate)
	}
	a, b := delayed[0], delayed[1]
	states := func(s ...keepalived.State) map[string]keepalived.State {
		m := map[string]keepalived.State{}
		for i, name := range slices.Concat(delayed, immediate) {
			m[name] = s[min(i, len(s)-1)]
		}
		return m
	}
	backup := states(keepalived.StateBackup)
	window := promptWindow(p.For(node)[0])
	check := func(what string, h Hold, p Plan, _ map[string]keepalived.State, now time.Time, want []string, wantUntil time.Time) {
		t.Helper()
		held, until := h.Held(p, node, now)
		if got := slices.Sorted(maps.Keys(held)); !slices.Equal(got, want) || !until.Equal(wantUntil) {
			t.Errorf("%s: held %v until %v, want %v until %v", what, got, until, want, wantUntil)
		}
		// Rendered without preempt_delay: within the window after a
		// hold's end only, and never an instance without a HoldDown.
		prompt := slices.Sorted(maps.Keys(h.Prompt(p, node, now, now)))
		var wantPrompt []string
		for _, name := range []string{a, b} {
			if held[name] {
				continue
			}
			if end := h.from(name).Add(delay); !now.Before(end) && now.Before(end.Add(window)) {
				wantPrompt = append(wantPrompt, name)
			}
		}
		if !slices.Equal(prompt, wantPrompt) {
			t.Errorf("%s: prompt %v, want %v", what, prompt, wantPrompt)
		}
	}

	// The speaker starts: every Delayed instance is held for the delay,
	// the Immediate ones never, whatever keepalived's state; then each is
	// rendered without preempt_delay for the prompt window, then with it
	// again.
	h := NewHold(t0, false).Next(p, node, nil, t0)
	check("at start", h, p, nil, t0, []string{a, b}, t0.Add(delay))
	check("at start, master of one", h, p, map[string]keepalived.State{a: keepalived.StateMaster}, t0.Add(time.Second), []string{a, b}, t0.Add(delay))
	check("one delay after start", h, p, backup, t0.Add(delay), nil, time.Time{})
	if got := h.Prompt(p, node, t0.Add(delay), t0.Add(delay)); !got[a] || !got[b] || len(got) != 2 {
		t.Errorf("at the hold's end: prompt %v, want %s and %s", got, a, b)
	}
	if got := h.Prompt(p, node, t0.Add(-time.Second), t0.Add(delay)); len(got) != 0 {
		t.Errorf("at the hold's end, no reload since the start: prompt %v, want none (keepalived's own delay ends now)", got)
	}
	if got := h.Prompt(p, node, t0.Add(delay+window), t0.Add(delay+window)); len(got) != 0 {
		t.Errorf("after the prompt window: prompt %v, want none", got)
	}
	if zero := (Hold{}); len(func() map[string]bool { m, _ := zero.Held(p, node, t0); return m }()) != 0 {
		t.Errorf("the zero Hold holds instances")
	}

	// A reload: the same states and plan, synced again and again, changes
	// nothing (keepalived's preempt_delay restarted here).
	t1 := t0.Add(10 * time.Minute)
	h = h.Next(p, node, backup, t0.Add(time.Second))
	for i := range 5 {
		h = h.Next(p, node, backup, t1.Add(time.Duration(i)*time.Second))
	}
	check("after reloads", h, p, backup, t1.Add(5*time.Second), nil, time.Time{})

	// The link goes down (FAULT) and comes back: every instance it left
	// is held from its return.
	h = h.Next(p, node, states(keepalived.StateFault), t1.Add(10*time.Second))
	back := t1.Add(20 * time.Second)
	h = h.Next(p, node, backup, back)
	check("back from FAULT", h, p, backup, back.Add(time.Second), []string{a, b}, back.Add(delay))
	h = h.Next(p, node, backup, back.Add(30*time.Second))
	check("back from FAULT, after a reload", h, p, backup, back.Add(30*time.Second), []string{a, b}, back.Add(delay))
	h = h.Next(p, node, backup, back.Add(delay))
	check("a delay after the return", h, p, backup, back.Add(delay), nil, time.Time{})
	if got := h.Prompt(p, node, back.Add(delay+time.Second), back.Add(delay+time.Second)); len(got) != 2 {
		t.Errorf("a delay after the return: prompt %v, want both", got)
	}
	h = h.Next(p, node, backup, back.Add(delay+window))
	if len(h.Returned) != 0 {
		t.Errorf("returns kept after their delay and window: %v", h.Returned)
	}

	// keepalived restarted (STOP) is a return; DELETED, then BACKUP (the
	// instance left this node's config and came back with a new plan) is
	// not by itself.
	t2 := t1.Add(time.Hour)
	h = h.Next(p, node, states(keepalived.StateStop), t2)
	h = h.Next(p, node, backup, t2.Add(time.Second))
	check("keepalived restarted", h, p, backup, t2.Add(time.Second), []string{a, b}, t2.Add(time.Second+delay))
	t3 := t2.Add(time.Hour)
	h = h.Next(p, node, states(keepalived.StateDeleted), t3)
	h = h.Next(p, node, backup, t3.Add(time.Second))
	check("deleted, then backup", h, p, backup, t3.Add(time.Second), nil, time.Time{})

	// The node goes NotReady (the plan drops it from every instance) and
	// comes back: the instances that existed without it are held.
	t4 := t3.Add(time.Hour)
	down := slices.Clone(nodes)
	down[0].Ready = false
	without := Compute(Input{Nodes: down, Pools: pools, VIPs: in.VIPs})
	if len(without.For(node)) != 0 {
		t.Fatalf("a NotReady node still takes part in %d instances", len(without.For(node)))
	}
	h = h.Next(without, node, nil, t4)
	h = h.Next(p, node, backup, t4.Add(30*time.Second))
	check("Ready again", h, p, backup, t4.Add(31*time.Second), []string{a, b}, t4.Add(30*time.Second+delay))

	// A new instance (a new pool's) is not a return: nobody held it.
	t5 := t4.Add(time.Hour)
	more := in
	more.Pools = append(slices.Clone(pools), Pool{Name: "n", FirstVRID: 9, LastVRID: 12})
	more.VIPs = append(slices.Clone(in.VIPs), shared("n", seq("203.0.113.1", 1))...)
	pm := Compute(more)
	h = h.Next(p, node, backup, t5)
	h = h.Next(pm, node, backup, t5.Add(time.Second))
	check("a new instance", h, p, backup, t5.Add(2*time.Second), nil, time.Time{})
	var fresh string
	for _, inst := range pm.For(node) {
		if inst.Pool == "n" {
			fresh = inst.Name
		}
	}
	if held, _ := h.Held(pm, node, t5.Add(2*time.Second)); held[fresh] || !h.Prompt(pm, node, t5.Add(2*time.Second), t5.Add(2*time.Second))[fresh] {
		t.Errorf("a new instance %s: held %v, prompt %v; want prompt, not held", fresh, held[fresh], h.Prompt(pm, node, t5.Add(2*time.Second), t5.Add(2*time.Second))[fresh])
	}
	after := t5.Add(time.Second + NewInstanceGrace(pm.For(node)[0]) + window + time.Second)
	if h = h.Next(pm, node, backup, after); h.Prompt(pm, node, after, after)[fresh] {
		t.Errorf("a new instance after its grace and window: still rendered without preempt_delay")
	}
}

// TestDeferred: an instance new to the cluster is left out of every node's
// configuration but its planned master's for NewInstanceGrace, a Local one's
// planned master being the best node with endpoints; instances seen at the
// first sync, or that existed before, are not deferred.
func TestDeferred(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	nodes := readyNodes(3)
	old := Pool{Name: "old", FirstVRID: 1, LastVRID: 20}
	in := Input{Nodes: nodes, Pools: []Pool{old}, VIPs: shared("old", seq("192.0.2.1", 4))}
	p := Compute(in)
	holds := map[string]Hold{}
	for _, n := range nodes {
		holds[n.Name] = NewHold(t0, false).Next(p, n.Name, nil, t0)
		if d, starting, until := holds[n.Name].Deferred(p, n.Name, in, t0); len(d) != 0 || starting || !until.IsZero() {
			t.Errorf("%s at its first sync, adopting a hand-off: deferred %v (starting %v) until %v, want none", n.Name, d, starting, until)
		}
		// Afresh, it defers those it is not the planned master of, for
		// the grace.
		fresh := NewHold(t0, true).Next(p, n.Name, nil, t0)
		d, starting, until := fresh.Deferred(p, n.Name, in, t0.Add(time.Second))
		for _, inst := range p.For(n.Name) {
			if want := inst.Master() != n.Name; d[inst.Name] != want || want && (!starting || !until.Equal(t0.Add(NewInstanceGrace(inst)))) {
				t.Errorf("%s started afresh: %s (planned master %s) deferred %v (starting %v, until %v)", n.Name, inst.Name, inst.Master(), d[inst.Name], starting, until)
			}
		}
		fresh = fresh.Next(p, n.Name, nil, t0.Add(20*time.Second))
		if d, starting, _ := fresh.Deferred(p, n.Name, in, t0.Add(20*time.Second)); len(d) != 0 || starting {
			t.Errorf("%s after its start's grace: deferred %v (starting %v)", n.Name, d, starting)
		}
	}

	// A new pool, a new VIP in an old instance's bucket, and a Local VIP
	// with endpoints on node-2 only.
	fresh := Pool{Name: "fresh", FirstVRID: 21, LastVRID: 40, Advert: 100 * time.Millisecond}
	more := in
	more.Pools = []Pool{old, fresh}
	more.VIPs = slices.Concat(in.VIPs, shared("old", seq("192.0.2.11", 1)), // 10 buckets: 192.0.2.1's
		shared("fresh", seq("198.51.100.1", 6)),
		[]VIP{local("fresh", netip.MustParseAddr("198.51.100.200"), 0, "node-2")})
	pm := Compute(more)
	t1 := t0.Add(time.Minute)
	seen := map[string]bool{}
	for _, n := range nodes {
		h := holds[n.Name].Next(pm, n.Name, nil, t1)
		d, starting, until := h.Deferred(pm, n.Name, more, t1.Add(time.Second))
		if starting {
			t.Errorf("%s: deferring new instances counts as starting", n.Name)
		}
		for _, inst := range pm.For(n.Name) {
			master := inst.Master()
			if inst.Local {
				master = "node-2"
			}
			want := inst.Pool == "fresh" && master != n.Name
			if d[inst.Name] != want {
				t.Errorf("%s: %s (pool %s, planned master %s) deferred %v, want %v", n.Name, inst.Name, inst.Pool, master, d[inst.Name], want)
			}
			if want {
				seen[inst.Name] = true
				if g := NewInstanceGrace(inst); !until.Equal(t1.Add(g)) || g < 5*time.Second+3*inst.Advert {
					t.Errorf("%s: deferral until %v, want %v (grace %v)", n.Name, until, t1.Add(g), g)
				}
			}
		}
		after := t1.Add(20 * time.Second)
		h = h.Next(pm, n.Name, nil, after)
		if d, _, _ := h.Deferred(pm, n.Name, more, after); len(d) != 0 {
			t.Errorf("%s after the grace: deferred %v, born %v", n.Name, d, h.Born)
		}
	}
	if len(seen) < 4 {
		t.Errorf("only %d instances deferred anywhere: the test proves little", len(seen))
	}
}
