package integration

import (
	"context"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/speaker"
)

// TestDecideHandoff runs the speaker's exit decision (--handoff=auto) as
// the speaker's ServiceAccount against a real API server: it must be
// allowed to read what it needs (manifests/speaker/rbac.yaml), hand off
// when its Pod is deleted by a rolling update, and not when its
// DaemonSet is deleted, nor when it cannot read its Pod.
func TestDecideHandoff(t *testing.T) {
	e := newEnv(t)
	if err := e.cp.Apply(t.Context(), manifestPath(t, "speaker/rbac.yaml")); err != nil {
		t.Fatal(err)
	}
	const ns, fin = "keeplb-system", "keeplb.io/test-holds-it"
	labels := map[string]string{"app": "speaker"}
	podSpec := v1.PodSpec{Containers: []v1.Container{{Name: "speaker", Image: "keeplb"}}}
	ds, err := e.client.AppsV1().DaemonSets(ns).Create(t.Context(), &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker", Finalizers: []string{fin}},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: v1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: podSpec}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes := true
	spec := podSpec
	spec.NodeName = "node-1"
	pod, err := e.client.CoreV1().Pods(ns).Create(t.Context(), &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker-x", Labels: labels, Finalizers: []string{fin},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes}}},
		Spec: spec,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, patch := range []func() error{
			func() error {
				_, err := e.client.CoreV1().Pods(ns).Patch(t.Context(), pod.Name, "application/merge-patch+json", []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
				return err
			},
			func() error {
				_, err := e.client.AppsV1().DaemonSets(ns).Patch(t.Context(), ds.Name, "application/merge-patch+json", []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
				return err
			},
		} {
			_ = patch()
		}
	})

	client := kubernetes.NewForConfigOrDie(e.cp.ImpersonatedConfig(speakerUser, "system:serviceaccounts", "system:serviceaccounts:keeplb-system", "system:authenticated"))
	o := speaker.NewOptions()
	o.NodeName, o.PodName, o.PodNamespace, o.HandoffDir = "node-1", pod.Name, ns, t.TempDir()
	decide := func(step string, want bool, why string) {
		t.Helper()
		got, reason := speaker.DecideHandoff(t.Context(), client, o)
		if got != want || !strings.Contains(reason, why) {
			t.Errorf("%s: DecideHandoff = %v, %q; want %v, containing %q", step, got, reason, want, why)
		}
	}
	decide("running", false, "not being deleted")
	if err := e.client.CoreV1().Pods(ns).Delete(t.Context(), pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	decide("rolling update", true, "will start a replacement on Node node-1")

	other := *o
	other.PodNamespace = "default"
	if got, reason := speaker.DecideHandoff(t.Context(), client, &other); got || !strings.Contains(reason, "forbidden") {
		t.Errorf("a Pod outside keeplb-system: DecideHandoff = %v, %q; want false, forbidden", got, reason)
	}
	// The Role lets it read its own namespace's object, and no other.
	if _, err := client.CoreV1().Namespaces().Get(t.Context(), ns, metav1.GetOptions{}); err != nil {
		t.Errorf("the speaker cannot read its own namespace: %v", err)
	}
	if _, err := client.CoreV1().Namespaces().Get(t.Context(), "default", metav1.GetOptions{}); err == nil {
		t.Error("the speaker can read namespace default")
	}

	if err := e.client.AppsV1().DaemonSets(ns).Delete(t.Context(), ds.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	decide("uninstall", false, "is being deleted")
}

// TestDecideHandoffNamespaceDeleted: `kubectl delete -k` deletes the
// namespace first, and the namespace's pods may go while their DaemonSet
// still stands: the speaker must not hand off then, or the nodes keep
// keeplb's forwarding after the uninstall. No controller runs here, so
// the namespace stays Terminating with its objects.
func TestDecideHandoffNamespaceDeleted(t *testing.T) {
	e := newEnv(t)
	const ns = "keeplb-gone"
	if _, err := e.client.CoreV1().Namespaces().Create(t.Context(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "speaker"}
	podSpec := v1.PodSpec{Containers: []v1.Container{{Name: "speaker", Image: "keeplb"}}, NodeName: "node-1"}
	ds, err := e.client.AppsV1().DaemonSets(ns).Create(t.Context(), &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker"},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: v1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: v1.PodSpec{Containers: podSpec.Containers}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes := true
	const fin = "keeplb.io/test-holds-it"
	pod, err := e.client.CoreV1().Pods(ns).Create(t.Context(), &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker-x", Labels: labels, Finalizers: []string{fin},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &yes}}},
		Spec: podSpec,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = e.client.CoreV1().Pods(ns).Patch(context.Background(), pod.Name, types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
	})
	if err := e.client.CoreV1().Pods(ns).Delete(t.Context(), pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	o := speaker.NewOptions()
	o.NodeName, o.PodName, o.PodNamespace, o.HandoffDir = "node-1", pod.Name, ns, t.TempDir()
	if got, why := speaker.DecideHandoff(t.Context(), e.client, o); !got {
		t.Fatalf("before the namespace's deletion: DecideHandoff = false, %q; want a hand-off", why)
	}
	if err := e.client.CoreV1().Namespaces().Delete(t.Context(), ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, why := speaker.DecideHandoff(t.Context(), e.client, o); got || !strings.Contains(why, "namespace keeplb-gone is being deleted") {
		t.Errorf("namespace deleted: DecideHandoff = %v, %q; want false, the namespace being deleted", got, why)
	}
}
