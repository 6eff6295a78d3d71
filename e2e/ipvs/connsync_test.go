package ipvs_e2e

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"

	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	"github.com/keeplb/keeplb/pkg/testing/streams"
)

// TestConnSync runs real speakers with --conn-sync on the VM's kernel: on
// every node the speaker starts both IPVS sync daemons on the link of the
// Node's InternalIP, with the guard admitting the two other Nodes; the
// connections of streams through the holder then appear in the other
// nodes' IPVS connection tables, bound to the same pods. What the
// streams live through is TestStreams'.
func TestConnSync(t *testing.T) { onIPVSKernel(t, connSync) }

func connSync(t *testing.T, cfg *rest.Config) {
	c := newCluster(t, cfg)
	client, clientIP, err := c.lab.AddClient("client")
	if err != nil {
		t.Fatal(err)
	}
	var all []endpoint
	for i, n := range c.lab.Nodes {
		p, err := c.lab.AddPod(n, "pod"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		c.serveStreams(p.Name, netip.AddrPortFrom(p.IP, 8080), p.Name)
		all = append(all, ready(p))
		if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: n.Name}); err != nil {
			t.Fatal(err)
		}
	}
	keeplbtest.CreatePool(t, c.dyn, "cs", `{addresses: ["`+lab.VIPRange+`"], forwarding: pod, vrrp: {advertisementInterval: "1s"}}`)
	vip := c.service("cs", v1.ProtocolTCP)
	c.slice("cs", v1.ProtocolTCP, all...)
	for _, n := range c.lab.Nodes {
		c.speakers.Start(n.Name, func(o *speaker.Options) { o.ConnSync.Enabled, o.ConnSync.SyncID = true, 7 })
	}
	holder := c.holder(vip)

	for _, n := range c.lab.Nodes {
		c.eventually(30*time.Second, "both sync daemons on eth0 in "+n.Name, func() bool {
			out, err := exec.Command("ip", "netns", "exec", n.Name, "ipvsadm", "-L", "--daemon").CombinedOutput()
			s := string(out)
			return err == nil && strings.Contains(s, "master sync daemon (mcast=eth0, syncid=7") && strings.Contains(s, "backup sync daemon (mcast=eth0, syncid=7")
		})
		out, err := exec.Command("ip", "netns", "exec", n.Name, "nft", "list", "set", "inet", "keeplb", "sync-peers-v4").CombinedOutput()
		if err != nil {
			t.Fatalf("nft list set sync-peers-v4 in %s: %v %s", n.Name, err, out)
		}
		for _, o := range c.lab.Nodes {
			if has := strings.Contains(string(out), o.IP.String()); has != (o.Name != n.Name) {
				t.Errorf("the sync guard of %s admits %s: %v; want only the other nodes:\n%s", n.Name, o.Name, has, out)
			}
		}
	}

	const n = 10
	checker, err := streams.Start(t.Context(), streams.Options{
		Addr: netip.AddrPortFrom(vip, 80).String(), Streams: n, Interval: 50 * time.Millisecond, Timeout: 5 * time.Second,
		Dial: func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
			err = lab.Do(client, func() error { conn, err = (&net.Dialer{}).DialContext(ctx, network, addr); return err })
			return conn, err
		},
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.dump())
	}
	defer checker.Stop()
	synced := func(node string) int {
		out, err := exec.Command("ip", "netns", "exec", node, "cat", "/proc/net/ip_vs_conn").CombinedOutput()
		if err != nil {
			return 0
		}
		return strings.Count(strings.ToUpper(string(out)), hexAddr(clientIP)+" ")
	}
	for _, nd := range c.lab.Nodes {
		if nd.Name == holder {
			continue
		}
		c.eventually(30*time.Second, "the streams' connection entries synced to "+nd.Name, func() bool { return synced(nd.Name) >= n })
	}
	t.Logf("the %d streams' connection entries reached the two nodes that do not hold %s", n, vip)
}

// hexAddr is an IPv4 address as /proc/net/ip_vs_conn writes it: eight
// hex digits.
func hexAddr(a netip.Addr) string {
	b := a.As4()
	const digits = "0123456789ABCDEF"
	out := make([]byte, 0, 8)
	for _, x := range b {
		out = append(out, digits[x>>4], digits[x&15])
	}
	return string(out)
}
