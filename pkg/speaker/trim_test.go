package speaker

import (
	"context"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/keeplb/keeplb/pkg/annotations"
)

// TestInformersCacheTrimmedObjects: what the speaker's informers cache has
// no managedFields, no last-applied copy, no Node image list and no
// endpoint's pod, hostname, zone or hints, and keeps everything the
// speaker reads, with what endpoints repeat shared.
func TestInformersCacheTrimmedObjects(t *testing.T) {
	managed := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", ManagedFields: managed, Annotations: map[string]string{
		lastApplied: `{"apiVersion":"v1","kind":"Service"}`, annotations.Forwarding: "pod",
	}}}
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ManagedFields: managed, Labels: map[string]string{"zone": "a"}},
		Status: v1.NodeStatus{
			Images:     []v1.ContainerImage{{Names: []string{"registry.example/app:1"}, SizeBytes: 1 << 20}},
			Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "10.0.0.1"}},
			Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}},
		},
	}
	// Two slices on the same node: what they cache is what forwarding
	// reads (addresses, node, conditions, ports, the Service label), with
	// the node name and conditions shared between them.
	slice := func(name, addr string, ready bool) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, ManagedFields: managed,
				Labels:          map[string]string{discoveryv1.LabelServiceName: "web"},
				Annotations:     map[string]string{"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-06T10:00:00Z"},
				OwnerReferences: []metav1.OwnerReference{{Kind: "Service", Name: "web"}}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{
				Addresses:  []string{addr},
				NodeName:   ptr("n1"),
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(ready), Serving: ptr(true), Terminating: ptr(false)},
				TargetRef:  &v1.ObjectReference{Kind: "Pod", Namespace: "ns", Name: "web-" + name},
				Hostname:   ptr("web-" + name), Zone: ptr("a"),
				Hints: &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: "a"}}},
			}},
			Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}},
		}
	}
	o := NewOptions()
	o.NodeName = "n1"
	s := newSpeaker(o, fake.NewClientset(svc, node, slice("web-a", "10.1.0.1", true), slice("web-b", "10.1.0.2", false)), dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()), Kernel{}, nil, record.NewFakeRecorder(10))
	// Shutdown waits for the informers, which stop when ctx is done.
	ctx, cancel := context.WithCancel(t.Context())
	s.factory.Start(ctx.Done())
	defer s.factory.Shutdown()
	defer cancel()
	if !cache.WaitForCacheSync(t.Context().Done(), s.services.HasSynced, s.nodes.HasSynced, s.slices.HasSynced) {
		t.Fatal("caches did not sync")
	}
	got, ok, _ := s.services.GetStore().GetByKey("ns/web")
	if !ok {
		t.Fatal("the Service is not cached")
	}
	gs := got.(*v1.Service)
	if len(gs.ManagedFields) > 0 || gs.Annotations[lastApplied] != "" || gs.Annotations[annotations.Forwarding] != "pod" {
		t.Errorf("cached Service: managedFields %v, annotations %v; want no managedFields, no last-applied, the forwarding annotation kept", gs.ManagedFields, gs.Annotations)
	}
	got, ok, _ = s.nodes.GetStore().GetByKey("n1")
	if !ok {
		t.Fatal("the Node is not cached")
	}
	gn := got.(*v1.Node)
	if len(gn.ManagedFields) > 0 || len(gn.Status.Images) > 0 || gn.Labels["zone"] != "a" || len(gn.Status.Addresses) != 1 || len(gn.Status.Conditions) != 1 {
		t.Errorf("cached Node: %+v; want no managedFields and images, labels, addresses and conditions kept", gn)
	}
	var eps []discoveryv1.Endpoint
	for _, name := range []string{"web-a", "web-b"} {
		got, ok, _ = s.slices.GetStore().GetByKey("ns/" + name)
		if !ok {
			t.Fatalf("the EndpointSlice %s is not cached", name)
		}
		es := got.(*discoveryv1.EndpointSlice)
		if len(es.ManagedFields) > 0 || es.Annotations != nil || es.OwnerReferences != nil || es.Labels[discoveryv1.LabelServiceName] != "web" ||
			len(es.Ports) != 1 || *es.Ports[0].Port != 8080 || len(es.Endpoints) != 1 {
			t.Fatalf("cached EndpointSlice %s: %+v; want no managedFields, annotations or owners, the label, ports and endpoint kept", name, es)
		}
		ep := es.Endpoints[0]
		if ep.TargetRef != nil || ep.Hostname != nil || ep.Zone != nil || ep.Hints != nil {
			t.Errorf("cached endpoint of %s keeps %+v; want no pod reference, hostname, zone or hints", name, ep)
		}
		eps = append(eps, ep)
	}
	a, b := eps[0], eps[1]
	if a.Addresses[0] != "10.1.0.1" || b.Addresses[0] != "10.1.0.2" || *a.NodeName != "n1" || !*a.Conditions.Ready || *b.Conditions.Ready || !*b.Conditions.Serving || *b.Conditions.Terminating {
		t.Errorf("cached endpoints %+v and %+v; want their addresses, node and conditions as written", a, b)
	}
	if a.NodeName != b.NodeName || a.Conditions.Serving != b.Conditions.Serving || a.Conditions.Ready != b.Conditions.Serving || b.Conditions.Ready != b.Conditions.Terminating {
		t.Error("the two endpoints' node name and conditions are not shared")
	}
}
