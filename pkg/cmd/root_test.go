package cmd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/version"
)

// execute runs a fresh keeplb command tree with args and returns what it
// wrote to stdout and stderr. extra commands are added to the root, to
// observe what the root set up. The tests using it must not run in
// parallel: logging is global to the process, and each run applies it.
func execute(t *testing.T, args []string, extra ...*cobra.Command) (stdout, stderr string, err error) {
	t.Helper()
	defer func() {
		// Applying a logging configuration twice is an error outside
		// tests; undo it so the next run can apply its own.
		if err := logsapi.ResetForTest(nil); err != nil {
			t.Errorf("reset logging: %v", err)
		}
	}()
	root := NewRootCommand()
	root.AddCommand(extra...)
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	err = root.Execute()
	return out.String(), errOut.String(), err
}

func TestVersion(t *testing.T) {
	out, _, err := execute(t, []string{"version"})
	if err != nil {
		t.Fatalf("version: %v", err)
	}
	if want := version.Get().String() + "\n"; out != want {
		t.Errorf("version printed %q, want %q", out, want)
	}
}

func TestVersionJSON(t *testing.T) {
	for _, args := range [][]string{{"version", "-o", "json"}, {"version", "--output=json"}} {
		out, _, err := execute(t, args)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var got version.Info
		dec := json.NewDecoder(strings.NewReader(out))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&got); err != nil {
			t.Fatalf("%v printed %q, not a version.Info: %v", args, out, err)
		}
		if want := version.Get(); got != want {
			t.Errorf("%v printed %+v, want %+v", args, got, want)
		}
		for _, key := range []string{`"version"`, `"commit"`, `"date"`, `"goVersion"`, `"platform"`} {
			if !strings.Contains(out, key) {
				t.Errorf("%v printed %q, without key %s", args, out, key)
			}
		}
	}
}

func TestVersionBadOutput(t *testing.T) {
	out, _, err := execute(t, []string{"version", "-o", "yaml"})
	if err == nil || !strings.Contains(err.Error(), "must be text or json") {
		t.Errorf("version -o yaml: err = %v, want one naming the formats", err)
	}
	if out != "" {
		t.Errorf("version -o yaml printed %q, want nothing", out)
	}
}

func TestControllerValidatesBeforeConnecting(t *testing.T) {
	// A kubeconfig that does not exist: getting past validation would fail
	// with a different error, about the file.
	out, errOut, err := execute(t, []string{"controller", "--workers=0", "--kubeconfig=/nonexistent"})
	if err == nil {
		t.Fatal("controller --workers=0 succeeded")
	}
	if !strings.Contains(err.Error(), "--workers must be at least 1") {
		t.Errorf("controller --workers=0: err = %v, want the validation message", err)
	}
	if strings.Contains(err.Error(), "nonexistent") {
		t.Errorf("controller --workers=0: err = %v, mentions the kubeconfig: validation ran too late", err)
	}
	// The caller prints the error once; the command prints nothing,
	// neither the error nor the usage.
	if out != "" || errOut != "" {
		t.Errorf("controller --workers=0 printed stdout %q, stderr %q; want nothing", out, errOut)
	}
}

func TestControllerHelp(t *testing.T) {
	out, _, err := execute(t, []string{"controller", "--help"})
	if err != nil {
		t.Fatalf("controller --help: %v", err)
	}
	for _, flag := range []string{"--load-balancer-class", "--workers", "--kubeconfig", "--v"} {
		if !strings.Contains(out, flag) {
			t.Errorf("controller --help does not list %s:\n%s", flag, out)
		}
	}
}

func TestUnknownFlagPointsAtHelp(t *testing.T) {
	_, _, err := execute(t, []string{"controller", "--no-such-flag"})
	if err == nil || !strings.Contains(err.Error(), "keeplb controller --help") {
		t.Errorf("controller --no-such-flag: err = %v, want a pointer to --help", err)
	}
}

func TestVerbosityReachesKlog(t *testing.T) {
	var got string
	probe := &cobra.Command{
		Use: "probe",
		RunE: func(*cobra.Command, []string) error {
			got = fmt.Sprintf("V(2)=%t V(3)=%t", klog.V(2).Enabled(), klog.V(3).Enabled())
			return nil
		},
	}
	if _, _, err := execute(t, []string{"-v=2", "probe"}, probe); err != nil {
		t.Fatalf("-v=2 probe: %v", err)
	}
	if want := "V(2)=true V(3)=false"; got != want {
		t.Errorf("after -v=2: %s, want %s", got, want)
	}
}

func TestMigrateKeepalivedVIP(t *testing.T) {
	cm := filepath.Join(t.TempDir(), "vip.yaml")
	data := "kind: ConfigMap\ndata:\n  10.0.0.10: default/web:dr\n  10.0.0.11: default/api\n  10.0.0.12: default/Bad\n"
	if err := os.WriteFile(cm, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := execute(t, []string{"migrate", "keepalived-vip", "--configmap", cm, "--pool-name", "legacy", "--vrid", "51-82"})
	if err == nil || !strings.Contains(err.Error(), `entry "10.0.0.12"`) {
		t.Errorf("err = %v, want one naming the invalid entry", err)
	}
	for _, want := range []string{"kind: IPPool", "name: legacy", "virtualRouterIDs: 51-82", "keeplb.io/ips: 10.0.0.10", "keeplb.io/ips: 10.0.0.11", "type: LoadBalancer"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	if !strings.HasPrefix(errOut, `warning: entry "10.0.0.10" (default/web, DR)`) {
		t.Errorf("stderr = %q, want the DR warning", errOut)
	}
}

func TestMigrateKeepalivedVIPStdin(t *testing.T) {
	root := NewRootCommand()
	var out, errOut bytes.Buffer
	root.SetIn(strings.NewReader("kind: ConfigMap\ndata: {10.0.0.10: default/web}\n"))
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs([]string{"migrate", "keepalived-vip", "--configmap", "-"})
	err := root.Execute()
	// As in execute: let the next run apply its own logging configuration.
	if err := logsapi.ResetForTest(nil); err != nil {
		t.Errorf("reset logging: %v", err)
	}
	if err != nil {
		t.Fatalf("migrate from stdin: %v", err)
	}
	if !strings.Contains(out.String(), "keeplb.io/ips: 10.0.0.10") || errOut.Len() != 0 {
		t.Errorf("stdout %q, stderr %q", out.String(), errOut.String())
	}
	if _, _, err := execute(t, []string{"migrate", "keepalived-vip"}); err == nil || !strings.Contains(err.Error(), "--configmap is required") {
		t.Errorf("without --configmap: err = %v", err)
	}
}

func TestStatusBadOutputBeforeConnecting(t *testing.T) {
	// A kubeconfig that does not exist: the output format is checked first.
	_, _, err := execute(t, []string{"status", "-o", "yaml", "--kubeconfig", filepath.Join(t.TempDir(), "missing")})
	if err == nil || !strings.Contains(err.Error(), "must be text or json") {
		t.Errorf("status -o yaml: err = %v, want one naming the formats", err)
	}
	_, _, err = execute(t, []string{"status", "--kubeconfig", filepath.Join(t.TempDir(), "missing")})
	if err == nil || !strings.Contains(err.Error(), "kubeconfig") {
		t.Errorf("status with a missing kubeconfig: err = %v, want one about the kubeconfig", err)
	}
}

// Every subcommand that connects finds its kubeconfig the same way, and
// says so.
func TestKubeconfigHelpStatesTheOrder(t *testing.T) {
	for _, cmd := range []string{"controller", "status"} {
		out, _, err := execute(t, []string{cmd, "--help"})
		if err != nil {
			t.Fatalf("%s --help: %v", cmd, err)
		}
		if want := "Empty uses $KUBECONFIG, ~/.kube/config, then the in-cluster service account."; !strings.Contains(out, want) {
			t.Errorf("%s --help does not say %q:\n%s", cmd, want, out)
		}
	}
}
