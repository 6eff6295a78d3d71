// Package pools translates between IPPool objects and the allocator: it
// turns pools into allocator.Pool values (reporting what cannot be parsed)
// and allocator statistics back into IPPool status. It is pure.
package pools

import (
	"fmt"
	"math/big"
	"net/netip"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// Condition reasons set on IPPool status.
const (
	ReasonValid            = "Valid"
	ReasonInvalidAddresses = "InvalidAddresses"
	ReasonInvalidSelector  = "InvalidSelector"
	ReasonOverlaps         = "Overlaps"
	ReasonNoOverlap        = "NoOverlap"
	ReasonNoAddresses      = "NoAddresses"
)

// Parsed is one IPPool ready for the allocator, with the problems found
// while parsing it. A pool with problems still serves what parsed.
type Parsed struct {
	Pool     allocator.Pool
	Problems []string
	// SelectorProblem is set when a selector is invalid; the pool then
	// admits nothing rather than everything.
	SelectorProblem string
}

// Parse converts IPPools into allocator pools. Order follows creation time,
// then name, so the older of two overlapping pools owns the overlap.
func Parse(ippools []*v1alpha1.IPPool) []Parsed {
	sorted := append([]*v1alpha1.IPPool(nil), ippools...)
	sort.Slice(sorted, func(i, j int) bool {
		ti, tj := sorted[i].CreationTimestamp, sorted[j].CreationTimestamp
		if !ti.Equal(&tj) {
			return ti.Before(&tj)
		}
		return sorted[i].Name < sorted[j].Name
	})
	out := make([]Parsed, 0, len(sorted))
	for i, ip := range sorted {
		out = append(out, parseOne(ip, i))
	}
	return out
}

func parseOne(ip *v1alpha1.IPPool, order int) Parsed {
	p := Parsed{Pool: allocator.Pool{
		Name:          ip.Name,
		AutoAssign:    ip.Spec.AutoAssignEnabled(),
		AvoidBuggyIPs: ip.Spec.AvoidBuggyIPs,
		Order:         order,
	}}
	for _, s := range ip.Spec.Addresses {
		r, err := allocator.ParseRange(s)
		if err != nil {
			p.Problems = append(p.Problems, err.Error())
			continue
		}
		p.Pool.Ranges = append(p.Pool.Ranges, r)
	}
	if sa := ip.Spec.ServiceAllocation; sa != nil {
		p.Pool.Priority = sa.Priority
		p.Pool.Namespaces = sa.Namespaces
		var err error
		if sa.NamespaceSelector != nil {
			if p.Pool.NamespaceSelector, err = metav1.LabelSelectorAsSelector(sa.NamespaceSelector); err != nil {
				p.SelectorProblem = "namespaceSelector: " + err.Error()
			}
		}
		if sa.ServiceSelector != nil {
			if p.Pool.ServiceSelector, err = metav1.LabelSelectorAsSelector(sa.ServiceSelector); err != nil {
				p.SelectorProblem = "serviceSelector: " + err.Error()
			}
		}
		if p.SelectorProblem != "" {
			p.Pool.NamespaceSelector = labels.Nothing()
		}
	}
	return p
}

// Status computes the status of ip from the allocator's statistics and the
// problems found by Parse. It keeps the condition timestamps of old when a
// condition does not change, so an unchanged pool is not rewritten.
func Status(ip *v1alpha1.IPPool, parsed Parsed, stats allocator.PoolStats, now metav1.Time) v1alpha1.IPPoolStatus {
	st := v1alpha1.IPPoolStatus{
		ObservedGeneration: ip.Generation,
		OutOfRange:         stats.OutOfRange,
		Conditions:         append([]metav1.Condition(nil), ip.Status.Conditions...),
	}
	total, free := new(big.Int), new(big.Int)
	for f, fs := range stats.Families {
		if fs.Total == nil {
			continue
		}
		total.Add(total, fs.Total)
		free.Add(free, fs.Free)
		st.Used += fs.Used
		if fs.Total.Sign() == 0 && fs.Used == 0 {
			continue
		}
		fst := &v1alpha1.FamilyStatus{Total: fs.Total.String(), Used: fs.Used, Free: fs.Free.String()}
		if allocator.Family(f) == allocator.IPv4 {
			st.IPv4 = fst
		} else {
			st.IPv6 = fst
		}
	}
	st.Total, st.Free = total.String(), free.String()

	ready := metav1.Condition{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: ReasonValid,
		Message: fmt.Sprintf("%s addresses, %d in use", st.Total, st.Used), ObservedGeneration: ip.Generation, LastTransitionTime: now}
	switch {
	case len(parsed.Problems) > 0:
		ready.Status, ready.Reason = metav1.ConditionFalse, ReasonInvalidAddresses
		ready.Message = "ignored spec.addresses entries: " + strings.Join(parsed.Problems, "; ")
	case parsed.SelectorProblem != "":
		ready.Status, ready.Reason = metav1.ConditionFalse, ReasonInvalidSelector
		ready.Message = "the pool admits no Service until this is fixed: " + parsed.SelectorProblem
	case total.Sign() == 0 && len(stats.ConflictsWith) > 0:
		ready.Status, ready.Reason = metav1.ConditionFalse, ReasonOverlaps
		ready.Message = "every address is owned by an older pool"
	case total.Sign() == 0:
		ready.Status, ready.Reason = metav1.ConditionFalse, ReasonNoAddresses
		ready.Message = "no allocatable address (avoidBuggyIPs skips .0 and .255)"
	}
	meta.SetStatusCondition(&st.Conditions, ready)

	conflict := metav1.Condition{Type: v1alpha1.ConditionConflicting, Status: metav1.ConditionFalse, Reason: ReasonNoOverlap,
		Message: "no overlap with other pools", ObservedGeneration: ip.Generation, LastTransitionTime: now}
	if len(stats.ConflictsWith) > 0 {
		conflict.Status, conflict.Reason = metav1.ConditionTrue, ReasonOverlaps
		conflict.Message = fmt.Sprintf("overlaps older IPPool %s; the overlap is allocated only from there", strings.Join(stats.ConflictsWith, ", "))
	}
	meta.SetStatusCondition(&st.Conditions, conflict)
	return st
}

// Find returns the name of the pool containing a, or "". parsed must be in
// Parse's order, so that where two pools overlap the older one wins, as
// the allocator decides.
func Find(parsed []Parsed, a netip.Addr) string {
	for _, p := range parsed {
		for _, r := range p.Pool.Ranges {
			if r.Contains(a) {
				return p.Pool.Name
			}
		}
	}
	return ""
}
