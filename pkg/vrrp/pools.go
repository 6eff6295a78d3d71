package vrrp

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// defaultSlice is how many VRIDs a pool that keeps the default range gets.
const defaultSlice = 32

// PoolsOf translates IPPools into the plan's pools: the ones named in order
// (creation order, as pools.Parse gives the valid ones), each with its
// VRID range, advert interval, unicast setting, interface and node
// selector. all are every IPPool: a range pinned by a pool that order
// leaves out still keeps other pools off its VRIDs.
//
// Pools that keep the default VRID range (1-255, or none) share it: in
// order each gets the next run of at most 32 VRIDs that no pool with an
// explicit range claims (runs shorter than 4 between pinned ranges are
// skipped), so two such pools never collide. A pool left with no VRIDs
// gets 0-0, which the plan reports. spec.vrrp.virtualRouterIDs pins a
// pool's VRIDs.
func PoolsOf(all []*v1alpha1.IPPool, order []string) []Pool {
	byName := make(map[string]*v1alpha1.IPPool, len(all))
	explicit := make([]bool, 256)
	shared := map[string]bool{}
	for _, p := range all {
		byName[p.Name] = p
		first, last, err := 1, 255, error(nil)
		if v := p.Spec.VRRP; v != nil {
			first, last, err = ParseVRIDRange(v.VirtualRouterIDs)
		}
		if err != nil || first == 1 && last == 255 {
			shared[p.Name] = true
			continue
		}
		for id := first; id <= last; id++ {
			explicit[id] = true
		}
	}
	next := 1
	slice := func() (int, int) {
		for next <= 255 {
			for next <= 255 && explicit[next] {
				next++
			}
			first := next
			for next <= 255 && !explicit[next] && next-first < defaultSlice {
				next++
			}
			if next-first >= 4 || next > 255 && next > first {
				return first, next - 1
			}
		}
		return 0, 0 // out of VRIDs: the plan reports the pool
	}
	out := make([]Pool, 0, len(order))
	for i, name := range order {
		vp := Pool{Name: name, FirstVRID: 1, LastVRID: 255, Order: i}
		if shared[name] {
			vp.FirstVRID, vp.LastVRID = slice()
		}
		if ip := byName[name]; ip != nil && ip.Spec.VRRP != nil {
			v := ip.Spec.VRRP
			if !shared[name] {
				vp.FirstVRID, vp.LastVRID, _ = ParseVRIDRange(v.VirtualRouterIDs)
			}
			if v.AdvertisementInterval != nil {
				vp.Advert = v.AdvertisementInterval.Duration
			}
			vp.Unicast, vp.Interface = v.Unicast, v.Interface
			vp.NodeSelector = selectorOf(v.NodeSelector)
			vp.Failback = v.Failback
			if d := v.FailbackDelay; d != nil && vp.Failback != v1alpha1.FailbackNever {
				vp.FailbackDelay = d.Duration
				if d.Duration == 0 { // waiting 0s is failing back at once
					vp.Failback = v1alpha1.FailbackImmediate
				}
			}
		}
		out = append(out, vp)
	}
	return out
}

// selectorOf returns the pool's node selector, nil for none. An invalid
// selector admits no node rather than all.
func selectorOf(s *metav1.LabelSelector) labels.Selector {
	if s == nil {
		return nil
	}
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		return labels.Nothing()
	}
	return sel
}

// Admits reports whether the pool lets a node with these labels hold its
// VIPs: the node lacks ExcludeLabel and matches the pool's node selector.
// Ready and addresses aside, this is the plan's rule for a pool's members,
// and the dataplane's for the pools whose virtual servers a node programs.
func (p Pool) Admits(nodeLabels map[string]string) bool {
	if _, excluded := nodeLabels[ExcludeLabel]; excluded {
		return false
	}
	return p.NodeSelector == nil || p.NodeSelector.Matches(labels.Set(nodeLabels))
}
