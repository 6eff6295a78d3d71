// Package cluster runs a real Kubernetes cluster for end-to-end tests,
// without Docker: etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler on the host, and nodes in the test VM (pkg/testing/vm,
// where IPVS and cgroup v2 exist), each a network namespace with its own
// containerd, kubelet and kube-proxy, all built from the Go module proxy
// (hack/tools.sh, hack/cluster-tools.sh). Nothing is pulled: the images
// (the pod sandbox, the echo backend, keeplb's) are imported into every
// node's containerd.
//
// The picture, with the addresses of config.go:
//
//	host namespace keeplb-cluster-PID            qemu VM
//	(no default route)                           root namespace = router
//	control plane, tests, clients                eth0 172.18.1.2
//	tap0 172.18.1.1 ════════════════════════════ br-nodes 172.18.0.1
//	routes 172.18.0.0/24, 10.244.0.0/16 → VM     ├ node1 172.18.0.11 (netns, cgroup /node1)
//	                                             ├ node2 172.18.0.12
//	                                             └ node3 172.18.0.13
//
// Each node's pods get its podCIDR (node IPAM's) on a bridge; the router
// and the other nodes route it to the node. A package using Start has
// Main as its TestMain. docs/real-cluster.md says what each test proves.
package cluster

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/images"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// Environment of Start.
const (
	// EnvClusterTools is the folder hack/cluster-tools.sh printed.
	EnvClusterTools = "KEEPLB_CLUSTER_TOOLS_DIR"
)

// The modules the nodes need beyond the VM's usual ones: overlayfs for
// containerd, br_netfilter for the pod bridge, and what kube-proxy's rules
// use in nftables mode and in its default, iptables mode (iptables-nft's
// matches and targets). Both modes' are loaded, so that one VM build
// serves either.
const extraModules = "overlay br_netfilter nft_fib_inet nft_reject_inet nft_reject_ipv4 nft_reject_ipv6 nft_numgen " +
	"nft_compat xt_tcpudp xt_MASQUERADE xt_nat xt_multiport xt_conntrack xt_mark xt_comment xt_statistic xt_addrtype ipt_REJECT"

// extraPrograms are the host's programs kube-proxy's iptables mode runs,
// copied into the VM. Without ip6tables it proxies IPv4 only, as the
// cluster is.
const extraPrograms = "iptables iptables-save iptables-restore"

// Deadlines of Start's steps, generous for TCG on two shared cores: a
// healthy start takes about a third. The agent answers once it has
// imported the images.
const (
	agentTimeout = 8 * time.Minute
	nodesTimeout = 8 * time.Minute
)

// Options configure Start.
type Options struct {
	// Nodes is the number of nodes (default 3).
	Nodes int
	// ProxyMode is kube-proxy's mode: "" for its default, or "nftables".
	ProxyMode string
	// Images are more image archives for every node (besides pause and the
	// echo backend): keeplb's. The VM imports them once, before the nodes
	// start, and gives each node's containerd a copy.
	Images []string
	// SkipModules are modules of the VM to leave unloaded at boot (see
	// vm.Options), e.g. ip_vs, for a test of what loads them.
	SkipModules []string
	// Memory is the VM's memory (default 6G: every node keeps each image
	// twice in memory, in containerd's content store and unpacked).
	Memory string
}

// Cluster is a running cluster.
type Cluster struct {
	// ControlPlane is the host's side: etcd, kube-apiserver, the
	// controllers and the scheduler; Kubectl runs as admin.
	*controlplane.ControlPlane
	// Client is an admin client.
	Client kubernetes.Interface
	// Nodes are the nodes' names, node1 first.
	Nodes []string
	// Dir is the work folder; Dir/logs holds every node's logs.
	Dir string

	agent   string
	vmDone  chan struct{}
	vmErr   error
	console *bytes.Buffer
	mu      sync.Mutex
}

// Start runs a cluster for tb and stops it when tb ends. It skips tb when
// it cannot run here (not root, not in Main's namespace, no qemu, no tools)
// and fails tb, with the logs that say why, when the cluster does not come
// up in time.
func Start(tb testing.TB, opts Options) *Cluster {
	tb.Helper()
	if os.Getenv(envRole) != "host" {
		tb.Skip("cluster: needs root and cluster.Main as the package's TestMain")
	}
	tools := os.Getenv("KEEPLB_TOOLS_DIR")
	clusterTools := os.Getenv(EnvClusterTools)
	if tools == "" || clusterTools == "" {
		tb.Skipf("cluster: needs KEEPLB_TOOLS_DIR (hack/tools.sh) and %s (hack/cluster-tools.sh)", EnvClusterTools)
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		tb.Skip(vm.ErrNoQEMU.Error())
	}
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	ctx := tb.Context()
	dir := tb.TempDir()
	c := &Cluster{Dir: dir, vmDone: make(chan struct{}), console: &bytes.Buffer{},
		agent: fmt.Sprintf("http://%s:%d", RouterAddr, AgentPort)}
	start := time.Now()

	users := map[string][]string{"system:kube-proxy": nil}
	for i := 1; i <= opts.Nodes; i++ {
		users["system:node:"+NodeName(i)] = []string{"system:nodes"}
		c.Nodes = append(c.Nodes, NodeName(i))
	}
	cp, err := controlplane.Start(ctx, controlplane.Options{
		BinDir: tools, WorkDir: filepath.Join(dir, "controlplane"),
		ControllersDir: clusterTools, Address: HostAddr, Users: users,
	})
	if err != nil {
		tb.Fatalf("cluster: control plane: %v", err)
	}
	tb.Cleanup(func() { _ = cp.Stop() })
	c.ControlPlane = cp
	if c.Client, err = kubernetes.NewForConfig(cp.AdminConfig()); err != nil {
		tb.Fatal(err)
	}
	tb.Logf("cluster: control plane up after %s", time.Since(start).Round(time.Millisecond))

	imgs, err := images.Build(ctx, filepath.Join(dir, "images"))
	if err != nil {
		tb.Fatalf("cluster: images: %v", err)
	}
	archives := append([]string{imgs[images.Pause], imgs[images.Echo]}, opts.Images...)
	for _, a := range archives {
		if _, err := os.Stat(a); err != nil {
			tb.Fatalf("cluster: image archive: %v (make image makes keeplb's)", err)
		}
	}

	cfg := &config{
		Nodes: opts.Nodes, ProxyMode: opts.ProxyMode, Tools: tools, ClusterTools: clusterTools,
		Images: archives, Server: cp.AdminConfig().Host,
		CAFile: filepath.Join(cp.WorkDir(), "certs", "apiserver.crt"),
		Tokens: map[string]string{"proxy": cp.UserConfig("system:kube-proxy").BearerToken},
		Dir:    dir,
	}
	for i := 1; i <= opts.Nodes; i++ {
		cfg.Tokens[NodeName(i)] = cp.UserConfig("system:node:" + NodeName(i)).BearerToken
	}
	cfgFile := filepath.Join(dir, "config.json")
	if err := cfg.write(cfgFile); err != nil {
		tb.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		tb.Fatal(err)
	}
	c.startVM(tb, opts, cfgFile, archives)
	if err := c.waitAgent(ctx); err != nil {
		tb.Fatalf("cluster: the VM's agent: %v\n%s", err, c.consoleTail(40))
	}
	tb.Logf("cluster: VM up after %s", time.Since(start).Round(time.Millisecond))
	if err := c.assignPodCIDRs(ctx); err != nil {
		tb.Fatalf("cluster: %v\n%s", err, c.Diagnose(ctx))
	}
	if err := c.waitNodesReady(ctx); err != nil {
		tb.Fatalf("cluster: %v\n%s", err, c.Diagnose(ctx))
	}
	tb.Logf("cluster: %d nodes Ready after %s", opts.Nodes, time.Since(start).Round(time.Millisecond))
	return c
}

// startVM boots the VM with the agent, in the background, and stops it
// when tb ends: the agent is asked to stop the nodes first.
func (c *Cluster) startVM(tb testing.TB, opts Options, cfgFile string, archives []string) {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	env := []string{
		"KEEPLB_VM_NET=tap:" + tapName,
		"KEEPLB_VM_MEM=" + cmp.Or(opts.Memory, "6G"),
		"KEEPLB_VM_EXTRA_MODULES=" + extraModules,
		"KEEPLB_VM_EXTRA_PROGRAMS=" + extraPrograms,
	}
	if len(opts.SkipModules) > 0 {
		env = append(env, "KEEPLB_VM_APPEND=keeplb.skipmods="+strings.Join(opts.SkipModules, ","))
	}
	shares := []string{c.Dir, filepath.Dir(self), os.Getenv("KEEPLB_TOOLS_DIR"), os.Getenv(EnvClusterTools)}
	for _, a := range archives {
		shares = append(shares, filepath.Dir(a))
	}
	// run.sh kills the VM at its timeout: the test's deadline, or an hour.
	deadline := time.Now().Add(time.Hour)
	if d, ok := tb.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			deadline = dl
		}
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	go func() {
		defer close(c.vmDone)
		w := &lockedWriter{c: c}
		rc, err := vm.ExecWith(ctx, w, env, shares, "env", envRole+"=agent", envConfig+"="+cfgFile, self, "-test.run=^$")
		if err == nil && rc != 0 {
			err = fmt.Errorf("the VM exited %d", rc)
		}
		c.mu.Lock()
		c.vmErr = err
		c.mu.Unlock()
	}()
	tb.Cleanup(func() {
		stopCtx, stop := context.WithTimeout(context.Background(), 20*time.Second)
		defer stop()
		if err := c.post(stopCtx, "/stop", struct{}{}, nil); err == nil {
			select {
			case <-c.vmDone:
			case <-stopCtx.Done():
			}
		}
		cancel()
		<-c.vmDone
		if tb.Failed() {
			tb.Logf("cluster: the VM's console, last lines:\n%s", c.consoleTail(60))
		}
	})
}

type lockedWriter struct{ c *Cluster }

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.c.mu.Lock()
	defer w.c.mu.Unlock()
	return w.c.console.Write(p)
}

func (c *Cluster) consoleTail(n int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return tail(c.console.String(), n)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitAgent polls the agent until it answers, the VM ends or the deadline.
func (c *Cluster) waitAgent(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, agentTimeout)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.agent+"/healthz", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-c.vmDone:
			return fmt.Errorf("the VM ended before its agent answered: %w", c.vmErr)
		case <-ctx.Done():
			return fmt.Errorf("no answer from %s within %s", c.agent, agentTimeout)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// assignPodCIDRs waits for every node to register and get its podCIDR from
// node IPAM, then has the agent route each.
func (c *Cluster) assignPodCIDRs(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, nodesTimeout)
	defer cancel()
	done := map[string]bool{}
	for len(done) < len(c.Nodes) {
		nodes, err := c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err == nil {
			for _, n := range nodes.Items {
				if done[n.Name] || n.Spec.PodCIDR == "" {
					continue
				}
				i, err := strconv.Atoi(strings.TrimPrefix(n.Name, "node"))
				if err != nil {
					return fmt.Errorf("unknown node %s", n.Name)
				}
				if err := c.post(ctx, "/podcidr", PodCIDRRequest{Node: i, CIDR: n.Spec.PodCIDR}, nil); err != nil {
					return fmt.Errorf("route %s's podCIDR %s: %w", n.Name, n.Spec.PodCIDR, err)
				}
				done[n.Name] = true
			}
		}
		if len(done) == len(c.Nodes) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nodes with a podCIDR after %s: %d of %d", nodesTimeout, len(done), len(c.Nodes))
		case <-c.vmDone:
			return fmt.Errorf("the VM ended: %w\n%s", c.vmErr, c.consoleTail(40))
		case <-time.After(time.Second):
		}
	}
	return nil
}

func (c *Cluster) waitNodesReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, nodesTimeout)
	defer cancel()
	for {
		nodes, err := c.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		ready := 0
		if err == nil {
			for _, n := range nodes.Items {
				if NodeReady(&n) {
					ready++
				}
			}
		}
		if ready == len(c.Nodes) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nodes Ready after %s: %d of %d", nodesTimeout, ready, len(c.Nodes))
		case <-c.vmDone:
			return fmt.Errorf("the VM ended: %w", c.vmErr)
		case <-time.After(time.Second):
		}
	}
}

// NodeReady reports whether n's Ready condition is True.
func NodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// post sends a JSON request to the agent and decodes its JSON answer into
// out (if not nil).
func (c *Cluster) post(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.agent+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(buf.String()))
	}
	if out != nil {
		return json.Unmarshal(buf.Bytes(), out)
	}
	return nil
}

// Exec runs argv in node's network namespace (node "" is the VM's root
// namespace, where every node's processes are visible) and returns its
// output, within 30 s; a non-zero exit is an error that carries the output.
func (c *Cluster) Exec(ctx context.Context, node string, argv ...string) (string, error) {
	var res ExecResult
	if err := c.post(ctx, "/exec", ExecRequest{Node: node, Argv: argv, Timeout: 30 * time.Second}, &res); err != nil {
		return "", err
	}
	if res.Code != 0 {
		return res.Output, fmt.Errorf("%s on %s exited %d: %s", strings.Join(argv, " "), cmp.Or(node, "the VM"), res.Code, strings.TrimSpace(res.Output))
	}
	return res.Output, nil
}

// SetProxyMode restarts every node's kube-proxy in mode ("" for its
// default, iptables), as an operator who changes the mode does; kube-proxy
// removes the rules of its other modes as it starts.
func (c *Cluster) SetProxyMode(ctx context.Context, mode string) error {
	return c.post(ctx, "/proxymode", ProxyModeRequest{Mode: mode}, nil)
}

// Crash fails node as a machine does that loses power: see CrashRequest.
func (c *Cluster) Crash(ctx context.Context, node string) error {
	return c.post(ctx, "/crash", CrashRequest{Node: node}, nil)
}

// Diagnose says why the cluster or its pods are not as expected: the
// nodes, every pod that is not Ready with `kubectl describe` and its
// containers' logs, and the tails of every node's kubelet and containerd
// logs and of the VM's console.
func (c *Cluster) Diagnose(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	var b strings.Builder
	out, _ := c.Kubectl(ctx, "get", "nodes,pods", "-A", "-o", "wide")
	fmt.Fprintf(&b, "== kubectl get nodes,pods -A\n%s\n", out)
	if pods, err := c.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, p := range pods.Items {
			if podReady(&p) {
				continue
			}
			out, _ := c.Kubectl(ctx, "describe", "pod", "-n", p.Namespace, p.Name)
			fmt.Fprintf(&b, "== kubectl describe pod -n %s %s\n%s\n", p.Namespace, p.Name, tail(out, 40))
			for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
				if cs.RestartCount > 0 || !cs.Ready {
					out, _ := c.Kubectl(ctx, "logs", "-n", p.Namespace, p.Name, "-c", cs.Name, "--tail=20")
					fmt.Fprintf(&b, "== kubectl logs -n %s %s -c %s\n%s\n", p.Namespace, p.Name, cs.Name, out)
				}
			}
		}
	}
	logs, _ := filepath.Glob(filepath.Join(c.Dir, "logs", "*.log"))
	sort.Strings(logs)
	for _, f := range logs {
		data, err := os.ReadFile(f)
		if err != nil || len(data) == 0 {
			continue
		}
		fmt.Fprintf(&b, "== %s (last lines)\n%s\n", filepath.Base(f), tail(string(data), 15))
	}
	fmt.Fprintf(&b, "== the VM's console (last lines)\n%s\n", c.consoleTail(20))
	return b.String()
}

func podReady(p *corev1.Pod) bool {
	if p.Status.Phase == corev1.PodSucceeded {
		return true
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
