package ipvs_e2e

import (
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
)

// inPool is an address of lab.VIPRange that no Service gets here (the
// allocator hands out the lowest free ones): a virtual server on it is
// inside keeplb's pool, but not keeplb's.
const inPool = "10.70.0.250:9999"

// TestSourceRangesFailClosed covers issue 10 items 2 and 3 with real
// speakers, IPVS and nftables. A node whose nftables write fails at run
// time (another program took the table inet keeplb) must not program
// the virtual server of a Service with loadBalancerSourceRanges, which it
// could not filter (the old speaker did, forwarding it unfiltered), while
// it goes on forwarding an unfiltered one; once the table can be written
// again, it programs it. A virtual server another program made inside the
// pool's range survives every sync and the speakers' exit (the old
// speaker deleted it at its first sync).
func TestSourceRangesFailClosed(t *testing.T) { onIPVSKernel(t, sourceRangesFailClosed) }

func sourceRangesFailClosed(t *testing.T, cfg *rest.Config) {
	c := newCluster(t, cfg)
	var all []endpoint
	for i, n := range c.lab.Nodes {
		p, err := c.lab.AddPod(n, "pod"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		serve(t, c, p.Name, netip.AddrPortFrom(p.IP, 8080), p.Name)
		all = append(all, ready(p))
		if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: n.Name}); err != nil {
			t.Fatal(err)
		}
		c.ipvsadm(n.Name, "-A", "-t", inPool, "-s", "rr")
	}
	keeplbtest.CreatePool(t, c.dyn, "sr", `{addresses: ["`+lab.VIPRange+`"], forwarding: pod, vrrp: {advertisementInterval: "200ms"}}`)
	for _, n := range c.lab.Nodes {
		c.startSpeaker(n.Name)
	}
	has := func(node string, vip netip.Addr) bool {
		return strings.Contains(c.ipvsadm(node, "-Ln"), netip.AddrPortFrom(vip, 80).String())
	}
	open := c.service("open", v1.ProtocolTCP)
	c.slice("open", v1.ProtocolTCP, all...)
	for _, n := range c.lab.Nodes {
		c.eventually(30*time.Second, n.Name+" forwarding "+open.String(), func() bool { return has(n.Name, open) })
	}

	victim := c.lab.Nodes[0].Name
	if out, err := exec.Command("ip", "netns", "exec", victim, "nft", "delete", "table", "inet", "keeplb").CombinedOutput(); err != nil {
		t.Fatalf("deleting keeplb's table in %s: %v: %s", victim, err, out)
	}
	release := c.takeNFTTable(victim)
	filtered := c.service("filtered", v1.ProtocolTCP, func(s *v1.Service) {
		s.Spec.LoadBalancerSourceRanges = []string{"10.70.0.0/24"}
	})
	c.slice("filtered", v1.ProtocolTCP, all...)
	for _, n := range c.lab.Nodes[1:] {
		c.eventually(30*time.Second, n.Name+" forwarding "+filtered.String(), func() bool { return has(n.Name, filtered) })
	}
	// The victim has had the Service (its sync runs with the others'),
	// and keeps not programming it across its retries.
	end := time.Now().Add(5 * time.Second)
	for time.Now().Before(end) {
		if has(victim, filtered) {
			t.Fatalf("%s, whose nftables write fails, programmed %s, which has source ranges:\n%s", victim, filtered, c.ipvsadm(victim, "-Ln"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !has(victim, open) {
		t.Errorf("%s stopped forwarding the unfiltered %s", victim, open)
	}
	t.Logf("%s, whose table another program owns: no virtual server for %s (source ranges) for 5 s, %s still forwarded", victim, filtered, open)

	release()
	c.eventually(45*time.Second, victim+" forwarding "+filtered.String()+" once its table can be written", func() bool { return has(victim, filtered) })
	out, err := exec.Command("ip", "netns", "exec", victim, "nft", "list", "set", "inet", "keeplb", "filtered-v4").CombinedOutput()
	if err != nil || !strings.Contains(string(out), filtered.String()) {
		t.Errorf("%s's table does not filter %s (%v):\n%s", victim, filtered, err, out)
	}

	for _, n := range c.lab.Nodes {
		if got := c.ipvsadm(n.Name, "-Ln"); !strings.Contains(got, inPool) {
			t.Errorf("%s: the virtual server %s inside the pool, not keeplb's, is gone:\n%s", n.Name, inPool, got)
		}
		c.stopSpeaker(n.Name)
		got := c.ipvsadm(n.Name, "-Ln")
		if !strings.Contains(got, inPool) {
			t.Errorf("%s: the virtual server %s inside the pool, not keeplb's, is gone after the speaker's exit:\n%s", n.Name, inPool, got)
		}
		if strings.Contains(got, netip.AddrPortFrom(open, 80).String()) {
			t.Errorf("%s: keeplb's virtual server for %s survived the speaker's exit:\n%s", n.Name, open, got)
		}
	}
}
