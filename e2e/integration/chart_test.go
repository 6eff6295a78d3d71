package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/keeplb/keeplb/pkg/testing/chart"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
)

// TestChart checks the Helm chart in manifests/charts/keeplb with the real
// kubectl and kube-apiserver: with its default values it renders, object
// for object, what `kubectl kustomize manifests/` prints, but the
// Namespace, which Helm leaves to --create-namespace; and rendered with
// the default values and with others, a server-side dry run accepts every
// object, as `helm install` would send them.
func TestChart(t *testing.T) {
	cp := controlplane.StartForTest(t)
	ctx := t.Context()

	t.Run("matches kustomize", func(t *testing.T) {
		out, err := cp.Kubectl(ctx, "kustomize", manifestPath(t, ""))
		if err != nil {
			t.Fatal(err)
		}
		objs, err := chart.Decode(out)
		if err != nil {
			t.Fatal(err)
		}
		var want []*unstructured.Unstructured
		for _, o := range objs {
			if o.GetKind() == "Namespace" {
				if o.GetName() != "keeplb-system" {
					t.Errorf("kustomize installs Namespace %s, the chart test expects keeplb-system", o.GetName())
				}
				continue
			}
			want = append(want, o)
		}
		got := renderChart(t, "keeplb-system", nil)
		for _, d := range chart.Diff(want, got) {
			t.Error(d)
		}
	})

	for _, tc := range []struct {
		name, namespace string
		values          map[string]any
	}{
		{name: "defaults", namespace: "keeplb-system"},
		{name: "other values", namespace: "lb", values: map[string]any{
			"image":            map[string]any{"repository": "registry.example/keeplb", "tag": "v0.1.0", "pullPolicy": "Always"},
			"imagePullSecrets": []any{map[string]any{"name": "regcred"}},
			"controller": map[string]any{
				"replicas":     float64(3),
				"extraArgs":    []any{"--v=2"},
				"resources":    map[string]any{"requests": map[string]any{"cpu": "100m"}, "limits": map[string]any{"memory": "512Mi"}},
				"nodeSelector": map[string]any{"kubernetes.io/os": "linux"},
				"tolerations":  []any{map[string]any{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}},
			},
			"speaker": map[string]any{
				"extraArgs":         []any{"--ipvs"},
				"nodeSelector":      map[string]any{"keeplb.io/speaker": "true"},
				"tolerations":       []any{},
				"priorityClassName": "",
				"setSysctls":        false,
			},
		}},
	} {
		t.Run("dry run with "+tc.name, func(t *testing.T) {
			// The namespace as docs/install.md has it made: a dry run
			// creates nothing, so it must exist.
			if _, err := cp.Kubectl(ctx, "create", "namespace", tc.namespace); err != nil {
				t.Fatal(err)
			}
			if _, err := cp.Kubectl(ctx, "label", "namespace", tc.namespace, "pod-security.kubernetes.io/enforce=privileged"); err != nil {
				t.Fatal(err)
			}
			r, err := chart.Render(chartDir(t), chart.Release{Name: "keeplb", Namespace: tc.namespace}, tc.values)
			if err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(t.TempDir(), "chart.yaml")
			if err := os.WriteFile(file, []byte(r.Manifest()), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := cp.Kubectl(ctx, "apply", "--server-side", "--field-manager=keeplb-dry-run", "--dry-run=server", "-f", file)
			if err != nil {
				t.Fatalf("dry-run apply of the chart: %v\n%s", err, r.Manifest())
			}
			t.Logf("kubectl apply --dry-run=server of the chart:\n%s", out)
			objs, err := r.Objects()
			if err != nil {
				t.Fatal(err)
			}
			if len(objs) < 9 {
				t.Errorf("the chart renders only %d objects", len(objs))
			}
			for _, o := range objs {
				resource := strings.ToLower(o.GetKind())
				if g := o.GroupVersionKind().Group; g != "" {
					resource += "." + g
				}
				if want := resource + "/" + o.GetName() + " serverside-applied"; !strings.Contains(out, want) {
					t.Errorf("dry run did not report %q", want)
				}
			}
		})
	}
}

func chartDir(t *testing.T) string { return manifestPath(t, "charts/keeplb") }

// renderChart renders the chart into namespace with values over its
// defaults and returns its objects, CRDs included.
func renderChart(t *testing.T, namespace string, values map[string]any) []*unstructured.Unstructured {
	t.Helper()
	objs, err := chart.RenderObjects(chartDir(t), chart.Release{Name: "keeplb", Namespace: namespace}, values)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}
