package keepalived_test

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
)

// requireKeepalived skips t unless it can run keepalived in network
// namespaces of its own: root, iproute2's ip and keepalived.
func requireKeepalived(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root to create network namespaces (run as root to test against a real keepalived)")
	}
	for _, bin := range []string{"ip", "keepalived"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("skipped: %s not found in PATH (apt-get install keepalived iproute2)", bin)
		}
	}
}

var nsSeq atomic.Int32

// newNetns creates a network namespace, deleted when t ends, and returns
// its name: kltest-PID-N-suffix. It skips t if namespaces are unavailable.
func newNetns(t *testing.T, suffix string) string {
	t.Helper()
	name := fmt.Sprintf("kltest-%d-%d-%s", os.Getpid(), nsSeq.Add(1), suffix)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("skipped: ip netns add failed, network namespaces unavailable: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ip(t, "-n", name, "link", "set", "lo", "up")
	return name
}

// ip runs ip with args and returns its output; it fails t on error.
func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
