package vrrp

import (
	"maps"
	"net/netip"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

// Hold is one node's record of when it came back to each instance: failback
// Delayed as the speakers do it. A node that comes back to an instance with
// a HoldDown is held down on it (Held) for that long: its track value ranks
// it below every node that is not, so it takes the instance over only once
// the hold ends, and then at once (keepalived preempts without a delay).
//
// keepalived's own preempt_delay did this until a reload showed its flaw:
// keepalived recreates its instances on a reload, and a recreated backup
// starts the delay anew, so under steady Service churn (a reload each) a
// node that came back never took its instances back. A Hold lives in the
// speaker, which reloads do not touch, and a hand-off carries Since over.
//
// A node comes back to an instance when:
//   - its speaker starts (Since), unless it adopts a hand-off, which keeps
//     the Since of the speaker it replaces;
//   - the instance leaves FAULT or STOP on it (its link came back, its
//     keepalived restarted, a Local instance's endpoints came to it);
//   - it becomes eligible for an instance that existed without it (the
//     Node became Ready again, or matches the pool's node selector).
//
// An instance that is new to the whole cluster is not a return: every node
// gets it at about the same time, and its planned master takes it at once.
// A node that is master of an instance is never held on it: the hold only
// keeps a node from taking an instance over, never makes it give one up.
//
// The record also knows which instances are new to the cluster: Deferred
// leaves those out of keepalived.conf on every node but their planned
// master for a short grace, so that a new VIP starts where the plan puts
// it instead of on whichever node configured it first.
//
// Hold is a value: Next returns the record after one more sync, and the
// zero Hold has no Since (nothing held at start).
type Hold struct {
	// Since is when this node's speaker started serving.
	Since time.Time
	// Returned is, per instance, when this node last came back to it after
	// Since, while that still matters (within the instance's HoldDown).
	Returned map[string]time.Time
	// Born is, per instance new to the cluster (one the plan did not have
	// at the sync before), when this node first saw it, while that still
	// matters (within NewInstanceGrace).
	Born map[string]time.Time
	// took says, for each instance of the last plan, whether this node
	// took part in it; states are keepalived's states at the last sync.
	took   map[string]bool
	states map[string]keepalived.State
}

// NewHold returns the record of a speaker that started serving at since.
func NewHold(since time.Time) Hold { return Hold{Since: since} }

// Next returns h after a sync that, at now, computed plan p and read
// keepalived's states (by instance name) on node.
func (h Hold) Next(p Plan, node string, states map[string]keepalived.State, now time.Time) Hold {
	next := Hold{
		Since:    h.Since,
		Returned: make(map[string]time.Time),
		Born:     make(map[string]time.Time),
		took:     make(map[string]bool, len(p.Instances)),
		states:   maps.Clone(states),
	}
	for _, inst := range p.Instances {
		_, in := inst.Priorities[node]
		next.took[inst.Name] = in
		born, ok := h.Born[inst.Name]
		if _, existed := h.took[inst.Name]; h.took != nil && !existed {
			born, ok = now, true
		}
		if ok && now.Sub(born) < NewInstanceGrace(inst) {
			next.Born[inst.Name] = born
		}
		if !in || inst.HoldDown <= 0 {
			continue
		}
		t, ok := h.Returned[inst.Name]
		if took, existed := h.took[inst.Name]; existed && !took || left(h.states[inst.Name], states[inst.Name]) {
			t, ok = now, true
		}
		if ok && now.Sub(t) < inst.HoldDown {
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

// Held returns the instances of p that node is held down on at now, given
// keepalived's states there, and the earliest time one of those holds ends
// (zero when none is held): a sync is due then.
func (h Hold) Held(p Plan, node string, states map[string]keepalived.State, now time.Time) (held map[string]bool, until time.Time) {
	held = make(map[string]bool)
	for _, inst := range p.For(node) {
		if inst.HoldDown <= 0 || masters(states[inst.Name]) {
			continue
		}
		from := h.Since
		if t, ok := h.Returned[inst.Name]; ok && t.After(from) {
			from = t
		}
		end := from.Add(inst.HoldDown)
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

// masters reports whether state is one in which the node holds the VIPs.
func masters(s keepalived.State) bool {
	return s == keepalived.StateMaster || s == keepalived.StateMasterRxLowerPri
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
// keepalived.conf at now, and when the first of those deferrals ends (zero
// when none is deferred): a sync is due then. An instance new to the
// cluster is deferred for NewInstanceGrace on every node but its planned
// master, the node with the highest base priority (for a Local instance,
// among the nodes with endpoints, from in), so that the planned master is
// the only node that has it while it comes up, and the others join it as
// backups. Otherwise whichever node configured it first would hold it
// until the planned master came, and the VIP would move once.
//
// The planned master is chosen by base priority alone: one that cannot
// forward takes the new instance all the same, and the best node that can
// takes it over once the grace ends (one move, at once: a new instance is
// no node's return, so nobody is held on it). One that is down leaves the
// VIP unannounced for the grace; then the others configure it and the
// best of them takes it after its Master_Down_Interval.
func (h Hold) Deferred(p Plan, node string, in Input, now time.Time) (deferred map[string]bool, until time.Time) {
	deferred = make(map[string]bool)
	var owners map[netip.Addr][]VIP
	for _, inst := range p.For(node) {
		born, ok := h.Born[inst.Name]
		if !ok {
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
		if until.IsZero() || end.Before(until) {
			until = end
		}
	}
	return deferred, until
}
