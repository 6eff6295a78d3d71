package vrrp

import (
	"net/netip"
	"testing"
	"time"

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

// TestFailback: each failback policy becomes its keepalived terms on every
// instance of the pool, shared and Local alike.
func TestFailback(t *testing.T) {
	d := func(x time.Duration) *metav1.Duration { return &metav1.Duration{Duration: x} }
	for _, tc := range []struct {
		name      string
		vrrp      *v1alpha1.VRRP
		delay     time.Duration
		noPreempt bool
	}{
		{"no vrrp block", nil, PreemptDelay, false},
		{"unset", &v1alpha1.VRRP{}, PreemptDelay, false},
		{"Delayed", &v1alpha1.VRRP{Failback: v1alpha1.FailbackDelayed}, PreemptDelay, false},
		{"Delayed 90s", &v1alpha1.VRRP{Failback: v1alpha1.FailbackDelayed, FailbackDelay: d(90 * time.Second)}, 90 * time.Second, false},
		{"Delayed 0s is Immediate", &v1alpha1.VRRP{Failback: v1alpha1.FailbackDelayed, FailbackDelay: d(0)}, 0, false},
		{"Immediate", &v1alpha1.VRRP{Failback: v1alpha1.FailbackImmediate}, 0, false},
		{"Never", &v1alpha1.VRRP{Failback: v1alpha1.FailbackNever}, 0, true},
		// The API refuses a delay beside Never; were one there, Never wins.
		{"Never with a delay", &v1alpha1.VRRP{Failback: v1alpha1.FailbackNever, FailbackDelay: d(time.Second)}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := Input{
				Pools: PoolsOf([]*v1alpha1.IPPool{apiPool("p", tc.vrrp)}, []string{"p"}),
				Nodes: readyNodes(3),
				VIPs: []VIP{
					{Addr: netip.MustParseAddr("10.1.0.1"), Pool: "p", Service: "ns/shared"},
					local("p", netip.MustParseAddr("10.1.0.2"), 0, "node-1"),
				},
			}
			plan := Compute(in)
			if len(plan.Instances) != 2 {
				t.Fatalf("%d instances, want a shared and a Local one: %+v", len(plan.Instances), plan.Problems)
			}
			for _, inst := range plan.Instances {
				if inst.HoldDown != tc.delay || inst.NoPreempt != tc.noPreempt {
					t.Errorf("%s: preempt delay %v, nopreempt %v; want %v, %v", inst.Name, inst.HoldDown, inst.NoPreempt, tc.delay, tc.noPreempt)
				}
			}
		})
	}
}
