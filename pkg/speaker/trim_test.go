package speaker

import (
	"context"
	"maps"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/keeplb/keeplb/pkg/annotations"
)

// TestInformersCacheTrimmedObjects: what the speaker's informers cache has
// no managedFields, no last-applied copy, no Service selector, cluster IPs,
// labels or other controllers' annotations, no Node image list,
// annotations, capacity or system info, no slice label but the Service's,
// and no endpoint's pod, hostname, zone or hints; it keeps everything the
// speaker reads, with what endpoints repeat shared.
func TestInformersCacheTrimmedObjects(t *testing.T) {
	managed := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", ManagedFields: managed, Labels: map[string]string{"app": "web"}, Annotations: map[string]string{
			lastApplied: `{"apiVersion":"v1","kind":"Service"}`, annotations.Forwarding: "pod",
			v1.AnnotationLoadBalancerSourceRangesKey: "192.0.2.0/24", "meta.helm.sh/release-name": "web",
		}},
		Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": "web"}, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			IPFamilies: []v1.IPFamily{v1.IPv4Protocol}, ExternalTrafficPolicy: v1.ServiceExternalTrafficPolicyLocal, HealthCheckNodePort: 32000,
			Ports: []v1.ServicePort{{Name: "http", Port: 80, NodePort: 30080}}, LoadBalancerSourceRanges: []string{"198.51.100.0/24"},
		},
		Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: "192.0.2.1"}}}},
	}
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ManagedFields: managed, Labels: map[string]string{"zone": "a"},
			Annotations: map[string]string{"flannel.alpha.coreos.com/backend-data": `{"VNI":1}`}},
		Status: v1.NodeStatus{
			Capacity:   v1.ResourceList{v1.ResourceCPU: resource.MustParse("4")},
			NodeInfo:   v1.NodeSystemInfo{KernelVersion: "6.1.0"},
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
				Labels:          map[string]string{discoveryv1.LabelServiceName: "web", discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io"},
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
	wantAnn := map[string]string{annotations.Forwarding: "pod", v1.AnnotationLoadBalancerSourceRangesKey: "192.0.2.0/24"}
	if len(gs.ManagedFields) > 0 || !maps.Equal(gs.Annotations, wantAnn) || gs.Labels != nil {
		t.Errorf("cached Service: managedFields %v, labels %v, annotations %v; want no managedFields or labels, annotations %v", gs.ManagedFields, gs.Labels, gs.Annotations, wantAnn)
	}
	if gs.Spec.Selector != nil || gs.Spec.ClusterIP != "" || gs.Spec.ClusterIPs != nil || gs.Spec.IPFamilies != nil {
		t.Errorf("cached Service spec %+v keeps kube-proxy's fields", gs.Spec)
	}
	if gs.Spec.Type != v1.ServiceTypeLoadBalancer || gs.Spec.ExternalTrafficPolicy != v1.ServiceExternalTrafficPolicyLocal || gs.Spec.HealthCheckNodePort != 32000 ||
		len(gs.Spec.Ports) != 1 || gs.Spec.Ports[0].NodePort != 30080 || len(gs.Spec.LoadBalancerSourceRanges) != 1 || len(gs.Status.LoadBalancer.Ingress) != 1 {
		t.Errorf("cached Service %+v lost what the speaker reads", gs)
	}
	got, ok, _ = s.nodes.GetStore().GetByKey("n1")
	if !ok {
		t.Fatal("the Node is not cached")
	}
	gn := got.(*v1.Node)
	if len(gn.ManagedFields) > 0 || len(gn.Status.Images) > 0 || gn.Annotations != nil || gn.Status.Capacity != nil || gn.Status.NodeInfo.KernelVersion != "" ||
		gn.Labels["zone"] != "a" || len(gn.Status.Addresses) != 1 || len(gn.Status.Conditions) != 1 {
		t.Errorf("cached Node: %+v; want no managedFields, images, annotations, capacity or system info, and labels, addresses and conditions kept", gn)
	}
	var eps []discoveryv1.Endpoint
	for _, name := range []string{"web-a", "web-b"} {
		got, ok, _ = s.slices.GetStore().GetByKey("ns/" + name)
		if !ok {
			t.Fatalf("the EndpointSlice %s is not cached", name)
		}
		es := got.(*discoveryv1.EndpointSlice)
		if len(es.ManagedFields) > 0 || es.Annotations != nil || es.OwnerReferences != nil || len(es.Labels) != 1 || es.Labels[discoveryv1.LabelServiceName] != "web" ||
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
