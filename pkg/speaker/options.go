package speaker

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/spf13/pflag"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/connsync"
	"github.com/keeplb/keeplb/pkg/handoff"
	"github.com/keeplb/keeplb/pkg/kubeconfig"
	"github.com/keeplb/keeplb/pkg/serve"
)

// Options are the flags of `keeplb speaker`.
type Options struct {
	// NodeName is this node's name (downward API spec.nodeName).
	NodeName string
	// Kubeconfig is a kubeconfig file; empty means $KUBECONFIG,
	// ~/.kube/config, then in-cluster (package kubeconfig).
	Kubeconfig string
	// LoadBalancerClass and DefaultClass select keeplb's Services, as for
	// the controller; both must be set alike on controller and speakers.
	LoadBalancerClass string
	DefaultClass      bool
	// RunDir holds keepalived.conf, its pid files, notify FIFO and track
	// files.
	RunDir string
	// Keepalived is the command that runs keepalived (a wrapper may come
	// first, e.g. "ip netns exec NS keepalived").
	Keepalived []string
	// ReloadWindow debounces keepalived reloads.
	ReloadWindow time.Duration
	// MinSyncInterval bounds how often the speaker recomputes its state.
	MinSyncInterval time.Duration
	// MetricsBindAddress serves /metrics and /healthz; "0" disables. The
	// default is loopback: in the host network, a wildcard address would
	// answer on every address of the node, each VIP it holds included.
	// The DaemonSet passes the node's address (status.hostIP), where the
	// kubelet probes and Prometheus scrapes a host-network pod.
	MetricsBindAddress string
	// MetricsSecure serves HTTPS, and /metrics only to callers the API
	// server authenticates and authorizes; false serves plain HTTP with
	// /metrics open to anyone who reaches the port, for tests and demos.
	MetricsSecure bool
	// MetricsCertFile and MetricsKeyFile are the serving certificate and
	// key; empty, a self-signed certificate is generated at start.
	MetricsCertFile, MetricsKeyFile string
	// SkipSysctls leaves sysctls alone (they are set on the node already).
	SkipSysctls bool
	// NetNS, for tests and the demo, runs the node side (addresses,
	// keepalived) in the named network namespace while the speaker itself
	// stays in its own, where it reaches the API server.
	NetNS string
	// KubeAPIQPS and KubeAPIBurst limit requests to the API server.
	// kubelet's defaults: each Service a node takes over costs a holder
	// PATCH and an event per VIP, so at 50 a node taking 10,000 VIPs
	// records them in about 7 minutes (17 at the former 20), off the sync
	// path either way.
	KubeAPIQPS   float32
	KubeAPIBurst int
	// IPVS programs this node's IPVS table for keeplb's VIPs, besides
	// holding them with VRRP. On by default: the controller publishes
	// ipMode Proxy for nodeport and pod forwarding, so kube-proxy leaves
	// those VIPs alone and nothing else forwards their traffic.
	IPVS bool
	// IPVSStats serves the per-virtual-server IPVS counters, read from the
	// kernel at most every IPVSStatsMaxAge (0: at every scrape).
	IPVSStats       bool
	IPVSStatsMaxAge time.Duration
	// KeepIPVSOnExit leaves keeplb's IPVS virtual servers, and its
	// nftables table, in place when the speaker exits, instead of deleting
	// them.
	KeepIPVSOnExit bool
	// ConnSync runs the kernel's IPVS connection sync daemons behind the
	// sync guard (package connsync). Off by default: see
	// docs/connections.md for what it keeps and what not yet.
	ConnSync connsync.Config
	// Handoff says when the speaker hands off as it exits (package
	// handoff): HandoffAuto when a replacement will start on this node
	// (handoff.Decide, from its own Pod, DaemonSet and Node),
	// HandoffAlways, or HandoffNever (keepalived stops with priority-0
	// adverts and the VIPs move at once).
	Handoff string
	// HandoffDir holds the hand-off record. It must outlive the pod and
	// not a reboot: a hostPath on the node's /run. Empty: no hand-off.
	HandoffDir string
	// HandoffTimeout is how long the backups wait for the replacement
	// before they take over: at most handoff.MaxTimeout.
	HandoffTimeout time.Duration
	// PodName and PodNamespace name the speaker's own Pod (downward API),
	// for HandoffAuto.
	PodName, PodNamespace string
}

// The values of Options.Handoff.
const (
	HandoffAuto   = "auto"
	HandoffAlways = "always"
	HandoffNever  = "never"
)

// NewOptions returns Options with the defaults.
func NewOptions() *Options {
	return &Options{
		NodeName:           os.Getenv("NODE_NAME"),
		LoadBalancerClass:  annotations.DefaultClass,
		DefaultClass:       true,
		RunDir:             "/run/keeplb",
		Keepalived:         []string{"keepalived"},
		ReloadWindow:       100 * time.Millisecond,
		MinSyncInterval:    100 * time.Millisecond,
		MetricsBindAddress: "127.0.0.1:10261",
		MetricsSecure:      true,
		KubeAPIQPS:         50,
		KubeAPIBurst:       100,
		IPVS:               true,
		IPVSStats:          true,
		IPVSStatsMaxAge:    30 * time.Second,
		Handoff:            HandoffAuto,
		HandoffTimeout:     30 * time.Second,
		PodName:            os.Getenv("POD_NAME"),
		PodNamespace:       os.Getenv("POD_NAMESPACE"),
	}
}

// AddFlags registers the options on fs.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.NodeName, "node-name", o.NodeName, "Name of this node (default $NODE_NAME, set from the downward API).")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig, kubeconfig.Usage)
	fs.StringVar(&o.LoadBalancerClass, "load-balancer-class", o.LoadBalancerClass, "spec.loadBalancerClass handled by keeplb; must match the controller's.")
	fs.BoolVar(&o.DefaultClass, "default-class", o.DefaultClass, "Also handle LoadBalancer Services that set no class; must match the controller's.")
	fs.StringVar(&o.RunDir, "run-dir", o.RunDir, "Directory for keepalived.conf, its pid files, notify FIFO and track files.")
	fs.StringSliceVar(&o.Keepalived, "keepalived", o.Keepalived, "Command that runs keepalived, comma-separated words.")
	fs.DurationVar(&o.ReloadWindow, "reload-window", o.ReloadWindow, "A burst of changes within this window is one keepalived reload (0 means the default, 100ms).")
	fs.DurationVar(&o.MinSyncInterval, "min-sync-interval", o.MinSyncInterval, "Shortest time between two syncs.")
	fs.StringVar(&o.MetricsBindAddress, "metrics-bind-address", o.MetricsBindAddress, "host:port serving /metrics and /healthz; \"0\" disables it. The DaemonSet passes [$(HOST_IP)]:10261, the node's address from the downward API (brackets fit IPv4 and IPv6). An empty host (:10261) answers on every address of the node, each VIP it holds included.")
	fs.BoolVar(&o.MetricsSecure, "metrics-secure", o.MetricsSecure, "Serve HTTPS, and /metrics only to callers the API server authenticates (bearer token, TokenReview) and authorizes to get the non-resource URL /metrics (SubjectAccessReview); /healthz stays open. --metrics-secure=false is INSECURE: plain HTTP, metrics (Service names, VIPs, nodes, traffic counters) open to anyone who reaches the port; for tests and demos only.")
	fs.StringVar(&o.MetricsCertFile, "metrics-cert-file", o.MetricsCertFile, "PEM serving certificate (with its chain) for the metrics port, read again when it changes. Empty: a self-signed certificate generated at start.")
	fs.StringVar(&o.MetricsKeyFile, "metrics-key-file", o.MetricsKeyFile, "PEM private key of --metrics-cert-file.")
	fs.BoolVar(&o.SkipSysctls, "skip-sysctls", o.SkipSysctls, "Do not check or set the sysctls VRRP needs.")
	fs.StringVar(&o.NetNS, "netns", o.NetNS, "For tests and demos: manage addresses, run keepalived and (with --ipvs) program IPVS and keeplb's nftables table in this named network namespace (ip netns, /run/netns/NAME). Implies --skip-sysctls for the speaker's own namespace.")
	fs.Float32Var(&o.KubeAPIQPS, "kube-api-qps", o.KubeAPIQPS, "Queries per second to the API server: mostly the holder annotations and VIPAcquired events, written apart from the syncs (one PATCH per Service and one event per VIP a node takes over).")
	fs.IntVar(&o.KubeAPIBurst, "kube-api-burst", o.KubeAPIBurst, "Burst of queries to the API server.")
	fs.BoolVar(&o.IPVS, "ipvs", o.IPVS, "Also forward VIP traffic with IPVS on this node (virtual servers to NodePorts or pods, with keeplb's nftables table inet keeplb for masquerading and loadBalancerSourceRanges; needs nft v1.0.1+; with --netns both live in that namespace). --ipvs=false: the speaker only holds VIPs with VRRP, and Services forwarded by nodeport or pod get no traffic. On a kernel without IPVS the speaker logs an error, records an IPVSUnavailable Warning event on each Service it would forward, and goes on holding VIPs.")
	fs.BoolVar(&o.IPVSStats, "ipvs-stats", o.IPVSStats, "With --ipvs: serve keeplb_ipvs_connections_total, keeplb_ipvs_packets_total and keeplb_ipvs_bytes_total, five series per virtual server on every node that programs it (50,000 per node at 10,000 Services).")
	fs.DurationVar(&o.IPVSStatsMaxAge, "ipvs-stats-max-age", o.IPVSStatsMaxAge, "With --ipvs-stats: read the IPVS counters from the kernel (a dump of the whole table) at most this often; a scrape serves the last read's and starts the next read in the background once they are this old. 0 reads at every scrape.")
	fs.BoolVar(&o.ConnSync.Enabled, "conn-sync", o.ConnSync.Enabled, "With --ipvs: run the kernel's IPVS connection sync daemons, so that the node that takes a VIP over has the connection entries of the node that held it (docs/connections.md: what this keeps, and what not yet). The backup daemon, which installs what it receives, runs only while keeplb's nftables table admits sync messages from the other Nodes' InternalIPs alone; a kernel without the daemons gets a Warning event on the Node and forwards as before.")
	fs.StringVar(&o.ConnSync.Interface, "conn-sync-interface", o.ConnSync.Interface, "With --conn-sync: the link the sync daemons use (default: the one that holds the Node's InternalIP of the group's family).")
	fs.Uint8Var(&o.ConnSync.SyncID, "conn-sync-id", o.ConnSync.SyncID, "With --conn-sync: the sync ID of this cluster's messages (0 to 255); a node installs only its own ID's (0: any). Give clusters that share a segment different IDs.")
	fs.Var(addrValue{&o.ConnSync.Group}, "conn-sync-group", "With --conn-sync: the multicast group (default 224.0.0.81, the kernel's; an IPv6 group syncs over IPv6).")
	fs.Uint16Var(&o.ConnSync.Port, "conn-sync-port", o.ConnSync.Port, fmt.Sprintf("With --conn-sync: the first UDP port (0: %d); the daemons' threads use up to %d ports from it, all guarded.", connsync.DefaultPort, connsync.MaxThreads))
	fs.StringVar(&o.Handoff, "handoff", o.Handoff, "When to hand off as the speaker exits, so that replacing it moves no VIP (docs/speaker.md#upgrades-that-move-no-vip): \"auto\" when a replacement will start on this node (its Pod is being deleted, not evicted, by a DaemonSet that still selects the node; needs --handoff-dir, $POD_NAME and $POD_NAMESPACE), \"always\", or \"never\" (keepalived stops with priority-0 adverts and the VIPs move at once).")
	fs.StringVar(&o.HandoffDir, "handoff-dir", o.HandoffDir, "Directory for the hand-off record, which the replacement reads: it must outlive the pod and not a reboot (the DaemonSet mounts the node's /run/keeplb-handoff). Empty: no hand-off.")
	fs.DurationVar(&o.HandoffTimeout, "handoff-timeout", o.HandoffTimeout, fmt.Sprintf("How long the backups wait for the replacement after a hand-off before they take over (at most %v). A node that fails in that window fails over after it, not after three adverts.", handoff.MaxTimeout))
	fs.BoolVar(&o.KeepIPVSOnExit, "keep-ipvs-on-exit", o.KeepIPVSOnExit, "With --ipvs: leave keeplb's IPVS virtual servers and its nftables table in place when the speaker exits, for upgrades, so the next speaker finds them programmed and only reconciles them. By default both are deleted on exit, so that a removed keeplb leaves no forwarding behind.")
}

// skipSysctls says whether the sysctls are not the speaker's to check:
// --skip-sysctls, or --netns (another namespace's sysctls are not this
// process's).
func (o *Options) skipSysctls() bool {
	return o.SkipSysctls || o.NetNS != ""
}

// Validate reports every invalid option at once.
func (o *Options) Validate() error {
	var errs []error
	if o.NodeName == "" {
		errs = append(errs, errors.New("--node-name (or $NODE_NAME) is required: the speaker must know which node it runs on"))
	}
	if err := annotations.ValidateClass("--load-balancer-class", o.LoadBalancerClass); err != nil {
		errs = append(errs, err)
	}
	if o.RunDir == "" || len(o.Keepalived) == 0 {
		errs = append(errs, errors.New("--run-dir and --keepalived must not be empty"))
	}
	if o.ReloadWindow < 0 || o.MinSyncInterval < 0 || o.IPVSStatsMaxAge < 0 {
		errs = append(errs, errors.New("--reload-window, --min-sync-interval and --ipvs-stats-max-age must not be negative"))
	}
	if err := o.ConnSync.Validate(); err != nil {
		errs = append(errs, err)
	}
	if o.ConnSync.Enabled && !o.IPVS {
		errs = append(errs, errors.New("--conn-sync needs --ipvs: the sync daemons copy IPVS connection entries"))
	}
	switch o.Handoff {
	case HandoffAuto, HandoffNever:
	case HandoffAlways:
		if o.HandoffDir == "" {
			errs = append(errs, errors.New("--handoff=always needs --handoff-dir: the replacement reads the hand-off record there"))
		}
	default:
		errs = append(errs, fmt.Errorf("--handoff=%q: want %q, %q or %q", o.Handoff, HandoffAuto, HandoffAlways, HandoffNever))
	}
	if o.HandoffTimeout <= 0 || o.HandoffTimeout > handoff.MaxTimeout {
		errs = append(errs, fmt.Errorf("--handoff-timeout=%v: want more than 0 and at most %v (three times the longest advert interval VRRPv3 carries)", o.HandoffTimeout, handoff.MaxTimeout))
	}
	if o.MetricsBindAddress != "0" {
		if err := o.serveConfig().Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// serveConfig is the metrics and health server's share of the options.
func (o *Options) serveConfig() serve.Config {
	c := serve.Config{BindAddress: o.MetricsBindAddress, Insecure: !o.MetricsSecure, CertFile: o.MetricsCertFile, KeyFile: o.MetricsKeyFile}
	c.Defaults()
	return c
}

// addrValue is a pflag.Value of an optional IP address: "" is the zero
// Addr.
type addrValue struct{ a *netip.Addr }

// String is part of pflag.Value.
func (v addrValue) String() string {
	if v.a == nil || !v.a.IsValid() {
		return ""
	}
	return v.a.String()
}

// Set is part of pflag.Value.
func (v addrValue) Set(s string) error {
	if s == "" {
		*v.a = netip.Addr{}
		return nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return err
	}
	*v.a = a
	return nil
}

// Type is part of pflag.Value.
func (addrValue) Type() string { return "ip" }
