package speaker

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nsthread"
)

// PrepareOptions are the flags of `keeplb prepare-node`, which the speaker
// DaemonSet runs as its privileged init container. The speaker itself runs
// unprivileged, where /proc/sys is read-only, and init containers do not
// run again when the speaker's container restarts: so the sysctls are set
// here, once per pod, after IPVS is loaded (its vs.* sysctls exist only
// then).
type PrepareOptions struct {
	// IPVS loads IPVS and sets its sysctls too, as the speaker's --ipvs.
	IPVS bool
	// NetNS, for tests and the demo, prepares the named network namespace
	// (ip netns) instead of the current one.
	NetNS string
}

// NewPrepareOptions returns PrepareOptions with the defaults.
func NewPrepareOptions() *PrepareOptions { return &PrepareOptions{IPVS: true} }

// AddFlags registers the options on fs.
func (o *PrepareOptions) AddFlags(fs *pflag.FlagSet) {
	fs.BoolVar(&o.IPVS, "ipvs", o.IPVS, "Also load IPVS (the ip_vs module) and set the sysctls IPVS forwarding needs; as the speaker's --ipvs. A kernel without IPVS is logged, not an error: the speaker then only holds VIPs.")
	fs.StringVar(&o.NetNS, "netns", o.NetNS, "For tests and demos: prepare this named network namespace (ip netns, /run/netns/NAME) instead of the current one.")
}

// Validate reports invalid options; there are none so far.
func (o *PrepareOptions) Validate() error { return nil }

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
		return prepare(ctx, o.IPVS, func() (ipvs.Interface, error) { return openIPVS("") }, net)
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
			closeHandle(h)
			reqs = append(reqs, ipvsSysctls()...)
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
