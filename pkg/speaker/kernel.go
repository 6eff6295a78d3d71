package speaker

import (
	"context"
	"errors"
	"fmt"
	"os"

	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/conntrack"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/nft"
)

// Kernel is everything of the node the speaker writes: one interface per
// kernel facility and keepalived, opened once from the options by
// OpenKernel; tests fill it with the fakes of the …/testing packages. The
// optional ones may be nil, as each field says, and the speaker does
// without them.
type Kernel struct {
	// Net is the node's addresses, links and sysctls.
	Net hostnet.Interface
	// IPVS is the node's IPVS table. Nil with --ipvs=false, or when the
	// kernel has no IPVS: the speaker then only holds VIPs.
	IPVS ipvs.Interface
	// NFT is keeplb's nftables table. Nil when nft is unusable: nothing is
	// masqueraded and virtual servers with source ranges are withheld.
	NFT knftables.Interface
	// Conntrack clears the entries of removed UDP real servers; nil skips
	// that.
	Conntrack conntrack.Interface
	// Keepalived runs keepalived with the speaker's keepalived.conf.
	Keepalived keepalived.Process
	// Sync runs the kernel's IPVS connection sync daemons; nil without
	// --conn-sync or IPVS.
	Sync ipvs.SyncDaemons
}

// OpenKernel opens the node side of the speaker: the network namespace
// --netns names, else the speaker's own. Only what the speaker cannot run
// without is an error (netlink, keepalived); IPVS, nftables and conntrack
// that cannot be opened are logged with how to fix them, and left nil. o
// must be valid. Close releases what it opened.
func OpenKernel(ctx context.Context, o *Options) (Kernel, error) {
	var k Kernel
	path := netnsPath(o.NetNS)
	var err error
	if path != "" {
		k.Net, err = hostnet.NewAt(path)
	} else {
		k.Net, err = hostnet.New()
	}
	if err != nil {
		return Kernel{}, err
	}
	layout := Layout{RunDir: o.RunDir}
	cmd := o.Keepalived
	if o.NetNS != "" {
		cmd = append([]string{"ip", "netns", "exec", o.NetNS}, cmd...)
	}
	if k.Keepalived, err = keepalived.NewExecProcess(keepalived.ExecOptions{Command: cmd, ConfigPath: layout.ConfigPath(), RunDir: o.RunDir, Output: os.Stderr}); err != nil {
		k.Close()
		return Kernel{}, err
	}
	if o.IPVS {
		h, err := ipvs.NewAt(path)
		if k.IPVS, err = ipvsOrNone(ctx, h, err); err != nil {
			k.Close()
			return Kernel{}, err
		}
		if k.IPVS != nil {
			k.Conntrack = openConntrack(ctx, path)
			if o.ConnSync.Enabled {
				k.Sync = h
			}
		}
	}
	k.NFT = openNFT(ctx, path)
	return k, nil
}

// ipvsOrNone turns the result of opening IPVS into the Kernel's field: a
// kernel without IPVS is no error (logged, nil: the speaker only holds
// VIPs); any other failure is.
func ipvsOrNone(ctx context.Context, h *ipvs.Netlink, err error) (ipvs.Interface, error) {
	if errors.Is(err, ipvs.ErrNoIPVS) {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) is off on this node: the kernel has no IPVS. Load the ip_vs module (modprobe ip_vs) and delete the speaker's pod (its init container sets the IPVS sysctls); meanwhile it only holds VIPs with VRRP")
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open IPVS: %w", err)
	}
	return h, nil
}

// openNFT opens keeplb's nftables table in the network namespace at path
// ("" for the current one), or returns nil, having logged why and how to
// fix it: IPVS forwarding goes on without masquerading and without
// loadBalancerSourceRanges, as it goes on without IPVS.
func openNFT(ctx context.Context, path string) knftables.Interface {
	n, err := nft.NewAt(path)
	if err != nil {
		klog.FromContext(ctx).Error(err, "The speaker runs without keeplb's nftables table: no VIP port guard, nothing is masqueraded (replies from other nodes' NodePorts and pods get lost) and Services with loadBalancerSourceRanges are not forwarded. Install nft v1.0.1 or later in the speaker's image, make sure the kernel has nftables (modprobe nf_tables) and the speaker has CAP_NET_ADMIN, and restart it")
		return nil
	}
	return n
}

// openConntrack opens the conntrack table of the network namespace at
// path, or returns nil, having logged why: IPVS forwarding goes on, but
// UDP clients of a removed real server keep sending to it until their
// conntrack entries time out.
func openConntrack(ctx context.Context, path string) conntrack.Interface {
	c, err := conntrack.NewAt(path)
	if err != nil {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) runs without clearing conntrack: UDP clients of a removed real server keep sending to it until their entries time out. Make sure the kernel has nf_conntrack and the speaker has CAP_NET_ADMIN, and restart it")
		return nil
	}
	return c
}

// ensureSysctls checks, and sets where it can, the sysctls VRRP needs and,
// with IPVS, those IPVS forwarding needs, unless o says they are not the
// speaker's to check.
func ensureSysctls(o *Options, k Kernel) error {
	if o.skipSysctls() {
		return nil
	}
	if err := hostnet.Ensure(k.Net, hostnet.VRRPSysctls()); err != nil {
		return fmt.Errorf("the speaker needs these sysctls, which its DaemonSet's init container (keeplb prepare-node) sets; see that container's log, or delete this pod to run it again: %w", err)
	}
	return ensureIPVSSysctls(k)
}

// ensureIPVSSysctls checks, and sets where it can, the sysctls IPVS
// forwarding needs, when k has IPVS.
func ensureIPVSSysctls(k Kernel) error {
	if k.IPVS == nil {
		return nil
	}
	if err := hostnet.Ensure(k.Net, dataplane.IPVSSysctls()); err != nil {
		return fmt.Errorf("IPVS forwarding (--ipvs) needs these sysctls, which the speaker DaemonSet's init container (keeplb prepare-node) sets once ip_vs is loaded; see that container's log, or delete this pod to run it again: %w", err)
	}
	return nil
}

// netnsPath returns the path of the network namespace --netns names, or ""
// for the speaker's own.
func netnsPath(netns string) string {
	if netns == "" {
		return ""
	}
	return "/run/netns/" + netns
}

// Close releases the handles that can be closed.
func (k Kernel) Close() {
	for _, h := range []any{k.Net, k.IPVS, k.Conntrack} {
		if c, ok := h.(interface{ Close() }); ok {
			c.Close()
		}
	}
}
