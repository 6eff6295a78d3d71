// Package vrrp is the speaker's end-to-end test: a real kube-apiserver,
// keeplb's controller, and one speaker per node with a real keepalived, in
// network namespaces the test creates (3 nodes and a client on a bridge).
// It needs root, iproute2, keepalived and the control-plane binaries (run
// it through `make test` or `make e2e-vrrp`); it skips with a reason
// otherwise.
package vrrp

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

func requireNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, bin := range []string{"ip", "keepalived"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (apt-get install iproute2 keepalived)", bin)
		}
	}
	ns := fmt.Sprintf("klprobe%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("network namespaces are unavailable here: %v %s", err, out)
	}
	_ = exec.Command("ip", "netns", "del", ns).Run()
}

// cluster is the whole system under test.
type cluster struct {
	t        *testing.T
	tp       *topology
	cp       *controlplane.ControlPlane
	client   kubernetes.Interface
	dyn      dynamic.Interface
	speakers *keeplbtest.Speakers
}

func newCluster(t *testing.T) *cluster { return newClusterWith(t, topoOptions{nodes: 3}) }

// newClusterWith is newCluster on the topology o describes.
func newClusterWith(t *testing.T, o topoOptions) *cluster {
	requireNetns(t)
	cp := controlplane.StartForTest(t)
	keeplbtest.Install(t, cp)
	cfg := cp.AdminConfig()
	c := &cluster{t: t, tp: newTopologyWith(t, o), cp: cp, client: kubernetes.NewForConfigOrDie(cfg), dyn: dynamic.NewForConfigOrDie(cfg),
		speakers: keeplbtest.NewSpeakers(t, cfg)}
	for _, ns := range c.tp.nodes {
		c.node(ns, true, nil)
	}
	keeplbtest.StartController(t, cp)
	return c
}

// node creates or updates the Node object of a node namespace.
func (c *cluster) node(name string, ready bool, labels map[string]string) {
	ctx := c.t.Context()
	n, err := c.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		n, err = c.client.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		if err != nil {
			c.t.Fatal(err)
		}
	}
	status := v1.ConditionFalse
	if ready {
		status = v1.ConditionTrue
	}
	n.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: status, LastHeartbeatTime: metav1.Now()}}
	n.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: c.tp.ips[name]}}
	if _, err := c.client.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

// startSpeaker runs the speaker of one node namespace, as its
// ServiceAccount, until stopSpeaker.
func (c *cluster) startSpeaker(ns string) { c.startSpeakerServing(ns, "0") }

// startSpeakerServing is startSpeaker with a metrics address.
func (c *cluster) startSpeakerServing(ns, metricsAddr string) {
	c.speakers.Start(ns, func(o *speaker.Options) { o.MetricsBindAddress = metricsAddr })
}

// stopSpeaker stops a speaker gracefully (SIGTERM to keepalived) and waits.
func (c *cluster) stopSpeaker(ns string) { c.speakers.Stop(ns) }

func (c *cluster) service(name string, mods ...func(*v1.Service)) {
	_, _ = c.client.CoreV1().Namespaces().Create(c.t.Context(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "e2e"}}, metav1.CreateOptions{})
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: name},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name},
			Ports: []v1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(80), Protocol: v1.ProtocolTCP}}},
	}
	for _, m := range mods {
		m(s)
	}
	if _, err := c.client.CoreV1().Services("e2e").Create(c.t.Context(), s, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

// vip waits for the Service's address.
func (c *cluster) vip(name string) string {
	var ip string
	eventually(c.t, 30*time.Second, "address of "+name, func() bool {
		s, err := c.client.CoreV1().Services("e2e").Get(c.t.Context(), name, metav1.GetOptions{})
		if err == nil && len(s.Status.LoadBalancer.Ingress) > 0 {
			ip = s.Status.LoadBalancer.Ingress[0].IP
		}
		return ip != ""
	})
	return ip
}

// holder waits until exactly one node holds vip and returns it.
func (c *cluster) holder(vip string, timeout time.Duration) string {
	var h []string
	eventually(c.t, timeout, "exactly one holder of "+vip, func() bool {
		h = c.tp.holders(vip)
		return len(h) == 1
	})
	return h[0]
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestVRRP covers issue scenarios 1, 3 and 4: one holder, reachable,
// holder recorded; crash and graceful failover measured from the client.
func TestVRRP(t *testing.T) {
	for _, advert := range []time.Duration{time.Second, 100 * time.Millisecond, 20 * time.Millisecond} {
		t.Run(advert.String(), func(t *testing.T) {
			c := newCluster(t)
			keeplbtest.CreatePool(t, c.dyn, "vips", fmt.Sprintf(`{addresses: ["10.77.0.200-10.77.0.250"], vrrp: {advertisementInterval: %q}}`, advert))
			metrics := map[string]string{}
			for _, ns := range c.tp.nodes {
				metrics[ns] = c.startWithMetrics(ns)
			}
			c.service("web")
			vip := c.vip("web")
			holder := c.holder(vip, 15*time.Second)

			// The client reaches the holder, and ARP resolves to it.
			ss, err := runProbe(t.Context(), c.tp.client, vip, 500*time.Millisecond, 50*time.Millisecond, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			answered := 0
			for _, s := range ss {
				if s.who == holder {
					answered++
				} else if s.who != "-" {
					t.Fatalf("%s answered for %s, held by %s", s.who, vip, holder)
				}
			}
			if answered == 0 {
				t.Fatalf("no answer from %s through %s", holder, vip)
			}
			if neigh := ip(t, "-n", c.tp.client, "neigh", "show", vip); !strings.Contains(neigh, c.tp.mac(holder)) {
				t.Fatalf("client ARP for %s = %q, want %s's MAC %s", vip, neigh, holder, c.tp.mac(holder))
			}
			eventually(t, 15*time.Second, "keeplb.io/holder annotation", func() bool {
				s, err := c.client.CoreV1().Services("e2e").Get(t.Context(), "web", metav1.GetOptions{})
				return err == nil && s.Annotations[annotations.Holder] == holder
			})
			eventually(t, 15*time.Second, "a VIPAcquired event naming "+holder, func() bool {
				evs, err := c.client.CoreV1().Events("e2e").List(t.Context(), metav1.ListOptions{FieldSelector: "involvedObject.name=web,reason=" + speaker.EventVIPAcquired})
				if err != nil {
					return false
				}
				for _, ev := range evs.Items {
					if strings.Contains(ev.Message, "Node "+holder+" holds "+vip) {
						return true
					}
				}
				return false
			})

			// Graceful: stop the holder's speaker; keepalived's priority-0
			// advert hands over at once.
			// The bound for a graceful stop: one advert interval plus
			// skew, plus the prober's 10 ms resolution.
			bound := advert + advert*time.Duration(256-vrrp.TopPriority+2)/256 + 10*time.Millisecond
			measure := func(name string, act func(), bound time.Duration) string {
				var wg sync.WaitGroup
				var ss []sample
				var perr error
				seen := make(chan struct{})
				wg.Add(1)
				go func() {
					defer wg.Done()
					// Up to 10 s: a loaded CI machine can be slow to
					// hand over, and bound, not the window, judges it.
					ss, perr = runProbe(context.Background(), c.tp.client, vip, 10*time.Second, 10*time.Millisecond, holder, seen)
				}()
				// Act once the prober has seen the holder answer, however
				// long the prober took to start.
				select {
				case <-seen:
				case <-time.After(10 * time.Second):
					wg.Wait()
					t.Fatalf("%s: the prober never reached %s through %s", name, holder, vip)
				}
				act()
				wg.Wait()
				if perr != nil {
					t.Fatal(perr)
				}
				if os.Getenv("KEEPLB_E2E_SAMPLES") != "" {
					for _, s := range ss {
						t.Logf("sample %s %s", s.at, s.who)
					}
				}
				g, newHolder, ok := gap(ss, holder)
				if !ok {
					t.Fatalf("%s: no other node answered after the %s failover", name, advert)
				}
				t.Logf("%s failover at advert %s: client saw %s without answers (bound %s); %s -> %s", name, advert, g, bound, holder, newHolder)
				if g > bound {
					t.Errorf("%s failover took %s, above %s", name, g, bound)
				}
				return newHolder
			}
			// The backup that must take over: the highest priority but the
			// holder's (the plan's second choice, or its first when a new
			// VIP started on the second; the others are vrrp.BackupGap
			// lower). Read before the stop.
			// The other nodes leave a new instance to its planned master
			// for a few seconds (vrrp.Hold.Deferred): wait until
			// keepalived runs it as BACKUP on both.
			c.waitBackups(vip, holder, metrics)
			second, best := "", 0
			for _, n := range c.tp.nodes {
				if p := priorityOf(t, n, vip); n != holder && p > best {
					second, best = n, p
				}
			}
			if best < vrrp.TopPriority-1 {
				t.Fatalf("the best backup of %s, %s, is at priority %d; want %d or more", vip, second, best, vrrp.TopPriority-1)
			}
			newHolder := measure("graceful", func() { c.stopSpeaker(holder) }, bound)
			if h := c.holder(vip, 5*time.Second); h != newHolder {
				t.Fatalf("holder after graceful failover is %s, client saw %s", h, newHolder)
			}
			to := "the planned second choice"
			if newHolder != second {
				to = "another backup than the planned second choice"
			}
			t.Logf("moves row: | graceful handover (SIGTERM to the holder's speaker, no hand-off), %s adverts | 1 move, to %s |", advert, to)
			switch {
			case newHolder == second:
			case advert >= 100*time.Millisecond:
				t.Errorf("graceful handover went to %s, not to the best backup %s", newHolder, second)
			default:
				// At 20 ms adverts the gap is 2.6 ms of skew, which a
				// loaded machine's scheduling can still lose: reported,
				// as docs/connections.md says.
				t.Logf("graceful handover at %s adverts went to %s, not to the best backup %s", advert, newHolder, second)
			}
			c.startSpeaker(holder)

			// Crash: take the holder's link down and kill its speaker.
			holder = newHolder
			crashBound := vrrp.MasterDown(advert, vrrp.TopPriority-2) + 300*time.Millisecond
			crashed := holder
			measure("crash", func() {
				ip(t, "-n", crashed, "link", "set", "eth0", "down")
				c.stopSpeaker(crashed)
			}, crashBound)
			others := slices.DeleteFunc(slices.Clone(c.tp.nodes), func(n string) bool { return n == crashed })
			eventually(t, 5*time.Second, "one holder among the others", func() bool {
				h := c.tp.holders(vip)
				return len(h) == 1 && slices.Contains(others, h[0])
			})
		})
	}
}

// startWithMetrics starts ns's speaker with plain-HTTP metrics on a free
// loopback address, and returns the address.
func (c *cluster) startWithMetrics(ns string) string {
	addr := keeplbtest.FreeAddr(c.t)
	c.speakers.Start(ns, func(o *speaker.Options) { o.MetricsBindAddress, o.MetricsSecure = addr, false })
	return addr
}

// waitBackups waits until keepalived runs vip's instance as BACKUP on every
// node but holder, by their speakers' metrics at metrics[node]: the other
// nodes leave a new instance, and those of other planned masters after
// their start, to the planned master for a few seconds (vrrp.Hold).
func (c *cluster) waitBackups(vip, holder string, metrics map[string]string) {
	c.t.Helper()
	eventually(c.t, 30*time.Second, "the other nodes BACKUP of "+vip, func() bool {
		for _, n := range c.tp.nodes {
			if n != holder && vrrpState(metrics[n], vip) != "0" {
				return false
			}
		}
		return true
	})
}

// vrrpState returns the value of keeplb_vrrp_state for vip that the
// speaker serving plain-HTTP metrics at addr reports ("1" MASTER, "0"
// BACKUP, "-1" FAULT), or "" when it reports none.
func vrrpState(addr, vip string) string {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "keeplb_vrrp_state{") && strings.Contains(line, `vip="`+vip+`"`) {
			f := strings.Fields(line)
			return f[len(f)-1]
		}
	}
	return ""
}

// priorityOf returns node's priority for the instance holding vip, from
// the keepalived.conf its speaker rendered (keeplbtest.RunDir);
// 0 if it has none.
func priorityOf(t *testing.T, node, vip string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(keeplbtest.RunDir(node), "keepalived.conf"))
	if err != nil {
		t.Fatal(err)
	}
	for _, block := range strings.Split(string(b), "vrrp_instance ")[1:] {
		if !strings.Contains(block, " "+vip+"/") {
			continue
		}
		for _, line := range strings.Split(block, "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "priority" {
				p, err := strconv.Atoi(f[1])
				if err != nil {
					t.Fatalf("%s's keepalived.conf: %q", node, line)
				}
				return p
			}
		}
	}
	return 0
}

// snapshot returns vip -> holders for each vip.
func (c *cluster) snapshot(vips []string) map[string][]string {
	out := map[string][]string{}
	for _, v := range vips {
		out[v] = c.tp.holders(v)
	}
	return out
}

// steady watches the holders of vips for d and fails at the first change.
func (c *cluster) steady(what string, vips []string, want map[string][]string, d time.Duration) {
	c.t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		for v, h := range c.snapshot(vips) {
			if !slices.Equal(h, want[v]) {
				c.t.Fatalf("%s: %s moved from %v to %v", what, v, want[v], h)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSpreadAndStability covers scenarios 2 and 6: 20 VIPs spread over
// three nodes within twice the fair share; restarting a speaker that holds
// nothing and adding a 21st VIP move none of them; a speaker that comes back
// takes nothing back before the preempt delay.
func TestSpreadAndStability(t *testing.T) {
	c := newCluster(t)
	keeplbtest.CreatePool(t, c.dyn, "vips", `{addresses: ["10.77.0.200-10.77.0.250"], vrrp: {advertisementInterval: "100ms"}}`)
	for _, ns := range c.tp.nodes {
		c.startSpeaker(ns)
	}
	var vips []string
	for i := range 20 {
		c.service(fmt.Sprintf("s%02d", i))
	}
	for i := range 20 {
		vips = append(vips, c.vip(fmt.Sprintf("s%02d", i)))
	}
	fair := (len(vips) + len(c.tp.nodes) - 1) / len(c.tp.nodes)
	// New instances start on their planned masters (the other nodes
	// defer them for a few seconds, vrrp.Hold): well within the preempt
	// delay.
	var count map[string]int
	start := time.Now()
	eventually(t, 30*time.Second, "20 VIPs spread within twice the fair share", func() bool {
		count = map[string]int{}
		for _, v := range vips {
			h := c.tp.holders(v)
			if len(h) != 1 {
				return false
			}
			count[h[0]]++
		}
		for _, k := range count {
			if k > 2*fair {
				return false
			}
		}
		return len(count) == 3
	})
	t.Logf("20 VIPs over 3 nodes after %s: %v (bound %d each)", time.Since(start).Round(100*time.Millisecond), count, 2*fair)
	// Settle: no move for a while means the plan is reached.
	before := c.snapshot(vips)
	c.steady("settled", vips, before, time.Second)

	// A 21st VIP moves none of the 20.
	c.service("s20")
	v21 := c.vip("s20")
	h21 := c.holder(v21, 15*time.Second)
	c.steady("adding a 21st VIP", vips, before, 2*time.Second)
	// It may join an instance that is MASTER already, for which keepalived
	// reports no state change: the holder is recorded all the same.
	eventually(t, 10*time.Second, "the holder of the 21st VIP recorded", func() bool {
		s, err := c.client.CoreV1().Services("e2e").Get(t.Context(), "s20", metav1.GetOptions{})
		return err == nil && s.Annotations[annotations.Holder] == h21
	})

	// A speaker that comes back takes nothing back before the delay.
	back := c.tp.holders(vips[0])[0]
	c.stopSpeaker(back)
	eventually(t, 10*time.Second, "VIPs to leave "+back, func() bool {
		for _, v := range vips {
			if h := c.tp.holders(v); len(h) != 1 || h[0] == back {
				return false
			}
		}
		return true
	})
	moved := c.snapshot(vips)
	c.startSpeaker(back)
	c.steady("a speaker coming back, within the preempt delay", vips, moved, vrrp.PreemptDelay/2)
	// Restarting it while it holds nothing moves nothing.
	c.stopSpeaker(back)
	c.startSpeaker(back)
	c.steady("restarting a speaker that holds nothing", vips, moved, 2*time.Second)
}

// TestUnicastAndLocal covers scenario 5: unicast adverts, and a Local
// Service's VIP held where its endpoint is, moving with it.
func TestUnicastAndLocal(t *testing.T) {
	c := newCluster(t)
	keeplbtest.CreatePool(t, c.dyn, "uni", `{addresses: ["10.77.0.200-10.77.0.220"], vrrp: {advertisementInterval: "100ms", unicast: true}}`)
	// Left behind by a crash: a pool address on a node. Not ours: a /32
	// outside every pool. The speaker removes the node1, keeps the second.
	node1 := c.tp.nodes[0]
	ip(t, "-n", node1, "addr", "add", "10.77.0.219/32", "dev", "eth0")
	ip(t, "-n", node1, "addr", "add", "10.77.0.99/32", "dev", "eth0")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	c.startSpeakerServing(node1, metricsAddr)
	for _, ns := range c.tp.nodes[1:] {
		c.startSpeaker(ns)
	}
	eventually(t, 10*time.Second, "the stale VIP removed at start", func() bool { return len(c.tp.holders("10.77.0.219")) == 0 })
	if h := c.tp.holders("10.77.0.99"); len(h) != 1 {
		t.Fatalf("an address outside every pool was touched: holders %v", h)
	}
	c.service("uni")
	vip := c.vip("uni")
	holder := c.holder(vip, 15*time.Second)
	token := keeplbtest.MetricsToken(t, c.client, "prometheus", true)
	eventually(t, 10*time.Second, "speaker metrics and health", func() bool {
		m, _, err := keeplbtest.Scrape("https://"+metricsAddr+"/metrics", token)
		if err != nil {
			return false
		}
		want := fmt.Sprintf(`keeplb_vrrp_state{node=%q,vip=%q}`, node1, vip)
		_, h, err := keeplbtest.Scrape("https://"+metricsAddr+"/healthz", "")
		return err == nil && h == 200 && strings.Contains(m, "keeplb_keepalived_up 1") && strings.Contains(m, want)
	})
	// VIPs and node names are for the monitoring's eyes only.
	if body, code, err := keeplbtest.Scrape("https://"+metricsAddr+"/metrics", ""); code != 401 {
		t.Errorf("the speaker's /metrics without a token = %d %q %v, want 401", code, body, err)
	}
	c.stopSpeaker(holder)
	if h := c.holder(vip, 5*time.Second); h == holder {
		t.Fatal("unicast: the VIP did not move when its holder stopped")
	}
	c.startSpeaker(holder)

	c.service("local", func(s *v1.Service) { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal })
	lvip := c.vip("local")
	first := c.holder(lvip, 15*time.Second)
	// Put the only endpoint on another node: the VIP follows it.
	target := c.tp.nodes[0]
	if target == first {
		target = c.tp.nodes[1]
	}
	ready := true
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "e2e", Name: "local-1", Labels: map[string]string{discoveryv1.LabelServiceName: "local"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.5"}, NodeName: &target, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}
	created, err := c.client.DiscoveryV1().EndpointSlices("e2e").Create(t.Context(), es, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the Local VIP on the endpoint's node "+target, func() bool {
		h := c.tp.holders(lvip)
		return len(h) == 1 && h[0] == target
	})
	// The endpoint moves: so does the VIP.
	next := c.tp.nodes[2]
	if next == target {
		next = c.tp.nodes[0]
	}
	created.Endpoints[0].NodeName = &next
	if _, err := c.client.DiscoveryV1().EndpointSlices("e2e").Update(t.Context(), created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the Local VIP to follow its endpoint to "+next, func() bool {
		h := c.tp.holders(lvip)
		return len(h) == 1 && h[0] == next
	})
}
