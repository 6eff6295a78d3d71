// Package netns creates network namespaces for tests that need a real
// kernel: each test gets namespaces of its own, removed when it ends, and
// skips with a clear message where they cannot be had.
package netns

import (
	"fmt"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"

	"github.com/keeplb/keeplb/pkg/nsthread"
)

// seq makes names unique within a test binary; the PID across binaries.
var seq atomic.Int32

// Require skips tb unless it runs as root and every named binary is in
// PATH (hint says how to install them).
func Require(tb testing.TB, hint string, bins ...string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipped: needs root to create network namespaces")
	}
	for _, bin := range bins {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Skipf("skipped: %s not found in PATH (%s)", bin, hint)
		}
	}
}

// New creates a network namespace with lo up, deleted when tb ends, and
// returns its name, kltest-PID-N-suffix. It skips tb where namespaces are
// unavailable.
func New(tb testing.TB, suffix string) string {
	tb.Helper()
	name := fmt.Sprintf("kltest-%d-%d-%s", os.Getpid(), seq.Add(1), suffix)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		tb.Skipf("skipped: ip netns add failed, network namespaces unavailable: %v: %s", err, out)
	}
	tb.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			tb.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		tb.Fatalf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	return name
}

// Do runs f on a thread of its own that has entered the network namespace
// name (package nsthread), and returns f's error: sockets f opens and
// processes it starts live there.
func Do(tb testing.TB, name string, f func() error) error {
	tb.Helper()
	return nsthread.Do(nsthread.Path(name), f)
}
