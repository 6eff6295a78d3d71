package dataplane_e2e

import (
	"os"
	"strings"
	"testing"

	"github.com/keeplb/keeplb/pkg/nsthread"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/netns"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// TestPrepareNode boots the VM with IPVS not loaded, as on a fresh node,
// and runs what the speaker DaemonSet's init container runs (keeplb
// prepare-node) in a new network namespace: without --ipvs it leaves IPVS
// alone; with it, IPVS gets loaded with no modprobe in PATH (as in the
// image: the kernel loads ip_vs itself on first use of its netlink family,
// since 5.16), and the vs.* sysctls, which exist only then, are set.
func TestPrepareNode(t *testing.T) {
	if !vm.InVM() {
		if os.Getenv("KEEPLB_VM") != "1" {
			t.Skip("needs a kernel whose ip_vs module is not loaded yet: set KEEPLB_VM=1 to run it in the VM of hack/vm")
		}
		vm.RunSelfWith(t, vm.Options{SkipModules: []string{"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc", "ip_vs_mh"}})
		return
	}
	loaded := func() bool { _, err := os.Stat("/proc/net/ip_vs"); return err == nil }
	if loaded() {
		t.Fatal("ip_vs is loaded already: the VM was to boot without it")
	}
	ns := netns.New(t, "prep")
	sysctl := func(name string) string {
		t.Helper()
		b, err := nsthread.Call(nsthread.Path(ns), func() ([]byte, error) { return os.ReadFile("/proc/sys/net/" + name) })
		if err != nil {
			return "(" + err.Error() + ")"
		}
		return strings.TrimSpace(string(b))
	}
	want := func(kv map[string]string) {
		t.Helper()
		for k, v := range kv {
			if got := sysctl(k); got != v {
				t.Errorf("net/%s = %s, want %s", k, got, v)
			}
		}
	}
	t.Setenv("PATH", "/nonexistent") // no modprobe, as in the image

	if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: false, NetNS: ns}); err != nil {
		t.Fatal(err)
	}
	if loaded() {
		t.Fatal("prepare-node --ipvs=false loaded ip_vs")
	}
	want(map[string]string{"ipv4/ip_nonlocal_bind": "1", "ipv4/conf/all/arp_ignore": "1", "ipv4/conf/all/arp_announce": "2", "ipv4/ip_forward": "0"})

	if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: ns}); err != nil {
		t.Fatal(err)
	}
	if !loaded() {
		t.Fatal("prepare-node did not load ip_vs")
	}
	want(map[string]string{"ipv4/vs/conntrack": "1", "ipv4/vs/expire_nodest_conn": "1", "ipv4/ip_forward": "1"})
}
