package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/testing/chart"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
)

// TestChart checks the Helm chart in manifests/charts/keeplb with the real
// kubectl, kube-apiserver and helm of hack/tools.sh. With its default
// values the chart renders, object for object, what `kubectl kustomize
// manifests/` prints, but the Namespace, which Helm leaves to
// --create-namespace: rendered by the Go renderer of pkg/testing/chart and
// by `helm template`. With the default values and with others, `helm lint
// --strict` passes, helm renders the same objects as the Go renderer (so
// the Go renderer, which the unit tests of hack/chartgen use, renders as
// Helm does), and a server-side dry run accepts every object of either
// rendering, as `helm install` would send them.
func TestChart(t *testing.T) {
	cp := controlplane.StartForTest(t)
	ctx := t.Context()

	cases := []struct {
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
				"prepareNode":       false,
			},
		}},
		// A null drops a default key, as the chart's README tells.
		{name: "a default dropped", namespace: "keeplb", values: map[string]any{
			"controller": map[string]any{"resources": map[string]any{"limits": nil}},
		}},
	}
	// The namespaces as docs/install.md has them made: a dry run creates
	// nothing, so they must exist.
	for _, tc := range cases {
		if _, err := cp.Kubectl(ctx, "create", "namespace", tc.namespace); err != nil {
			t.Fatal(err)
		}
		if _, err := cp.Kubectl(ctx, "label", "namespace", tc.namespace, "pod-security.kubernetes.io/enforce=privileged"); err != nil {
			t.Fatal(err)
		}
	}

	out, err := cp.Kubectl(ctx, "kustomize", manifestPath(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := chart.Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	var kustomized []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			if o.GetName() != "keeplb-system" {
				t.Errorf("kustomize installs Namespace %s, the chart test expects keeplb-system", o.GetName())
			}
			continue
		}
		kustomized = append(kustomized, o)
	}

	// A user who installs their own build changes the image and nothing
	// else (docs/install.md): an overlay with only an images entry must
	// give every container that image and change no other field.
	t.Run("an overlay that only sets the image", func(t *testing.T) {
		dir := t.TempDir()
		// kustomize takes a relative path to the base only.
		base, err := filepath.Rel(dir, manifestPath(t, ""))
		if err != nil {
			t.Fatal(err)
		}
		overlay := "resources:\n- " + base + "\nimages:\n- name: ghcr.io/keeplb/keeplb\n  newName: keeplb\n  newTag: e2e\n"
		if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(overlay), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := cp.Kubectl(ctx, "kustomize", "--load-restrictor=LoadRestrictionsNone", dir)
		if err != nil {
			t.Fatal(err)
		}
		got, err := chart.Decode(out)
		if err != nil {
			t.Fatal(err)
		}
		images := 0
		for _, o := range got {
			for _, field := range []string{"containers", "initContainers"} {
				cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", field)
				for i, c := range cs {
					c := c.(map[string]any)
					if c["image"] != "keeplb:e2e" {
						t.Errorf("%s %s[%d] runs %v, want keeplb:e2e", chart.Key(o), field, i, c["image"])
					}
					c["image"] = "ghcr.io/keeplb/keeplb:latest" // back to the base's, for the diff below
					images++
				}
				if len(cs) > 0 {
					_ = unstructured.SetNestedSlice(o.Object, cs, "spec", "template", "spec", field)
				}
			}
		}
		if images < 3 {
			t.Errorf("the overlay set %d images, want the controller's, the speaker's and its init container's", images)
		}
		var rest []*unstructured.Unstructured
		for _, o := range got {
			if o.GetKind() != "Namespace" {
				rest = append(rest, o)
			}
		}
		for _, d := range chart.Diff(kustomized, rest) {
			t.Errorf("the overlay changed more than the image: %s", d)
		}
	})

	t.Run("matches kustomize", func(t *testing.T) {
		got := renderChart(t, "keeplb-system", nil)
		for _, d := range chart.Diff(kustomized, got) {
			t.Error(d)
		}
	})

	t.Run("helm template matches kustomize", func(t *testing.T) {
		h := newHelm(t)
		got, err := chart.Decode(h.template(t, "keeplb-system", nil))
		if err != nil {
			t.Fatalf("helm template: %v", err)
		}
		for _, d := range chart.Diff(kustomized, got) {
			t.Error(d)
		}
	})

	for _, tc := range cases {
		t.Run("dry run with "+tc.name, func(t *testing.T) {
			r, err := chart.Render(chartDir(t), chart.Release{Name: "keeplb", Namespace: tc.namespace}, tc.values)
			if err != nil {
				t.Fatal(err)
			}
			dryRunApply(t, cp, r.Manifest())
		})

		t.Run("helm with "+tc.name, func(t *testing.T) {
			h := newHelm(t)
			h.lint(t, tc.namespace, tc.values)
			manifest := h.template(t, tc.namespace, tc.values)
			got, err := chart.Decode(manifest)
			if err != nil {
				t.Fatalf("helm template: %v", err)
			}
			want := renderChart(t, tc.namespace, tc.values)
			for _, d := range chart.Diff(want, got) {
				t.Errorf("the Go renderer (-) and helm (+) render the chart differently: %s", d)
			}
			dryRunApply(t, cp, manifest)
		})
	}
}

// dryRunApply sends manifest to the API server as `kubectl apply
// --server-side --dry-run=server` and checks that every object of it was
// accepted.
func dryRunApply(t *testing.T, cp *controlplane.ControlPlane, manifest string) {
	t.Helper()
	objs, err := chart.Decode(manifest)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) < 9 {
		t.Errorf("the chart renders only %d objects", len(objs))
	}
	file := filepath.Join(t.TempDir(), "chart.yaml")
	if err := os.WriteFile(file, []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := cp.Kubectl(t.Context(), "apply", "--server-side", "--field-manager=keeplb-dry-run", "--dry-run=server", "-f", file)
	if err != nil {
		t.Fatalf("dry-run apply of the chart: %v\n%s", err, manifest)
	}
	t.Logf("kubectl apply --dry-run=server of the chart:\n%s", out)
	for _, o := range objs {
		resource := strings.ToLower(o.GetKind())
		if g := o.GroupVersionKind().Group; g != "" {
			resource += "." + g
		}
		if want := resource + "/" + o.GetName() + " serverside-applied"; !strings.Contains(out, want) {
			t.Errorf("dry run did not report %q", want)
		}
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

// helm runs the helm binary of hack/tools.sh with its cache, config and
// data under a directory of the test's, so that it neither reads nor
// writes the user's.
type helm struct {
	bin, home string
}

// newHelm returns the helm in $KEEPLB_TOOLS_DIR, and skips t without one:
// $KEEPLB_TOOLS_DIR unset, or built by a hack/tools.sh that predates helm.
func newHelm(t *testing.T) *helm {
	t.Helper()
	dir := os.Getenv("KEEPLB_TOOLS_DIR")
	if dir == "" {
		t.Skip("KEEPLB_TOOLS_DIR is not set: run `make test-integration`, which builds helm with hack/tools.sh")
	}
	bin := filepath.Join(dir, "helm")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("no helm in KEEPLB_TOOLS_DIR (%v): rerun hack/tools.sh, which builds it", err)
	}
	return &helm{bin: bin, home: t.TempDir()}
}

// run runs helm with args and returns its stdout. Helm writes warnings to
// stderr, such as a value whose type differs from its default's; a chart
// should render without any, so output there fails t.
func (h *helm) run(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), h.bin, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(h.home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(h.home, "config"),
		"HELM_DATA_HOME="+filepath.Join(h.home, "data"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	if stderr.Len() > 0 {
		t.Errorf("helm %s wrote to stderr:\n%s", strings.Join(args, " "), stderr.String())
	}
	return stdout.String()
}

// lint runs `helm lint --strict` on the chart with values over its
// defaults: any warning fails it.
func (h *helm) lint(t *testing.T, namespace string, values map[string]any) {
	t.Helper()
	args := append([]string{"lint", "--strict", "--namespace", namespace}, valuesArgs(t, values)...)
	t.Log(h.run(t, append(args, chartDir(t))...))
}

// template returns what `helm template` renders of the chart, CRDs
// included, for release keeplb in namespace with values over its defaults.
func (h *helm) template(t *testing.T, namespace string, values map[string]any) string {
	t.Helper()
	args := append([]string{"template", "keeplb", chartDir(t), "--namespace", namespace, "--include-crds"}, valuesArgs(t, values)...)
	return h.run(t, args...)
}

// valuesArgs writes values to a file and returns the flag that passes it
// to helm, as `helm install -f` would; none for nil.
func valuesArgs(t *testing.T, values map[string]any) []string {
	t.Helper()
	if values == nil {
		return nil
	}
	b, err := yaml.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"--values", file}
}
