package dataplane_e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	"k8s.io/component-base/logs"
	"sigs.k8s.io/yaml"

	keeplbcmd "github.com/keeplb/keeplb/pkg/cmd"
	"github.com/keeplb/keeplb/pkg/nsthread"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/netns"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// TestPrepareNode boots the VM with IPVS not loaded, as on a fresh node,
// and runs what the speaker DaemonSet's init container runs (keeplb
// prepare-node) in a new network namespace: without --ipvs it leaves IPVS
// alone; with it, IPVS gets loaded with no modprobe in PATH (as in the
// image: the kernel loads ip_vs itself on first use of its netlink family,
// since 5.16), and the vs.* sysctls, which exist only then, are set.
func TestPrepareNode(t *testing.T) {
	if !vm.InVM() {
		if os.Getenv("KEEPLB_VM") != "1" {
			t.Skip("needs a kernel whose ip_vs module is not loaded yet: set KEEPLB_VM=1 to run it in the VM of hack/vm")
		}
		vm.RunSelfWith(t, vm.Options{SkipModules: []string{"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc", "ip_vs_mh"}})
		return
	}
	loaded := func() bool { _, err := os.Stat("/proc/net/ip_vs"); return err == nil }
	if loaded() {
		t.Fatal("ip_vs is loaded already: the VM was to boot without it")
	}
	ns := netns.New(t, "prep")
	sysctl := func(name string) string {
		t.Helper()
		b, err := nsthread.Call(nsthread.Path(ns), func() ([]byte, error) { return os.ReadFile("/proc/sys/net/" + name) })
		if err != nil {
			return "(" + err.Error() + ")"
		}
		return strings.TrimSpace(string(b))
	}
	want := func(kv map[string]string) {
		t.Helper()
		for k, v := range kv {
			if got := sysctl(k); got != v {
				t.Errorf("net/%s = %s, want %s", k, got, v)
			}
		}
	}
	t.Setenv("PATH", "/nonexistent") // no modprobe, as in the image

	if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: false, NetNS: ns}); err != nil {
		t.Fatal(err)
	}
	if loaded() {
		t.Fatal("prepare-node --ipvs=false loaded ip_vs")
	}
	want(map[string]string{"ipv4/ip_nonlocal_bind": "1", "ipv4/conf/all/arp_ignore": "1", "ipv4/conf/all/arp_announce": "2", "ipv4/ip_forward": "0"})

	if err := speaker.PrepareNode(t.Context(), &speaker.PrepareOptions{IPVS: true, NetNS: ns}); err != nil {
		t.Fatal(err)
	}
	if !loaded() {
		t.Fatal("prepare-node did not load ip_vs")
	}
	want(map[string]string{"ipv4/vs/conntrack": "1", "ipv4/vs/expire_nodest_conn": "1", "ipv4/ip_forward": "1"})
}

// TestPrepareNodeUnprivileged measures, on the VM's real kernel (booted
// without ip_vs), what the speaker's init container needs. Each run of
// `keeplb prepare-node` happens in a container as a container runtime makes
// one for a pod with privileged: false (containerd's default spec, which
// runc applies): uid 0 in the node's network namespace (hostNetwork), its
// own mount namespace with a fresh /proc whose /proc/sys is read-only, the
// pod's hostPath volumes bound before that, no_new_privs
// (allowPrivilegeEscalation: false) and only the capabilities asked for in
// the bounding, permitted and effective sets. Not reproduced: the seccomp
// and AppArmor profiles (RuntimeDefault), which give a process no more than
// its capabilities allow for what prepare-node does.
//
// The first case is the init container of manifests/speaker/daemonset.yaml
// exactly as written; the others take one thing away from it to show that
// it is needed.
func TestPrepareNodeUnprivileged(t *testing.T) {
	if !vm.InVM() {
		if os.Getenv("KEEPLB_VM") != "1" {
			t.Skip("needs a kernel whose ip_vs module is not loaded yet: set KEEPLB_VM=1 to run it in the VM of hack/vm")
		}
		vm.RunSelfWith(t, vm.Options{SkipModules: []string{"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_lc", "ip_vs_wlc", "ip_vs_mh"}})
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// Everything the manifest gives the init container, then variations.
	manifest := manifestInitContainer(t)
	withoutSysctlMount := manifest
	withoutSysctlMount.Binds = slices.DeleteFunc(slices.Clone(manifest.Binds), func(b bindMount) bool { return b.Source == "/proc/sys/net" })
	withoutSysctlMount.Args = slices.DeleteFunc(slices.Clone(manifest.Args), func(a string) bool { return strings.HasPrefix(a, "--sysctl-root") })
	if len(withoutSysctlMount.Binds) == len(manifest.Binds) {
		t.Fatalf("the init container mounts no hostPath /proc/sys/net: %v", manifest.Binds)
	}
	noCaps := manifest
	noCaps.Caps = nil
	netAdminOnly := manifest
	netAdminOnly.Caps = []string{"NET_ADMIN"}

	// The image has modprobe (kmod); the VM's is busybox's, in /usr/sbin.
	const withModprobe, withoutModprobe = "/usr/sbin:/usr/bin", "/nonexistent"
	vrrp := []string{"ipv4/ip_nonlocal_bind", "ipv4/conf/all/arp_ignore", "ipv4/conf/all/arp_announce"}
	all := append(slices.Clone(vrrp), "ipv4/ip_forward", "ipv4/vs/conntrack", "ipv4/vs/expire_nodest_conn")
	for _, tc := range []struct {
		name     string
		c        container
		path     string
		argv     []string // nil: keeplb with c.args
		wantOK   bool
		wantOut  []string // in the output
		loaded   bool     // ip_vs loaded afterwards
		set, not []string // sysctls under net/ set as prepare-node wants, and left alone
	}{{
		name: "the manifest's init container", c: manifest, path: withModprobe,
		wantOK: true, loaded: true, set: all,
	}, {
		// Why privileged was used: the container's /proc/sys is read-only,
		// whatever its capabilities.
		name: "without the hostPath of /proc/sys/net", c: withoutSysctlMount, path: withModprobe,
		wantOut: []string{"net.ipv4.ip_nonlocal_bind=1", "net.ipv4.ip_forward=1", "net.ipv4.vs.conntrack=1", "read-only file system"},
		loaded:  true, not: all,
	}, {
		// uid 0 may write the net.* sysctls of its namespace; ip_forward
		// alone asks for CAP_NET_ADMIN. The kernel loads ip_vs itself when
		// its netlink family is asked for (Linux 5.16 and later), which
		// needs no capability.
		name: "no capabilities", c: noCaps, path: withoutModprobe,
		wantOut: []string{"net.ipv4.ip_forward=1", "operation not permitted"},
		loaded:  true, set: append(slices.Clone(vrrp), "ipv4/vs/conntrack", "ipv4/vs/expire_nodest_conn"), not: []string{"ipv4/ip_forward"},
	}, {
		// modprobe fails without CAP_SYS_MODULE, and the kernel loads
		// ip_vs all the same.
		name: "NET_ADMIN only", c: netAdminOnly, path: withModprobe,
		wantOK: true, loaded: true, set: all,
	}, {
		// On a kernel older than 5.16 modprobe is the only way in, and it
		// needs CAP_SYS_MODULE.
		name: "modprobe without SYS_MODULE", c: netAdminOnly, path: withModprobe, argv: []string{"/usr/sbin/modprobe", "ip_vs"},
		wantOut: []string{"ip_vs", "not permitted"}, loaded: false,
	}, {
		name: "modprobe with the manifest's capabilities", c: manifest, path: withModprobe, argv: []string{"/usr/sbin/modprobe", "ip_vs"},
		wantOK: true, loaded: true,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			resetNode(t, all)
			argv := tc.argv
			if argv == nil {
				argv = append([]string{exe}, tc.c.Args...)
			}
			out, err := tc.c.run(exe, tc.path, argv)
			t.Logf("caps %v, hostPath mounts %v, argv %q:\n%s", tc.c.Caps, tc.c.Binds, argv, out)
			if ok := err == nil; ok != tc.wantOK {
				t.Errorf("succeeded = %v (%v), want %v", ok, err, tc.wantOK)
			}
			for _, want := range tc.wantOut {
				if !strings.Contains(strings.ToLower(out), strings.ToLower(want)) {
					t.Errorf("output lacks %q", want)
				}
			}
			if got := ipvsLoaded(); got != tc.loaded {
				t.Errorf("ip_vs loaded = %v, want %v", got, tc.loaded)
			}
			for _, name := range tc.set {
				if got, want := hostSysctl(name), preparedValue(name); got != want {
					t.Errorf("net/%s = %s, want %s", name, got, want)
				}
			}
			for _, name := range tc.not {
				if got := hostSysctl(name); got == preparedValue(name) {
					t.Errorf("net/%s = %s: set, though it was not to be", name, got)
				}
			}
		})
	}
}

// container is what a container runtime makes of one container of a pod,
// as far as prepare-node can tell.
type container struct {
	// Caps are the capabilities it keeps (capabilities.add, after
	// drop: ALL), without the CAP_ prefix.
	Caps []string
	// Binds are its hostPath volumes.
	Binds []bindMount
	// Args are its args: keeplb's command line.
	Args []string
}

// bindMount is a hostPath volume mounted into a container.
type bindMount struct {
	Source, Target string
	ReadOnly       bool
}

func (b bindMount) String() string {
	if b.ReadOnly {
		return b.Source + ":" + b.Target + ":ro"
	}
	return b.Source + ":" + b.Target
}

// manifestInitContainer returns the prepare-node init container of
// manifests/speaker/daemonset.yaml, failing t unless it runs as the test
// can reproduce: in the host network, not privileged, as uid 0 without
// privilege escalation, every capability dropped but those it adds, with
// hostPath volumes only.
func manifestInitContainer(t *testing.T) container {
	t.Helper()
	b, err := os.ReadFile("../../manifests/speaker/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Fatal("the speaker pod is not in the host network, as this test assumes")
	}
	i := slices.IndexFunc(spec.InitContainers, func(c v1.Container) bool { return len(c.Args) > 0 && c.Args[0] == "prepare-node" })
	if i < 0 {
		t.Fatal("no init container runs keeplb prepare-node")
	}
	c := spec.InitContainers[i]
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Fatal("the init container has no securityContext")
	case sc.Privileged != nil && *sc.Privileged:
		t.Fatal("the init container is privileged")
	case sc.RunAsUser == nil || *sc.RunAsUser != 0:
		t.Fatal("the init container does not run as uid 0")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Fatal("the init container allows privilege escalation")
	case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL"):
		t.Fatal("the init container does not drop ALL capabilities")
	}
	out := container{Args: c.Args}
	for _, cp := range sc.Capabilities.Add {
		out.Caps = append(out.Caps, string(cp))
	}
	for _, m := range c.VolumeMounts {
		j := slices.IndexFunc(spec.Volumes, func(v v1.Volume) bool { return v.Name == m.Name })
		if j < 0 || spec.Volumes[j].HostPath == nil {
			t.Fatalf("volume %s of the init container is not a hostPath", m.Name)
		}
		out.Binds = append(out.Binds, bindMount{Source: spec.Volumes[j].HostPath.Path, Target: m.MountPath, ReadOnly: m.ReadOnly})
	}
	return out
}

// containEnv makes the test binary enter a container (containSpec, JSON)
// and exec its argv, instead of running tests; runKeeplbEnv makes it
// keeplb, running the command line of its arguments as the image's
// entrypoint does.
const (
	containEnv   = "KEEPLB_PREPARE_E2E_CONTAIN"
	runKeeplbEnv = "KEEPLB_PREPARE_E2E_KEEPLB"
)

// containSpec is a container to enter and what to run in it.
type containSpec struct {
	Caps  []string
	Binds []bindMount
	Argv  []string
	Env   []string
}

func init() {
	if spec := os.Getenv(containEnv); spec != "" {
		// Capabilities and no_new_privs are the calling thread's, and exec
		// hands that thread's to the program: keep to one thread.
		runtime.LockOSThread()
		err := enterContainer(spec)
		fmt.Fprintln(os.Stderr, "enter the container:", err)
		os.Exit(125)
	}
	if os.Getenv(runKeeplbEnv) == "1" {
		// As cmd/keeplb's main does.
		root := keeplbcmd.NewRootCommand()
		root.SetArgs(os.Args[1:])
		err := root.Execute()
		logs.FlushLogs()
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// run runs argv in c, with PATH path, and returns its output.
func (c container) run(exe, path string, argv []string) (string, error) {
	spec, err := json.Marshal(containSpec{Caps: c.Caps, Binds: c.Binds, Argv: argv, Env: []string{"PATH=" + path, runKeeplbEnv + "=1"}})
	if err != nil {
		return "", err
	}
	cmd := exec.Command(exe)
	cmd.Env = []string{containEnv + "=" + string(spec)}
	// A mount namespace of its own, / made private (os/exec does that with
	// CLONE_NEWNS), as a container has.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// capNumbers are the capabilities the test knows by name.
var capNumbers = map[string]int{
	"NET_ADMIN": unix.CAP_NET_ADMIN, "NET_RAW": unix.CAP_NET_RAW,
	"SYS_MODULE": unix.CAP_SYS_MODULE, "SYS_ADMIN": unix.CAP_SYS_ADMIN,
}

// enterContainer does, in a new mount namespace, what runc does for a
// container that is not privileged (in the order runc does it: the mounts,
// then the read-only paths, then the capabilities), and execs the spec's
// argv. It returns only on error.
func enterContainer(js string) error {
	var s containSpec
	if err := json.Unmarshal([]byte(js), &s); err != nil {
		return err
	}
	// hostPath volumes: binds of the node's paths, taken before the
	// container's own /proc is mounted, as runc binds them from the host.
	for _, b := range s.Binds {
		if err := os.MkdirAll(b.Target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(b.Source, b.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b, err)
		}
		if b.ReadOnly {
			if err := unix.Mount("", b.Target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				return fmt.Errorf("read-only %s: %w", b, err)
			}
		}
	}
	// The container's /proc, with /proc/sys read-only: containerd's
	// default spec lists it in readonlyPaths unless privileged.
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	if err := unix.Mount("/proc/sys", "/proc/sys", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind /proc/sys: %w", err)
	}
	if err := unix.Mount("", "/proc/sys", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("read-only /proc/sys: %w", err)
	}
	keep := map[int]bool{}
	var data [2]unix.CapUserData
	for _, name := range s.Caps {
		n, ok := capNumbers[name]
		if !ok {
			return fmt.Errorf("capability %s unknown to this test", name)
		}
		keep[n] = true
		data[n/32].Effective |= 1 << (n % 32)
		data[n/32].Permitted |= 1 << (n % 32)
	}
	// The bounding set first (dropping needs CAP_SETPCAP), up to the
	// kernel's last capability, where prctl says EINVAL.
	for n := range 64 {
		if keep[n] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(n), 0, 0, 0); err == unix.EINVAL {
			break
		} else if err != nil {
			return fmt.Errorf("drop capability %d: %w", n, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	if err := unix.Capset(&unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	// allowPrivilegeEscalation: false.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return syscall.Exec(s.Argv[0], s.Argv, s.Env)
}

// resetNode unloads ip_vs and puts the sysctls under /proc/sys/net that
// exist without it back to the kernel's defaults, as on a fresh node.
func resetNode(t *testing.T, names []string) {
	t.Helper()
	if ipvsLoaded() {
		if err := unix.DeleteModule("ip_vs", unix.O_NONBLOCK); err != nil {
			t.Fatalf("unload ip_vs: %v", err)
		}
	}
	for _, name := range names {
		if strings.HasPrefix(name, "ipv4/vs/") {
			continue // gone with ip_vs
		}
		if err := os.WriteFile("/proc/sys/net/"+name, []byte("0"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func ipvsLoaded() bool { _, err := os.Stat("/proc/net/ip_vs"); return err == nil }

// hostSysctl reads a sysctl under net/ of the VM's network namespace.
func hostSysctl(name string) string {
	b, err := os.ReadFile("/proc/sys/net/" + name)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b))
}

// preparedValue is what prepare-node sets a sysctl under net/ to.
func preparedValue(name string) string {
	if name == "ipv4/conf/all/arp_announce" {
		return "2"
	}
	return "1"
}
