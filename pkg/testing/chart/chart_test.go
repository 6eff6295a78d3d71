package chart

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestMerge(t *testing.T) {
	defaults := map[string]any{
		"a": map[string]any{"keep": 1, "change": 2, "drop": 3},
		"b": []any{"x"},
		"c": "s",
	}
	got := merge(defaults, map[string]any{
		"a": map[string]any{"change": 20, "drop": nil, "new": 4},
		"b": []any{},
		"d": map[string]any{"e": 5},
	})
	want := map[string]any{
		"a": map[string]any{"keep": 1, "change": 20, "new": 4},
		"b": []any{},
		"c": "s",
		"d": map[string]any{"e": 5},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("merge = %v, want %v", got, want)
	}
	if _, ok := defaults["a"].(map[string]any)["drop"]; !ok {
		t.Error("merge changed its defaults")
	}
}

// TestRender renders a small chart with the functions Helm's templates use,
// and refuses one that calls a function Helm has but this package does not.
func TestRender(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("Chart.yaml", "apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: \"4.5\"\n")
	write("values.yaml", "labels:\n  a: b\nlist: [x, z]\n")
	write("crds/c.yaml", "kind: CustomResourceDefinition # {{ not rendered }}\n")
	write("templates/cm.yaml", `kind: ConfigMap
metadata:
  namespace: {{ .Release.Namespace }}
  labels:
    {{- toYaml .Values.labels | nindent 4 }}
data:
  chart: {{ .Chart.Name }}-{{ .Chart.Version }}-{{ .Chart.AppVersion }}
  list:
    {{- toYaml .Values.list | nindent 4 }}
`)
	r, err := Render(dir, Release{Name: "r", Namespace: "ns"}, map[string]any{"labels": map[string]any{"c": "d"}})
	if err != nil {
		t.Fatal(err)
	}
	want := `kind: ConfigMap
metadata:
  namespace: ns
  labels:
    a: b
    c: d
data:
  chart: demo-1.2.3-4.5
  list:
    - x
    - z
`
	if got := r.Templates["templates/cm.yaml"]; got != want {
		t.Errorf("rendered:\n%s\nwant:\n%s", got, want)
	}
	if !strings.HasPrefix(r.Manifest(), "---\n# Source: crds/c.yaml\nkind: CustomResourceDefinition # {{ not rendered }}") {
		t.Errorf("CRDs do not come first, as they are:\n%s", r.Manifest())
	}

	write("templates/cm.yaml", "x: {{ .Values.labels | toJson }}\n")
	if _, err := Render(dir, Release{}, nil); err == nil || !strings.Contains(err.Error(), "toJson") {
		t.Errorf("a template calling toJson rendered (err %v)", err)
	}
	write("templates/cm.yaml", "x: {{ .Values.typo }}\n")
	if _, err := Render(dir, Release{}, nil); err == nil {
		t.Error("a missing value rendered")
	}
}

func TestDiff(t *testing.T) {
	objs, err := Decode("kind: A\nmetadata: {name: a}\nspec: {x: 1}\n---\nkind: B\nmetadata: {name: b}\n")
	if err != nil {
		t.Fatal(err)
	}
	other, err := Decode("kind: A\nmetadata: {name: a}\nspec: {x: 2}\n---\n# only a comment\n---\nkind: C\nmetadata: {name: c, namespace: ns}\n")
	if err != nil {
		t.Fatal(err)
	}
	if d := Diff(objs, objs); d != nil {
		t.Errorf("Diff of equal sets: %v", d)
	}
	got := strings.Join(Diff(objs, other), "\n")
	for _, want := range []string{"differs: A /a", "-   x: 1", "+   x: 2", "missing: B /b", "unexpected: C ns/c"} {
		if !strings.Contains(got, want) {
			t.Errorf("Diff lacks %q:\n%s", want, got)
		}
	}
}
