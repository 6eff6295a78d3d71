// Package chart renders keeplb's Helm chart (manifests/charts/keeplb) in Go,
// for tests, without a helm binary, and compares the objects it installs
// with those of another source such as `kubectl kustomize manifests/`.
//
// It implements only what the chart uses: Go text/template over `.Values`,
// `.Release` and `.Chart`, and the functions toYaml and nindent, which
// behave as Helm's. A template that calls anything else fails to parse, so
// the chart cannot quietly grow a construct these tests would render
// differently from Helm. A missing value is an error here (Helm would
// render it empty), which catches misspelt value names.
package chart

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"text/template"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Release is what a chart sees of its release as `.Release`.
type Release struct {
	Name      string
	Namespace string
}

// Rendered is a rendered chart: each file of templates/ by its path
// relative to the chart (such as "templates/controller-deployment.yaml"),
// and the CRDs of crds/, which Helm installs as they are.
type Rendered struct {
	Templates map[string]string
	CRDs      map[string]string
}

// Render renders the chart in dir for rel, with the chart's values.yaml
// overlaid by values as `helm install -f` does: maps are merged key by key,
// anything else replaces the default, and a nil value removes the key.
func Render(dir string, rel Release, values map[string]any) (*Rendered, error) {
	var meta struct {
		Name       string `json:"name"`
		Version    string `json:"version"`
		AppVersion string `json:"appVersion"`
	}
	if err := readYAML(filepath.Join(dir, "Chart.yaml"), &meta); err != nil {
		return nil, err
	}
	defaults := map[string]any{}
	if err := readYAML(filepath.Join(dir, "values.yaml"), &defaults); err != nil {
		return nil, err
	}
	data := map[string]any{
		"Values":  merge(defaults, values),
		"Release": map[string]any{"Name": rel.Name, "Namespace": rel.Namespace, "Service": "Helm"},
		"Chart":   map[string]any{"Name": meta.Name, "Version": meta.Version, "AppVersion": meta.AppVersion},
	}

	out := &Rendered{Templates: map[string]string{}, CRDs: map[string]string{}}
	templates, err := filepath.Glob(filepath.Join(dir, "templates", "*"))
	if err != nil {
		return nil, err
	}
	for _, file := range templates {
		rel, err := filepath.Rel(dir, file)
		if err != nil {
			return nil, err
		}
		text, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		t, err := template.New(rel).Option("missingkey=error").Funcs(funcs).Parse(string(text))
		if err != nil {
			return nil, err
		}
		var b strings.Builder
		if err := t.Execute(&b, data); err != nil {
			return nil, err
		}
		out.Templates[rel] = b.String()
	}
	crds, err := filepath.Glob(filepath.Join(dir, "crds", "*"))
	if err != nil {
		return nil, err
	}
	for _, file := range crds {
		text, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		out.CRDs[filepath.Join("crds", filepath.Base(file))] = string(text)
	}
	return out, nil
}

// Manifest returns the CRDs, then every rendered template but NOTES.txt, as
// one multi-document YAML stream in the order Helm installs them (CRDs
// first; templates here in name order, which kubectl apply does not mind).
func (r *Rendered) Manifest() string {
	var b strings.Builder
	for _, m := range []map[string]string{r.CRDs, r.Templates} {
		for _, name := range slices.Sorted(maps.Keys(m)) {
			if !strings.HasSuffix(name, ".yaml") {
				continue
			}
			fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", name, m[name])
		}
	}
	return b.String()
}

// RenderObjects renders the chart as Render does and returns the objects
// of its Manifest.
func RenderObjects(dir string, rel Release, values map[string]any) ([]*unstructured.Unstructured, error) {
	r, err := Render(dir, rel, values)
	if err != nil {
		return nil, err
	}
	return r.Objects()
}

// Objects decodes the objects of Manifest.
func (r *Rendered) Objects() ([]*unstructured.Unstructured, error) {
	objs, err := Decode(r.Manifest())
	if err != nil {
		return nil, fmt.Errorf("rendered chart: %w", err)
	}
	return objs, nil
}

// funcs are the template functions of Helm's that the chart may use.
var funcs = template.FuncMap{
	// toYaml marshals as Helm's does (with sigs.k8s.io/yaml, as Helm
	// does) without the final newline. Helm renders a marshalling error as
	// an empty string; here it fails the render.
	"toYaml": func(v any) (string, error) {
		b, err := yaml.Marshal(v)
		return strings.TrimSuffix(string(b), "\n"), err
	},
	// nindent starts a new line and indents every line of s by n spaces.
	"nindent": func(n int, s string) string {
		pad := strings.Repeat(" ", n)
		return "\n" + pad + strings.ReplaceAll(s, "\n", "\n"+pad)
	},
}

// merge returns defaults overlaid with overrides: maps deeply, other values
// replaced, nil deleting. Neither argument is changed.
func merge(defaults, overrides map[string]any) map[string]any {
	out := maps.Clone(defaults)
	for k, v := range overrides {
		switch v := v.(type) {
		case nil:
			delete(out, k)
		case map[string]any:
			if d, ok := out[k].(map[string]any); ok {
				out[k] = merge(d, v)
				continue
			}
			out[k] = v
		default:
			out[k] = v
		}
	}
	return out
}

func readYAML(file string, v any) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	return nil
}

// Decode returns every object of a multi-document YAML stream, skipping
// empty documents.
func Decode(stream string) ([]*unstructured.Unstructured, error) {
	var objs []*unstructured.Unstructured
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(stream)))
	for doc := 1; ; doc++ {
		data, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", doc, err)
		}
		js, err := utilyaml.ToJSON(data)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w\n%s", doc, err, data)
		}
		if bytes.Equal(js, []byte("null")) {
			continue
		}
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("document %d: %w\n%s", doc, err, data)
		}
		objs = append(objs, obj)
	}
}

// Key names an object: kind, namespace (empty for cluster-scoped ones) and
// name.
func Key(o *unstructured.Unstructured) string {
	return fmt.Sprintf("%s %s/%s", o.GroupVersionKind().GroupKind(), o.GetNamespace(), o.GetName())
}

// Diff compares two sets of objects regardless of order and returns one
// message per difference: an object only in one set, or in both with other
// contents (shown as the YAML of each side). Empty means equal.
func Diff(want, got []*unstructured.Unstructured) []string {
	index := func(objs []*unstructured.Unstructured) (map[string]*unstructured.Unstructured, []string) {
		m := map[string]*unstructured.Unstructured{}
		var dups []string
		for _, o := range objs {
			if _, ok := m[Key(o)]; ok {
				dups = append(dups, "twice: "+Key(o))
			}
			m[Key(o)] = o
		}
		return m, dups
	}
	w, problems := index(want)
	g, dups := index(got)
	problems = append(problems, dups...)
	for _, k := range slices.Sorted(maps.Keys(w)) {
		o, ok := g[k]
		switch {
		case !ok:
			problems = append(problems, "missing: "+k)
		case !reflect.DeepEqual(w[k].Object, o.Object):
			problems = append(problems, fmt.Sprintf("differs: %s (- want, + got):\n%s", k, lineDiff(toYAML(w[k]), toYAML(o))))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(g)) {
		if _, ok := w[k]; !ok {
			problems = append(problems, "unexpected: "+k)
		}
	}
	return problems
}

// lineDiff returns the lines of a and b outside their longest common
// subsequence, prefixed with - and +, each with the nearest line before it
// that both share, for orientation.
func lineDiff(a, b string) string {
	x, y := strings.Split(a, "\n"), strings.Split(b, "\n")
	// lcs[i][j] is the length of the longest common subsequence of x[i:]
	// and y[j:].
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var out strings.Builder
	context, shown := "", false
	emit := func(prefix, line string) {
		if !shown && context != "" {
			fmt.Fprintf(&out, "  %s\n", context)
		}
		fmt.Fprintf(&out, "%s %s\n", prefix, line)
		shown = true
	}
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			context, shown = x[i], false
			i++
			j++
		case j == len(y) || i < len(x) && lcs[i+1][j] >= lcs[i][j+1]:
			emit("-", x[i])
			i++
		default:
			emit("+", y[j])
			j++
		}
	}
	return out.String()
}

func toYAML(o *unstructured.Unstructured) string {
	b, err := yaml.Marshal(o.Object)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
