package vrrp

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

func apiPool(name string, v *v1alpha1.VRRP) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.IPPoolSpec{VRRP: v}}
}

func TestDefaultVRIDRangesDoNotCollide(t *testing.T) {
	all := []*v1alpha1.IPPool{
		apiPool("a", nil),
		apiPool("b", &v1alpha1.VRRP{VirtualRouterIDs: "1-255"}),
		apiPool("pinned", &v1alpha1.VRRP{VirtualRouterIDs: "20-40"}),
		apiPool("c", &v1alpha1.VRRP{}),
	}
	ps := PoolsOf(all, []string{"a", "b", "pinned", "c"})
	got := map[string][2]int{}
	for _, p := range ps {
		got[p.Name] = [2]int{p.FirstVRID, p.LastVRID}
	}
	want := map[string][2]int{"a": {1, 19}, "b": {41, 72}, "pinned": {20, 40}, "c": {73, 104}}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("pool %s VRIDs %v, want %v (all: %v)", name, got[name], w, got)
		}
	}
	plan := Compute(Input{Pools: ps})
	for _, p := range plan.Problems {
		if p.Reason == ReasonVRIDOverlap {
			t.Fatalf("default ranges overlap: %+v", p)
		}
	}
}

// A range pinned by a pool left out of the plan (its addresses invalid)
// still keeps the shared pools off its VRIDs.
func TestPinnedRangeOfAnIgnoredPool(t *testing.T) {
	all := []*v1alpha1.IPPool{apiPool("broken", &v1alpha1.VRRP{VirtualRouterIDs: "1-10"}), apiPool("a", nil)}
	ps := PoolsOf(all, []string{"a"})
	if len(ps) != 1 || ps[0].FirstVRID != 11 || ps[0].LastVRID != 42 {
		t.Fatalf("PoolsOf = %+v, want a with VRIDs 11-42", ps)
	}
}

func TestPoolAdmits(t *testing.T) {
	ps := PoolsOf([]*v1alpha1.IPPool{
		apiPool("any", nil),
		apiPool("rack1", &v1alpha1.VRRP{NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"rack": "1"}}}),
		apiPool("bad", &v1alpha1.VRRP{NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"rack": "not a value!"}}}),
	}, []string{"any", "rack1", "bad"})
	for _, c := range []struct {
		pool   int
		labels map[string]string
		want   bool
	}{
		{0, nil, true},
		{0, map[string]string{ExcludeLabel: ""}, false},
		{1, map[string]string{"rack": "1"}, true},
		{1, map[string]string{"rack": "2"}, false},
		{1, map[string]string{"rack": "1", ExcludeLabel: "true"}, false},
		{2, map[string]string{"rack": "not a value!"}, false}, // an invalid selector admits no node
	} {
		if got := ps[c.pool].Admits(c.labels); got != c.want {
			t.Errorf("pool %s admits %v = %v, want %v", ps[c.pool].Name, c.labels, got, c.want)
		}
	}
}
