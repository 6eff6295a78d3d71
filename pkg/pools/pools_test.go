package pools

import (
	"math/big"
	"net/netip"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

func ippool(name string, created int, addrs ...string) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{
		ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 3, CreationTimestamp: metav1.NewTime(time.Unix(int64(created), 0))},
		Spec:       v1alpha1.IPPoolSpec{Addresses: addrs},
	}
}

func TestParseOrdersAndReportsProblems(t *testing.T) {
	b := ippool("b", 1, "192.0.2.0/30")
	a := ippool("a", 1, "192.0.2.4/30", "2001:db8::10-2001:db8::1", "junk")
	old := ippool("z-old", 0, "198.51.100.0/30")
	f := false
	old.Spec.AutoAssign = &f
	old.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{Priority: 7, Namespaces: []string{"x"},
		ServiceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"k": "v"}}}
	bad := ippool("bad", 2, "192.0.2.8/30")
	bad.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{NamespaceSelector: &metav1.LabelSelector{
		MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "k", Operator: "Bogus"}}}}

	got := Parse([]*v1alpha1.IPPool{b, bad, a, old})
	var names []string
	for i, p := range got {
		names = append(names, p.Pool.Name)
		if p.Pool.Order != i {
			t.Errorf("%s Order = %d, want %d", p.Pool.Name, p.Pool.Order, i)
		}
	}
	if strings.Join(names, ",") != "z-old,a,b,bad" {
		t.Fatalf("order = %v, want creation time then name", names)
	}
	if p := got[0].Pool; p.AutoAssign || p.Priority != 7 || p.Namespaces[0] != "x" || !p.ServiceSelector.Matches(labels.Set{"k": "v"}) || p.ServiceSelector.Matches(labels.Set{}) {
		t.Fatalf("z-old parsed as %+v", p)
	}
	if pa := got[1]; len(pa.Pool.Ranges) != 1 || len(pa.Problems) != 2 || !strings.Contains(pa.Problems[0], "starts after it ends") {
		t.Fatalf("a parsed as %+v", pa)
	}
	if pb := got[3]; pb.SelectorProblem == "" || pb.Pool.NamespaceSelector.Matches(labels.Set{"k": "v"}) {
		t.Fatalf("an invalid selector must admit nothing: %+v", pb)
	}
}

func stats(total4, free4 int64, used4 int64, total6 string, conflicts ...string) allocator.PoolStats {
	t6, _ := new(big.Int).SetString(total6, 10)
	return allocator.PoolStats{Families: [2]allocator.FamilyStats{
		{Total: big.NewInt(total4), Free: big.NewInt(free4), Used: used4},
		{Total: t6, Free: new(big.Int).Set(t6)},
	}, ConflictsWith: conflicts}
}

func TestStatus(t *testing.T) {
	now := metav1.NewTime(time.Unix(1000, 0))
	later := metav1.NewTime(time.Unix(2000, 0))
	p := ippool("p", 0, "192.0.2.0/28", "2001:db8::/64")
	st := Status(p, Parse([]*v1alpha1.IPPool{p})[0], stats(16, 13, 3, "18446744073709551616"), now)
	if st.Total != "18446744073709551632" || st.Used != 3 || st.Free != "18446744073709551629" || st.ObservedGeneration != 3 {
		t.Fatalf("counts = %+v", st)
	}
	if st.IPv4 == nil || st.IPv4.Total != "16" || st.IPv4.Used != 3 || st.IPv6 == nil || st.IPv6.Free != "18446744073709551616" {
		t.Fatalf("per family = %+v %+v", st.IPv4, st.IPv6)
	}
	ready := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionReady)
	conf := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionConflicting)
	if ready.Status != metav1.ConditionTrue || conf.Status != metav1.ConditionFalse {
		t.Fatalf("conditions = %+v", st.Conditions)
	}

	// A new conflict flips Conflicting and keeps Ready's transition time.
	p.Status = st
	st2 := Status(p, Parse([]*v1alpha1.IPPool{p})[0], stats(16, 13, 3, "0", "older"), later)
	conf = meta.FindStatusCondition(st2.Conditions, v1alpha1.ConditionConflicting)
	ready = meta.FindStatusCondition(st2.Conditions, v1alpha1.ConditionReady)
	if conf.Status != metav1.ConditionTrue || !strings.Contains(conf.Message, "older") || !conf.LastTransitionTime.Equal(&later) {
		t.Fatalf("Conflicting = %+v", conf)
	}
	if !ready.LastTransitionTime.Equal(&now) {
		t.Fatalf("Ready moved its transition time without changing: %+v", ready)
	}
	if st2.IPv6 != nil {
		t.Fatalf("an empty family must be omitted: %+v", st2.IPv6)
	}

	bad := ippool("bad", 0, "2001:db8::10-2001:db8::1")
	st3 := Status(bad, Parse([]*v1alpha1.IPPool{bad})[0], stats(0, 0, 0, "0"), now)
	ready = meta.FindStatusCondition(st3.Conditions, v1alpha1.ConditionReady)
	if ready.Status != metav1.ConditionFalse || ready.Reason != ReasonInvalidAddresses || !strings.Contains(ready.Message, "starts after it ends") {
		t.Fatalf("Ready = %+v", ready)
	}
	shadowed := ippool("shadowed", 0, "192.0.2.0/30")
	st4 := Status(shadowed, Parse([]*v1alpha1.IPPool{shadowed})[0], stats(0, 0, 0, "0", "older"), now)
	if r := meta.FindStatusCondition(st4.Conditions, v1alpha1.ConditionReady); r.Status != metav1.ConditionFalse || r.Reason != ReasonOverlaps {
		t.Fatalf("fully shadowed pool Ready = %+v", r)
	}
}

func TestFindPrefersTheOlderPool(t *testing.T) {
	newer := ippool("newer", 5, "192.0.2.0/28")
	older := ippool("older", 1, "192.0.2.8/29")
	parsed := Parse([]*v1alpha1.IPPool{newer, older})
	for addr, want := range map[string]string{"192.0.2.9": "older", "192.0.2.1": "newer", "198.51.100.1": ""} {
		if got := Find(parsed, netip.MustParseAddr(addr)); got != want {
			t.Errorf("Find(%s) = %q, want %q", addr, got, want)
		}
	}
}
