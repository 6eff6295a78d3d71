package controlplane

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestControlPlane starts one control plane and runs every check against it,
// because a start costs seconds; the Stop check runs last.
func TestControlPlane(t *testing.T) {
	start := time.Now()
	cp := StartForTest(t)
	t.Logf("control plane started in %v at %s", time.Since(start).Round(time.Millisecond), cp.AdminConfig().Host)

	admin := newClient(t, cp.AdminConfig())

	t.Run("readyz", func(t *testing.T) {
		body, err := admin.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(t.Context())
		if err != nil || string(body) != "ok" {
			t.Fatalf("/readyz = %q, %v; want ok", body, err)
		}
	})

	t.Run("AdminConfigIsACopy", func(t *testing.T) {
		a := cp.AdminConfig()
		a.BearerToken = "changed"
		a.CAData[0] = 'x'
		if b := cp.AdminConfig(); b.BearerToken == "changed" || b.CAData[0] == 'x' {
			t.Fatal("changing one AdminConfig changed the next")
		}
	})

	t.Run("Apply", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "objects.yaml")
		manifest := `# leading comment document
---
apiVersion: v1
kind: Namespace
metadata:
  name: apply-test
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: apply-test
data:
  answer: "42"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: defaulted
data: {}
`
		if err := os.WriteFile(file, []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		// Twice: applying unchanged objects again must succeed.
		for range 2 {
			if err := cp.Apply(t.Context(), file); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := admin.CoreV1().Namespaces().Get(t.Context(), "apply-test", metav1.GetOptions{}); err != nil {
			t.Fatalf("namespace not created: %v", err)
		}
		cm, err := admin.CoreV1().ConfigMaps("apply-test").Get(t.Context(), "settings", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("configmap not created: %v", err)
		}
		if cm.Data["answer"] != "42" {
			t.Errorf("configmap data = %v, want answer=42", cm.Data)
		}
		if got := cm.ManagedFields; len(got) == 0 || got[0].Manager != applyFieldManager || got[0].Operation != metav1.ManagedFieldsOperationApply {
			t.Errorf("managed fields = %+v, want an Apply entry of %q", got, applyFieldManager)
		}
		if _, err := admin.CoreV1().ConfigMaps(metav1.NamespaceDefault).Get(t.Context(), "defaulted", metav1.GetOptions{}); err != nil {
			t.Errorf("configmap without namespace not created in default: %v", err)
		}
	})

	t.Run("ApplyCRDThenCustomResource", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "crd.yaml")
		manifest := `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.keeplb.io
spec:
  group: test.keeplb.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
---
apiVersion: test.keeplb.io/v1
kind: Widget
metadata:
  name: w1
spec:
  size: 3
`
		if err := os.WriteFile(file, []byte(manifest), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := cp.Apply(t.Context(), file); err != nil {
			t.Fatal(err)
		}
		out, err := cp.Kubectl(t.Context(), "get", "widgets.test.keeplb.io", "w1", "-n", "default", "-o", "jsonpath={.spec.size}")
		if err != nil || out != "3" {
			t.Fatalf("kubectl get widget = %q, %v; want 3", out, err)
		}
	})

	t.Run("ApplySyntaxErrorAppliesNothing", func(t *testing.T) {
		dir := t.TempDir()
		good := filepath.Join(dir, "good.yaml")
		bad := filepath.Join(dir, "bad.yaml")
		if err := os.WriteFile(good, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: never}\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bad, []byte("kind: [unterminated\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := cp.Apply(t.Context(), good, bad); err == nil || !strings.Contains(err.Error(), bad) {
			t.Fatalf("Apply error = %v, want one naming %s", err, bad)
		}
		_, err := admin.CoreV1().ConfigMaps(metav1.NamespaceDefault).Get(t.Context(), "never", metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			t.Fatalf("get configmap from the good file = %v, want NotFound", err)
		}
	})

	t.Run("ImpersonationWithoutRBACIsForbidden", func(t *testing.T) {
		c := newClient(t, cp.ImpersonatedConfig("nobody", "system:authenticated"))
		_, err := c.CoreV1().Services(metav1.NamespaceDefault).List(t.Context(), metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Fatalf("list services as nobody: err = %v, want Forbidden", err)
		}
		if !strings.Contains(err.Error(), `"nobody"`) {
			t.Errorf("error %q does not name the impersonated user", err)
		}
	})

	t.Run("DualStackService", func(t *testing.T) {
		policy := corev1.IPFamilyPolicyRequireDualStack
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "dual"},
			Spec: corev1.ServiceSpec{
				Type:           corev1.ServiceTypeClusterIP,
				IPFamilyPolicy: &policy,
				Ports:          []corev1.ServicePort{{Port: 80}},
			},
		}
		got, err := admin.CoreV1().Services(metav1.NamespaceDefault).Create(t.Context(), svc, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Spec.ClusterIPs) != 2 || len(got.Spec.IPFamilies) != 2 {
			t.Fatalf("clusterIPs = %v, ipFamilies = %v; want one of each family", got.Spec.ClusterIPs, got.Spec.IPFamilies)
		}
		if got.Spec.IPFamilies[0] == got.Spec.IPFamilies[1] {
			t.Errorf("ipFamilies = %v, want IPv4 and IPv6", got.Spec.IPFamilies)
		}
	})

	t.Run("Kubectl", func(t *testing.T) {
		out, err := cp.Kubectl(t.Context(), "get", "namespace", "default", "-o", "name")
		if err != nil || strings.TrimSpace(out) != "namespace/default" {
			t.Fatalf("kubectl get namespace default = %q, %v", out, err)
		}
		if _, err := cp.Kubectl(t.Context(), "get", "nosuchkind"); err == nil {
			t.Error("kubectl get nosuchkind succeeded")
		}
	})

	t.Run("Stop", func(t *testing.T) {
		pids := map[string]int{
			"etcd":           cp.etcd.cmd.Process.Pid,
			"kube-apiserver": cp.apiserver.cmd.Process.Pid,
		}
		workDir := cp.WorkDir()
		start := time.Now()
		if err := cp.Stop(); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		t.Logf("Stop took %v", time.Since(start).Round(time.Millisecond))
		if err := cp.Stop(); err != nil {
			t.Fatalf("second Stop: %v", err)
		}
		for name, pid := range pids {
			// Both the process and its process group (Setpgid makes the
			// PID the group ID) must be gone.
			for _, target := range []int{pid, -pid} {
				deadline := time.Now().Add(10 * time.Second)
				for {
					err := syscall.Kill(target, 0)
					if errors.Is(err, syscall.ESRCH) {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("%s (kill(%d, 0) = %v) still alive after Stop", name, target, err)
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		}
		if _, err := os.Stat(workDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("work dir %s not removed: %v", workDir, err)
		}
	})
}

// TestStartWithoutToolsDir checks the message users see without binaries.
func TestStartWithoutToolsDir(t *testing.T) {
	t.Setenv(toolsDirEnv, "")
	_, err := Start(t.Context(), Options{})
	if !errors.Is(err, errNoToolsDir) {
		t.Fatalf("Start error = %v, want errNoToolsDir", err)
	}
	_, reason, err := StartForMain()
	if err != nil || !strings.Contains(reason, "make test") {
		t.Fatalf("StartForMain = %q, %v; want a skip reason mentioning make test", reason, err)
	}
}

// TestPrefixWriter checks that copied log lines are whole and labelled.
func TestPrefixWriter(t *testing.T) {
	var buf bytes.Buffer
	sink := &logSink{out: &buf}
	w := sink.writer("etcd")
	for _, chunk := range []string{"one\ntw", "o\n", "thr", "ee"} {
		if n, err := w.Write([]byte(chunk)); n != len(chunk) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", chunk, n, err)
		}
	}
	if got, want := buf.String(), "[etcd] one\n[etcd] two\n"; got != want {
		t.Fatalf("before flush: %q, want %q", got, want)
	}
	w.flush()
	if got, want := buf.String(), "[etcd] one\n[etcd] two\n[etcd] three\n"; got != want {
		t.Fatalf("after flush: %q, want %q", got, want)
	}
}

func newClient(t *testing.T, cfg *rest.Config) *kubernetes.Clientset {
	t.Helper()
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
