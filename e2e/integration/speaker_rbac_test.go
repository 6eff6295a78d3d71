package integration

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	servicehelper "k8s.io/cloud-provider/service/helpers"
)

// speakerUser is the identity of every speaker: one token on every node.
const speakerUser = "system:serviceaccount:keeplb-system:keeplb-speaker"

// Issue 10: the speaker's ClusterRole can patch any Service, to write one
// annotation. The ValidatingAdmissionPolicy of manifests/speaker narrows
// that to the keeplb.io/holder annotation, enforced by the API server:
// this is the speaker's own ServiceAccount trying everything else a
// compromised node would.
func TestSpeakerMayOnlyWriteTheHolder(t *testing.T) {
	e := newEnv(t)
	if err := e.cp.Apply(t.Context(), manifestPath(t, "speaker/rbac.yaml"), manifestPath(t, "speaker/admission.yaml")); err != nil {
		t.Fatal(err)
	}
	victim := newService("tenant", "web", ann("team", "a"))
	victim.Labels = map[string]string{"app": "web"}
	victim.Finalizers = []string{servicehelper.LoadBalancerCleanupFinalizer}
	e.create(victim)
	t.Cleanup(func() {
		// Let the Service go at the end: the finalizer is the test's.
		s, err := e.client.CoreV1().Services("tenant").Get(t.Context(), "web", metav1.GetOptions{})
		if err == nil {
			s.Finalizers = nil
			_, _ = e.client.CoreV1().Services("tenant").Update(t.Context(), s, metav1.UpdateOptions{})
		}
	})

	cfg := e.cp.ImpersonatedConfig(speakerUser, "system:serviceaccounts", "system:serviceaccounts:keeplb-system", "system:authenticated")
	speaker := kubernetes.NewForConfigOrDie(cfg)
	patch := func(p map[string]any) error {
		b, _ := json.Marshal(p)
		_, err := speaker.CoreV1().Services("tenant").Patch(t.Context(), "web", types.MergePatchType, b, metav1.PatchOptions{FieldManager: "keeplb-speaker"})
		return err
	}
	meta := func(m map[string]any) map[string]any { return map[string]any{"metadata": m} }

	// The policy takes effect asynchronously after it is created; wait
	// until a forbidden change is refused by it.
	eventually(t, 30*time.Second, "the policy to refuse a selector change", func() (bool, string) {
		err := patch(map[string]any{"spec": map[string]any{"selector": map[string]string{"app": "evil"}}})
		if err == nil {
			// Undo, as admin, so that the later checks start clean.
			s := e.get("tenant", "web")
			s.Spec.Selector = map[string]string{"app": "web"}
			if _, err := e.client.CoreV1().Services("tenant").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			return false, "allowed"
		}
		return strings.Contains(err.Error(), "keeplb-speaker-holder-only"), err.Error()
	})

	if err := patch(meta(map[string]any{"annotations": map[string]string{"keeplb.io/holder": "node-1"}})); err != nil {
		t.Fatalf("writing the holder annotation was refused: %v", err)
	}
	if err := patch(meta(map[string]any{"annotations": map[string]any{"keeplb.io/holder": nil}})); err != nil {
		t.Fatalf("removing the holder annotation was refused: %v", err)
	}

	for _, tc := range []struct {
		what  string
		patch map[string]any
	}{
		{"rewrite the selector", map[string]any{"spec": map[string]any{"selector": map[string]string{"app": "evil"}}}},
		{"add externalIPs", map[string]any{"spec": map[string]any{"externalIPs": []string{"203.0.113.9"}}}},
		{"change a port", map[string]any{"spec": map[string]any{"ports": []map[string]any{{"name": "http", "port": 81, "targetPort": 8080, "protocol": "TCP"}}}}},
		{"set keeplb.io/ips to steal a VIP", meta(map[string]any{"annotations": map[string]string{"keeplb.io/ips": "192.0.2.1"}})},
		{"change another annotation", meta(map[string]any{"annotations": map[string]string{"team": "b"}})},
		{"remove another annotation", meta(map[string]any{"annotations": map[string]any{"team": nil}})},
		{"change a label", meta(map[string]any{"labels": map[string]string{"app": "evil"}})},
		{"strip the finalizers", meta(map[string]any{"finalizers": []string{}})},
		{"add an owner", meta(map[string]any{"ownerReferences": []map[string]any{{"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "00000000-0000-0000-0000-000000000001"}}})},
		{"set the holder and the selector at once", map[string]any{
			"metadata": map[string]any{"annotations": map[string]string{"keeplb.io/holder": "node-1"}},
			"spec":     map[string]any{"selector": map[string]string{"app": "evil"}},
		}},
	} {
		err := patch(tc.patch)
		if err == nil {
			t.Errorf("the speaker could %s", tc.what)
			continue
		}
		if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
			t.Errorf("%s: refused, but not by the policy: %v", tc.what, err)
		}
	}
	// And what RBAC already refused stays refused.
	if err := speaker.CoreV1().Services("tenant").Delete(t.Context(), "web", metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("delete: %v, want forbidden", err)
	}
	if _, err := speaker.CoreV1().Services("tenant").Create(t.Context(), newService("tenant", "evil"), metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("create: %v, want forbidden", err)
	}
	s := e.get("tenant", "web")
	if s.Spec.Selector["app"] != "web" || s.Annotations["team"] != "a" || s.Labels["app"] != "web" || len(s.Spec.ExternalIPs) != 0 || len(s.Finalizers) != 1 {
		t.Fatalf("the Service changed: %+v", s)
	}

	// The policy binds the speaker only: the admin and the controller
	// still change Services.
	s.Spec.Ports[0].Port = 8081
	if _, err := e.client.CoreV1().Services("tenant").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("the admin could not change the Service: %v", err)
	}
}
