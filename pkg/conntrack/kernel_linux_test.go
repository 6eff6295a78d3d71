package conntrack_test

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/keeplb/keeplb/pkg/conntrack"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// TestKernelDeleteUDP makes real conntrack entries in a network namespace
// of its own, with an nftables DNAT standing in for IPVS (both leave the
// VIP in the original tuple and the real server in the reply tuple), and
// checks that DeleteUDP removes exactly the matching ones.
func TestKernelDeleteUDP(t *testing.T) {
	netnstest.Require(t, "apt-get install iproute2 nftables", "ip", "nft")
	ns := netnstest.New(t, "ct")
	for _, args := range [][]string{
		{"addr", "add", "192.0.2.1/32", "dev", "lo"},
		{"addr", "add", "10.0.0.2/32", "dev", "lo"},
		{"addr", "add", "10.0.0.3/32", "dev", "lo"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Skipf("skipped: ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	// Any NAT chain makes the namespace track connections.
	rules := `table ip ct-test {
	chain out {
		type nat hook output priority -100;
		ip daddr 192.0.2.1 udp sport 40001 dnat to 10.0.0.3:5353
		ip daddr 192.0.2.1 udp dport { 53, 54 } dnat to 10.0.0.2:5353
	}
}
`
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("skipped: nftables NAT (and so conntrack) unavailable in a network namespace: %v: %s", err, out)
	}

	type send struct{ from, to string }
	sends := []send{
		{"10.0.0.2:40000", "192.0.2.1:53"},  // -> 10.0.0.2:5353: matches
		{"10.0.0.2:40002", "192.0.2.1:53"},  // -> 10.0.0.2:5353: matches
		{"10.0.0.2:40001", "192.0.2.1:53"},  // -> 10.0.0.3:5353: other real server
		{"10.0.0.2:40000", "192.0.2.1:54"},  // -> 10.0.0.2:5353: other VIP port
		{"10.0.0.3:40000", "10.0.0.2:5353"}, // not through the VIP
	}
	if err := netnstest.Do(t, ns, func() error {
		for _, s := range sends {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s.from)), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s.to)))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("ping"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	list := func() []string {
		t.Helper()
		var out []string
		for _, f := range flows(t, ns) {
			if f.Forward.Protocol == unix.IPPROTO_UDP {
				out = append(out, fmt.Sprintf("%s:%d>%s:%d reply %s:%d", f.Forward.SrcIP, f.Forward.SrcPort, f.Forward.DstIP, f.Forward.DstPort, f.Reverse.SrcIP, f.Reverse.SrcPort))
			}
		}
		slices.Sort(out)
		return out
	}
	before := list()
	if len(before) == 0 {
		t.Skip("skipped: no conntrack entries for UDP in a network namespace (nf_conntrack unavailable?)")
	}
	want := []string{
		"10.0.0.2:40000>192.0.2.1:53 reply 10.0.0.2:5353",
		"10.0.0.2:40000>192.0.2.1:54 reply 10.0.0.2:5353",
		"10.0.0.2:40001>192.0.2.1:53 reply 10.0.0.3:5353",
		"10.0.0.2:40002>192.0.2.1:53 reply 10.0.0.2:5353",
		"10.0.0.3:40000>10.0.0.2:5353 reply 10.0.0.2:5353",
	}
	if !slices.Equal(before, want) {
		t.Fatalf("conntrack entries before\n%s\nwant\n%s", strings.Join(before, "\n"), strings.Join(want, "\n"))
	}

	ct, err := conntrack.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	n, err := ct.DeleteUDP(netip.MustParseAddrPort("192.0.2.1:53"), netip.MustParseAddrPort("10.0.0.2:5353"))
	if err != nil {
		t.Fatalf("DeleteUDP: %v", err)
	}
	if n != 2 {
		t.Errorf("DeleteUDP deleted %d entries, want 2", n)
	}
	wantLeft := []string{want[1], want[2], want[4]}
	if got := list(); !slices.Equal(got, wantLeft) {
		t.Errorf("conntrack entries after DeleteUDP\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(wantLeft, "\n"))
	}
	if n, err := ct.DeleteUDP(netip.MustParseAddrPort("192.0.2.1:53"), netip.MustParseAddrPort("10.0.0.2:5353")); err != nil || n != 0 {
		t.Errorf("second DeleteUDP = %d, %v; want 0", n, err)
	}
}

// TestKernelDeleteOfVIPs makes real conntrack entries in a network
// namespace of its own, UDP and TCP, to and from two VIPs and to another
// address, one of them in another zone, one from a VIP to the node's own
// address (a NodePort flow, kube-proxy's), and checks that DeleteOfVIPs
// removes exactly those of the zone given with the VIPs it is given at
// either end, but that one.
func TestKernelDeleteOfVIPs(t *testing.T) {
	netnstest.Require(t, "apt-get install iproute2 nftables", "ip", "nft")
	ns := netnstest.New(t, "ctvip")
	for _, a := range []string{"192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32", "10.0.0.2/32", "10.0.0.7/32"} {
		if out, err := exec.Command("ip", "-n", ns, "addr", "add", a, "dev", "lo").CombinedOutput(); err != nil {
			t.Skipf("skipped: ip addr add %s: %v: %s", a, err, out)
		}
	}
	// The zone as keeplb's vip-transit chain sets it, before conntrack.
	rules := `table ip ct-test {
	chain raw {
		type filter hook output priority raw;
		udp sport 40009 ct zone set 27500
	}
	chain out {
		type nat hook output priority -100;
		ip daddr 192.0.2.9 dnat to 10.0.0.2
	}
}
`
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("skipped: nftables (and so conntrack) unavailable in a network namespace: %v: %s", err, out)
	}
	sends := [][2]string{
		{"10.0.0.2:40000", "192.0.2.1:53"},    // opened to a VIP: deleted
		{"10.0.0.2:40001", "192.0.2.1:8080"},  // another port: deleted
		{"10.0.0.2:40002", "192.0.2.2:53"},    // the other VIP: deleted
		{"10.0.0.2:40009", "192.0.2.1:53"},    // the transit zone: kept
		{"10.0.0.2:40003", "192.0.2.3:53"},    // not a VIP given: kept
		{"192.0.2.1:40004", "10.0.0.2:53"},    // from a VIP: deleted
		{"192.0.2.1:40006", "10.0.0.7:30080"}, // from a VIP to the node's address (its NodePort): kept
	}
	if err := netnstest.Do(t, ns, func() error {
		for _, s := range sends {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s[0])), net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s[1])))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("ping"))
			c.Close()
			if err != nil {
				return err
			}
		}
		// A TCP connection to a VIP, open until the test ends: deleted.
		l, err := net.Listen("tcp", "192.0.2.2:80")
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort("10.0.0.2:40005"))}
		c, err := d.Dial("tcp", "192.0.2.2:80")
		if err != nil {
			return err
		}
		t.Cleanup(func() { c.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	list := func() []string {
		t.Helper()
		var out []string
		for _, f := range flows(t, ns) {
			if f.Forward.SrcPort >= 40000 && f.Forward.SrcPort < 40010 {
				out = append(out, fmt.Sprintf("%d %s:%d>%s:%d zone %d", f.Forward.Protocol, f.Forward.SrcIP, f.Forward.SrcPort, f.Forward.DstIP, f.Forward.DstPort, f.Zone))
			}
		}
		slices.Sort(out)
		return out
	}
	want := []string{
		"17 10.0.0.2:40000>192.0.2.1:53 zone 0",
		"17 10.0.0.2:40001>192.0.2.1:8080 zone 0",
		"17 10.0.0.2:40002>192.0.2.2:53 zone 0",
		"17 10.0.0.2:40003>192.0.2.3:53 zone 0",
		"17 10.0.0.2:40009>192.0.2.1:53 zone 27500",
		"17 192.0.2.1:40004>10.0.0.2:53 zone 0",
		"17 192.0.2.1:40006>10.0.0.7:30080 zone 0",
		"6 10.0.0.2:40005>192.0.2.2:80 zone 0",
	}
	switch got := list(); {
	case len(got) == 0:
		t.Skip("skipped: no conntrack entries in a network namespace (nf_conntrack unavailable?)")
	case !slices.Equal(got, want):
		t.Fatalf("conntrack entries before\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	ct, err := conntrack.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	vips := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("::ffff:192.0.2.2")}
	node := []netip.Addr{netip.MustParseAddr("::ffff:10.0.0.7")}
	n, err := ct.DeleteOfVIPs(vips, 0, node)
	if err != nil {
		t.Fatalf("DeleteOfVIPs: %v", err)
	}
	wantLeft := []string{want[3], want[4], want[6]}
	if got := list(); n != 5 || !slices.Equal(got, wantLeft) {
		t.Errorf("DeleteOfVIPs deleted %d entries (want 5), leaving\n%s\nwant\n%s", n, strings.Join(got, "\n"), strings.Join(wantLeft, "\n"))
	}
	if n, err := ct.DeleteOfVIPs(vips, 0, node); err != nil || n != 0 {
		t.Errorf("second DeleteOfVIPs = %d, %v; want 0", n, err)
	}
	// The other zone's alone.
	if n, err := ct.DeleteOfVIPs(vips, 27500, node); err != nil || n != 1 {
		t.Errorf("DeleteOfVIPs in zone 27500 = %d, %v; want 1", n, err)
	}
	if got := list(); !slices.Equal(got, []string{want[3], want[6]}) {
		t.Errorf("after deleting zone 27500's, left\n%s\nwant\n%s\n%s", strings.Join(got, "\n"), want[3], want[6])
	}
}

// flows lists the IPv4 conntrack entries of the network namespace ns.
func flows(t *testing.T, ns string) []*netlink.ConntrackFlow {
	t.Helper()
	h, err := netns.GetFromPath("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h, unix.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	out, err := nh.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatalf("listing conntrack: %v", err)
	}
	return out
}
