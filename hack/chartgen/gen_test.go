package main

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"testing/fstest"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/keeplb/keeplb/pkg/testing/chart"
)

const (
	manifestsDir = "../../manifests"
	// releaseNamespace is the namespace of the kustomize base, and the one
	// the docs install the chart into.
	releaseNamespace = "keeplb-system"
)

var chartPath = filepath.Join(manifestsDir, chartDir)

// TestChartUpToDate fails when the committed chart is not what `make chart`
// writes, or holds a generated file that the base no longer produces.
func TestChartUpToDate(t *testing.T) {
	files, err := generate(os.DirFS(manifestsDir))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(chartPath, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s is not what hack/chartgen writes (err %v): run make chart", name, err)
		}
	}
	for _, pattern := range []string{"templates/*.yaml", "crds/*"} {
		onDisk, err := filepath.Glob(filepath.Join(chartPath, pattern))
		if err != nil {
			t.Fatal(err)
		}
		for _, file := range onDisk {
			rel, _ := filepath.Rel(chartPath, file)
			if _, ok := files[filepath.ToSlash(rel)]; !ok {
				t.Errorf("%s is not generated from the base: delete it, or add its source to manifests/kustomization.yaml", rel)
			}
		}
	}
}

// TestCRDIsTheBase checks the chart's CRD byte for byte against the base's.
func TestCRDIsTheBase(t *testing.T) {
	want, err := os.ReadFile(filepath.Join(manifestsDir, "crd/ippools.keeplb.io.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(chartPath, "crds/ippools.keeplb.io.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("crds/ippools.keeplb.io.yaml differs from manifests/crd/ippools.keeplb.io.yaml: run make chart")
	}
}

// TestDefaultsAreTheBase renders the chart with its values.yaml and compares
// its objects with the base's, but for the Namespace, which the chart leaves
// to Helm. kustomizeResources refuses a kustomization.yaml with anything but
// resources, so the base's objects are those of its files;
// e2e/integration/chart_test.go compares with `kubectl kustomize` itself.
func TestDefaultsAreTheBase(t *testing.T) {
	resources, err := kustomizeResources(os.DirFS(manifestsDir))
	if err != nil {
		t.Fatal(err)
	}
	var base []*unstructured.Unstructured
	for _, res := range resources {
		data, err := os.ReadFile(filepath.Join(manifestsDir, res))
		if err != nil {
			t.Fatal(err)
		}
		objs, err := chart.Decode(string(data))
		if err != nil {
			t.Fatalf("%s: %v", res, err)
		}
		for _, o := range objs {
			if o.GetKind() != "Namespace" {
				base = append(base, o)
			}
		}
	}
	got := render(t, releaseNamespace, nil)
	for _, d := range chart.Diff(base, got) {
		t.Error(d)
	}
}

// TestValues renders non-default values into another namespace and checks
// that each reaches the objects.
func TestValues(t *testing.T) {
	objs := render(t, "lb", map[string]any{
		"image":            map[string]any{"repository": "registry.example/keeplb", "tag": "v9.9.9", "pullPolicy": "Always"},
		"imagePullSecrets": []any{map[string]any{"name": "regcred"}},
		"controller": map[string]any{
			"replicas":     float64(3),
			"extraArgs":    []any{"--v=4", "--default-class=false"},
			"resources":    map[string]any{"limits": map[string]any{"memory": "1Gi"}, "requests": nil}, // nil drops a default, as in Helm
			"nodeSelector": map[string]any{"node-role.kubernetes.io/control-plane": ""},
			"tolerations":  []any{map[string]any{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}},
		},
		"speaker": map[string]any{
			"extraArgs":         []any{"--ipvs"},
			"resources":         map[string]any{"requests": nil},
			"nodeSelector":      map[string]any{"keeplb.io/speaker": "true"},
			"tolerations":       []any{},
			"priorityClassName": "",
			"prepareNode":       false,
			"goMemLimit":        "off",
		},
	})
	byKey := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		byKey[chart.Key(o)] = o
		if o.GetNamespace() != "" && o.GetNamespace() != "lb" {
			t.Errorf("%s: not in the release namespace", chart.Key(o))
		}
		subjects, _, _ := unstructured.NestedSlice(o.Object, "subjects")
		for _, s := range subjects {
			if ns := s.(map[string]any)["namespace"]; ns != "lb" {
				t.Errorf("%s: subject in namespace %v", chart.Key(o), ns)
			}
		}
	}
	dep := byKey["Deployment.apps lb/keeplb-controller"]
	ds := byKey["DaemonSet.apps lb/keeplb-speaker"]
	if dep == nil || ds == nil {
		t.Fatalf("no controller Deployment or speaker DaemonSet in %v", sortedKeys(byKey))
	}

	for _, tc := range []struct {
		obj  *unstructured.Unstructured
		path string
		want any
	}{
		{dep, "spec.replicas", int64(3)},
		{dep, "spec.template.spec.imagePullSecrets", []any{map[string]any{"name": "regcred"}}},
		{dep, "spec.template.spec.nodeSelector", map[string]any{"node-role.kubernetes.io/control-plane": ""}},
		{dep, "spec.template.spec.tolerations", []any{map[string]any{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}}},
		{dep, "spec.template.spec.containers.0.image", "registry.example/keeplb:v9.9.9"},
		{dep, "spec.template.spec.containers.0.imagePullPolicy", "Always"},
		{dep, "spec.template.spec.containers.0.args", []any{"controller", "--leader-elect=true", "--metrics-bind-address=:10260", "--v=4", "--default-class=false"}},
		{dep, "spec.template.spec.containers.0.resources", map[string]any{"limits": map[string]any{"memory": "1Gi"}}},
		{ds, "spec.template.spec.imagePullSecrets", []any{map[string]any{"name": "regcred"}}},
		{ds, "spec.template.spec.nodeSelector", map[string]any{"keeplb.io/speaker": "true"}},
		{ds, "spec.template.spec.tolerations", nil},
		{ds, "spec.template.spec.priorityClassName", nil},
		{ds, "spec.template.spec.initContainers", nil},
		{ds, "spec.template.spec.containers.0.image", "registry.example/keeplb:v9.9.9"},
		{ds, "spec.template.spec.containers.0.args", []any{"speaker", "--metrics-bind-address=[$(HOST_IP)]:10261", "--handoff-dir=/run/keeplb-handoff", "--ipvs"}},
		{ds, "spec.template.spec.containers.0.resources", map[string]any{}},
		{ds, "spec.template.spec.containers.0.env.4", map[string]any{"name": "GOMEMLIMIT", "value": "off"}},
	} {
		got := field(tc.obj.Object, tc.path)
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s %s = %#v, want %#v", chart.Key(tc.obj), tc.path, got, tc.want)
		}
	}
}

// TestSpeakerTolerations: speaker.tolerateControlPlane adds the
// control-plane taint's toleration after speaker.tolerations, default or
// not, and the speaker tolerates no other taint of its own.
func TestSpeakerTolerations(t *testing.T) {
	toleration := func(key string) any {
		return map[string]any{"key": key, "operator": "Exists", "effect": "NoSchedule"}
	}
	defaults := []any{toleration("node.kubernetes.io/not-ready"), toleration("node.kubernetes.io/unreachable")}
	for _, tc := range []struct {
		name   string
		values map[string]any
		want   any
	}{
		{"defaults", map[string]any{}, defaults},
		{"control plane", map[string]any{"tolerateControlPlane": true},
			append(append([]any{}, defaults...), toleration("node-role.kubernetes.io/control-plane"))},
		{"control plane only", map[string]any{"tolerateControlPlane": true, "tolerations": []any{}},
			[]any{toleration("node-role.kubernetes.io/control-plane")}},
		{"none", map[string]any{"tolerations": []any{}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ds *unstructured.Unstructured
			for _, o := range render(t, releaseNamespace, map[string]any{"speaker": tc.values}) {
				if o.GetKind() == "DaemonSet" {
					ds = o
				}
			}
			if ds == nil {
				t.Fatal("no DaemonSet rendered")
			}
			if got := field(ds.Object, "spec.template.spec.tolerations"); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("tolerations = %#v, want %#v", got, tc.want)
			}
		})
	}
}

// TestNotes renders NOTES.txt, which Helm prints after an install.
func TestNotes(t *testing.T) {
	r, err := chart.Render(chartPath, chart.Release{Name: "keeplb", Namespace: "lb"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	notes := r.Templates["templates/NOTES.txt"]
	for _, want := range []string{"kubectl -n lb get pods", "IPPool", "docs/install.md"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt lacks %q:\n%s", want, notes)
		}
	}
}

func TestGenerateRefuses(t *testing.T) {
	deployment, err := os.ReadFile(filepath.Join(manifestsDir, "controller/deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	const kustomization = "resources:\n  - controller/deployment.yaml\n"
	for _, tc := range []struct {
		name string
		fs   fstest.MapFS
		want string
	}{{
		name: "kustomize features",
		fs:   fstest.MapFS{"kustomization.yaml": {Data: []byte(kustomization + "namePrefix: x-\n")}},
		want: `does not follow "namePrefix"`,
	}, {
		name: "resource outside manifests",
		fs:   fstest.MapFS{"kustomization.yaml": {Data: []byte("resources:\n  - ../other/x.yaml\n")}},
		want: "only YAML files inside manifests/",
	}, {
		name: "edited line gone",
		fs: fstest.MapFS{
			"kustomization.yaml":         {Data: []byte(kustomization)},
			"controller/deployment.yaml": {Data: regexp.MustCompile(`(?m)^  replicas:.*\n`).ReplaceAll(deployment, nil)},
		},
		want: `no line "  replicas:"`,
	}, {
		name: "template action in the base",
		fs: fstest.MapFS{
			"kustomization.yaml":         {Data: []byte(kustomization)},
			"controller/deployment.yaml": {Data: append(bytes.Clone(deployment), "# {{ x }}\n"...)},
		},
		want: "template action",
	}, {
		name: "namespace where no rule replaces it",
		fs: fstest.MapFS{
			"kustomization.yaml": {Data: []byte("resources:\n  - x.yaml\n")},
			"x.yaml":             {Data: []byte("kind: ConfigMap\ndata:\n  ns: keeplb-system\n")},
		},
		want: "teach lineRules",
	}, {
		name: "namespace with other objects",
		fs: fstest.MapFS{
			"kustomization.yaml": {Data: []byte("resources:\n  - x.yaml\n")},
			"x.yaml":             {Data: []byte("kind: Namespace\n---\nkind: ConfigMap\n")},
		},
		want: "files of their own",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := generate(tc.fs)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// render renders the committed chart into namespace with values over its
// defaults and returns its objects, CRDs included.
func render(t *testing.T, namespace string, values map[string]any) []*unstructured.Unstructured {
	t.Helper()
	objs, err := chart.RenderObjects(chartPath, chart.Release{Name: "keeplb", Namespace: namespace}, values)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// field returns the value at a dotted path, where numbers index lists;
// nil when absent.
func field(obj any, path string) any {
	for _, p := range strings.Split(path, ".") {
		switch o := obj.(type) {
		case map[string]any:
			obj = o[p]
		case []any:
			i := 0
			for _, c := range p {
				i = i*10 + int(c-'0')
			}
			if i >= len(o) {
				return nil
			}
			obj = o[i]
		default:
			return nil
		}
	}
	return obj
}

// TestValuesDocumented checks that every value is commented in values.yaml
// and listed in the chart's README: a top-level value, or each value of a
// top-level group such as controller.
func TestValuesDocumented(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(chartPath, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile(filepath.Join(chartPath, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	key := regexp.MustCompile(`^( {0,2})([A-Za-z][A-Za-z0-9]*):(.*)$`)
	group, prev := "", ""
	for _, line := range strings.Split(string(data), "\n") {
		m := key.FindStringSubmatch(line)
		if m == nil {
			prev = line
			continue
		}
		name := m[2]
		if m[1] == "" {
			group = ""
			if strings.TrimSpace(m[3]) == "" {
				group = name // a group of values, such as controller
				prev = line
				continue
			}
		} else {
			name = group + "." + name
		}
		if !strings.HasPrefix(strings.TrimSpace(prev), "#") {
			t.Errorf("values.yaml: %s has no comment above it", name)
		}
		if !strings.Contains(string(readme), "| `"+name+"` |") {
			t.Errorf("README.md does not list %s in its table of values", name)
		}
		prev = line
	}
}
