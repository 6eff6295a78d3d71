package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupControllers are the controllers the kubelet wants under its
// cgroupRoot; hugetlb among them, or it refuses the root.
const cgroupControllers = "+cpu +cpuset +memory +pids +io +hugetlb"

// runAgent is the VM's side of the cluster: it makes the VM's root network
// namespace the router between the tap link and the nodes' segment, starts
// every node (runNode, in `ip netns exec nodeN`), and serves the host's
// requests (ExecRequest and friends) on RouterAddr:AgentPort until told to
// stop.
func runAgent(cfg *config) error {
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "logs"), 0o755); err != nil {
		return err
	}
	if err := setUpRouter(cfg); err != nil {
		return err
	}
	if err := seedImages(cfg); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	a := &agent{cfg: cfg, done: make(chan struct{})}
	for i := 1; i <= cfg.Nodes; i++ {
		f, err := os.Create(filepath.Join(cfg.Dir, "logs", NodeName(i)+".log"))
		if err != nil {
			return err
		}
		cmd := exec.Command("ip", "netns", "exec", NodeName(i), self, "-test.run=^$")
		cmd.Env = append(os.Environ(), envRole+"=node", envNode+"="+strconv.Itoa(i))
		cmd.Stdout, cmd.Stderr = f, f
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s: %w", NodeName(i), err)
		}
		a.nodes = append(a.nodes, cmd)
		go func() { _ = cmd.Wait() }()
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(RouterAddr, strconv.Itoa(AgentPort)))
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = fmt.Fprintln(w, "ok") })
	mux.HandleFunc("POST /exec", a.exec)
	mux.HandleFunc("POST /podcidr", a.podCIDR)
	mux.HandleFunc("POST /crash", a.crash)
	mux.HandleFunc("POST /proxymode", a.proxyMode)
	mux.HandleFunc("POST /stop", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = fmt.Fprintln(w, "stopping")
		close(a.done)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	log.Printf("agent: serving on %s", ln.Addr())
	<-a.done
	for _, n := range a.nodes {
		_ = n.Process.Signal(syscall.SIGTERM)
	}
	time.Sleep(time.Second) // the nodes' processes get their SIGTERM
	return srv.Close()
}

type agent struct {
	cfg   *config
	nodes []*exec.Cmd
	done  chan struct{}
}

// setUpRouter: cgroup2 with the kubelet's controllers; eth0 on the tap
// link; the bridge br-nodes with a veth per node namespace; forwarding on;
// unreachable routes for the pod and Service ranges, so that nothing meant
// for them leaves through eth0.
func setUpRouter(cfg *config) error {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		if err := syscall.Mount("none", "/sys/fs/cgroup", "cgroup2", 0, ""); err != nil {
			return fmt.Errorf("mount cgroup2: %w", err)
		}
	}
	steps := [][]string{
		{"sh", "-c", "echo '" + cgroupControllers + "' > /sys/fs/cgroup/cgroup.subtree_control"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{"ip", "route", "add", "unreachable", "10.244.0.0/16"},
		{"ip", "route", "add", "unreachable", ServiceCIDR},
		{"ip", "link", "add", "br-nodes", "type", "bridge"},
		{"ip", "addr", "add", Gateway + "/24", "dev", "br-nodes"},
		{"ip", "link", "set", "br-nodes", "up"},
		{"ip", "addr", "flush", "dev", "eth0"},
		{"ip", "addr", "add", RouterAddr + "/24", "dev", "eth0"},
		{"ip", "link", "set", "eth0", "up"},
	}
	for i := 1; i <= cfg.Nodes; i++ {
		n, veth := NodeName(i), "veth"+strconv.Itoa(i)
		steps = append(steps,
			[]string{"ip", "netns", "add", n},
			[]string{"ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", n},
			[]string{"ip", "link", "set", veth, "master", "br-nodes", "up"},
			[]string{"ip", "-n", n, "addr", "add", NodeAddr(i).String() + "/24", "dev", "eth0"},
			[]string{"ip", "-n", n, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", n, "link", "set", "lo", "up"},
			[]string{"ip", "-n", n, "route", "add", "default", "via", Gateway},
			[]string{"mkdir", "-p", "/sys/fs/cgroup/" + n},
			[]string{"sh", "-c", "echo '" + cgroupControllers + "' > /sys/fs/cgroup/" + n + "/cgroup.subtree_control"},
		)
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	return nil
}

// ExecRequest runs a command in a node's network namespace (Node, e.g.
// "node1"), or in the VM's root namespace (Node ""): the router, where the
// whole VM's processes and modules are visible.
type ExecRequest struct {
	Node    string
	Argv    []string
	Timeout time.Duration
}

// ExecResult is an ExecRequest's outcome.
type ExecResult struct {
	// Code is the exit code, -1 if the command did not run to its end.
	Code   int
	Output string
}

func (a *agent) exec(w http.ResponseWriter, r *http.Request) {
	var req ExecRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.Argv) == 0 {
		http.Error(w, fmt.Sprintf("bad request: %v", err), http.StatusBadRequest)
		return
	}
	argv := req.Argv
	if req.Node != "" {
		argv = append([]string{"ip", "netns", "exec", req.Node}, argv...)
	}
	ctx, cancel := context.WithTimeout(r.Context(), max(req.Timeout, time.Second))
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	res := ExecResult{Output: string(out)}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit) && exit.Exited():
		res.Code = exit.ExitCode()
	default:
		res.Code = -1
		res.Output += err.Error()
	}
	_ = json.NewEncoder(w).Encode(res)
}

// PodCIDRRequest gives node Node (1-based) its podCIDR, as node IPAM
// assigned it: the node's bridge network gets that subnet and the router
// and the other nodes a route to it.
type PodCIDRRequest struct {
	Node int
	CIDR string
}

func (a *agent) podCIDR(w http.ResponseWriter, r *http.Request) {
	var req PodCIDRRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Node < 1 || req.Node > a.cfg.Nodes {
		http.Error(w, fmt.Sprintf("bad request: %v", err), http.StatusBadRequest)
		return
	}
	if _, _, err := net.ParseCIDR(req.CIDR); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	via := NodeAddr(req.Node).String()
	steps := [][]string{{"ip", "route", "replace", req.CIDR, "via", via}}
	for j := 1; j <= a.cfg.Nodes; j++ {
		if j != req.Node {
			steps = append(steps, []string{"ip", "-n", NodeName(j), "route", "replace", req.CIDR, "via", via})
		}
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			http.Error(w, fmt.Sprintf("%s: %v: %s", strings.Join(s, " "), err, out), http.StatusInternalServerError)
			return
		}
	}
	// The bridge plugin per node; the pods' own gateway is the bridge, and
	// traffic between nodes is routed, never masqueraded.
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
`, req.CIDR)
	file := filepath.Join(cniDir(req.Node), "10-bridge.conflist")
	if err := os.WriteFile(file+".tmp", []byte(conf), 0o644); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if err := os.Rename(file+".tmp", file); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	_, _ = fmt.Fprintln(w, "ok")
}

// CrashRequest makes node Node (e.g. "node2") fail as a machine does when
// its power or its uplink goes: its link goes down first, then every
// process of the node (containerd, the kubelet, kube-proxy, every pod's
// containers, keepalived among them) is killed at once (cgroup.kill).
type CrashRequest struct {
	Node string
}

func (a *agent) crash(w http.ResponseWriter, r *http.Request) {
	var req CrashRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || !strings.HasPrefix(req.Node, "node") {
		http.Error(w, fmt.Sprintf("bad request: %v", err), http.StatusBadRequest)
		return
	}
	if out, err := exec.Command("ip", "-n", req.Node, "link", "set", "eth0", "down").CombinedOutput(); err != nil {
		http.Error(w, fmt.Sprintf("link down: %v: %s", err, out), http.StatusInternalServerError)
		return
	}
	if err := os.WriteFile("/sys/fs/cgroup/"+req.Node+"/cgroup.kill", []byte("1"), 0o644); err != nil {
		http.Error(w, fmt.Sprintf("kill: %v", err), http.StatusInternalServerError)
		return
	}
	_, _ = fmt.Fprintln(w, "ok")
}

// ProxyModeRequest restarts every node's kube-proxy in mode Mode.
type ProxyModeRequest struct {
	Mode string
}

func (a *agent) proxyMode(w http.ResponseWriter, r *http.Request) {
	var req ProxyModeRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, fmt.Sprintf("bad request: %v", err), http.StatusBadRequest)
		return
	}
	for i := 1; i <= a.cfg.Nodes; i++ {
		if err := writeProxyConfig(i, req.Mode); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		b, err := os.ReadFile(proxyPIDFile(i))
		if err != nil {
			continue // a crashed node
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	}
	_, _ = fmt.Fprintln(w, "ok")
}
