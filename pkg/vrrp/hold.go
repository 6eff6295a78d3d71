package vrrp

import (
	"maps"
	"net/netip"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

// Hold is one node's record of when it came back to each instance, for
// failback Delayed. keepalived's preempt_delay does the waiting: a backup
// that outranks the master takes over only once it has seen the master's
// adverts for the delay. But keepalived recreates its instances on every
// reload, and a recreated backup starts the delay anew, so under steady
// Service churn (a reload each) a node that came back never took its
// instances back. The speaker therefore keeps the hold itself (Held): when
// a node's hold on an instance ends, and a reload restarted keepalived's
// delay meanwhile, it renders that instance without preempt_delay for a
// short window (Prompt), a reload that ends the delay, and keepalived
// preempts at once; the next reload after the window renders the delay
// again, for the node's next return.
//
// A node comes back to an instance when:
//   - its speaker starts (Since), unless it adopts a hand-off, which keeps
//     the Since of the speaker it replaces;
//   - the instance leaves FAULT or STOP on it (its link came back, its
//     keepalived restarted, a Local instance's endpoints came to it);
//   - it becomes eligible for an instance that existed without it (the
//     Node became Ready again, or matches the pool's node selector).
//
// An instance new to the whole cluster is not a return: nobody held it.
// Such an instance is rendered without preempt_delay for its first
// NewInstanceGrace (Prompt), so that its planned master takes it at once
// from whichever node got it first, and Deferred leaves it out of every
// node's keepalived.conf but its planned master's meanwhile, so that it
// starts there in the first place.
//
// A speaker that starts afresh (not adopting a hand-off) also defers, for
// the same grace, every instance it is not the planned master of: when the
// speakers start together (a new cluster, a reboot of all), each instance
// then starts on its planned master instead of on the first node up, which
// preempt_delay would keep it on for a minute.
//
// Hold is a value: Next returns the record after one more sync, and the
// zero Hold has no Since (nothing held at start).
type Hold struct {
	// Since is when this node's speaker started serving.
	Since time.Time
	// Returned is, per instance, when this node last came back to it after
	// Since, while that still matters (within the instance's HoldDown and
	// its Prompt window).
	Returned map[string]time.Time
	// Born is, per instance new to the cluster (one the plan did not have
	// at the sync before), when this node first saw it, while that still
	// matters (within NewInstanceGrace and its prompt window).
	Born map[string]time.Time
	// took says, for each instance of the last plan, whether this node
	// took part in it; states are keepalived's states at the last sync.
	took   map[string]bool
	states map[string]keepalived.State
	// fresh says the speaker started afresh (no hand-off adopted), and
	// started is its first sync: it defers the instances it is not the
	// planned master of until a grace after it.
	fresh   bool
	started time.Time
}

// NewHold returns the record of a speaker that started serving at since:
// afresh (fresh), or adopting the hand-off of one that did at since.
func NewHold(since time.Time, fresh bool) Hold { return Hold{Since: since, fresh: fresh} }

// Next returns h after a sync that, at now, computed plan p and read
// keepalived's states (by instance name) on node.
func (h Hold) Next(p Plan, node string, states map[string]keepalived.State, now time.Time) Hold {
	next := Hold{
		Since:    h.Since,
		fresh:    h.fresh,
		started:  h.started,
		Returned: make(map[string]time.Time),
		Born:     make(map[string]time.Time),
		took:     make(map[string]bool, len(p.Instances)),
		states:   maps.Clone(states),
	}
	if h.took == nil {
		next.started = now
	}
	for _, inst := range p.Instances {
		_, in := inst.Priorities[node]
		next.took[inst.Name] = in
		born, ok := h.Born[inst.Name]
		if _, existed := h.took[inst.Name]; h.took != nil && !existed {
			born, ok = now, true
		}
		if ok && now.Sub(born) < NewInstanceGrace(inst)+promptWindow(inst) {
			next.Born[inst.Name] = born
		}
		if !in || inst.HoldDown <= 0 {
			continue
		}
		t, ok := h.Returned[inst.Name]
		if took, existed := h.took[inst.Name]; existed && !took || left(h.states[inst.Name], states[inst.Name]) {
			t, ok = now, true
		}
		if ok && now.Sub(t) < inst.HoldDown+promptWindow(inst) {
			next.Returned[inst.Name] = t
		}
	}
	return next
}

// left reports whether an instance's state went from prev to cur by
// coming back from a state in which it neither held nor competed.
func left(prev, cur keepalived.State) bool {
	down := func(s keepalived.State) bool { return s == keepalived.StateFault || s == keepalived.StateStop }
	return down(prev) && cur != "" && !down(cur) && cur != keepalived.StateDeleted
}

// Held returns the instances of p that node is held on at now (it came
// back to them less than their HoldDown ago; never one new to the
// cluster), and the earliest time one of those holds ends (zero when none
// is held): a sync is due then, which renders the instance without
// preempt_delay (Prompt).
func (h Hold) Held(p Plan, node string, now time.Time) (held map[string]bool, until time.Time) {
	held = make(map[string]bool)
	for _, inst := range p.For(node) {
		if _, born := h.Born[inst.Name]; born || inst.HoldDown <= 0 {
			continue
		}
		end := h.from(inst.Name).Add(inst.HoldDown)
		if !now.Before(end) {
			continue
		}
		held[inst.Name] = true
		if until.IsZero() || end.Before(until) {
			until = end
		}
	}
	return held, until
}

// Prompt returns the instances of p with a HoldDown that node renders
// without keepalived's preempt_delay at now, given when keepalived was
// last reloaded (or is about to be, by this sync): those whose hold ended
// less than their prompt window ago, if a reload since the return
// restarted keepalived's delay (without one, keepalived's own delay ends
// with the hold, and Local endpoint churn, which changes no
// configuration, causes no reload); and those new to the cluster, for
// their NewInstanceGrace and a prompt window after it (their planned
// master, and after the grace the best node, takes them at once).
func (h Hold) Prompt(p Plan, node string, reloaded, now time.Time) map[string]bool {
	out := make(map[string]bool)
	for _, inst := range p.For(node) {
		if inst.HoldDown <= 0 {
			continue
		}
		if _, born := h.Born[inst.Name]; born {
			out[inst.Name] = true
			continue
		}
		from := h.from(inst.Name)
		if end := from.Add(inst.HoldDown); !now.Before(end) && now.Before(end.Add(promptWindow(inst))) && reloaded.After(from) {
			out[inst.Name] = true
		}
	}
	return out
}

// from is when this node's current hold on the named instance began.
func (h Hold) from(name string) time.Time {
	if t, ok := h.Returned[name]; ok && t.After(h.Since) {
		return t
	}
	return h.Since
}

// promptWindow is how long an instance stays without preempt_delay after
// a hold ends: enough for keepalived to preempt (the Master_Down_Interval
// at the lowest priority) and 2 s for the reload.
func promptWindow(inst Instance) time.Duration {
	return MasterDown(inst.Advert, 1) + 2*time.Second
}

// NewInstanceGrace is how long a node that is not the planned master of an
// instance new to the cluster leaves it out of its keepalived.conf
// (Deferred): 5 s for the planned master's speaker to see the instance and
// reload keepalived, then keepalived's Master_Down_Interval (at the lowest
// priority) and one advert for it to become master and be heard.
func NewInstanceGrace(inst Instance) time.Duration {
	return 5*time.Second + MasterDown(inst.Advert, 1) + inst.Advert
}

// Deferred returns the instances of p that node leaves out of its
// keepalived.conf at now, whether some are deferred because the speaker
// has just started (it is not ready until they are not), and when the
// first of those deferrals ends (zero when none is deferred): a sync is due
// then. An instance new to the cluster, and every instance of a speaker
// that started afresh, is deferred for NewInstanceGrace on every node but
// its planned master, the node with the highest base priority (for a Local instance,
// among the nodes with endpoints, from in), so that the planned master is
// the only node that has it while it comes up, and the others join it as
// backups. Otherwise whichever node configured it first would hold it
// until the planned master came, and the VIP would move once.
//
// The planned master is chosen by base priority alone: one that cannot
// forward takes the new instance all the same, and the best node that can
// takes it over once the grace ends (one move, at once: Prompt renders a
// new instance without preempt_delay until a while after the grace). One that is down leaves the
// VIP unannounced for the grace; then the others configure it and the
// best of them takes it after its Master_Down_Interval.
func (h Hold) Deferred(p Plan, node string, in Input, now time.Time) (deferred map[string]bool, starting bool, until time.Time) {
	deferred = make(map[string]bool)
	var owners map[netip.Addr][]VIP
	for _, inst := range p.For(node) {
		born, ok := h.Born[inst.Name]
		start := !ok && h.fresh && !h.started.IsZero()
		if start {
			born = h.started
		} else if !ok {
			continue
		}
		end := born.Add(NewInstanceGrace(inst))
		if !now.Before(end) {
			continue
		}
		master := inst.Master()
		if inst.Local {
			if owners == nil {
				owners = localOwners(in)
			}
			if eps := localEndpoints(inst, owners); len(eps) > 0 {
				master = ""
				for n := range eps {
					if p, q := inst.Priorities[n], inst.Priorities[master]; master == "" || p > q || p == q && n < master {
						master = n
					}
				}
			}
		}
		if master == node {
			continue
		}
		deferred[inst.Name] = true
		starting = starting || start
		if until.IsZero() || end.Before(until) {
			until = end
		}
	}
	return deferred, starting, until
}
