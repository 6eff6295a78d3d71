package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// pids are the processes up started, each the leader of its own session
// (so its children go with it).
type pids struct {
	ControlPlane int       `json:"controlPlane"`
	Controller   int       `json:"controller"`
	Node         int       `json:"node"`
	Where        string    `json:"where"`
	Started      time.Time `json:"started"`
}

const demoNS = "demo"

func (c config) path(elem ...string) string {
	return filepath.Join(append([]string{c.state}, elem...)...)
}

func alive(pid int) bool { return pid > 0 && syscall.Kill(pid, 0) == nil }

// running returns the pids of a demo that is up, if one is.
func running(c config) (pids, bool) {
	var p pids
	if err := readJSON(c.path("pids.json"), &p); err != nil {
		return p, false
	}
	return p, alive(p.ControlPlane) || alive(p.Controller) || alive(p.Node)
}

func up(c config) error {
	pr := progress{start: time.Now()}
	if p, ok := running(c); ok {
		fmt.Printf("A demo is already running (started %s, node side in the %s); nothing was changed.\n", p.Started.Format(time.TimeOnly), p.Where)
		usage(c)
		fmt.Println("To start afresh: make demo-down && make demo")
		return nil
	}
	_ = os.RemoveAll(c.state) // a stale one: its processes are gone
	if err := os.MkdirAll(c.path("logs"), 0o755); err != nil {
		return err
	}
	p := pids{Started: time.Now()}
	save := func() error { return writeJSON(c.path("pids.json"), p) }

	pr.step("starting the control plane: etcd and kube-apiserver %s (logs: %s)", "v1.37", c.path("logs", "controlplane.log"))
	var err error
	if p.ControlPlane, err = daemon(c.path("logs", "controlplane.log"), nil, c.self, "controlplane", "-state", c.state, "-tools", c.tools); err != nil {
		return err
	}
	if err := save(); err != nil {
		return err
	}
	if err := waitFile(c.path("kubeconfig"), 3*time.Minute, p.ControlPlane); err != nil {
		return fmt.Errorf("the control plane did not come up: %w (see %s)", err, c.path("logs", "controlplane.log"))
	}
	kubectl := func(args ...string) (string, error) {
		out, err := exec.Command(filepath.Join(c.tools, "kubectl"), append([]string{"--kubeconfig", c.path("kubeconfig")}, args...)...).CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	m := func(rel string) string { return filepath.Join(c.repo, rel) }
	pr.step("applying manifests/: the IPPool CRD, namespace keeplb-system, RBAC of the controller and the speaker")
	if _, err := kubectl("apply", "--server-side", "-f", m("manifests/crd/ippools.keeplb.io.yaml"), "-f", m("manifests/namespace.yaml"),
		"-f", m("manifests/controller/rbac.yaml"), "-f", m("manifests/speaker/rbac.yaml")); err != nil {
		return err
	}
	if _, err := kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/ippools.keeplb.io"); err != nil {
		return err
	}
	if _, err := kubectl("apply", "--server-side", "-f", m("docs/examples/00-ippool.yaml")); err != nil {
		return err
	}
	pr.step("applied docs/examples/00-ippool.yaml: IPPool demo, 10.70.0.200-10.70.0.250")

	pr.step("starting keeplb controller (logs: %s)", c.path("logs", "controller.log"))
	if p.Controller, err = daemon(c.path("logs", "controller.log"), nil, c.keeplb, "controller", "--kubeconfig="+c.path("kubeconfig"),
		"--leader-elect=false", "--metrics-bind-address=0"); err != nil {
		return err
	}
	if err := save(); err != nil {
		return err
	}

	if ipvs.Available() == nil {
		p.Where = "host"
		pr.step("the host kernel has IPVS: the node side runs here, in network namespaces demo-*")
		p.Node, err = daemon(c.path("logs", "node.log"), nil, c.self, "node", "-state", c.state, "-keeplb", c.keeplb,
			"-kubeconfig", c.path("kubeconfig"), "-where", "host")
	} else {
		p.Where = "VM"
		pr.step("the host kernel has no IPVS: the node side runs in a VM (hack/vm: Debian's kernel under qemu), in network namespaces demo-*; console: %s", c.path("logs", "node.log"))
		env := []string{"KEEPLB_VM_NET=user", "KEEPLB_VM_MEM=1G", "KEEPLB_VM_TIMEOUT=2592000"}
		if c.vmDir != "" {
			env = append(env, "KEEPLB_VM_DIR="+c.vmDir)
		}
		shares := []string{c.repo}
		if !strings.HasPrefix(c.state, c.repo+"/") {
			shares = append(shares, c.state)
		}
		argv := append(append([]string{filepath.Join(c.repo, "hack/vm/run.sh")}, shares...), "--",
			c.self, "node", "-state", c.state, "-keeplb", c.keeplb, "-kubeconfig", c.path("kubeconfig-vm"), "-where", "VM")
		p.Node, err = daemon(c.path("logs", "node.log"), env, argv...)
	}
	if err != nil {
		return err
	}
	if err := save(); err != nil {
		return err
	}
	if err := waitFile(c.path("node.json"), 2*time.Minute, p.Node); err != nil {
		return fmt.Errorf("the node side did not come up: %w (see %s)", err, c.path("logs", "node.log"))
	}
	var lay layout
	if err := readJSON(c.path("node.json"), &lay); err != nil {
		return err
	}
	pr.step("node side up: nodes %s, each with one pod (demo-web-1..3, answering HTTP on 8080 with its name), prepared by keeplb prepare-node (the speaker DaemonSet's init container) and running a speaker (keepalived + IPVS); client %s at %s",
		strings.Join(nodeNames(lay), ", "), lay.Client, lay.ClientIP)

	cfg, err := clientcmd.BuildConfigFromFlags("", c.path("kubeconfig"))
	if err != nil {
		return err
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()
	if err := createNodes(ctx, cs, lay); err != nil {
		return err
	}
	pr.step("created Node objects %s with their InternalIPs, Ready (as kubelet would)", strings.Join(nodeNames(lay), ", "))

	if _, err := cs.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: demoNS}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	examples, _ := filepath.Glob(m("docs/examples/0[1-9]*.yaml"))
	for _, f := range examples {
		if _, err := kubectl("apply", "--server-side", "-f", f); err != nil {
			return err
		}
		pr.step("applied %s", strings.TrimPrefix(f, c.repo+"/"))
	}
	svcs, err := cs.CoreV1().Services(demoNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, s := range svcs.Items {
		if err := writeSlice(ctx, cs, &s, lay); err != nil {
			return err
		}
	}
	pr.step("created an EndpointSlice per Service with the three pods (as the EndpointSlice controller would)")
	if err := nodePorts(c, svcs.Items, lay); err != nil {
		return err
	}
	pr.step("programmed each Service's NodePort on every node as kube-proxy would (IPVS in the node: NodePort → the node's own pod); keeplb leaves these virtual servers alone")

	vips := map[string]netip.AddrPort{}
	deadline := time.Now().Add(time.Minute)
	for len(vips) < len(svcs.Items) && time.Now().Before(deadline) {
		for _, s := range svcs.Items {
			got, err := cs.CoreV1().Services(demoNS).Get(ctx, s.Name, metav1.GetOptions{})
			if err == nil && len(got.Status.LoadBalancer.Ingress) > 0 {
				a, _ := netip.ParseAddr(got.Status.LoadBalancer.Ingress[0].IP)
				vips[s.Name] = netip.AddrPortFrom(a, uint16(got.Spec.Ports[0].Port))
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(vips) < len(svcs.Items) {
		return fmt.Errorf("only %d of %d Services got an EXTERNAL-IP within a minute (see %s)", len(vips), len(svcs.Items), c.path("logs", "controller.log"))
	}
	pr.step("every Service has its EXTERNAL-IP:")
	for _, args := range [][]string{{"get", "ippools"}, {"get", "svc", "-n", demoNS, "-o", "wide"}} {
		out, err := kubectl(args...)
		if err != nil {
			return err
		}
		fmt.Printf("\n$ kubectl %s\n%s\n", strings.Join(args, " "), out)
	}

	for _, name := range slices.Sorted(maps.Keys(vips)) {
		holder, err := waitHolder(ctx, cs, name, "", 30*time.Second)
		if err != nil {
			return err
		}
		res, err := getRetry(c, vips[name], 30*time.Second)
		if err != nil {
			return fmt.Errorf("curl %s (%s) from the client: %w", vips[name], name, err)
		}
		pr.step("curl http://%s/ (Service %s) from %s → answered by %s, which saw the request from %s; VIP held by %s", vips[name], name, lay.Client, res.Answer.Name, res.Answer.From.Addr(), holder)
	}

	// The Local Service: after the failover its new holder forwards to its
	// own pod, so no request goes to the dead node's NodePort or pod,
	// which its Node object (Ready, with no kubelet to say otherwise)
	// would keep in the other Services' real servers.
	if err := failover(c, cs, pr, "local", vips["local"]); err != nil {
		return err
	}
	pr.step("the demo is up")
	usage(c)
	return nil
}

func nodeNames(lay layout) []string {
	var out []string
	for _, n := range lay.Nodes {
		out = append(out, n.Name)
	}
	return out
}

// failover cuts the holder of svc's VIP off while the client sends
// requests, reports the gap, and brings the node back.
func failover(c config, cs kubernetes.Interface, pr progress, svc string, vip netip.AddrPort) error {
	ctx := context.Background()
	old, err := waitHolder(ctx, cs, svc, "", 30*time.Second)
	if err != nil {
		return err
	}
	pr.step("failover: the client sends a request to %s every 20 ms (new connection, 250 ms timeout); after 20 of them %s is cut off (link down, speaker and keepalived killed)", vip, old)
	res, err := send(c.state, request{Op: "failover", Addr: vip.String(), Node: old}, 90*time.Second)
	if err != nil {
		return fmt.Errorf("failover: %w", err)
	}
	next, err := waitHolder(ctx, cs, svc, old, 30*time.Second)
	if err != nil {
		return err
	}
	pr.step("failover: traffic resumed through %s; the longest wait between two answers was %d ms (%d of %d requests failed, each after its 250 ms timeout); first answer after the cut from %s", next, res.Gap.Milliseconds(), res.Failed, res.Sent, res.By)
	if _, err := send(c.state, request{Op: "restore", Node: old}, 30*time.Second); err != nil {
		return fmt.Errorf("restore %s: %w", old, err)
	}
	pr.step("%s is back (link up, speaker restarted); it takes back the VIPs it is preferred for after the 60 s preempt delay", old)
	return nil
}

// waitHolder waits for the keeplb.io/holder annotation of svc to name a
// node other than not.
func waitHolder(ctx context.Context, cs kubernetes.Interface, svc, not string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		s, err := cs.CoreV1().Services(demoNS).Get(ctx, svc, metav1.GetOptions{})
		if err == nil {
			if h := s.Annotations[annotations.Holder]; h != "" && h != not {
				return h, nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "", fmt.Errorf("no node reported holding the VIP of %s within %s", svc, timeout)
}

func getRetry(c config, addr netip.AddrPort, timeout time.Duration) (response, error) {
	deadline := time.Now().Add(timeout)
	for {
		res, err := send(c.state, request{Op: "get", Addr: addr.String()}, 10*time.Second)
		if err == nil || time.Now().After(deadline) {
			return res, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func createNodes(ctx context.Context, cs kubernetes.Interface, lay layout) error {
	for _, n := range lay.Nodes {
		node, err := cs.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now(), Reason: "KubeletReady"}}
		node.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: n.IP}}
		if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return nil
}

// writeSlice writes the EndpointSlice of s: every pod, on 8080.
func writeSlice(ctx context.Context, cs kubernetes.Interface, s *v1.Service, lay layout) error {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name + "-demo", Labels: map[string]string{discoveryv1.LabelServiceName: s.Name}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, p := range s.Spec.Ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptr.To(p.Name), Port: ptr.To[int32](8080), Protocol: ptr.To(p.Protocol)})
	}
	for _, p := range lay.Pods {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.IP},
			NodeName:   ptr.To(p.Node),
			TargetRef:  &v1.ObjectReference{Kind: "Pod", Namespace: s.Namespace, Name: p.Name},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		})
	}
	_, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, es, metav1.CreateOptions{})
	return err
}

// nodePorts programs every NodePort on every node: an IPVS virtual server
// NodeIP:NodePort to the node's own pod.
func nodePorts(c config, svcs []v1.Service, lay layout) error {
	for _, s := range svcs {
		for _, port := range s.Spec.Ports {
			if port.NodePort == 0 {
				continue
			}
			for _, n := range lay.Nodes {
				pod := lay.Pods[slices.IndexFunc(lay.Pods, func(p podInfo) bool { return p.Node == n.Name })]
				req := request{Op: "nodeport", Node: n.Name, Addr: n.IP + ":" + strconv.Itoa(int(port.NodePort)), Target: pod.IP + ":8080"}
				if _, err := send(c.state, req, 20*time.Second); err != nil {
					return fmt.Errorf("NodePort %d on %s: %w", port.NodePort, n.Name, err)
				}
			}
		}
	}
	return nil
}

func usage(c config) {
	rel := func(p string) string {
		if r, err := filepath.Rel(c.repo, p); err == nil && !strings.HasPrefix(r, "..") {
			return r
		}
		return p
	}
	bin := filepath.Dir(c.keeplb)
	fmt.Printf(`
keeplb is running locally. To use it:

  export KUBECONFIG=%s PATH=%s:$PATH

Then try:
  kubectl get svc -n demo -o wide     # the Services and their EXTERNAL-IPs
  keeplb status                       # pools, VIPs, holders, problems
  keeplb-demo curl web                # a request to web's VIP from the client namespace
  keeplb-demo failover local          # cut local's VIP holder off and measure the gap

Logs: %s.  Stop everything: make demo-down
`, c.path("kubeconfig"), bin, rel(c.path("logs")))
}

// poke runs the curl and failover commands.
func poke(c config, what, svc string) error {
	if _, ok := running(c); !ok {
		return errors.New("no demo is running: make demo")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.path("kubeconfig"))
	if err != nil {
		return err
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	s, err := cs.CoreV1().Services(demoNS).Get(context.Background(), svc, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if len(s.Status.LoadBalancer.Ingress) == 0 {
		return fmt.Errorf("Service %s has no EXTERNAL-IP yet", svc) //nolint:staticcheck // ST1005: Service is the Kubernetes kind, a proper noun
	}
	a, err := netip.ParseAddr(s.Status.LoadBalancer.Ingress[0].IP)
	if err != nil {
		return err
	}
	vip := netip.AddrPortFrom(a, uint16(s.Spec.Ports[0].Port))
	if what == "failover" {
		return failover(c, cs, progress{start: time.Now()}, svc, vip)
	}
	res, err := send(c.state, request{Op: "get", Addr: vip.String()}, 10*time.Second)
	if err != nil {
		return err
	}
	fmt.Printf("http://%s/ → %s (it saw the request from %s); VIP held by %s\n", vip, res.Answer.Name, res.Answer.From.Addr(), s.Annotations[annotations.Holder])
	return nil
}

// down stops what up started, newest first, and deletes the state.
func down(c config) error {
	p, ok := running(c)
	if !ok {
		_ = os.RemoveAll(c.state)
		fmt.Println("No demo is running.")
		return nil
	}
	for _, d := range []struct {
		name string
		pid  int
	}{{"node side (" + p.Where + ")", p.Node}, {"controller", p.Controller}, {"control plane", p.ControlPlane}} {
		if !alive(d.pid) {
			continue
		}
		_ = syscall.Kill(-d.pid, syscall.SIGTERM)
		deadline := time.Now().Add(20 * time.Second)
		for alive(d.pid) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if alive(d.pid) {
			_ = syscall.Kill(-d.pid, syscall.SIGKILL)
		}
		fmt.Printf("stopped the %s\n", d.name)
	}
	if p.Where == "host" {
		_ = lab.Cleanup(labPrefix)
	}
	if err := os.RemoveAll(c.state); err != nil {
		return err
	}
	fmt.Println("The demo is down; its state folder is deleted.")
	return nil
}

// daemon starts argv in a session of its own, detached from this process,
// with output to logPath, and returns its PID.
func daemon(logPath string, env []string, argv ...string) (int, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer func() { _ = logf.Close() }() // the child has its own descriptor
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	pid := cmd.Process.Pid
	go func() { _ = cmd.Wait() }() // reaped while up runs; init's afterwards
	return pid, nil
}

// waitFile waits for path to exist while pid lives.
func waitFile(path string, timeout time.Duration, pid int) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if !alive(pid) {
			return fmt.Errorf("process %d exited", pid)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("no %s after %s", path, timeout)
}

// runControlPlane is the control-plane process: etcd and kube-apiserver
// until SIGTERM.
func runControlPlane(c config) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cp, err := controlplane.Start(ctx, controlplane.Options{BinDir: c.tools, WorkDir: c.path("controlplane"), Out: os.Stdout})
	if err != nil {
		return err
	}
	defer func() { _ = cp.Stop() }()
	// The certificate names "kubernetes", not the VM's view of the host.
	if err := vm.WriteKubeconfig(cp.KubeconfigPath(), c.path("kubeconfig-vm"), "kubernetes"); err != nil {
		return err
	}
	b, err := os.ReadFile(cp.KubeconfigPath())
	if err != nil {
		return err
	}
	// Written last: up waits for it.
	if err := os.WriteFile(c.path("kubeconfig.tmp"), b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(c.path("kubeconfig.tmp"), c.path("kubeconfig")); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}
