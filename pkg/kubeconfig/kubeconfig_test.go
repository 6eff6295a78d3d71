package kubeconfig

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// childPath is set in the environment of a child test process: it calls
// Load with the value and prints the result. client-go computes the path of
// ~/.kube/config when its package is initialized, so only a fresh process
// sees the $HOME a test sets.
const childPath = "KEEPLB_KUBECONFIG_TEST_LOAD"

func TestMain(m *testing.M) {
	if path, ok := os.LookupEnv(childPath); ok {
		cfg, err := Load(path)
		if err != nil {
			fmt.Println("error:", err)
		} else {
			fmt.Println("host:", cfg.Host)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// load runs Load(path) in a child process with the test's environment and
// returns what it printed: "host: <server>" or "error: <message>".
func load(t *testing.T, path string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// Under -race, a process waits a second before it exits unless told
	// not to.
	cmd.Env = append(os.Environ(), childPath+"="+path, "GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// write writes a kubeconfig whose current context selects server to path.
func write(t *testing.T, path, server string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["c"] = &clientcmdapi.Cluster{Server: server}
	cfg.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: "t"}
	cfg.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	cfg.CurrentContext = "c"
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestLoadOrder: an explicit path, else $KUBECONFIG (a list, the first
// file to set a value winning), else ~/.kube/config, else the in-cluster
// service account; and a clear error when there is none of them.
func TestLoadOrder(t *testing.T) {
	dir := t.TempDir()
	explicit := write(t, filepath.Join(dir, "explicit"), "https://explicit:6443")
	first := write(t, filepath.Join(dir, "first"), "https://first:6443")
	second := write(t, filepath.Join(dir, "second"), "https://second:6443")
	missing := filepath.Join(dir, "missing")
	withHome := filepath.Join(dir, "home")
	write(t, filepath.Join(withHome, ".kube", "config"), "https://home:6443")
	emptyHome := filepath.Join(dir, "empty-home")
	list := strings.Join([]string{missing, first, second}, string(os.PathListSeparator))

	for _, tc := range []struct {
		name, path, kubeconfigEnv, home string
		want                            string
	}{
		{"explicit path wins over $KUBECONFIG and ~/.kube/config", explicit, list, withHome, "host: https://explicit:6443"},
		{"$KUBECONFIG wins over ~/.kube/config", "", list, withHome, "host: https://first:6443"},
		{"$KUBECONFIG is a list: a missing file is skipped", "", strings.Join([]string{missing, second}, string(os.PathListSeparator)), emptyHome, "host: https://second:6443"},
		{"~/.kube/config when $KUBECONFIG is empty", "", "", withHome, "host: https://home:6443"},
		{"a missing explicit path is an error, not a fallback", missing, list, withHome, "error: stat " + missing},
		{"nothing at all", "", "", emptyHome, "error: no configuration: no kubeconfig path given, no file in $KUBECONFIG (or ~/.kube/config when it is unset) selects a cluster, and there is no in-cluster service account"},
		{"$KUBECONFIG lists only missing files", "", missing, emptyHome, "error: no configuration: no kubeconfig path given"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("HOME", tc.home)
			t.Setenv("KUBECONFIG", tc.kubeconfigEnv)
			// Not in a pod, whatever runs the test.
			t.Setenv("KUBERNETES_SERVICE_HOST", "")
			t.Setenv("KUBERNETES_SERVICE_PORT", "")
			if got := load(t, tc.path); !strings.HasPrefix(got, tc.want) {
				t.Errorf("Load(%q) with KUBECONFIG=%q HOME=%s: %s, want %s...", tc.path, tc.kubeconfigEnv, filepath.Base(tc.home), got, tc.want)
			}
		})
	}
}
