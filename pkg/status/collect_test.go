package status

import (
	"context"
	"reflect"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stypes "k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/speaker"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func ippool(name string, age time.Duration, fwd v1alpha1.Forwarding, addrs ...string) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{
		ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(t0.Add(-age))},
		Spec:       v1alpha1.IPPoolSpec{Addresses: addrs, Forwarding: fwd},
	}
}

func lbService(ns, name string, class *string, ann map[string]string, ips ...string) *v1.Service {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: k8stypes.UID("uid-" + name), Annotations: ann},
		Spec:       v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, LoadBalancerClass: class},
	}
	mode := v1.LoadBalancerIPModeVIP
	for _, ip := range ips {
		svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip, IPMode: &mode})
	}
	return svc
}

func warning(ns, name, uid, msg string, at time.Duration) *v1.Event {
	return &v1.Event{
		ObjectMeta:     metav1.ObjectMeta{Namespace: ns, Name: name + "." + msg[:3] + at.String()},
		InvolvedObject: v1.ObjectReference{Kind: "Service", Namespace: ns, Name: name, UID: k8stypes.UID(uid)},
		Type:           v1.EventTypeWarning,
		Message:        msg,
		LastTimestamp:  metav1.NewTime(t0.Add(at)),
	}
}

func TestCollect(t *testing.T) {
	ptr := func(s string) *string { return &s }
	older := ippool("older", 2*time.Hour, "", "192.0.2.0/28")
	older.Status = v1alpha1.IPPoolStatus{Total: "16", Used: 1, Free: "15", Conditions: []metav1.Condition{
		{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Valid"},
		{Type: v1alpha1.ConditionConflicting, Status: metav1.ConditionFalse, Reason: "NoOverlap"},
	}}
	// Overlaps older: 192.0.2.1 belongs to older, 192.0.2.20 to newer.
	newer := ippool("newer", time.Hour, v1alpha1.ForwardingPod, "192.0.2.0/27")

	var objs []runtime.Object
	for _, p := range []*v1alpha1.IPPool{newer, older} {
		u, err := v1alpha1.ToUnstructured(p)
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, u)
	}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{v1alpha1.IPPoolResource: "IPPoolList"}, objs...)

	kube := fake.NewClientset(
		lbService("default", "web", nil, map[string]string{annotations.Holder: "node-a"}, "192.0.2.1"),
		lbService("default", "wide", ptr("keeplb.io/vip"), nil, "192.0.2.20"),
		lbService("default", "dual", nil, map[string]string{annotations.Holder: "192.0.2.2=node-a,2001:db8::2=node-b"}, "192.0.2.2", "2001:db8::2"),
		lbService("default", "half", nil, map[string]string{annotations.Holder: "2001:db8::3=node-b"}, "192.0.2.3", "2001:db8::3"),
		lbService("shop", "pending", nil, map[string]string{annotations.Pool: "newer"}),
		lbService("shop", "quiet", nil, nil),
		lbService("shop", "foreign", ptr("other.io/lb"), nil),
		&v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "cluster"}, Spec: v1.ServiceSpec{Type: v1.ServiceTypeClusterIP}},
		warning("shop", "pending", "uid-pending", "old problem", -time.Minute),
		warning("shop", "pending", "uid-pending", "no free address in IPPool newer", 0),
		// A Service of the same name deleted before: not this one's.
		warning("shop", "pending", "uid-gone", "stale problem", time.Minute),
		warning("shop", "foreign", "uid-foreign", "not ours", 0),
		&v1.Event{
			ObjectMeta:     metav1.ObjectMeta{Namespace: "shop", Name: "normal"},
			InvolvedObject: v1.ObjectReference{Kind: "Service", Namespace: "shop", Name: "quiet"},
			Type:           v1.EventTypeNormal, Message: "fine", LastTimestamp: metav1.NewTime(t0.Add(time.Hour)),
		},
	)

	got, err := Collect(context.Background(), kube, dyn, Options{LoadBalancerClass: "keeplb.io/vip", DefaultClass: true})
	if err != nil {
		t.Fatal(err)
	}
	wantPools := []Pool{
		{Name: "newer", Addresses: []string{"192.0.2.0/27"}},
		{
			Name: "older", Addresses: []string{"192.0.2.0/28"}, Total: "16", Used: 1, Free: "15",
			Ready:       Condition{Status: "True", Reason: "Valid"},
			Conflicting: Condition{Status: "False", Reason: "NoOverlap"},
		},
	}
	if !reflect.DeepEqual(got.Pools, wantPools) {
		t.Errorf("pools:\n got %+v\nwant %+v", got.Pools, wantPools)
	}
	wantSvcs := []Service{
		{Namespace: "default", Name: "dual", VIPs: []VIP{{IP: "192.0.2.2", IPMode: "VIP", Holder: "node-a"}, {IP: "2001:db8::2", IPMode: "VIP", Holder: "node-b"}}, Pools: []string{"older"}, Holder: "node-a,node-b", Forwarding: "nodeport"},
		{Namespace: "default", Name: "half", VIPs: []VIP{{IP: "192.0.2.3", IPMode: "VIP"}, {IP: "2001:db8::3", IPMode: "VIP", Holder: "node-b"}}, Pools: []string{"older"}, Holder: "-,node-b", Forwarding: "nodeport"},
		{Namespace: "default", Name: "web", VIPs: []VIP{{IP: "192.0.2.1", IPMode: "VIP", Holder: "node-a"}}, Pools: []string{"older"}, Holder: "node-a", Forwarding: "nodeport"},
		{Namespace: "default", Name: "wide", VIPs: []VIP{{IP: "192.0.2.20", IPMode: "VIP"}}, Pools: []string{"newer"}, Forwarding: "pod"},
		{Namespace: "shop", Name: "pending", VIPs: []VIP{}, Pools: []string{}, Forwarding: "pod", Problem: "no free address in IPPool newer"},
		{Namespace: "shop", Name: "quiet", VIPs: []VIP{}, Pools: []string{}, Forwarding: "nodeport"},
	}
	if !reflect.DeepEqual(got.Services, wantSvcs) {
		t.Errorf("services:\n got %+v\nwant %+v", got.Services, wantSvcs)
	}

	// Without --default-class, only Services with the class are keeplb's.
	got, err = Collect(context.Background(), kube, dyn, Options{LoadBalancerClass: "keeplb.io/vip"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Services) != 1 || got.Services[0].Name != "wide" {
		t.Errorf("without default class: services %+v, want only default/wide", got.Services)
	}
}

// TestProblemPrefersKeeplbsWarning: a pending Service's problem is the
// latest Warning of keeplb's components, else of the upstream service
// controller it runs, even when a less preferred component warned later
// (the API server's ClusterIP repair did, in the integration suite, and
// the service controller's wrapping of the provider's error did); a
// Service with only others' warnings shows the latest of those.
func TestProblemPrefersKeeplbsWarning(t *testing.T) {
	from := func(ev *v1.Event, component, reporting string) v1.Event {
		ev.Source.Component, ev.ReportingController = component, reporting
		return *ev
	}
	svcs := []v1.Service{
		*lbService("ns", "a", nil, nil),
		*lbService("ns", "b", nil, nil),
		*lbService("ns", "c", nil, nil),
		*lbService("ns", "d", nil, nil),
	}
	for i := range svcs {
		svcs[i].UID = k8stypes.UID("uid-" + svcs[i].Name)
	}
	events := []v1.Event{
		from(warning("ns", "a", "uid-a", "Error syncing load balancer: IPPool small has no free IPv4 address", 0), "service-controller", ""),
		from(warning("ns", "a", "uid-a", "Cluster IP [IPv4]: 10.96.59.116 is not allocated; repairing", time.Second), "ipallocator-repair-controller", ""),
		// The provider's own event of the failure the service controller
		// wrapped above, stamped a little earlier (the integration suite
		// saw either order).
		from(warning("ns", "d", "uid-d", "PoolExhausted: IPPool small has no free IPv4 address", 0), controller.Component, ""),
		from(warning("ns", "d", "uid-d", "Error syncing load balancer: failed to ensure load balancer: keeplb: IPPool small has no free IPv4 address", time.Millisecond), "service-controller", ""),
		from(warning("ns", "b", "uid-b", "no VRRP instance: VRID range full", 0), "", speaker.Component),
		from(warning("ns", "b", "uid-b", "ClusterIP repair said something", time.Minute), "", "ipallocator-repair-controller"),
		from(warning("ns", "c", "uid-c", "only a foreign warning", 0), "someone-else", ""),
		from(warning("ns", "c", "uid-c", "a later foreign warning", time.Second), "someone-else", ""),
	}
	r := Build(nil, svcs, events, Options{LoadBalancerClass: "keeplb.io/vip", DefaultClass: true})
	got := map[string]string{}
	for _, s := range r.Services {
		got[s.Name] = s.Problem
	}
	want := map[string]string{
		"a": "Error syncing load balancer: IPPool small has no free IPv4 address",
		"b": "no VRRP instance: VRID range full",
		"c": "a later foreign warning",
		"d": "PoolExhausted: IPPool small has no free IPv4 address",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("problems %q; want %q", got, want)
	}
	for _, c := range []string{controller.Component, speaker.Component} {
		if tier(c) != tierKeeplb {
			t.Errorf("component %q is not counted as keeplb's", c)
		}
	}
}
