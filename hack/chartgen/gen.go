package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"regexp"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"
)

// chartDir is the chart, relative to manifests/.
const chartDir = "charts/keeplb"

// generate returns the chart's generated files, by path relative to the
// chart, from the kustomize base in manifests (a file system rooted at
// manifests/):
//
//   - the Namespace is left out: Helm installs into a namespace that exists
//     (or that --create-namespace creates);
//   - a CustomResourceDefinition is copied byte for byte to crds/, which
//     Helm applies as it is, before the templates;
//   - every other file becomes templates/DIR-FILE: the same text with the
//     namespace, the image and the settings of edits turned into values.
//
// A file the base gains is carried over by the same rules; an edit whose
// line is no longer in the base is an error, to be fixed here.
func generate(manifests fs.FS) (map[string][]byte, error) {
	resources, err := kustomizeResources(manifests)
	if err != nil {
		return nil, err
	}
	out := map[string][]byte{}
	used := map[*edit]bool{}
	for _, res := range resources {
		data, err := fs.ReadFile(manifests, res)
		if err != nil {
			return nil, err
		}
		kinds, err := documentKinds(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", res, err)
		}
		switch {
		case slices.Equal(kinds, []string{"Namespace"}):
			continue
		case allEqual(kinds, "CustomResourceDefinition"):
			out[path.Join("crds", path.Base(res))] = data
			continue
		case slices.Contains(kinds, "Namespace") || slices.Contains(kinds, "CustomResourceDefinition"):
			return nil, fmt.Errorf("%s: keep Namespaces and CRDs in files of their own, which the chart handles apart", res)
		}
		text, err := templatize(res, string(data), edits[res], used)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", res, err)
		}
		out[path.Join("templates", strings.ReplaceAll(res, "/", "-"))] = []byte(text)
	}
	for file, es := range edits {
		for i := range es {
			if !used[&es[i]] {
				return nil, fmt.Errorf("edit of %q in %s: the file is no longer in manifests/kustomization.yaml", es[i].line, file)
			}
		}
	}
	return out, nil
}

// kustomizeResources returns the resources of manifests/kustomization.yaml.
// Anything else in it (patches, a namespace, images, ...) would change the
// objects in ways this generator does not follow, so it is refused.
func kustomizeResources(manifests fs.FS) ([]string, error) {
	data, err := fs.ReadFile(manifests, "kustomization.yaml")
	if err != nil {
		return nil, err
	}
	var k map[string]any
	if err := yaml.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("kustomization.yaml: %w", err)
	}
	var resources []string
	for key, v := range k {
		switch key {
		case "apiVersion", "kind":
		case "resources":
			list, _ := v.([]any)
			for _, r := range list {
				s, ok := r.(string)
				if !ok || path.Clean(s) != s || strings.HasPrefix(s, "../") || !strings.HasSuffix(s, ".yaml") {
					return nil, fmt.Errorf("kustomization.yaml: resource %v: chartgen takes only YAML files inside manifests/", r)
				}
				resources = append(resources, s)
			}
		default:
			return nil, fmt.Errorf("kustomization.yaml: chartgen does not follow %q; teach it, or change the base files themselves", key)
		}
	}
	return resources, nil
}

// documentKinds returns the kind of each non-empty document of a YAML file.
func documentKinds(data []byte) ([]string, error) {
	var kinds []string
	for _, doc := range docSeparator.Split(string(data), -1) {
		var obj struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			return nil, err
		}
		if obj.Kind != "" {
			kinds = append(kinds, obj.Kind)
		}
	}
	if len(kinds) == 0 {
		return nil, errors.New("no object")
	}
	return kinds, nil
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

func allEqual(s []string, v string) bool {
	return !slices.ContainsFunc(s, func(x string) bool { return x != v })
}

// edit turns one block of a base file into template text. The block is the
// first line that is line, or starts with line and a space (so "replicas:"
// finds "replicas: 2" whatever the number), with the lines nested under
// it. Without after, line must occur once in the file; with after, the
// block is the first match below the line matching after.
type edit struct {
	after, line string
	change      func(block string) string
}

// edits are the settings the chart lets an operator change, by base file.
// With the default values.yaml each renders what the base says, which the
// tests check.
var edits = map[string][]edit{
	"controller/deployment.yaml": {
		{line: "  replicas:", change: replace("  replicas: {{ .Values.controller.replicas }}")},
		{line: "      serviceAccountName:", change: appendLines(
			withBlock(6, "imagePullSecrets", ".Values.imagePullSecrets"),
			withBlock(6, "nodeSelector", ".Values.controller.nodeSelector"),
			withBlock(6, "tolerations", ".Values.controller.tolerations"),
		)},
		{line: "          args:", change: appendLines(extraArgs(12, ".Values.controller.extraArgs"))},
		{line: "          resources:", change: replace(toYAMLBlock(10, "resources", ".Values.controller.resources"))},
	},
	"speaker/daemonset.yaml": {
		{line: "      serviceAccountName:", change: appendLines(
			withBlock(6, "imagePullSecrets", ".Values.imagePullSecrets"),
			withBlock(6, "nodeSelector", ".Values.speaker.nodeSelector"),
		)},
		{line: "      priorityClassName:", change: replace(
			"      {{- with .Values.speaker.priorityClassName }}\n" +
				"      priorityClassName: {{ . }}\n" +
				"      {{- end }}")},
		{line: "      tolerations:", change: replace(withBlock(6, "tolerations", ".Values.speaker.tolerations"))},
		{line: "      initContainers:", change: wrap(
			"      {{- if .Values.speaker.setSysctls }}",
			"      {{- end }}")},
		{after: "        - name: speaker", line: "          args:", change: appendLines(extraArgs(12, ".Values.speaker.extraArgs"))},
		{line: "          resources:", change: replace(toYAMLBlock(10, "resources", ".Values.speaker.resources"))},
	},
}

// lineRules apply to every line of every templated file, after the edits.
var lineRules = []struct {
	re   *regexp.Regexp
	repl string
}{
	// The base's namespace becomes the release's.
	{regexp.MustCompile(`^(\s*)namespace: keeplb-system$`), "${1}namespace: {{ .Release.Namespace }}"},
	// One image for every container, as in the base; its placeholder
	// comment gives way to values.yaml's.
	{regexp.MustCompile(`^(\s*)image: \S+(\s+#.*)?$`), `${1}image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"`},
	{regexp.MustCompile(`^(\s*)imagePullPolicy: \S+$`), "${1}imagePullPolicy: {{ .Values.image.pullPolicy }}"},
}

// templatize applies es and lineRules to the text of the base file res,
// marking in used the edits it applied.
func templatize(res, text string, es []edit, used map[*edit]bool) (string, error) {
	if strings.Contains(text, "{{") {
		return "", errors.New(`contains "{{", which Helm would take for a template action`)
	}
	lines := strings.Split(text, "\n")
	for i := range es {
		e := &es[i]
		start, end, err := findBlock(lines, e.after, e.line)
		if err != nil {
			return "", err
		}
		block := strings.Join(lines[start:end], "\n")
		lines = slices.Concat(lines[:start], strings.Split(e.change(block), "\n"), lines[end:])
		used[e] = true
	}
	for i, l := range lines {
		for _, r := range lineRules {
			l = r.re.ReplaceAllString(l, r.repl)
		}
		if strings.Contains(l, "keeplb-system") && !strings.HasPrefix(strings.TrimSpace(l), "#") {
			return "", fmt.Errorf("line %q names the namespace keeplb-system where the chart needs the release's: teach lineRules", l)
		}
		lines[i] = l
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Generated by `make chart` (hack/chartgen) from manifests/%s.\n", res)
	b.WriteString("# Do not edit: change that file, or the edits in hack/chartgen/gen.go.\n")
	b.WriteString(strings.Join(lines, "\n"))
	return b.String(), nil
}

// findBlock returns the lines [start, end) of the block that after and line
// select (see edit).
func findBlock(lines []string, after, line string) (start, end int, err error) {
	matches := func(l, anchor string) bool { return l == anchor || strings.HasPrefix(l, anchor+" ") }
	from := 0
	if after != "" {
		from = slices.IndexFunc(lines, func(l string) bool { return matches(l, after) })
		if from < 0 {
			return 0, 0, fmt.Errorf("no line %q: the base changed, update edits in hack/chartgen", after)
		}
	}
	start = -1
	for i := from; i < len(lines); i++ {
		if !matches(lines[i], line) {
			continue
		}
		if start >= 0 {
			return 0, 0, fmt.Errorf("line %q is there twice: give its edit an after line", line)
		}
		start = i
		if after != "" {
			break
		}
	}
	if start < 0 {
		return 0, 0, fmt.Errorf("no line %q: the base changed, update edits in hack/chartgen", line)
	}
	indent := indentOf(lines[start])
	for end = start + 1; end < len(lines); end++ {
		l := lines[end]
		nested := strings.TrimSpace(l) != "" && (indentOf(l) > indent ||
			indentOf(l) == indent && strings.HasPrefix(strings.TrimSpace(l), "- ") && strings.HasSuffix(lines[start], ":"))
		if !nested {
			break
		}
	}
	return start, end, nil
}

func indentOf(l string) int { return len(l) - len(strings.TrimLeft(l, " ")) }

func replace(text string) func(string) string {
	return func(string) string { return text }
}

func appendLines(texts ...string) func(string) string {
	return func(block string) string { return block + "\n" + strings.Join(texts, "\n") }
}

func wrap(before, after string) func(string) string {
	return func(block string) string { return before + "\n" + block + "\n" + after }
}

// withBlock renders key with the YAML of value under it, or nothing when
// value is empty.
func withBlock(indent int, key, value string) string {
	pad := strings.Repeat(" ", indent)
	return fmt.Sprintf("%[1]s{{- with %[3]s }}\n%[1]s%[2]s:\n%[1]s  {{- toYaml . | nindent %[4]d }}\n%[1]s{{- end }}",
		pad, key, value, indent+2)
}

// toYAMLBlock renders key with the YAML of value under it, even when empty.
func toYAMLBlock(indent int, key, value string) string {
	pad := strings.Repeat(" ", indent)
	return fmt.Sprintf("%[1]s%[2]s:\n%[1]s  {{- toYaml %[3]s | nindent %[4]d }}", pad, key, value, indent+2)
}

// extraArgs renders the items of the list value, to follow a list of
// arguments indented by indent.
func extraArgs(indent int, value string) string {
	pad := strings.Repeat(" ", indent)
	return fmt.Sprintf("%[1]s{{- with %[2]s }}\n%[1]s{{- toYaml . | nindent %[3]d }}\n%[1]s{{- end }}", pad, value, indent)
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
