package speaker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nsthread"
)

// PrepareOptions are the flags of `keeplb prepare-node`, which the speaker
// DaemonSet runs as its init container. A container's /proc/sys is
// read-only unless it is privileged, and init containers do not run again
// when the speaker's container restarts: so the sysctls are set here, once
// per pod, after IPVS is loaded (its vs.* sysctls exist only then), through
// the node's /proc/sys/net mounted elsewhere (SysctlRoot).
type PrepareOptions struct {
	// IPVS loads IPVS and sets its sysctls too, as the speaker's --ipvs.
	IPVS bool
	// NetNS, for tests and the demo, prepares the named network namespace
	// (ip netns) instead of the current one.
	NetNS string
	// SysctlRoot is the folder whose net/ is /proc/sys/net: /proc/sys, or
	// where the DaemonSet mounts the node's /proc/sys/net (a hostPath
	// volume, writable where the container's own /proc/sys is not). Either
	// way the net.* sysctls are those of the writing thread's network
	// namespace, the node's with hostNetwork. Empty means /proc/sys.
	SysctlRoot string
}

// NewPrepareOptions returns PrepareOptions with the defaults.
func NewPrepareOptions() *PrepareOptions {
	return &PrepareOptions{IPVS: true, SysctlRoot: DefaultSysctlRoot}
}

// DefaultSysctlRoot is where the kernel's sysctls are, outside containers.
const DefaultSysctlRoot = "/proc/sys"

// AddFlags registers the options on fs.
func (o *PrepareOptions) AddFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&o.IPVS, "ipvs", o.IPVS, "Also load IPVS (the ip_vs module) and set the sysctls IPVS forwarding needs; as the speaker's --ipvs. A kernel without IPVS is logged, not an error: the speaker then only holds VIPs.")
	fs.StringVar(&o.NetNS, "netns", o.NetNS, "For tests and demos: prepare this named network namespace (ip netns, /run/netns/NAME) instead of the current one.")
	fs.StringVar(&o.SysctlRoot, "sysctl-root", o.SysctlRoot, "Folder whose net/ subfolder is the node's /proc/sys/net, where the sysctls are written. In a container that is not privileged /proc/sys is read-only: mount the node's /proc/sys/net (a hostPath volume) elsewhere, such as /host/proc/sys/net, and pass its parent, /host/proc/sys.")
}

// Validate reports invalid options.
func (o *PrepareOptions) Validate() error {
	if !filepath.IsAbs(o.SysctlRoot) {
		return fmt.Errorf("--sysctl-root %q: want an absolute path", o.SysctlRoot)
	}
	return nil
}

// PrepareNode readies a node for the speaker: it loads IPVS when asked
// (the kernel loads ip_vs on first use of its netlink family since Linux
// 5.16; before that, modprobe must be in the image and the host's
// /lib/modules mounted) and sets the sysctls VRRP and IPVS need, returning
// one error that names each sysctl it could not set.
func PrepareNode(ctx context.Context, o *PrepareOptions) error {
	run := func() error {
		net, err := hostnet.New()
		if err != nil {
			return err
		}
		defer net.Close()
		var h hostnet.Interface = net
		if root := filepath.Clean(o.SysctlRoot); root != DefaultSysctlRoot && root != "." {
			h = sysctlsUnder{Interface: net, root: root}
		}
		return prepare(ctx, o.IPVS, func() (ipvs.Interface, error) {
			h, err := ipvs.New()
			if err != nil {
				return nil, err // not a typed nil in an interface
			}
			return h, nil
		}, h)
	}
	if o.NetNS == "" {
		return run()
	}
	// On a thread inside the namespace, /proc/sys/net is the namespace's.
	return nsthread.Do(nsthread.Path(o.NetNS), run)
}

// prepare is PrepareNode with its kernel access given.
func prepare(ctx context.Context, withIPVS bool, open func() (ipvs.Interface, error), net hostnet.Interface) error {
	logger := klog.FromContext(ctx)
	reqs := hostnet.VRRPSysctls()
	if withIPVS {
		h, err := open()
		switch {
		case errors.Is(err, ipvs.ErrNoIPVS):
			// Not fatal: the speaker holds VIPs all the same, and says so
			// on every Service it cannot forward.
			logger.Error(err, "This node's kernel has no IPVS, so its speaker will hold VIPs but not forward their traffic. Load the ip_vs module (modprobe ip_vs, and ip_vs in /etc/modules-load.d/ for the next boot), then delete this speaker pod so that this runs again")
		case err != nil:
			return fmt.Errorf("open IPVS: %w", err)
		default:
			if c, ok := h.(interface{ Close() }); ok {
				c.Close()
			}
			reqs = append(reqs, dataplane.IPVSSysctls()...)
		}
	}
	if err := hostnet.Ensure(net, reqs); err != nil {
		return fmt.Errorf("prepare the node for the speaker: %w", err)
	}
	for _, r := range reqs {
		logger.Info("Sysctl holds", "name", r.Name, "value", r.Value, "why", r.Why)
	}
	return nil
}

// sysctlsUnder reads and writes the sysctls under root, a mount of the
// node's /proc/sys/net at root/net; the rest of the node's network it
// leaves to the hostnet.Interface it wraps. A procfs mount shows under net/
// the network namespace of the thread that opens a file, whichever procfs
// it is, so this is the node's namespace (hostNetwork) or NetNS's.
type sysctlsUnder struct {
	hostnet.Interface
	root string
}

// Sysctl is part of hostnet.Interface.
func (s sysctlsUnder) Sysctl(name string) (string, error) {
	b, err := os.ReadFile(s.path(name))
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// SetSysctl is part of hostnet.Interface.
func (s sysctlsUnder) SetSysctl(name, value string) error {
	return os.WriteFile(s.path(name), []byte(value), 0o644)
}

// path maps net.ipv4.ip_forward to root/net/ipv4/ip_forward, as
// hostnet.Netlink does under /proc/sys.
func (s sysctlsUnder) path(name string) string {
	return filepath.Join(s.root, filepath.FromSlash(strings.ReplaceAll(name, ".", "/")))
}
