package cluster

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// runNode is one node, inside the VM: it runs in the node's network
// namespace and in a mount namespace of its own (`ip netns exec` made
// both), starts containerd on the images the agent seeded, then the
// kubelet and kube-proxy, and waits. Each process logs to Dir/logs/nodeN-NAME.log.
func runNode(cfg *config, i int) error {
	name := NodeName(i)
	logs := filepath.Join(cfg.Dir, "logs")
	if err := setUpNodeMounts(i); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if err := writeNodeFiles(cfg, i); err != nil {
		return err
	}
	containerd, err := startLogged(ctx, logs, name+"-containerd", filepath.Join(cfg.ClusterTools, "containerd"), "--config", "/etc/containerd/config.toml")
	if err != nil {
		return err
	}
	if err := waitFile(ctx, containerdSocket(i), time.Minute); err != nil {
		return fmt.Errorf("%s: containerd did not start: %w", name, err)
	}
	kubelet, err := startLogged(ctx, logs, name+"-kubelet", filepath.Join(cfg.ClusterTools, "kubelet"),
		"--config=/var/lib/kubelet/config.yaml", "--kubeconfig=/var/lib/kubelet/kubeconfig",
		"--hostname-override="+name, "--node-ip="+NodeAddr(i).String(), "--v=1")
	if err != nil {
		return err
	}
	go runProxy(ctx, cfg, i)
	// A node whose process died is a broken node, which the host sees (the
	// Node turns NotReady) and reports with the logs; the others go on.
	for _, p := range []*exec.Cmd{containerd, kubelet} {
		go func() {
			err := p.Wait()
			if ctx.Err() == nil {
				log.Printf("%s: %s exited: %v", name, filepath.Base(p.Path), err)
			}
		}()
	}
	<-ctx.Done()
	for _, p := range []*exec.Cmd{kubelet, containerd} {
		_ = p.Process.Signal(syscall.SIGTERM)
	}
	return nil
}

// setUpNodeMounts gives the node its own /var (the kubelet's and
// containerd's state, /var/log/pods), /run/containerd and /etc/containerd,
// a cgroup2 mount and its leaf cgroup /nodeN/system, and its own
// machine-id. `ip netns exec` left the mount namespace a slave of the VM's;
// private, nothing mounted here shows elsewhere.
func setUpNodeMounts(i int) error {
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	// ip netns exec mounted a fresh /sys for the namespace, without cgroups.
	if err := syscall.Mount("none", "/sys/fs/cgroup", "cgroup2", 0, ""); err != nil {
		return fmt.Errorf("mount cgroup2: %w", err)
	}
	leaf := fmt.Sprintf("/sys/fs/cgroup/%s/system", NodeName(i))
	if err := os.MkdirAll(leaf, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(leaf+"/cgroup.procs", []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("move into %s: %w", leaf, err)
	}
	for _, dir := range []string{"/var", "/run/containerd", "/etc/containerd"} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "mode=755"); err != nil {
			return fmt.Errorf("mount tmpfs on %s: %w", dir, err)
		}
	}
	for _, dir := range []string{"/var/lib/kubelet", "/var/log"} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	id := fmt.Sprintf("%032x\n", 0xc1a5+i)
	if err := os.WriteFile("/etc/containerd/machine-id", []byte(id), 0o444); err != nil {
		return err
	}
	if _, err := os.Stat("/etc/machine-id"); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile("/etc/machine-id", nil, 0o444); err != nil {
			return err
		}
	}
	if err := syscall.Mount("/etc/containerd/machine-id", "/etc/machine-id", "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind machine-id: %w", err)
	}
	return nil
}

// nodeRun is node i's folder in the VM's /run, which the agent sees too:
// the CNI configuration it writes once the node has its podCIDR, and
// containerd's socket, for the images a test imports later.
func nodeRun(i int) string { return "/run/keeplb-cluster/" + NodeName(i) }

func cniDir(i int) string           { return nodeRun(i) + "/net.d" }
func containerdSocket(i int) string { return nodeRun(i) + "/containerd.sock" }

// containerdRoot is node i's containerd root: in the VM's /run, on the
// same filesystem as the seed's (seedImages), whose image data it shares
// through hard links.
func containerdRoot(i int) string { return nodeRun(i) + "/containerd" }

// writeNodeFiles writes containerd's, the kubelet's and kube-proxy's
// configuration and credentials.
func writeNodeFiles(cfg *config, i int) error {
	name := NodeName(i)
	if err := os.MkdirAll(cniDir(i), 0o755); err != nil {
		return err
	}
	files := map[string]string{
		"/etc/containerd/config.toml":  containerdConfig(cfg, containerdRoot(i), "/run/containerd", containerdSocket(i), cniDir(i)),
		"/var/lib/kubelet/kubeconfig":  kubeconfig(cfg, cfg.Tokens[name]),
		"/var/lib/kubelet/proxyconfig": kubeconfig(cfg, cfg.Tokens["proxy"]),
		// The node's processes run under /nodeN; a tmpfs /var cannot be
		// sized for ephemeral-storage eviction.
		"/var/lib/kubelet/config.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /%s
containerRuntimeEndpoint: unix://%s
failSwapOn: false
localStorageCapacityIsolation: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: ""
evictionHard: {memory.available: "1Mi"}
nodeStatusReportFrequency: 10s
`, name, containerdSocket(i)),
	}
	for f, content := range files {
		if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
			return err
		}
	}
	return writeProxyConfig(i, cfg.ProxyMode)
}

// proxyConfig is node i's kube-proxy configuration, in the VM's /run so
// that the agent can change the mode (SetProxyMode).
func proxyConfig(i int) string { return nodeRun(i) + "/kube-proxy.yaml" }

func proxyPIDFile(i int) string { return nodeRun(i) + "/kube-proxy.pid" }

func writeProxyConfig(i int, mode string) error {
	conf := fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %q
clientConnection: {kubeconfig: /var/lib/kubelet/proxyconfig}
hostnameOverride: %s
clusterCIDR: 10.244.0.0/16
conntrack: {maxPerCore: 0}
`, mode, NodeName(i))
	if err := os.WriteFile(proxyConfig(i)+".tmp", []byte(conf), 0o600); err != nil {
		return err
	}
	return os.Rename(proxyConfig(i)+".tmp", proxyConfig(i))
}

// runProxy runs kube-proxy until ctx ends, starting it again whenever it
// exits: the agent changes its mode by rewriting the configuration and
// stopping it, as an operator restarts kube-proxy with a new mode.
func runProxy(ctx context.Context, cfg *config, i int) {
	logs := filepath.Join(cfg.Dir, "logs")
	for ctx.Err() == nil {
		p, err := startLogged(ctx, logs, NodeName(i)+"-kube-proxy", filepath.Join(cfg.ClusterTools, "kube-proxy"),
			"--config="+proxyConfig(i), "--v=1")
		if err != nil {
			log.Printf("%s: %v", NodeName(i), err)
			return
		}
		_ = os.WriteFile(proxyPIDFile(i), []byte(strconv.Itoa(p.Process.Pid)), 0o644)
		stop := context.AfterFunc(ctx, func() { _ = p.Process.Signal(syscall.SIGTERM) })
		err = p.Wait()
		stop()
		if ctx.Err() == nil {
			log.Printf("%s: kube-proxy exited (%v); starting it again", NodeName(i), err)
			time.Sleep(time.Second)
		}
	}
}

// containerdConfig is the configuration of a node's containerd, or of the
// seed's. runc cannot pivot_root out of the VM's initramfs: NoPivotRoot.
func containerdConfig(cfg *config, root, state, socket, cni string) string {
	return fmt.Sprintf(`version = 3
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [%q]
  conf_dir = %q
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = %q
    SystemdCgroup = false
    NoPivotRoot = true
`, root, state, socket, filepath.Join(cfg.ClusterTools, "cni"), cni, filepath.Join(cfg.ClusterTools, "runc"))
}

func kubeconfig(cfg *config, token string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: %q, certificate-authority: %q}
users:
- name: u
  user: {token: %q}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
`, cfg.Server, cfg.CAFile, token)
}

// startLogged starts a process of the node, its output appended to
// logs/NAME.log.
func startLogged(ctx context.Context, logs, name, bin string, args ...string) (*exec.Cmd, error) {
	f, err := os.OpenFile(filepath.Join(logs, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	log.Printf("%s: started (pid %d)", name, cmd.Process.Pid)
	return cmd, nil
}

// waitFile polls for file until it exists or d passes.
func waitFile(ctx context.Context, file string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		if _, err := os.Stat(file); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no %s after %s", file, d)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
