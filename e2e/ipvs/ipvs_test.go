// Package ipvs_e2e is the dataplane's end-to-end test: keeplb's speakers,
// each with a real keepalived and IPVS, forward real traffic in a lab of
// network namespaces (pkg/testing/lab: 3 nodes with pods, two clients), driven by
// a real kube-apiserver and keeplb's controller.
//
// The API server and the controller run on the host. The node side needs a
// kernel with IPVS: where the host lacks it, the test re-runs itself in the
// VM of hack/vm, which reaches the host's API server over qemu's user-mode
// network (10.0.2.2 is the host's loopback there). It needs root,
// iproute2, keepalived, ipvsadm and qemu (hack/vm/build.sh installs what is
// missing); it skips with the reason otherwise.
package ipvs_e2e

import (
	"context"
	"flag"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nsthread"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

var kubeconfig = flag.String("lab.kubeconfig", "", "internal: the node side's kubeconfig when the test runs in the VM")

// TestDataplane runs the scenarios of the dataplane on a real IPVS kernel.
func TestDataplane(t *testing.T) { onIPVSKernel(t, scenarios) }

// onIPVSKernel runs node with a config for the API server, where the
// kernel has IPVS: on the host if it has, else in the VM of hack/vm (each
// top-level test boots one), with the API server and keeplb's controller
// on the host.
func onIPVSKernel(t *testing.T, node func(*testing.T, *rest.Config)) {
	if *kubeconfig != "" { // the node side, in the VM
		cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		node(t, cfg)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	for _, bin := range []string{"ip", "keepalived", "ipvsadm"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (apt-get install iproute2 keepalived ipvsadm)", bin)
		}
	}
	hostIPVS := ipvs.Available() == nil
	if !hostIPVS {
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			t.Skipf("the host kernel has no IPVS and %v", vm.ErrNoQEMU)
		}
	}
	cp := controlplane.StartForTest(t)
	keeplbtest.Install(t, cp)
	keeplbtest.StartController(t, cp)
	if hostIPVS {
		node(t, cp.AdminConfig())
		return
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	// The API server's certificate names "kubernetes", not 10.0.2.2.
	if err := vm.WriteKubeconfig(cp.KubeconfigPath(), path, "kubernetes"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	args := []string{"-lab.kubeconfig=" + path}
	if *streamsTable {
		args = append(args, "-streams.table")
	}
	if *streamsRolling {
		args = append(args, "-streams.rolling")
	}
	opts := vm.Options{Net: true, Memory: "1536M", Shares: []string{dir}}
	if t.Name() == "TestStreams" && !*streamsTable {
		// Its default run takes about 3 minutes; a guest kernel stuck in
		// softirq (seen once: docs/connections.md) must not take the
		// package's 30.
		opts.Timeout = 8 * time.Minute
	}
	vm.RunSelfWith(t, opts, args...)
	t.Logf("VM run (boot, scenarios, shutdown): %s", time.Since(start).Round(100*time.Millisecond))
}

// Foreign is a virtual server keeplb must leave alone: what kube-proxy's
// IPVS mode would program for a ClusterIP.
const foreign = "10.96.0.10:53"

// advert is the pools' VRRP advertisement interval.
const advert = 200 * time.Millisecond

func scenarios(t *testing.T, cfg *rest.Config) {
	began := time.Now()
	c := newCluster(t, cfg)
	client, clientIP, err := c.lab.AddClient("client")
	if err != nil {
		t.Fatal(err)
	}
	outsider, _, err := c.lab.AddClient("outsider")
	if err != nil {
		t.Fatal(err)
	}
	// One pod per node, serving HTTP and UDP on 8080; and on each node a
	// responder on NodePort 30080, standing for kube-proxy's NodePort
	// forwarding to a pod of that node.
	var pods []*lab.Pod
	for i, n := range c.lab.Nodes {
		p, err := c.lab.AddPod(n, "pod"+string(rune('a'+i)))
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
		serve(t, c, p.Name, netip.AddrPortFrom(p.IP, 8080), p.Name)
		serve(t, c, n.Name, netip.AddrPortFrom(n.IP, 30080), n.Name)
		// What the speaker DaemonSet's init container runs on a real
		// node; with --netns the speaker leaves the namespace's sysctls
		// alone. A new namespace starts with vs.conntrack=0, without which
		// nothing below is masqueraded.
		if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: n.Name}); err != nil {
			t.Fatal(err)
		}
		for name, want := range map[string]string{"ipv4/vs/conntrack": "1", "ipv4/vs/expire_nodest_conn": "1", "ipv4/ip_forward": "1", "ipv4/conf/all/arp_ignore": "1"} {
			got, err := nsthread.Call(nsthread.Path(n.Name), func() ([]byte, error) { return os.ReadFile("/proc/sys/net/" + name) })
			if err != nil || strings.TrimSpace(string(got)) != want {
				t.Fatalf("%s after prepare-node: net/%s = %q (%v), want %s", n.Name, name, got, err, want)
			}
		}
		c.ipvsadm(n.Name, "-A", "-t", foreign, "-s", "rr")
		c.ipvsadm(n.Name, "-a", "-t", foreign, "-r", p.IP.String()+":53", "-m")
	}
	foreignBefore := map[string]string{}
	for _, n := range c.lab.Nodes {
		foreignBefore[n.Name] = c.ipvsadm(n.Name, "-Ln", "-t", foreign)
	}

	keeplbtest.CreatePool(t, c.dyn, "lab", `{addresses: ["`+lab.VIPRange+`"], forwarding: pod, vrrp: {advertisementInterval: "`+advert.String()+`"}}`)
	for _, n := range c.lab.Nodes {
		c.startSpeaker(n.Name)
	}
	all := []endpoint{ready(pods[0]), ready(pods[1]), ready(pods[2])}
	port := func(vip netip.Addr) netip.AddrPort { return netip.AddrPortFrom(vip, 80) }

	// 1. nodeport and pod forwarding, rr and sh.
	t.Run("nodeport/rr", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("np", v1.ProtocolTCP, func(s *v1.Service) {
			s.Annotations[annotations.Forwarding] = "nodeport"
			s.Spec.Ports[0].NodePort = 30080
		})
		c.slice("np", v1.ProtocolTCP, all...)
		holder := c.servedBy(vip, 3)
		got := names(c.answers(client, port(vip), 6))
		// The other nodes' NodePorts, and the holder's own pod in place of
		// its own NodePort, which IPVS cannot reach.
		var want []string
		for i, n := range c.lab.Nodes {
			if n.Name == holder {
				want = append(want, pods[i].Name)
			} else {
				want = append(want, n.Name)
			}
		}
		checkRR(t, got, want)
		t.Logf("VIP %s held by %s; 6 requests answered by %v", vip, holder, got)
	})
	var rrVIP netip.Addr
	t.Run("pod/rr", func(t *testing.T) {
		c := c.at(t)
		rrVIP = c.service("rr", v1.ProtocolTCP)
		c.slice("rr", v1.ProtocolTCP, all...)
		holder := c.servedBy(rrVIP, 3)
		as := c.answers(client, port(rrVIP), 6)
		checkRR(t, names(as), []string{pods[0].Name, pods[1].Name, pods[2].Name})
		// 2. Cluster: masqueraded, the pods see the holder, not the client.
		for _, a := range as {
			if a.From.Addr() == clientIP {
				t.Errorf("%s saw the client's address %s with externalTrafficPolicy Cluster; want the holder's (masqueraded)", a.Name, a.From)
			}
		}
		t.Logf("VIP %s held by %s; answers %v, seen from %v", rrVIP, holder, names(as), as[0].From.Addr())
	})
	t.Run("pod/sh", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("sh", v1.ProtocolTCP, func(s *v1.Service) { s.Annotations[annotations.Scheduler] = "sh" })
		c.slice("sh", v1.ProtocolTCP, all...)
		c.servedBy(vip, 3)
		got := names(c.answers(client, port(vip), 8))
		if len(slices.Compact(slices.Sorted(slices.Values(got)))) != 1 {
			t.Errorf("sh scheduler: one client was answered by %v; want one pod every time", got)
		}
	})
	// A scheduler this kernel has no module for (the VM has none for sed):
	// every node's kernel refuses that virtual server, and each speaker
	// says so on the Service, naming the annotation and the module.
	t.Run("missing-scheduler", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("nosched", v1.ProtocolTCP, func(s *v1.Service) { s.Annotations[annotations.Scheduler] = "sed" })
		c.slice("nosched", v1.ProtocolTCP, all...)
		var last []string
		c.eventually(30*time.Second, "a ForwardingProblem event from every node naming the missing scheduler", func() bool {
			evs, err := c.client.CoreV1().Events(ns).List(t.Context(), metav1.ListOptions{FieldSelector: "involvedObject.name=nosched,reason=" + speaker.EventForwardingProblem})
			if err != nil {
				return false
			}
			last = last[:0]
			for _, ev := range evs.Items {
				last = append(last, ev.Message)
			}
			for _, n := range c.lab.Nodes {
				if !slices.ContainsFunc(last, func(m string) bool {
					return strings.Contains(m, "node "+n.Name+"'s kernel has no IPVS scheduler \"sed\"") && strings.Contains(m, "modprobe ip_vs_sed")
				}) {
					return false
				}
			}
			return true
		})
		t.Logf("events: %q", last)
		for _, n := range c.lab.Nodes {
			if got := c.ipvsadm(n.Name, "-Ln"); strings.Contains(got, port(vip).String()+" ") {
				t.Errorf("%s has a virtual server for %s with a scheduler it lacks:\n%s", n.Name, vip, got)
			}
		}
		if err := c.client.CoreV1().Services(ns).Delete(t.Context(), "nosched", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	// 2. Local + pod: only the holder's pod, and it sees the client.
	t.Run("pod/local", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("local", v1.ProtocolTCP, func(s *v1.Service) {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		})
		c.slice("local", v1.ProtocolTCP, all...)
		holder := c.servedBy(vip, 1)
		local := pods[slices.IndexFunc(pods, func(p *lab.Pod) bool { return p.Node == holder })]
		for _, a := range c.answers(client, port(vip), 4) {
			if a.Name != local.Name || a.From.Addr() != clientIP {
				t.Errorf("Local: answered by %s seeing %s; want %s (on holder %s) seeing the client %s", a.Name, a.From, local.Name, holder, clientIP)
			}
		}
	})
	// 7. loadBalancerSourceRanges.
	t.Run("source-ranges", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("ranges", v1.ProtocolTCP, func(s *v1.Service) {
			s.Spec.LoadBalancerSourceRanges = []string{clientIP.String() + "/32"}
		})
		c.slice("ranges", v1.ProtocolTCP, all...)
		c.servedBy(vip, 3)
		c.answers(client, port(vip), 2)
		if a, err := lab.Get(t.Context(), outsider, port(vip), "/", time.Second); err == nil {
			t.Errorf("a client outside loadBalancerSourceRanges was answered by %s", a.Name)
		}
	})
	// 6. UDP, through a backend change.
	t.Run("udp", func(t *testing.T) {
		c := c.at(t)
		vip := c.service("udp", v1.ProtocolUDP)
		c.slice("udp", v1.ProtocolUDP, all...)
		c.holder(vip)
		u, err := lab.NewUDPClient(client)
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		var first lab.Answer
		c.eventually(10*time.Second, "a UDP answer through "+vip.String(), func() bool {
			first, err = u.Query(port(vip), 500*time.Millisecond)
			return err == nil
		})
		var rest []endpoint
		for _, p := range pods {
			if p.Name != first.Name {
				rest = append(rest, ready(p))
			}
		}
		c.slice("udp", v1.ProtocolUDP, rest...)
		t0 := time.Now()
		var a lab.Answer
		c.eventually(10*time.Second, "a UDP answer from another pod than "+first.Name+" on the same client port", func() bool {
			a, err = u.Query(port(vip), 300*time.Millisecond)
			return err == nil && a.Name != first.Name
		})
		t.Logf("UDP: %s answered first; after it left the slice, %s answered %s later on the same client port", first.Name, a.Name, fmtGap(time.Since(t0)))
	})
	// 3. Unready stops new connections; terminating drains.
	t.Run("unready-and-drain", func(t *testing.T) {
		c := c.at(t)
		holder := c.holder(rrVIP)
		c.slice("rr", v1.ProtocolTCP, ready(pods[0]), endpoint{pod: pods[1]}, ready(pods[2]))
		c.eventually(10*time.Second, pods[1].Name+" out of IPVS", func() bool {
			return !strings.Contains(c.ipvsadm(holder, "-Ln", "-t", port(rrVIP).String()), pods[1].IP.String())
		})
		for _, n := range names(c.answers(client, port(rrVIP), 6)) {
			if n == pods[1].Name {
				t.Errorf("unready %s got a new connection", n)
			}
		}
		// Only pods[2] ready: the slow request is bound to reach it.
		c.slice("rr", v1.ProtocolTCP, endpoint{pod: pods[0]}, endpoint{pod: pods[1]}, ready(pods[2]))
		c.eventually(10*time.Second, "only "+pods[2].Name+" in IPVS", func() bool {
			out := c.ipvsadm(holder, "-Ln", "-t", port(rrVIP).String())
			return !strings.Contains(out, pods[0].IP.String()) && !strings.Contains(out, pods[1].IP.String())
		})
		type result struct {
			a   lab.Answer
			err error
		}
		slow := make(chan result, 1)
		go func() {
			a, err := lab.Get(context.Background(), client, port(rrVIP), "/slow?ms=4000", 20*time.Second)
			slow <- result{a, err}
		}()
		c.eventually(5*time.Second, "the slow connection established in IPVS", func() bool {
			return strings.Contains(c.ipvsadm(holder, "-Lnc"), "ESTABLISHED")
		})
		c.slice("rr", v1.ProtocolTCP, ready(pods[0]), ready(pods[1]), endpoint{pod: pods[2], serving: true, terminating: true})
		c.eventually(10*time.Second, pods[2].Name+" at weight 0", func() bool {
			for _, line := range strings.Split(c.ipvsadm(holder, "-Ln", "-t", port(rrVIP).String()), "\n") {
				if f := strings.Fields(line); len(f) >= 4 && strings.HasPrefix(f[1], pods[2].IP.String()+":") {
					return f[3] == "0"
				}
			}
			return false
		})
		for _, n := range names(c.answers(client, port(rrVIP), 4)) {
			if n == pods[2].Name {
				t.Errorf("terminating %s got a new connection", n)
			}
		}
		r := <-slow
		if r.err != nil || r.a.Name != pods[2].Name {
			t.Errorf("the connection established before %s began terminating: %v, %v; want it completed by %s", pods[2].Name, r.a, r.err, pods[2].Name)
		}
		c.slice("rr", v1.ProtocolTCP, all...)
	})
	// 4. Failover under load.
	t.Run("failover", func(t *testing.T) {
		c := c.at(t)
		old := c.holder(rrVIP)
		var mu sync.Mutex
		type sample struct {
			at time.Time
			ok bool
		}
		var samples []sample
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				at := time.Now()
				_, err := lab.Get(context.Background(), client, port(rrVIP), "/", 250*time.Millisecond)
				mu.Lock()
				samples = append(samples, sample{at, err == nil})
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
		time.Sleep(time.Second)
		killed := time.Now()
		if err := lab.SetLink(old, false); err != nil {
			t.Fatal(err)
		}
		c.stopSpeaker(old)
		var next string
		c.eventually(30*time.Second, "a new holder", func() bool {
			h := c.holders(rrVIP)
			h = slices.DeleteFunc(h, func(n string) bool { return n == old })
			if len(h) == 1 {
				next = h[0]
			}
			return next != ""
		})
		// Keep probing until traffic has flowed for a while again.
		c.eventually(30*time.Second, "traffic resumed", func() bool {
			mu.Lock()
			defer mu.Unlock()
			ok := 0
			for _, s := range samples {
				if s.at.After(killed) && s.ok {
					ok++
				}
			}
			return ok >= 10
		})
		close(stop)
		wg.Wait()
		// The gap is the longest time between two answered requests:
		// what a client retrying at once would have waited.
		slices.SortFunc(samples, func(a, b sample) int { return a.at.Compare(b.at) })
		failed, gap, prev := 0, time.Duration(0), time.Time{}
		for _, s := range samples {
			if !s.ok {
				failed++
				continue
			}
			if !prev.IsZero() && s.at.Sub(prev) > gap {
				gap = s.at.Sub(prev)
			}
			prev = s.at
		}
		// The VRRP bound (3 adverts and skew), the prober's timeout and
		// period, and slack for the VM's emulated CPUs.
		bound := 3*advert + advert + 250*time.Millisecond + 20*time.Millisecond + 2*time.Second
		t.Logf("failover %s → %s under load: %d requests, %d failed, gap %s (bound %s)", old, next, len(samples), failed, fmtGap(gap), fmtGap(bound))
		if gap > bound {
			t.Errorf("traffic resumed after %s; want within %s", gap, bound)
		}
		if err := c.lab.SetNodeLink(old, true); err != nil {
			t.Fatal(err)
		}
	})
	// 5. Foreign virtual servers: untouched by every sync, and at exit.
	t.Run("foreign", func(t *testing.T) {
		c := c.at(t)
		for _, n := range c.lab.Nodes {
			if got := c.ipvsadm(n.Name, "-Ln", "-t", foreign); got != foreignBefore[n.Name] {
				t.Errorf("%s: the foreign virtual server changed:\n%s\nwas:\n%s", n.Name, got, foreignBefore[n.Name])
			}
		}
		for _, n := range c.lab.Nodes {
			c.stopSpeaker(n.Name)
			got := c.ipvsadm(n.Name, "-Ln")
			if !strings.Contains(got, foreign) {
				t.Errorf("%s: the foreign virtual server is gone after the speaker exited:\n%s", n.Name, got)
			}
			if strings.Contains(got, "10.70.0.2") { // VIPs are 10.70.0.200-250
				t.Errorf("%s: keeplb's virtual servers are left after the speaker exited:\n%s", n.Name, got)
			}
		}
	})
	t.Logf("scenarios took %s", time.Since(began).Round(100*time.Millisecond))
}

// checkRR checks that got cycles through all of want, in the order IPVS
// chose: the first len(want) answers are distinct, then they repeat.
func checkRR(t *testing.T, got, want []string) {
	t.Helper()
	n := len(want)
	first := slices.Sorted(slices.Values(got[:n]))
	if !slices.Equal(first, slices.Sorted(slices.Values(want))) {
		t.Fatalf("rr: answers %v; want each of %v once per round", got, want)
	}
	for k := n; k < len(got); k++ {
		if got[k] != got[k%n] {
			t.Fatalf("rr: answers %v do not repeat one order of %v", got, want)
		}
	}
}

func serve(t *testing.T, c *cluster, ns string, addr netip.AddrPort, name string) {
	s, err := lab.Serve(ns, addr, name)
	if err != nil {
		t.Fatal(err)
	}
	c.lab.OnClose(s.Close)
}
