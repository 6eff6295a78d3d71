// Package demo_e2e runs `make demo`'s script (hack/demo.sh) and checks that
// what it prints is true: every Service shows an EXTERNAL-IP, each VIP
// answers the client, a failover is observed within the VRRP bound, a
// second run says a demo is up instead of breaking it, and `keeplb-demo
// down` leaves nothing running. It needs root and the control-plane tools
// (run it through `make test`); where the host lacks IPVS it needs qemu
// (hack/vm/build.sh installs it), and skips without.
package demo_e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

func TestDemo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, IPVS)")
	}
	if os.Getenv("KEEPLB_TOOLS_DIR") == "" {
		t.Skip("KEEPLB_TOOLS_DIR is not set: run `make test`")
	}
	if ipvs.Available() != nil {
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			t.Skip("the host kernel has no IPVS and qemu-system-x86_64 is not installed (hack/vm/build.sh installs it)")
		}
	}
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "demo")
	demo := filepath.Join(repo, "_output", "bin", "keeplb-demo")
	run := func(argv ...string) (string, error) {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "KEEPLB_DEMO_STATE="+state)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	down := func() {
		out, err := run(demo, "down", "-state", state)
		t.Logf("keeplb-demo down:\n%s", out)
		if err != nil {
			t.Errorf("keeplb-demo down: %v", err)
		}
	}

	start := time.Now()
	out, err := run("hack/demo.sh")
	took := time.Since(start)
	t.Logf("hack/demo.sh (%s):\n%s", took.Round(100*time.Millisecond), out)
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(state, "pids.json")); err == nil {
			down()
		}
	})
	if err != nil {
		t.Fatalf("hack/demo.sh: %v", err)
	}
	if took > 5*time.Minute {
		t.Errorf("the demo took %s with the tools and the VM built; want under 5 minutes warm", took.Round(time.Second))
	}

	// EXTERNAL-IP of every Service in the printed table, in the pool.
	rows := regexp.MustCompile(`(?m)^(\S+)\s+LoadBalancer\s+\S+\s+(\S+)\s+\S+/TCP`).FindAllStringSubmatch(out, -1)
	if len(rows) != 5 {
		t.Fatalf("kubectl get svc printed %d LoadBalancer rows; want 5 (docs/examples)", len(rows))
	}
	for _, r := range rows {
		if !strings.HasPrefix(r[2], "10.70.0.2") {
			t.Errorf("Service %s: EXTERNAL-IP %q; want an address of the demo pool", r[1], r[2])
		}
	}
	// Each VIP answered by a pod; the Local one saw the client.
	curls := regexp.MustCompile(`curl http://(\S+)/ \(Service (\S+)\) from \S+ → answered by (demo-web-\d), which saw the request from (\S+); VIP held by (demo-node\d)`).FindAllStringSubmatch(out, -1)
	if len(curls) != 5 {
		t.Errorf("%d curl lines with an answer; want 5", len(curls))
	}
	for _, c := range curls {
		if c[2] == "local" && c[4] != "10.70.0.100" {
			t.Errorf("the Local Service's pod saw %s; want the client's 10.70.0.100", c[4])
		}
	}
	// The failover: a new holder and a gap within the VRRP bound (3
	// adverts of 200 ms and skew) plus the 250 ms probe timeout and slack
	// for emulated CPUs.
	m := regexp.MustCompile(`failover: traffic resumed through (demo-node\d); the longest wait between two answers was (\d+) ms`).FindStringSubmatch(out)
	if m == nil {
		t.Fatal("no failover observed in the output")
	}
	if gap, _ := strconv.Atoi(m[2]); gap > 3000 {
		t.Errorf("failover gap %d ms; want under 3000", gap)
	}
	if !strings.Contains(out, "export KUBECONFIG="+filepath.Join(state, "kubeconfig")) || !strings.Contains(out, "make demo-down") {
		t.Error("the output does not say how to use the demo (KUBECONFIG, make demo-down)")
	}

	// A second run leaves the running demo alone.
	again, err := run("hack/demo.sh")
	if err != nil || !strings.Contains(again, "A demo is already running") {
		t.Errorf("a second make demo: %v\n%s", err, again)
	}
	// Four times: web is nodeport with rr over three real servers, so every
	// one of them answers, the holder's own share included.
	for i := range 4 {
		if out, err := run(demo, "curl", "-state", state, "web"); err != nil || !strings.Contains(out, "→ demo-web-") {
			t.Errorf("keeplb-demo curl web (%d) after the second run: %v\n%s", i+1, err, out)
		}
	}

	var pids struct{ ControlPlane, Controller, Node int }
	b, err := os.ReadFile(filepath.Join(state, "pids.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &pids); err != nil {
		t.Fatal(err)
	}
	down()
	for _, pid := range []int{pids.ControlPlane, pids.Controller, pids.Node} {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("process %d still runs after keeplb-demo down", pid)
		}
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("the state folder is still there after keeplb-demo down: %v", err)
	}
}
