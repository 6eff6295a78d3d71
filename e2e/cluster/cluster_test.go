// Package cluster_test runs keeplb as its users run it: the image built
// from the Dockerfile (make image), installed with `kubectl apply
// --server-side -k` and with `helm install`, as pods under real kubelets
// with their own containerd, next to a real kube-proxy, on a real cluster
// in the test VM (pkg/testing/cluster). docs/real-cluster.md says what each
// test proves.
//
// It needs root, qemu, KEEPLB_TOOLS_DIR, KEEPLB_CLUSTER_TOOLS_DIR and
// KEEPLB_CLUSTER_IMAGES (the archives of keeplb's image stamped v0.0.1 and
// v0.0.2, in that order); hack/e2e-cluster.sh provides them all.
package cluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/testing/cluster"
)

func TestMain(m *testing.M) { cluster.Main(m) }

// envImages lists the archives of keeplb's image stamped v0.0.1 and
// v0.0.2 (make image), separated by a space.
const envImages = "KEEPLB_CLUSTER_IMAGES"

// The image tags of envImages' archives.
const (
	imageV1 = "keeplb.local/keeplb:v0.0.1"
	imageV2 = "keeplb.local/keeplb:v0.0.2"
)

// Timeouts of the steps, for TCG on two shared cores.
const (
	podsTimeout    = 4 * time.Minute
	serviceTimeout = 2 * time.Minute
	// rolloutTimeout bounds `kubectl rollout status` of the three speakers,
	// replaced one at a time: 4 to 4.75 minutes here, about 30% more on
	// CI's machine, where 6 minutes once ran out. 12 minutes ran out here
	// once too: the first two pods took 3 minutes each, then containerd
	// on the third node took over 5 minutes to clean up the init
	// container's finished task ("failed to delete task: context deadline
	// exceeded", retried with backoff), with the pod in Init meanwhile.
	rolloutTimeout = 20 * time.Minute
)

// repo is the repository's root, from this package's folder.
func repo(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// poll calls f until it returns nil or d passes; the error is f's last.
func poll(ctx context.Context, d time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("after %s: %w", d, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// kustomizeOverlay writes an overlay of manifests/ that sets only the
// image, as docs/install.md tells users to, and returns its folder.
func kustomizeOverlay(t *testing.T, image string) string {
	t.Helper()
	dir := t.TempDir()
	base, err := filepath.Rel(dir, filepath.Join(repo(t), "manifests"))
	if err != nil {
		t.Fatal(err)
	}
	name, tag, _ := strings.Cut(image, ":v")
	overlay := fmt.Sprintf("resources:\n- %s\nimages:\n- name: ghcr.io/keeplb/keeplb\n  newName: %s\n  newTag: v%s\n", base, name, tag)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(overlay), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// waitKeeplb waits until the controller's two replicas and a speaker on
// each node are Ready, and returns the speakers.
func waitKeeplb(t *testing.T, c *cluster.Cluster) []corev1.Pod {
	t.Helper()
	ctx := t.Context()
	start := time.Now()
	if _, err := c.WaitPods(ctx, "keeplb-system", "app.kubernetes.io/component=controller", 2, podsTimeout); err != nil {
		t.Fatalf("the controller: %v", err)
	}
	speakers, err := c.WaitPods(ctx, "keeplb-system", "app.kubernetes.io/component=speaker", len(c.Nodes), podsTimeout)
	if err != nil {
		t.Fatalf("the speakers: %v", err)
	}
	t.Logf("keeplb: 2 controllers and %d speakers Ready after %s", len(speakers), time.Since(start).Round(time.Second))
	return speakers
}

// examples makes the demo namespace: a Deployment of the echo backend,
// one pod per node, and the docs' examples with the pool's addresses moved
// into the cluster's VIP range, plus one Service for each forwarding mode
// the examples lack. It returns the Services' names.
func applyExamples(t *testing.T, c *cluster.Cluster) []string {
	t.Helper()
	ctx := t.Context()
	dir := t.TempDir()
	var files []string
	srcs, _ := filepath.Glob(filepath.Join(repo(t), "docs/examples/*.yaml"))
	if len(srcs) < 5 {
		t.Fatalf("docs/examples has %d files, want the pool and four Services", len(srcs))
	}
	for _, src := range srcs {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		// The docs' lab LAN is 10.70.0.0/24; here the nodes' segment is
		// 172.18.0.0/24 and its VIP range the same .200-.250.
		out := filepath.Join(dir, filepath.Base(src))
		if err := os.WriteFile(out, []byte(strings.ReplaceAll(string(b), "10.70.0.", "172.18.0.")), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, out)
	}
	extra := filepath.Join(dir, "zz-cluster.yaml")
	if err := os.WriteFile(extra, []byte(backendYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client.CoreV1().Namespaces().Get(ctx, "demo", metav1.GetOptions{}); err != nil {
		if out, err := c.Kubectl(ctx, "create", "namespace", "demo"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	args := []string{"apply", "--server-side"}
	for _, f := range append(files, extra) {
		args = append(args, "-f", f)
	}
	if out, err := c.Kubectl(ctx, args...); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := c.WaitPods(ctx, "demo", "app=web", len(c.Nodes), podsTimeout); err != nil {
		t.Fatal(err)
	}
	svcs, err := c.Client.CoreV1().Services("demo").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range svcs.Items {
		names = append(names, s.Name)
	}
	return names
}

// backendYAML is the examples' backend (app: web), one pod per node, and
// the Services for the modes the examples lack: pod forwarding with
// externalTrafficPolicy Cluster, and kube-proxy forwarding (ipMode VIP).
const backendYAML = `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: echo
        image: keeplb.local/echo:1
        imagePullPolicy: Never
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports: [{containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: pod-cluster
  namespace: demo
  annotations: {keeplb.io/forwarding: pod}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: via-kube-proxy
  namespace: demo
  annotations: {keeplb.io/forwarding: kube-proxy}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
`

// ingress waits for the Service's first ingress address and returns it
// with its ipMode.
func ingress(t *testing.T, c *cluster.Cluster, ns, name string) (string, string) {
	t.Helper()
	var ip, mode string
	err := poll(t.Context(), serviceTimeout, func() error {
		s, err := c.Client.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if len(s.Status.LoadBalancer.Ingress) == 0 {
			return fmt.Errorf("service %s/%s has no EXTERNAL-IP", ns, name)
		}
		in := s.Status.LoadBalancer.Ingress[0]
		ip = in.IP
		if in.IPMode != nil {
			mode = string(*in.IPMode)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ip, mode
}

// servicePort is the Service's first port.
func servicePort(t *testing.T, c *cluster.Cluster, ns, name string) int32 {
	t.Helper()
	s, err := c.Client.CoreV1().Services(ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s.Spec.Ports[0].Port
}

var answer = regexp.MustCompile(`^pod=(\S+) remote=(\S+):\d+\s*$`)

// reach polls url from the host side until a pod answers, and returns the
// pod's name and the client address it saw.
func reach(t *testing.T, url string) (pod, remote string) {
	t.Helper()
	start := time.Now()
	var body string
	err := poll(t.Context(), serviceTimeout, func() error {
		var err error
		body, err = cluster.Get(t.Context(), url)
		return err
	})
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	m := answer.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("GET %s: %q is not the echo backend's answer", url, body)
	}
	t.Logf("GET %s: %s after %s", url, strings.TrimSpace(body), time.Since(start).Round(time.Millisecond))
	return m[1], m[2]
}

// holdersOf returns the nodes, in order, whose eth0 is up and holds vip:
// the kernel's word, not the holder annotation's. A crashed node's link is
// down, so it holds nothing.
func holdersOf(ctx context.Context, c *cluster.Cluster, vip string) []string {
	var on []string
	for _, n := range c.Nodes {
		out, err := c.Exec(ctx, n, "ip", "-4", "-o", "addr", "show", "dev", "eth0", "up")
		if err == nil && strings.Contains(out, " "+vip+"/") {
			on = append(on, n)
		}
	}
	return on
}

// holder returns the node whose eth0 holds vip, polling until exactly one
// does.
func holder(t *testing.T, c *cluster.Cluster, vip string) string {
	t.Helper()
	var got string
	err := poll(t.Context(), serviceTimeout, func() error {
		on := holdersOf(t.Context(), c, vip)
		if len(on) != 1 {
			return fmt.Errorf("%s is on %d nodes: %v", vip, len(on), on)
		}
		got = on[0]
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestKeeplbOnACluster runs keeplb as users do on one three-node cluster,
// each scenario leaving it as the next expects. First with kube-proxy in
// nftables mode, installed with kubectl apply -k, down to its uninstall;
// then with kube-proxy switched to its default mode (iptables), installed
// with helm install, down to a node crash and the Helm uninstall. One
// cluster for both halves, because under TCG a start (the images imported
// into every node) takes minutes.
func TestKeeplbOnACluster(t *testing.T) {
	archives := strings.Fields(os.Getenv(envImages))
	if len(archives) != 2 {
		t.Skipf("needs %s: the archives of keeplb's image stamped v0.0.1 and v0.0.2 (hack/e2e-cluster.sh)", envImages)
	}
	// ip_vs stays unloaded at boot: the speaker's init container must load
	// it.
	// Both images are imported as the nodes start: an import takes a
	// minute per node under TCG, and one later, next to the scenarios,
	// starves them (it made the kubelets kill healthy speakers).
	c := cluster.Start(t, cluster.Options{
		ProxyMode: "nftables", SkipModules: []string{"ip_vs"}, Images: archives,
	})
	ctx := t.Context()

	t.Run("installed with kubectl apply -k", func(t *testing.T) {
		dir := kustomizeOverlay(t, imageV1)
		if out, err := c.Kubectl(ctx, "apply", "--server-side", "-k", dir); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		speakers := waitKeeplb(t, c)
		checkInstalled(t, c, speakers)
	})
	if t.Failed() {
		t.FailNow()
	}

	var services []string
	t.Run("examples in every forwarding mode", func(t *testing.T) {
		services = applyExamples(t, c)
		checkExamples(t, c, services)
		checkKeepalived(t, c)
	})
	t.Run("clients inside the cluster", func(t *testing.T) { checkInClusterClients(t, c) })
	t.Run("the controller's leader deleted", func(t *testing.T) { checkLeaderKill(t, c) })
	t.Run("rollout restart of the speakers", func(t *testing.T) { checkRollout(t, c) })
	t.Run("upgrade from v0.0.1 to v0.0.2", func(t *testing.T) { checkUpgrade(t, c) })
	t.Run("kubectl delete -k leaves the nodes clean", func(t *testing.T) {
		deleteServices(t, c)
		if out, err := c.Kubectl(ctx, "delete", "-k", kustomizeOverlay(t, imageV2), "--wait=true"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		waitGone(t, c, true, "")
		checkClean(t, c, c.Nodes)
	})
	if t.Failed() {
		t.FailNow()
	}

	// The second half: kube-proxy in its default mode, keeplb installed
	// with Helm, and a node crash.
	t.Run("kube-proxy switched to its default mode", func(t *testing.T) { checkProxySwitch(t, c) })
	if t.Failed() {
		t.FailNow()
	}
	t.Run("installed with helm install", func(t *testing.T) {
		helm(t, c, "install", "keeplb", filepath.Join(repo(t), "manifests/charts/keeplb"),
			"--namespace", "keeplb-system", "--create-namespace",
			"--set", "image.repository=keeplb.local/keeplb", "--set", "image.tag=v0.0.2")
		speakers := waitKeeplb(t, c)
		checkInstalled(t, c, speakers)
	})
	if t.Failed() {
		t.FailNow()
	}
	t.Run("examples with kube-proxy in iptables mode", func(t *testing.T) {
		checkExamples(t, c, applyExamples(t, c))
		checkKeepalived(t, c)
	})
	t.Run("clients inside the cluster with kube-proxy in iptables mode", func(t *testing.T) { checkInClusterClients(t, c) })
	var crashed string
	t.Run("failover when the holder crashes", func(t *testing.T) { crashed = checkFailover(t, c) })
	t.Run("helm uninstall leaves the nodes clean", func(t *testing.T) {
		deleteServices(t, c)
		helm(t, c, "uninstall", "keeplb", "--namespace", "keeplb-system", "--wait")
		waitGone(t, c, false, crashed)
		var up []string
		for _, n := range c.Nodes {
			if n != crashed {
				up = append(up, n)
			}
		}
		checkClean(t, c, up)
	})
}

// toolsDir is hack/tools.sh's folder: kubectl, helm.
func toolsDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("KEEPLB_TOOLS_DIR")
	if dir == "" {
		t.Skip("needs KEEPLB_TOOLS_DIR (hack/tools.sh)")
	}
	return dir
}

// checkInstalled: the pods run with the manifests' own securityContext, the
// init container loaded ip_vs and set the sysctls, and keepalived runs in
// every speaker pod, in its node's network namespace.
func checkInstalled(t *testing.T, c *cluster.Cluster, speakers []corev1.Pod) {
	ctx := t.Context()
	for _, p := range speakers {
		for _, ctr := range p.Spec.Containers {
			sc := ctr.SecurityContext
			if sc == nil || (sc.Privileged != nil && *sc.Privileged) {
				t.Errorf("%s: container %s is privileged", p.Name, ctr.Name)
			}
		}
	}
	mods, err := c.Exec(ctx, "", "cat", "/proc/modules")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^ip_vs `).MatchString(mods) {
		t.Errorf("ip_vs is not loaded (the VM booted without it): the init container did not load it")
	}
	for _, n := range c.Nodes {
		for _, s := range []string{"net.ipv4.ip_nonlocal_bind", "net.ipv4.conf.all.arp_ignore", "net.ipv4.vs.conntrack", "net.ipv4.ip_forward"} {
			out, err := c.Exec(ctx, n, "cat", "/proc/sys/"+strings.ReplaceAll(s, ".", "/"))
			if err != nil {
				t.Errorf("%s: %s: %v", n, s, err)
				continue
			}
			if strings.TrimSpace(out) == "0" {
				t.Errorf("%s: %s is 0: the init container did not set it", n, s)
			}
		}
	}
}

// checkKeepalived: keepalived runs in the speaker pod of every node: in a
// pod's cgroup, and in the node's network namespace (the speaker's, which
// is the host's).
func checkKeepalived(t *testing.T, c *cluster.Cluster) {
	ctx := t.Context()
	var ps string
	err := poll(ctx, time.Minute, func() error {
		var err error
		// Each keepalived with its network namespace and its cgroup: a
		// pod's container, under the node's kubepods, not the node's own
		// processes.
		ps, err = c.Exec(ctx, "", "sh", "-c", `for p in /proc/[0-9]*; do read -r c < $p/comm 2>/dev/null; [ "$c" = keepalived ] && echo "$(readlink $p/ns/net) $(cut -d: -f3 $p/cgroup)"; done; true`)
		if err != nil {
			return err
		}
		nets := map[string]bool{}
		for _, line := range strings.Split(strings.TrimSpace(ps), "\n") {
			ns, cgroup, ok := strings.Cut(line, " ")
			if !ok {
				continue
			}
			if !strings.Contains(cgroup, "/kubepods") {
				return fmt.Errorf("a keepalived runs outside every pod, in cgroup %s", cgroup)
			}
			nets[ns] = true
		}
		if len(nets) != len(c.Nodes) {
			return fmt.Errorf("keepalived runs in %d network namespaces, want %d (one per node):\n%s", len(nets), len(c.Nodes), ps)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// checkExamples: every Service gets its address with the ipMode its
// forwarding gives, and a client outside the nodes reaches a pod through
// it; through pod forwarding with externalTrafficPolicy Local, the pod
// sees the client's own address.
func checkExamples(t *testing.T, c *cluster.Cluster, services []string) {
	want := map[string]string{"web": "Proxy", "fixed": "Proxy", "shared-http": "Proxy", "shared-alt": "Proxy", "local": "Proxy", "pod-cluster": "Proxy", "via-kube-proxy": "VIP"}
	for _, name := range services {
		t.Run(name, func(t *testing.T) {
			ip, mode := ingress(t, c, "demo", name)
			if w, ok := want[name]; ok && mode != w {
				t.Errorf("ipMode %q, want %q", mode, w)
			}
			if name == "fixed" && ip != "172.18.0.210" {
				t.Errorf("got %s, want the address it asked for, 172.18.0.210", ip)
			}
			port := servicePort(t, c, "demo", name)
			pod, remote := reach(t, fmt.Sprintf("http://%s:%d/", ip, port))
			t.Logf("%s: %s (ipMode %s) held by %s, served by %s, which saw %s", name, ip, mode, holder(t, c, ip), pod, remote)
			if name == "local" && remote != cluster.HostAddr {
				t.Errorf("the pod saw %s, want the client's own address %s", remote, cluster.HostAddr)
			}
		})
	}
}
