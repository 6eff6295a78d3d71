package keepalived_test

import (
	"os/exec"
	"strings"
	"testing"

	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// requireKeepalived skips t unless it can run keepalived in network
// namespaces of its own: root, iproute2's ip and keepalived.
func requireKeepalived(t *testing.T) {
	t.Helper()
	netnstest.Require(t, "apt-get install keepalived iproute2", "ip", "keepalived")
}

// newNetns creates a network namespace for t (see netnstest.New).
func newNetns(t *testing.T, suffix string) string {
	t.Helper()
	return netnstest.New(t, suffix)
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
