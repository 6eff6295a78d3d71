package cmd

import (
	"os"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestManifestsRunRealCommands: every keeplb container of the kustomize
// base (which the Helm chart is generated from) names a subcommand this
// binary has, with flags it accepts. A renamed subcommand or flag would
// otherwise show up only as a crash-looping pod.
func TestManifestsRunRealCommands(t *testing.T) {
	var pods []v1.PodSpec
	for _, file := range []string{"../../manifests/controller/deployment.yaml"} {
		var d appsv1.Deployment
		read(t, file, &d)
		pods = append(pods, d.Spec.Template.Spec)
	}
	for _, file := range []string{"../../manifests/speaker/daemonset.yaml"} {
		var ds appsv1.DaemonSet
		read(t, file, &ds)
		pods = append(pods, ds.Spec.Template.Spec)
	}
	seen := map[string]bool{}
	for _, p := range pods {
		for _, c := range append(p.InitContainers, p.Containers...) {
			if len(c.Command) > 0 {
				t.Errorf("container %s sets command %q: the image's entrypoint is keeplb, give args", c.Name, c.Command)
				continue
			}
			root := NewRootCommand()
			sub, rest, err := root.Find(c.Args)
			if err != nil || sub == root {
				t.Errorf("container %s: args %q name no keeplb subcommand (%v)", c.Name, c.Args, err)
				continue
			}
			if err := sub.ParseFlags(rest); err != nil {
				t.Errorf("container %s: keeplb %s rejects its flags %q: %v", c.Name, sub.Name(), rest, err)
				continue
			}
			if args := sub.Flags().Args(); len(args) > 0 {
				t.Errorf("container %s: keeplb %s takes no arguments, got %q", c.Name, sub.Name(), args)
			}
			seen[sub.Name()] = true
		}
	}
	for _, want := range []string{"controller", "speaker", "prepare-node"} {
		if !seen[want] {
			t.Errorf("no container runs keeplb %s; ran %v", want, seen)
		}
	}
}

func read(t *testing.T, file string, into any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if strings.Contains(string(b), "\n---") {
		t.Fatalf("%s: one object per file expected", file)
	}
}
