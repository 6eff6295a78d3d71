package cluster_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keeplb/keeplb/pkg/testing/cluster"
)

// checkInClusterClients: a pod, a node that does not hold the VIP and the
// node that holds it each reach the VIP of a Service in each forwarding
// mode.
func checkInClusterClients(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	for _, name := range []string{"web", "pod-cluster", "via-kube-proxy"} {
		t.Run(name, func(t *testing.T) {
			ip, _ := ingress(t, c, "demo", name)
			url := fmt.Sprintf("http://%s:%d/", ip, servicePort(t, c, "demo", name))
			h := holder(t, c, ip)
			var other string
			for _, n := range c.Nodes {
				if n != h {
					other = n
					break
				}
			}
			pods, err := c.Client.CoreV1().Pods("demo").List(ctx, metav1.ListOptions{LabelSelector: "app=web", FieldSelector: "spec.nodeName=" + other})
			if err != nil || len(pods.Items) == 0 {
				t.Fatalf("no web pod on %s: %v", other, err)
			}
			pod := pods.Items[0].Name
			clients := []struct {
				who string
				get func() (string, error)
			}{
				{"pod " + pod + " on " + other, func() (string, error) {
					return c.Kubectl(ctx, "exec", "-n", "demo", pod, "--", "/echo", "get", url)
				}},
				{"node " + other + " (not the holder)", func() (string, error) { return c.GetFrom(ctx, other, url) }},
				{"node " + h + " (the holder)", func() (string, error) { return c.GetFrom(ctx, h, url) }},
			}
			for _, cl := range clients {
				start := time.Now()
				var body string
				tries := 0
				err := poll(ctx, 30*time.Second, func() error {
					var err error
					tries++
					body, err = cl.get()
					if err == nil && answer.FindStringSubmatch(strings.TrimSpace(body)) == nil {
						err = fmt.Errorf("not the echo backend's answer: %q", body)
					}
					return err
				})
				if err != nil {
					t.Errorf("%s cannot reach %s (%s): %v", cl.who, url, name, err)
					continue
				}
				t.Logf("%s → %s: %s (%s, %d tries)", cl.who, url, strings.TrimSpace(body), time.Since(start).Round(time.Millisecond), tries)
			}
		})
	}
}

// burstPool is a pool for the 50 Services of checkLeaderKill, on the same
// segment as the examples' (which has room for 51).
const burstPool = `apiVersion: keeplb.io/v1alpha1
kind: IPPool
metadata: {name: burst}
spec:
  addresses: [172.18.0.100-172.18.0.179]
`

// lbService is a LoadBalancer Service of the demo backend, in pool.
func lbService(name, pool string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", Annotations: map[string]string{"keeplb.io/pool": pool}},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
}

// addresses returns the first ingress address of every Service in demo.
func addresses(t *testing.T, c *cluster.Cluster) map[string]string {
	t.Helper()
	svcs, err := c.Client.CoreV1().Services("demo").List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, s := range svcs.Items {
		if len(s.Status.LoadBalancer.Ingress) > 0 {
			out[s.Name] = s.Status.LoadBalancer.Ingress[0].IP
		}
	}
	return out
}

// sameAddresses fails t for every Service of before whose address changed.
func sameAddresses(t *testing.T, before, after map[string]string) {
	t.Helper()
	for name, ip := range before {
		if after[name] != ip {
			t.Errorf("service %s: %s became %q", name, ip, after[name])
		}
	}
}

// leader returns the identity in the controller's Lease.
func leader(t *testing.T, c *cluster.Cluster) string {
	t.Helper()
	l, err := c.Client.CoordinationV1().Leases("keeplb-system").Get(t.Context(), "keeplb-controller", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// checkLeaderKill: 50 Services get addresses; the leading replica's pod is
// deleted; the other replica leads, every Service keeps its address, and a
// Service created afterwards gets one that no other Service has.
func checkLeaderKill(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	pool := filepath.Join(t.TempDir(), "pool.yaml")
	if err := os.WriteFile(pool, []byte(burstPool), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := c.Kubectl(ctx, "apply", "--server-side", "-f", pool); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for i := range 50 {
		if _, err := c.Client.CoreV1().Services("demo").Create(ctx, lbService(fmt.Sprintf("burst-%02d", i), "burst"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	var before map[string]string
	err := poll(ctx, serviceTimeout, func() error {
		before = addresses(t, c)
		for i := range 50 {
			if before[fmt.Sprintf("burst-%02d", i)] == "" {
				return fmt.Errorf("burst-%02d has no address", i)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("50 Services assigned in %s", time.Since(start).Round(time.Millisecond))
	old := leader(t, c)
	if old == "" {
		t.Fatal("the controller's Lease has no holder")
	}
	start = time.Now()
	if err := c.Client.CoreV1().Pods("keeplb-system").Delete(ctx, old, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete the leader %s: %v", old, err)
	}
	var now string
	err = poll(ctx, 2*time.Minute, func() error {
		now = leader(t, c)
		if now == "" || now == old {
			return fmt.Errorf("the Lease is still %q", now)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("leader %s deleted; %s leads after %s", old, now, time.Since(start).Round(time.Millisecond))
	if _, err := c.Client.CoreV1().Services("demo").Create(ctx, lbService("after-leader", "burst"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ip, _ := ingress(t, c, "demo", "after-leader")
	after := addresses(t, c)
	sameAddresses(t, before, after)
	for name, other := range before {
		if other == ip && !strings.HasPrefix(name, "shared-") {
			t.Errorf("after-leader got %s, which %s has", ip, name)
		}
	}
	for i := range 50 {
		_ = c.Client.CoreV1().Services("demo").Delete(ctx, fmt.Sprintf("burst-%02d", i), metav1.DeleteOptions{})
	}
	_ = c.Client.CoreV1().Services("demo").Delete(ctx, "after-leader", metav1.DeleteOptions{})
}

// load sends requests to url from the host side, a new connection every
// 20 ms, and counts them, until stop is called; it also samples which node
// holds vip and counts the moves.
type load struct {
	ok, failed, moves atomic.Int64
	// gap is the longest run of time without a successful request.
	gap   atomic.Int64
	stop  func()
	wg    sync.WaitGroup
	first string
}

func startLoad(t *testing.T, c *cluster.Cluster, url, vip string) *load {
	ctx, cancel := context.WithCancel(t.Context())
	l := &load{stop: cancel}
	l.first = holder(t, c, vip)
	l.wg.Add(2)
	go func() {
		defer l.wg.Done()
		last := time.Now()
		for ctx.Err() == nil {
			rctx, rcancel := context.WithTimeout(ctx, 500*time.Millisecond)
			_, err := cluster.Get(rctx, url)
			rcancel()
			switch {
			case ctx.Err() != nil:
			case err == nil:
				l.ok.Add(1)
				if g := int64(time.Since(last)); g > l.gap.Load() {
					l.gap.Store(g)
				}
				last = time.Now()
			default:
				l.failed.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	go func() {
		defer l.wg.Done()
		cur := l.first
		for ctx.Err() == nil {
			if on := holdersOf(ctx, c, vip); len(on) > 0 && on[0] != cur {
				l.moves.Add(1)
				cur = on[0]
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()
	return l
}

func (l *load) finish() string {
	l.stop()
	l.wg.Wait()
	return fmt.Sprintf("%d requests, %d failed, longest gap %s, VIP moves %d",
		l.ok.Load()+l.failed.Load(), l.failed.Load(), time.Duration(l.gap.Load()).Round(time.Millisecond), l.moves.Load())
}

// checkRollout: `kubectl rollout restart daemonset/keeplb-speaker` while a
// client sends requests; the failed requests and VIP moves are reported
// (a figure to improve, not a bound), and every speaker is Ready after.
func checkRollout(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	ip, _ := ingress(t, c, "demo", "web")
	l := startLoad(t, c, fmt.Sprintf("http://%s:80/", ip), ip)
	start := time.Now()
	if out, err := c.Kubectl(ctx, "rollout", "restart", "-n", "keeplb-system", "daemonset/keeplb-speaker"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if out, err := c.Kubectl(ctx, "rollout", "status", "-n", "keeplb-system", "daemonset/keeplb-speaker", "--timeout="+rolloutTimeout.String()); err != nil {
		l.finish()
		t.Fatalf("%v: %s\n%s", err, out, c.Diagnose(ctx))
	}
	took := time.Since(start)
	time.Sleep(3 * time.Second) // the client's view after the last pod
	t.Logf("rollout restart of the speakers took %s: %s", took.Round(time.Second), l.finish())
	t.Logf("the speakers' pods, from the restart:\n%s", timeline(t, c, "keeplb-system", start))
	reach(t, fmt.Sprintf("http://%s:80/", ip))
}

// checkUpgrade: from the image stamped v0.0.1 to v0.0.2 by applying the
// overlay with the new tag: every keeplb pod runs and reports v0.0.2, and
// no Service changes address.
func checkUpgrade(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	start := time.Now()
	before := addresses(t, c)
	dir := kustomizeOverlay(t, imageV2)
	if out, err := c.Kubectl(ctx, "apply", "--server-side", "-k", dir); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, w := range []string{"daemonset/keeplb-speaker", "deployment/keeplb-controller"} {
		if out, err := c.Kubectl(ctx, "rollout", "status", "-n", "keeplb-system", w, "--timeout="+rolloutTimeout.String()); err != nil {
			t.Fatalf("%v: %s\n%s", err, out, c.Diagnose(ctx))
		}
	}
	t.Logf("keeplb's pods, from the new apply:\n%s", timeline(t, c, "keeplb-system", start))
	pods := waitKeeplb(t, c)
	ctrl, err := c.Client.CoreV1().Pods("keeplb-system").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=controller"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range append(pods, ctrl.Items...) {
		if p.DeletionTimestamp != nil {
			continue
		}
		out, err := c.Kubectl(ctx, "exec", "-n", "keeplb-system", p.Name, "-c", p.Spec.Containers[0].Name, "--", "keeplb", "version")
		if err != nil || !strings.Contains(out, "v0.0.2") {
			t.Errorf("%s reports %q (%v), want v0.0.2", p.Name, strings.TrimSpace(out), err)
		}
	}
	sameAddresses(t, before, addresses(t, c))
	t.Logf("upgrade to v0.0.2 done in %s; %d Services kept their addresses", time.Since(start).Round(time.Second), len(before))
}

// deleteServices deletes every LoadBalancer Service, as docs/install.md's
// Uninstall says to first, and waits until they are gone (the controller
// removes its finalizer).
func deleteServices(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	if out, err := c.Kubectl(ctx, "delete", "service", "-n", "demo", "--all", "--wait=false"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	err := poll(ctx, serviceTimeout, func() error {
		svcs, err := c.Client.CoreV1().Services("demo").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(svcs.Items) > 0 {
			return fmt.Errorf("%d Services left, e.g. %s with finalizers %v", len(svcs.Items), svcs.Items[0].Name, svcs.Items[0].Finalizers)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// vipOnNode matches an address of the tests' pools (.100 and above).
var vipOnNode = regexp.MustCompile(` 172\.18\.0\.(1\d\d|2\d\d)/`)

// checkClean: on every node that runs: no VIP of the range on an
// interface, no IPVS virtual server, no `inet keeplb` table, no keepalived.
func checkClean(t *testing.T, c *cluster.Cluster, nodes []string) {
	ctx := t.Context()
	err := poll(ctx, 2*time.Minute, func() error {
		var problems []string
		for _, n := range nodes {
			addrs, err := c.Exec(ctx, n, "ip", "-4", "-o", "addr", "show")
			if err != nil {
				return err
			}
			if vipOnNode.MatchString(addrs) {
				problems = append(problems, n+": a VIP is still on an interface:\n"+addrs)
			}
			vs, err := c.Exec(ctx, n, "ipvsadm", "-Ln")
			if err != nil {
				return err
			}
			if strings.Contains(vs, "TCP ") || strings.Contains(vs, "UDP ") {
				problems = append(problems, n+": IPVS virtual servers are left:\n"+vs)
			}
			tables, err := c.Exec(ctx, n, "nft", "list", "tables")
			if err != nil {
				return err
			}
			if strings.Contains(tables, "inet keeplb") {
				problems = append(problems, n+": the inet keeplb table is left")
			}
		}
		ps, err := c.Exec(ctx, "", "sh", "-c", `for p in /proc/[0-9]*; do read -r c < $p/comm 2>/dev/null; [ "$c" = keepalived ] && echo $p; done; true`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(ps) != "" {
			problems = append(problems, "keepalived still runs: "+strings.Join(strings.Fields(ps), " "))
		}
		if len(problems) > 0 {
			return fmt.Errorf("%s", strings.Join(problems, "\n"))
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// waitGone waits until keeplb's pods are gone, but those of a crashed
// node (its kubelet cannot confirm their end), and, if ns is set, the
// namespace too.
func waitGone(t *testing.T, c *cluster.Cluster, ns bool, crashed string) {
	ctx := t.Context()
	err := poll(ctx, 3*time.Minute, func() error {
		pods, err := c.Client.CoreV1().Pods("keeplb-system").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		left := 0
		for _, p := range pods.Items {
			if crashed == "" || p.Spec.NodeName != crashed {
				left++
			}
		}
		if left > 0 {
			return fmt.Errorf("%d keeplb pods left", left)
		}
		if ns {
			_, err := c.Client.CoreV1().Namespaces().Get(ctx, "keeplb-system", metav1.GetOptions{})
			if !apierrors.IsNotFound(err) {
				return fmt.Errorf("namespace keeplb-system still there (%w)", err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.Diagnose(ctx))
	}
}

// helm runs the tools' helm against the cluster.
func helm(t *testing.T, c *cluster.Cluster, args ...string) string {
	t.Helper()
	bin := filepath.Join(toolsDir(t), "helm")
	cmd := exec.CommandContext(t.Context(), bin, append([]string{"--kubeconfig", c.KubeconfigPath()}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// checkFailover: the holder of a VIP crashes (link down, then every process
// of the node killed); another node serves it. The gap a client sees is
// measured: the longest time without a successful request.
func checkFailover(t *testing.T, c *cluster.Cluster) string {
	ctx := t.Context()
	ip, _ := ingress(t, c, "demo", "web")
	url := fmt.Sprintf("http://%s:80/", ip)
	reach(t, url)
	l := startLoad(t, c, url, ip)
	time.Sleep(2 * time.Second)
	crashed := l.first
	start := time.Now()
	if err := c.Crash(ctx, crashed); err != nil {
		l.finish()
		t.Fatal(err)
	}
	var now string
	err := poll(ctx, time.Minute, func() error {
		for _, n := range holdersOf(ctx, c, ip) {
			if n != crashed {
				now = n
				return nil
			}
		}
		return fmt.Errorf("no other node holds %s", ip)
	})
	if err != nil {
		l.finish()
		t.Fatal(err)
	}
	held := time.Since(start)
	// The client goes on until the NodePorts of the crashed node are no
	// longer used (it turns NotReady) or a minute passes.
	time.Sleep(10 * time.Second)
	t.Logf("failover: %s crashed; %s held %s after %s; client: %s", crashed, now, ip, held.Round(time.Millisecond), l.finish())
	return crashed
}

// timeline lists the events of namespace's pods since start, oldest first,
// with the time since start: where a rollout spends its time.
func timeline(t *testing.T, c *cluster.Cluster, namespace string, start time.Time) string {
	evs, err := c.Client.CoreV1().Events(namespace).List(t.Context(), metav1.ListOptions{FieldSelector: "involvedObject.kind=Pod"})
	if err != nil {
		return err.Error()
	}
	type line struct {
		at time.Duration
		s  string
	}
	var lines []line
	for _, e := range evs.Items {
		at := e.LastTimestamp.Time
		if at.IsZero() {
			at = e.EventTime.Time
		}
		if at.Before(start.Add(-time.Second)) {
			continue
		}
		lines = append(lines, line{at.Sub(start), fmt.Sprintf("%-32s %-10s %s", e.InvolvedObject.Name, e.Reason, strings.TrimSpace(e.Message))})
	}
	sort.Slice(lines, func(i, j int) bool { return lines[i].at < lines[j].at })
	var b strings.Builder
	for _, l := range lines {
		fmt.Fprintf(&b, "  +%6.1fs %s\n", l.at.Seconds(), l.s)
	}
	return b.String()
}

// checkProxySwitch restarts every kube-proxy in its default mode,
// iptables, and waits until each node has kube-proxy's iptables rules and
// no longer its nftables table.
func checkProxySwitch(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	start := time.Now()
	if err := c.SetProxyMode(ctx, ""); err != nil {
		t.Fatal(err)
	}
	err := poll(ctx, 2*time.Minute, func() error {
		for _, n := range c.Nodes {
			rules, err := c.Exec(ctx, n, "iptables-save", "-t", "nat")
			if err != nil {
				return err
			}
			if !strings.Contains(rules, "-A KUBE-SERVICES") {
				return fmt.Errorf("%s: no KUBE-SERVICES rules in iptables' nat table yet", n)
			}
			if _, err := c.Exec(ctx, n, "nft", "list", "table", "ip", "kube-proxy"); err == nil {
				return fmt.Errorf("%s: kube-proxy's nftables table is still there", n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.Diagnose(ctx))
	}
	t.Logf("kube-proxy runs in iptables mode on every node after %s", time.Since(start).Round(time.Millisecond))
}
