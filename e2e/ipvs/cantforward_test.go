package ipvs_e2e

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"

	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// instanceOf returns the instance of vip in the cluster's VRRP plan,
// computed from the API as every speaker computes it.
func (c *cluster) instanceOf(vip netip.Addr) vrrp.Instance {
	c.t.Helper()
	for _, inst := range keeplbtest.Plan(c.t, c.client, c.dyn).Instances {
		if slices.Contains(inst.VIPs, vip) {
			return inst
		}
	}
	c.t.Fatalf("VIP %s is in no instance of the plan", vip)
	return vrrp.Instance{}
}

// trackValue returns the value node's speaker last wrote to the track file
// of instance, or false while there is none.
func trackValue(node, instance string) (int, bool) {
	b, err := os.ReadFile(filepath.Join(os.TempDir(), "keeplb-e2e-"+node, "track", instance))
	if err != nil {
		return 0, false
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return v, err == nil
}

// takeNFTTable makes keeplb's nftables table in node's namespace another
// program's: an nft process creates it with the owner flag and keeps its
// netlink socket open, so every other process's write to the table fails
// (EPERM), as when the table cannot be loaded. release ends that.
func (c *cluster) takeNFTTable(node string) (release func()) {
	c.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", node, "nft", "-i")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		c.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	done := false
	release = func() {
		if done {
			return
		}
		done = true
		stdin.Close() // nft -i exits at the end of its input; the table goes with its socket
		_ = cmd.Wait()
	}
	c.t.Cleanup(release)
	if _, err := io.WriteString(stdin, "add table inet keeplb { flags owner; }\n"); err != nil {
		c.t.Fatal(err)
	}
	c.eventually(10*time.Second, "table inet keeplb owned by another program in "+node, func() bool {
		out, err := exec.Command("ip", "netns", "exec", node, "nft", "list", "table", "inet", "keeplb").CombinedOutput()
		return err == nil && strings.Contains(string(out), "owner")
	})
	return release
}

// TestCannotForward covers issue 9 item 11: a node that cannot forward
// (here its nftables table cannot be written; a kernel without IPVS or a
// speaker without --ipvs count the same) used to become the holder of pod
// and nodeport VIPs like any other, and black-hole them. Now it ranks
// below every node that can: the VIP's planned master, started last,
// never takes the VIP, which another node holds and forwards, for longer
// than the preempt delay after which it would have taken it over; once
// its table can be written again, its priority is restored.
func TestCannotForward(t *testing.T) { onIPVSKernel(t, cannotForward) }

func cannotForward(t *testing.T, cfg *rest.Config) {
	c := newCluster(t, cfg)
	client, _, err := c.lab.AddClient("client")
	if err != nil {
		t.Fatal(err)
	}
	var all []endpoint
	var pods []string
	for i, n := range c.lab.Nodes {
		p, err := c.lab.AddPod(n, "pod"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		serve(t, c, p.Name, netip.AddrPortFrom(p.IP, 8080), p.Name)
		all, pods = append(all, ready(p)), append(pods, p.Name)
		if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: n.Name}); err != nil {
			t.Fatal(err)
		}
	}
	keeplbtest.CreatePool(t, c.dyn, "cf", `{addresses: ["`+lab.VIPRange+`"], forwarding: pod, vrrp: {advertisementInterval: "1s"}}`)
	vip := c.service("cf", v1.ProtocolTCP)
	c.slice("cf", v1.ProtocolTCP, all...)
	inst := c.instanceOf(vip)
	master := inst.Master()
	release := c.takeNFTTable(master)

	// The others first, so that one of them holds the VIP before the
	// planned master starts; the planned master, which comes back, takes
	// it over after the preempt delay, unless it ranks lower, as a node
	// that cannot forward must.
	for _, n := range c.lab.Nodes {
		if n.Name != master {
			c.startSpeaker(n.Name)
		}
	}
	// Started afresh, they leave the instance to its planned master for a
	// grace (vrrp.NewInstanceGrace, 10 s at 1 s adverts), then take it.
	var holder string
	c.eventually(90*time.Second, "exactly one holder of "+vip.String()+" among the others", func() bool {
		h := c.holders(vip)
		if len(h) == 1 {
			holder = h[0]
		}
		return len(h) == 1
	})
	c.startSpeaker(master)
	var lowered int
	c.eventually(30*time.Second, master+"'s track value for "+inst.Name+" lowered", func() bool {
		v, ok := trackValue(master, inst.Name)
		lowered = v
		return ok && v < 0
	})
	for _, n := range c.lab.Nodes {
		if n.Name == master {
			continue
		}
		if v, ok := trackValue(n.Name, inst.Name); !ok || v != 0 {
			t.Errorf("%s, which can forward: track value %d (%v), want 0", n.Name, v, ok)
		}
	}
	t.Logf("%s, the planned master of %s (%s), cannot write its nftables table: track value %d; %s holds it", master, vip, inst.Name, lowered, holder)

	// Beyond the preempt delay, the planned master never takes the VIP:
	// the best node that can forward does (the plan's second choice, once
	// it has preempted whichever node came first), and forwards it to the
	// pods.
	second, best := "", 0
	for n, p := range inst.Priorities {
		if n != master && p > best {
			second, best = n, p
		}
	}
	end := time.Now().Add(vrrp.PreemptDelay + 15*time.Second)
	answered, requests, lastErr := 0, 0, ""
	for time.Now().Before(end) {
		if h := c.holders(vip); slices.Contains(h, master) {
			t.Fatalf("%s held by %v: %s cannot forward and must not hold it", vip, h, master)
		}
		requests++
		a, err := lab.Get(t.Context(), client, netip.AddrPortFrom(vip, 80), "/", 2*time.Second)
		switch {
		case err == nil && slices.Contains(pods, a.Name):
			answered++
		case lastErr == "":
			lastErr = fmt.Sprintf("%v %v\n%s", a, err, c.dump())
		}
		time.Sleep(time.Second)
	}
	if h := c.holders(vip); !slices.Equal(h, []string{second}) {
		t.Errorf("after the preempt delay %s is held by %v, want %s, the best node that can forward", vip, h, second)
	}
	if answered < requests/2 {
		t.Errorf("%d of %d requests through %s answered by the pods; the first that was not: %s", answered, requests, vip, lastErr)
	}
	t.Logf("for %s: %s never held by %s, held by %s at the end; %d of %d requests answered by the pods", vrrp.PreemptDelay+15*time.Second, vip, master, second, answered, requests)

	// The table could not even be opened at start: the speaker runs
	// without it until restarted, as its log says. Restarted with the
	// table free, the node's priority is restored.
	release()
	c.stopSpeaker(master)
	c.startSpeaker(master)
	back := func(what string) {
		c.eventually(45*time.Second, fmt.Sprintf("%s's track value for %s back to 0 %s", master, inst.Name, what), func() bool {
			v, ok := trackValue(master, inst.Name)
			return ok && v == 0
		})
	}
	back("after a restart")

	// A write that fails at run time (another program took the table)
	// lowers the priority at the next change, and a later write that
	// succeeds (the speaker retries a failed sync within its backoff)
	// restores it.
	if out, err := exec.Command("ip", "netns", "exec", master, "nft", "delete", "table", "inet", "keeplb").CombinedOutput(); err != nil {
		t.Fatalf("deleting keeplb's table in %s: %v: %s", master, err, out)
	}
	release = c.takeNFTTable(master)
	c.slice("cf", v1.ProtocolTCP, all[:2]...) // a change: the table is written again
	c.eventually(30*time.Second, master+"'s track value lowered after a failed write", func() bool {
		v, ok := trackValue(master, inst.Name)
		return ok && v < 0
	})
	release()
	back("after a successful write")
}
