package speaker

import (
	"context"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/keeplb/keeplb/pkg/annotations"
)

// TestInformersCacheTrimmedObjects: what the speaker's informers cache has
// no managedFields, no last-applied copy and no Node image list, and keeps
// everything the speaker reads.
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
	o := NewOptions()
	o.NodeName = "n1"
	s := newSpeaker(o, fake.NewClientset(svc, node), dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()), Kernel{}, nil, record.NewFakeRecorder(10))
	// Shutdown waits for the informers, which stop when ctx is done.
	ctx, cancel := context.WithCancel(t.Context())
	s.factory.Start(ctx.Done())
	defer s.factory.Shutdown()
	defer cancel()
	if !cache.WaitForCacheSync(t.Context().Done(), s.services.HasSynced, s.nodes.HasSynced) {
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
}
