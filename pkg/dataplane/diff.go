package dataplane

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// OpKind is what an Op does. Kinds are declared in the order Diff emits
// them.
type OpKind uint8

// The kinds of Op, in apply order: virtual servers are created or updated
// first, then real servers are added and updated, and only then are stale
// real servers and virtual servers deleted, so a virtual server never runs
// empty while it is being changed.
const (
	AddVirtual OpKind = iota
	UpdateVirtual
	AddReal
	UpdateReal
	DeleteReal
	DeleteVirtual
)

// String returns the kind's name.
func (k OpKind) String() string {
	switch k {
	case AddVirtual:
		return "AddVirtual"
	case UpdateVirtual:
		return "UpdateVirtual"
	case AddReal:
		return "AddReal"
	case UpdateReal:
		return "UpdateReal"
	case DeleteReal:
		return "DeleteReal"
	case DeleteVirtual:
		return "DeleteVirtual"
	}
	return fmt.Sprintf("OpKind(%d)", uint8(k))
}

// Op is one change to the IPVS table.
type Op struct {
	Kind OpKind
	// Virtual is the virtual server to add, update or delete, or the one
	// whose real server changes (then only its key matters).
	Virtual ipvs.VirtualServer
	// Real is the real server, for the real-server kinds.
	Real ipvs.RealServer
	// Reals are, for DeleteVirtual, the real servers the virtual server
	// had: they leave it with it (see Result.Removed).
	Reals []ipvs.RealServer
}

// String returns e.g. "AddReal TCP/192.0.2.1:80 -> 10.0.0.1:30080 w1 masq".
func (o Op) String() string {
	switch o.Kind {
	case AddVirtual, UpdateVirtual:
		return o.Kind.String() + " " + o.Virtual.String()
	case DeleteVirtual:
		return o.Kind.String() + " " + o.Virtual.Key().String()
	case DeleteReal:
		return o.Kind.String() + " " + o.Virtual.Key().String() + " -> " + o.Real.AddrPort().String()
	}
	return o.Kind.String() + " " + o.Virtual.Key().String() + " -> " + o.Real.String()
}

func compareOps(a, b Op) int {
	if c := cmp.Compare(a.Kind, b.Kind); c != 0 {
		return c
	}
	if c := a.Virtual.Key().Compare(b.Virtual.Key()); c != 0 {
		return c
	}
	return ipvs.CompareReal(a.Real, b.Real)
}

// Diff returns the changes that turn current into desired, in a safe apply
// order (see OpKind), considering only virtual servers for which ours is
// true: others are neither created, changed nor deleted, whatever either
// table says. A virtual server whose scheduler or persistence changed is
// updated in place, keeping its connections; a real server whose weight
// changed likewise. It is pure; each table is walked once.
func Diff(current, desired ipvs.Table, ours func(ipvs.Key) bool) []Op {
	var ops []Op
	for k, want := range desired {
		if !ours(k) {
			continue
		}
		have, ok := current[k]
		if !ok {
			ops = append(ops, Op{Kind: AddVirtual, Virtual: want.Virtual})
			for _, r := range want.Reals {
				ops = append(ops, Op{Kind: AddReal, Virtual: want.Virtual, Real: r})
			}
			continue
		}
		if !have.Virtual.Equal(want.Virtual) {
			ops = append(ops, Op{Kind: UpdateVirtual, Virtual: want.Virtual})
		}
		ops = diffReals(ops, want.Virtual, sorted(have.Reals), sorted(want.Reals))
	}
	for k, have := range current {
		if _, keep := desired[k]; !keep && ours(k) {
			ops = append(ops, Op{Kind: DeleteVirtual, Virtual: have.Virtual, Reals: have.Reals})
		}
	}
	slices.SortFunc(ops, compareOps)
	return ops
}

// diffReals merges two sorted lists of real servers.
func diffReals(ops []Op, vs ipvs.VirtualServer, have, want []ipvs.RealServer) []Op {
	i, j := 0, 0
	for i < len(have) || j < len(want) {
		var c int
		switch {
		case i == len(have):
			c = 1
		case j == len(want):
			c = -1
		default:
			c = ipvs.CompareReal(have[i], want[j])
		}
		switch {
		case c < 0:
			ops = append(ops, Op{Kind: DeleteReal, Virtual: vs, Real: have[i]})
			i++
		case c > 0:
			ops = append(ops, Op{Kind: AddReal, Virtual: vs, Real: want[j]})
			j++
		default:
			if !have[i].Equal(want[j]) {
				ops = append(ops, Op{Kind: UpdateReal, Virtual: vs, Real: want[j]})
			}
			i++
			j++
		}
	}
	return ops
}

func sorted(rs []ipvs.RealServer) []ipvs.RealServer {
	if slices.IsSortedFunc(rs, ipvs.CompareReal) {
		return rs
	}
	return slices.SortedFunc(slices.Values(rs), ipvs.CompareReal)
}

// Removal is a real server that left a virtual server.
type Removal struct {
	Virtual ipvs.Key
	Real    netip.AddrPort
}

// String returns e.g. "UDP/192.0.2.1:53 -> 10.0.0.1:30053".
func (r Removal) String() string { return r.Virtual.String() + " -> " + r.Real.String() }

// Result counts what Apply did.
type Result struct {
	VirtualAdded, VirtualUpdated, VirtualDeleted int
	RealAdded, RealUpdated, RealDeleted          int
	// Failed counts ops that failed or were skipped because their virtual
	// server could not be created.
	Failed int
	// Removed lists the real servers that left a virtual server: deleted
	// from it, or deleted with it. Their UDP flows need clearing from
	// conntrack: UDP has no connection to close, so clients would go on
	// sending to them.
	Removed []Removal
	// Errors holds, for each virtual server with an op that failed, the
	// first error, so that it can be told to the Service that owns it.
	Errors map[ipvs.Key]error
}

// Changes returns the number of ops applied.
func (r Result) Changes() int {
	return r.VirtualAdded + r.VirtualUpdated + r.VirtualDeleted + r.RealAdded + r.RealUpdated + r.RealDeleted
}

// String returns the counts, for logs.
func (r Result) String() string {
	return fmt.Sprintf("virtual +%d ~%d -%d, real +%d ~%d -%d, failed %d",
		r.VirtualAdded, r.VirtualUpdated, r.VirtualDeleted, r.RealAdded, r.RealUpdated, r.RealDeleted, r.Failed)
}

// Apply sends ops to h in order. It goes on after a failure, so one bad
// virtual server does not hold up the others, but skips the real servers
// of a virtual server it could not create. Deleting what is already gone
// counts as done. The error joins every failure; the next Sync retries.
func Apply(h ipvs.Interface, ops []Op) (Result, error) {
	var res Result
	var errs []error
	broken := map[ipvs.Key]bool{}
	for _, op := range ops {
		k := op.Virtual.Key()
		if broken[k] {
			res.Failed++
			continue
		}
		var err error
		switch op.Kind {
		case AddVirtual:
			if err = h.AddVirtualServer(op.Virtual); err == nil {
				res.VirtualAdded++
			} else {
				broken[k] = true
			}
		case UpdateVirtual:
			if err = h.UpdateVirtualServer(op.Virtual); err == nil {
				res.VirtualUpdated++
			}
		case DeleteVirtual:
			if err = h.DeleteVirtualServer(k); err == nil || ipvs.IsNotFound(err) {
				err = nil
				res.VirtualDeleted++
				for _, r := range op.Reals {
					res.Removed = append(res.Removed, Removal{Virtual: k, Real: r.AddrPort()})
				}
			}
		case AddReal:
			if err = h.AddRealServer(k, op.Real); err == nil {
				res.RealAdded++
			}
		case UpdateReal:
			if err = h.UpdateRealServer(k, op.Real); err == nil {
				res.RealUpdated++
			}
		case DeleteReal:
			if err = h.DeleteRealServer(k, op.Real.AddrPort()); err == nil || ipvs.IsNotFound(err) {
				err = nil
				res.RealDeleted++
				res.Removed = append(res.Removed, Removal{Virtual: k, Real: op.Real.AddrPort()})
			}
		default:
			err = fmt.Errorf("unknown op kind %d", op.Kind)
		}
		if err != nil {
			res.Failed++
			errs = append(errs, fmt.Errorf("%s: %w", op, err))
			if res.Errors == nil {
				res.Errors = map[ipvs.Key]error{}
			}
			if _, seen := res.Errors[k]; !seen {
				res.Errors[k] = err
			}
		}
	}
	return res, errors.Join(errs...)
}
