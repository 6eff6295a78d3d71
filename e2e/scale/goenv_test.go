package scale_e2e

import (
	"fmt"
	"os"
	"path/filepath"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// daemonSetPath is the speaker's DaemonSet, from the repository's root.
const daemonSetPath = "manifests/speaker/daemonset.yaml"

// goEnv are the Go runtime's settings the speaker's memory depends on,
// each with the flag that overrides the DaemonSet's value.
var goEnv = []struct{ name, flag string }{
	{"GOGC", "scale.gogc"},
	{"GOMEMLIMIT", "scale.gomemlimit"},
	// Diagnostics only: gctrace=1 logs the heap at each collection.
	{"GODEBUG", "scale.godebug"},
}

// manifestEnv returns the value the speaker's DaemonSet gives name in its
// speaker container ("" for none), so that the speaker measured here
// runs as the manifest runs it. The file is found from the working
// directory upwards (go test runs in the package's folder, the bench
// script in the repository's).
func manifestEnv(name string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	var b []byte
	for d := dir; ; d = filepath.Dir(d) {
		if b, err = os.ReadFile(filepath.Join(d, daemonSetPath)); err == nil {
			break
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no %s in %s or above", daemonSetPath, dir)
		}
	}
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(b, &ds); err != nil {
		return "", fmt.Errorf("%s: %w", daemonSetPath, err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != "speaker" {
			continue
		}
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value, nil
			}
		}
		return "", nil
	}
	return "", fmt.Errorf("%s has no speaker container", daemonSetPath)
}
