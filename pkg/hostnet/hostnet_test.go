package hostnet_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/keeplb/keeplb/pkg/hostnet"
	hostnettesting "github.com/keeplb/keeplb/pkg/hostnet/testing"
)

func TestEnsureSysctls(t *testing.T) {
	f := hostnettesting.New(nil, map[string]string{
		"net.ipv4.ip_nonlocal_bind":      "0",
		"net.ipv4.conf.all.arp_ignore":   "1",
		"net.ipv4.conf.all.arp_announce": "0",
	})
	f.MakeReadOnly("net.ipv4.conf.all.arp_announce")
	err := hostnet.Ensure(f, hostnet.VRRPSysctls())
	if err == nil || !strings.Contains(err.Error(), "sysctl net.ipv4.conf.all.arp_announce=2") || strings.Contains(err.Error(), "ip_nonlocal_bind") {
		t.Fatalf("Ensure error = %v; want it to name arp_announce only", err)
	}
	if v, _ := f.Sysctl("net.ipv4.ip_nonlocal_bind"); v != "1" {
		t.Fatalf("ip_nonlocal_bind = %s, want it set to 1", v)
	}
}

func TestStaleVIPs(t *testing.T) {
	pool := netip.MustParsePrefix("192.0.2.0/24")
	links := []hostnet.Link{
		{Name: "eth0", Prefixes: []netip.Prefix{
			netip.MustParsePrefix("192.0.2.5/24"),    // the node's own address, inside the pool range by mistake
			netip.MustParsePrefix("192.0.2.10/32"),   // a VIP left behind
			netip.MustParsePrefix("198.51.100.7/32"), // someone else's /32: never ours to touch
		}},
		{Name: "eth1", Prefixes: []netip.Prefix{netip.MustParsePrefix("192.0.2.5/32")}},
	}
	keep := map[netip.Addr]bool{netip.MustParseAddr("192.0.2.5"): true}
	got := hostnet.StaleVIPs(links, pool.Contains, keep)
	if len(got) != 1 || len(got["eth0"]) != 1 || got["eth0"][0].String() != "192.0.2.10/32" {
		t.Fatalf("StaleVIPs = %v, want only 192.0.2.10/32 on eth0", got)
	}
}

// TestNetlinkInNamespace runs the real implementation against a network
// namespace the test creates.
func TestNetlinkInNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip command")
	}
	ns := "kl-hostnet-" + strings.ReplaceAll(t.Name(), "/", "-")
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run("-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	run("-n", ns, "link", "set", "d1", "up")
	run("-n", ns, "link", "set", "d0", "up")
	run("-n", ns, "addr", "add", "10.251.0.2/24", "dev", "d0")
	run("-n", ns, "addr", "add", "10.251.0.100/32", "dev", "d0")
	run("-n", ns, "route", "add", "default", "via", "10.251.0.1")
	// Default routes in another table are not the node's: policy routing
	// (a VRF, a CNI's own table) must not make a link the default one.
	run("-n", ns, "addr", "add", "10.252.0.2/24", "dev", "d1")
	run("-n", ns, "route", "add", "default", "via", "10.252.0.1", "dev", "d1", "table", "100")
	run("-n", ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "d0", "table", "100")

	h, err := hostnet.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	links, err := h.Links()
	if err != nil {
		t.Fatal(err)
	}
	var d0, d1 *hostnet.Link
	for i := range links {
		switch links[i].Name {
		case "d0":
			d0 = &links[i]
		case "d1":
			d1 = &links[i]
		}
	}
	if d0 == nil || !d0.DefaultRoute4 || d0.DefaultRoute6 || len(d0.Prefixes) < 2 {
		t.Fatalf("d0 = %+v, want two addresses and the IPv4 default route of the main table only", d0)
	}
	if d1 == nil || d1.DefaultRoute4 || d1.DefaultRoute6 {
		t.Fatalf("d1 = %+v, want no default route: its only one is in table 100", d1)
	}
	stale := hostnet.StaleVIPs(links, netip.MustParsePrefix("10.251.0.0/24").Contains, map[netip.Addr]bool{netip.MustParseAddr("10.251.0.2"): true})
	for link, ps := range stale {
		for _, p := range ps {
			if err := h.DeleteAddress(link, p); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := h.DeleteAddress("d0", netip.MustParsePrefix("10.251.0.100/32")); err != nil {
		t.Fatalf("deleting an absent address must not fail: %v", err)
	}
	out, _ := exec.Command("ip", "-n", ns, "-br", "addr", "show", "d0").CombinedOutput()
	if strings.Contains(string(out), "10.251.0.100") || !strings.Contains(string(out), "10.251.0.2/24") {
		t.Fatalf("after cleanup: %s", out)
	}

	// The namespace's sysctls, not the process's: d0 is only there, and
	// a value written is the namespace's. (Read from the process's, a
	// handle at a namespace read another node's values.)
	if err := h.SetSysctl("net.ipv4.conf.d0.arp_ignore", "2"); err != nil {
		t.Fatal(err)
	}
	if v, err := h.Sysctl("net.ipv4.conf.d0.arp_ignore"); err != nil || v != "2" {
		t.Errorf("d0's arp_ignore read through the handle: %q, %v; want 2", v, err)
	}
	if out, err := exec.Command("ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/conf/d0/arp_ignore").CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "2" {
		t.Errorf("d0's arp_ignore in the namespace: %q, %v; want 2", out, err)
	}
}

// TestLinksWhileAddressesChange reads the links while another link's
// addresses change as fast as netlink takes them, as when keepalived adds
// thousands of VIPs: the kernel then interrupts dumps, and Links must read
// again rather than fail or return what an interrupted dump gave.
func TestLinksWhileAddressesChange(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	ns := "kl-hostnet-churn"
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	for _, args := range [][]string{
		{"link", "add", "stable", "type", "veth", "peer", "name", "stable-p"},
		{"addr", "add", "10.252.0.2/24", "dev", "stable"},
		{"link", "add", "busy", "type", "veth", "peer", "name", "busy-p"},
		{"link", "set", "busy", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	nsh, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	churn, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer churn.Close()
	busy, err := churn.LinkByName("busy")
	if err != nil {
		t.Fatal(err)
	}
	// 500 addresses on busy, and then one added and removed again and
	// again while Links reads.
	for i := range 500 {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 253, byte(i/250), byte(i%250+1)), Mask: net.CIDRMask(32, 32)}}
		if err := churn.AddrAdd(busy, a); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 254, 0, 1), Mask: net.CIDRMask(32, 32)}}
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = churn.AddrAdd(busy, a)
			_ = churn.AddrDel(busy, a)
		}
	}()
	h, err := hostnet.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for i := range 200 {
		links, err := h.Links()
		if err != nil {
			close(stop)
			<-done
			t.Fatalf("read %d: %v", i, err)
		}
		for _, l := range links {
			if l.Name == "stable" && !slices.Equal(l.Prefixes, []netip.Prefix{netip.MustParsePrefix("10.252.0.2/24")}) {
				t.Fatalf("read %d: stable has %v", i, l.Prefixes)
			}
			if l.Name == "busy" && len(l.Prefixes) < 500 {
				t.Fatalf("read %d: busy has %d of its 500 addresses", i, len(l.Prefixes))
			}
		}
	}
	close(stop)
	<-done
}

// BenchmarkLinks reads the links of a namespace whose link holds 10,000
// VIPs, as a speaker holding them does at every sync (e2e/scale's shape):
// every address, and for the default routes the main table, while the
// local table has a route per VIP.
func BenchmarkLinks(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to create a network namespace")
	}
	const vips = 10000
	ns := "kl-hostnet-bench"
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		b.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	b.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	var batch strings.Builder
	batch.WriteString("link add vips type veth peer name vips-p\nlink set vips-p up\nlink set vips up\naddr add 10.250.0.2/16 dev vips\nroute add default via 10.250.0.1\n")
	for i := range vips {
		fmt.Fprintf(&batch, "addr add 10.250.%d.%d/32 dev vips\n", 1+i/250, 1+i%250)
	}
	cmd := exec.Command("ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(batch.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("ip -batch: %v\n%s", err, out)
	}
	h, err := hostnet.NewAt("/run/netns/" + ns)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	b.ReportAllocs()
	for b.Loop() {
		links, err := h.Links()
		if err != nil {
			b.Fatal(err)
		}
		i := slices.IndexFunc(links, func(l hostnet.Link) bool { return l.Name == "vips" })
		// Its VIPs, its own address and an IPv6 link-local one.
		if i < 0 || len(links[i].Prefixes) < vips+1 || !links[i].DefaultRoute4 {
			b.Fatalf("%d links, want vips with %d addresses or more and the default route", len(links), vips+1)
		}
	}
}

// TestAddressLifetime: on a real kernel, SetAddressLifetime bounds an
// address (IPv4 and IPv6, with its label kept), makes it permanent again,
// and the kernel removes a bounded one when its lifetime ends.
func TestAddressLifetime(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip command")
	}
	ns := "kl-hostnet-lft"
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	ip := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ip("link", "set", "d0", "up")
	v4, v6 := netip.MustParsePrefix("10.251.0.100/32"), netip.MustParsePrefix("2001:db8::100/128")
	ip("addr", "add", v4.String(), "dev", "d0", "label", "d0:vip")
	ip("addr", "add", v6.String(), "dev", "d0", "nodad")
	h, err := hostnet.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	show := func(p netip.Prefix) string {
		return ip("addr", "show", "dev", "d0", "to", p.String())
	}
	for _, p := range []netip.Prefix{v4, v6} {
		if err := h.SetAddressLifetime("d0", p, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		if out := show(p); !strings.Contains(out, "valid_lft 30sec") && !strings.Contains(out, "valid_lft 29sec") {
			t.Errorf("%v after a 30 s lifetime:\n%s", p, out)
		}
		if err := h.SetAddressLifetime("d0", p, 0); err != nil {
			t.Fatal(err)
		}
		if out := show(p); !strings.Contains(out, "valid_lft forever") {
			t.Errorf("%v made permanent again:\n%s", p, out)
		}
	}
	if out := show(v4); !strings.Contains(out, "d0:vip") {
		t.Errorf("the label is gone:\n%s", out)
	}
	if err := h.SetAddressLifetime("d0", netip.MustParsePrefix("10.251.0.101/32"), time.Second); err == nil {
		t.Error("setting the lifetime of an absent address did not fail")
	}
	for _, p := range []netip.Prefix{v4, v6} {
		if err := h.SetAddressLifetime("d0", p, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for show(v4) != "" || show(v6) != "" {
		if time.Now().After(deadline) {
			t.Fatalf("the kernel did not remove the addresses after their 1 s lifetime:\n%s", ip("addr", "show", "dev", "d0"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
