package nsthread_test

import (
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"testing"

	"github.com/keeplb/keeplb/pkg/nsthread"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// TestCall enters two fresh namespaces, one with a veth pair, and sees
// each one's links; the caller's thread stays where it was; a namespace
// that does not exist is an error.
func TestCall(t *testing.T) {
	netnstest.Require(t, "apt-get install iproute2", "ip")
	a, b := netnstest.New(t, "a"), netnstest.New(t, "b")
	if out, err := exec.Command("ip", "-n", a, "link", "add", "v0", "type", "veth", "peer", "name", "v1").CombinedOutput(); err != nil {
		t.Fatalf("veth in %s: %v %s", a, err, out)
	}
	names := func() ([]string, error) {
		ifs, err := net.Interfaces()
		var out []string
		for _, i := range ifs {
			out = append(out, i.Name)
		}
		slices.Sort(out)
		return out, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	for ns, want := range map[string][]string{a: {"lo", "v0", "v1"}, b: {"lo"}} {
		got, err := nsthread.Call(nsthread.Path(ns), names)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("links in %s: %v, %v; want %v", ns, got, err, want)
		}
	}
	if after, _ := os.Readlink("/proc/thread-self/ns/net"); after != before {
		t.Errorf("the caller's thread moved from %s to %s", before, after)
	}
	if err := nsthread.Do(nsthread.Path(b+"-missing"), func() error { return nil }); err == nil {
		t.Error("Do in a missing namespace succeeded")
	}
}
