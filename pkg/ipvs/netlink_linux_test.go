package ipvs_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// TestNewWithoutIPVS checks that a kernel without IPVS is reported as such,
// not discovered later as odd netlink errors.
func TestNewWithoutIPVS(t *testing.T) {
	if ipvs.Available() == nil {
		t.Skip("this kernel has IPVS; the no-IPVS error cannot be observed here")
	}
	h, err := ipvs.New()
	if !errors.Is(err, ipvs.ErrNoIPVS) {
		t.Fatalf("New() = %v, %v; want an error wrapping ErrNoIPVS", h, err)
	}
	t.Logf("New() on this host: %v", err)
}

// TestNetlinkInNamespace programs the real kernel in a fresh network
// namespace, so the host's table is never touched.
//
// Where the host kernel lacks IPVS, KEEPLB_VM=1 runs it inside the VM of
// hack/vm (a stock Debian kernel with IPVS).
func TestNetlinkInNamespace(t *testing.T) {
	if ipvs.Available() != nil && !vm.InVM() && os.Getenv("KEEPLB_VM") == "1" {
		vm.RunSelf(t)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace and program IPVS")
	}
	if err := ipvs.Available(); err != nil {
		t.Skipf("skipping the real-kernel IPVS test: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip command")
	}
	ns := fmt.Sprintf("keeplb-ipvs-%d", os.Getpid())
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	// The kernel accepts a NAT real server only at an address it can route
	// to: give the namespace the real servers' subnets.
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "v0", "type", "veth", "peer", "name", "v1"},
		{"addr", "add", "10.0.0.254/24", "dev", "v0"},
		{"-6", "addr", "add", "fd00::fe/64", "dev", "v0", "nodad"},
		{"link", "set", "v0", "up"},
		{"link", "set", "v1", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}

	h, err := ipvs.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()

	vs4 := ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	vs6 := ipvs.VirtualServer{Address: netip.MustParseAddr("2001:db8::1"), Protocol: ipvs.UDP, Port: 53, Scheduler: "wrr", Persistent: true, Timeout: 10800 * time.Second}
	r4 := ipvs.RealServer{Address: netip.MustParseAddr("10.0.0.1"), Port: 30080, Weight: 1}
	r6 := ipvs.RealServer{Address: netip.MustParseAddr("fd00::1"), Port: 5353, Weight: 2}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(h.AddVirtualServer(vs4))
	must(h.AddVirtualServer(vs6))
	must(h.AddRealServer(vs4.Key(), r4))
	must(h.AddRealServer(vs6.Key(), r6))
	if err := h.AddVirtualServer(vs4); !ipvs.IsExist(err) {
		t.Errorf("adding an existing virtual server: %v, want EEXIST", err)
	}
	want := ipvs.Table{vs4.Key(): {Virtual: vs4, Reals: []ipvs.RealServer{r4}}, vs6.Key(): {Virtual: vs6, Reals: []ipvs.RealServer{r6}}}
	got, err := ipvs.Dump(h, nil)
	must(err)
	if !got.Equal(want) {
		t.Fatalf("kernel table =\n%s\nwant\n%s", got, want)
	}

	vs4.Scheduler, vs4.Persistent, vs4.Timeout = "sh", true, time.Minute // sh: a scheduler module the VM has
	r4.Weight = 0
	must(h.UpdateVirtualServer(vs4))
	must(h.UpdateRealServer(vs4.Key(), r4))
	must(h.DeleteRealServer(vs6.Key(), r6.AddrPort()))
	if err := h.DeleteRealServer(vs6.Key(), r6.AddrPort()); !ipvs.IsNotFound(err) {
		t.Errorf("deleting a missing real server: %v, want not found", err)
	}
	want = ipvs.Table{vs4.Key(): {Virtual: vs4, Reals: []ipvs.RealServer{r4}}, vs6.Key(): {Virtual: vs6}}
	got, err = ipvs.Dump(h, nil)
	must(err)
	if !got.Equal(want) {
		t.Fatalf("kernel table after updates =\n%s\nwant\n%s", got, want)
	}
	must(h.DeleteVirtualServer(vs4.Key()))
	must(h.DeleteVirtualServer(vs6.Key()))
	if err := h.DeleteVirtualServer(vs6.Key()); !errors.Is(err, syscall.ESRCH) && !ipvs.IsNotFound(err) {
		t.Errorf("deleting a missing virtual server: %v, want not found", err)
	}
	if vss, err := h.VirtualServers(); err != nil || len(vss) != 0 {
		t.Errorf("VirtualServers() = %v, %v; want none", vss, err)
	}
}
