package controller

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/kubeconfig"
	"github.com/keeplb/keeplb/pkg/serve"
)

// Options are the flags of `keeplb controller`.
type Options struct {
	// Kubeconfig is a kubeconfig file; empty looks where kubeconfig.Load
	// says.
	Kubeconfig string
	// ClusterName is passed to the LoadBalancer implementation, as
	// kube-controller-manager's --cluster-name would be.
	ClusterName string
	// LoadBalancerClass is the spec.loadBalancerClass keeplb answers to.
	LoadBalancerClass string
	// DefaultClass makes keeplb handle Services that set no class.
	DefaultClass bool
	// AllowUnmanagedIPs are the CIDRs outside every pool that keeplb.io/ips
	// and spec.loadBalancerIP may name; none by default. Any tenant who may
	// create a Service may claim an address there.
	AllowUnmanagedIPs []string
	// Workers is the number of Services reconciled at once.
	Workers int
	// RetryInterval is how often a Service that could not get an address is
	// retried when nothing it depends on changes.
	RetryInterval time.Duration
	// MetricsBindAddress serves /metrics, /healthz and /readyz; "0" disables.
	MetricsBindAddress string
	// MetricsSecure serves HTTPS, and /metrics only to callers the API
	// server authenticates and authorizes; false serves plain HTTP with
	// /metrics open to anyone who reaches the port, for tests and demos.
	MetricsSecure bool
	// MetricsCertFile and MetricsKeyFile are the serving certificate and
	// key; empty, a self-signed certificate is generated at start.
	MetricsCertFile, MetricsKeyFile string
	// LeaderElect runs only one active controller among the replicas.
	LeaderElect bool
	// LeaderElectNamespace holds the Lease.
	LeaderElectNamespace string
	// LeaderElectName is the Lease's name.
	LeaderElectName string
	// LeaseDuration, RenewDeadline and RetryPeriod tune leader election.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// Identity names this replica in the Lease; default: hostname.
	Identity string
	// KubeAPIQPS and KubeAPIBurst limit the requests to the API server of
	// each writer: each has a client, and so a rate limiter, of its own.
	KubeAPIQPS   float32
	KubeAPIBurst int
	// EventQPS and EventBurst limit the event writer's requests: events
	// trail the status writes instead of taking the API server's time
	// from them (kubelet's --event-qps and --event-burst do the same).
	EventQPS   float32
	EventBurst int
}

// NewOptions returns Options with the defaults.
func NewOptions() *Options {
	ns := os.Getenv("POD_NAMESPACE")
	if ns == "" {
		ns = "keeplb-system"
	}
	id := os.Getenv("POD_NAME")
	if id == "" {
		id, _ = os.Hostname()
	}
	return &Options{
		ClusterName:          "kubernetes",
		LoadBalancerClass:    annotations.DefaultClass,
		DefaultClass:         true,
		Workers:              16,
		RetryInterval:        time.Minute,
		MetricsBindAddress:   ":10260",
		MetricsSecure:        true,
		LeaderElect:          true,
		LeaderElectNamespace: ns,
		LeaderElectName:      "keeplb-controller",
		LeaseDuration:        15 * time.Second,
		RenewDeadline:        10 * time.Second,
		RetryPeriod:          2 * time.Second,
		Identity:             id,
		KubeAPIQPS:           500,
		KubeAPIBurst:         2000,
		EventQPS:             50,
		EventBurst:           100,
	}
}

// AddFlags registers the options on fs.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Kubeconfig, "kubeconfig", o.Kubeconfig, kubeconfig.Usage)
	fs.StringVar(&o.ClusterName, "cluster-name", o.ClusterName, "Cluster name passed to the load balancer implementation.")
	fs.StringVar(&o.LoadBalancerClass, "load-balancer-class", o.LoadBalancerClass, "spec.loadBalancerClass handled by keeplb. Services of any other class are never touched.")
	fs.BoolVar(&o.DefaultClass, "default-class", o.DefaultClass, "Also handle LoadBalancer Services that set no spec.loadBalancerClass.")
	fs.StringSliceVar(&o.AllowUnmanagedIPs, "allow-unmanaged-ips", o.AllowUnmanagedIPs, "CIDRs outside every IPPool that keeplb.io/ips and spec.loadBalancerIP may name, comma-separated (e.g. 203.0.113.0/28). Any tenant who may create a Service can claim an address there; never with keeplb.io/forwarding: kube-proxy. Default none.")
	fs.IntVar(&o.Workers, "workers", o.Workers, "Number of Services each of the two service reconcilers (classless Services, and Services of --load-balancer-class) works on concurrently.")
	fs.DurationVar(&o.RetryInterval, "retry-interval", o.RetryInterval, "How often a Service without an address is retried when nothing changes. Freed addresses, pool and namespace changes retry it at once.")
	fs.StringVar(&o.MetricsBindAddress, "metrics-bind-address", o.MetricsBindAddress, "Address serving /metrics, /healthz and /readyz. \"0\" disables it.")
	fs.BoolVar(&o.MetricsSecure, "metrics-secure", o.MetricsSecure, "Serve HTTPS, and /metrics only to callers the API server authenticates (bearer token, TokenReview) and authorizes to get the non-resource URL /metrics (SubjectAccessReview); /healthz and /readyz stay open. --metrics-secure=false is INSECURE: plain HTTP, metrics open to anyone who reaches the port; for tests and demos only.")
	fs.StringVar(&o.MetricsCertFile, "metrics-cert-file", o.MetricsCertFile, "PEM serving certificate (with its chain) for the metrics port, read again when it changes. Empty: a self-signed certificate generated at start.")
	fs.StringVar(&o.MetricsKeyFile, "metrics-key-file", o.MetricsKeyFile, "PEM private key of --metrics-cert-file.")
	fs.BoolVar(&o.LeaderElect, "leader-elect", o.LeaderElect, "Elect one active replica through a Lease.")
	fs.StringVar(&o.LeaderElectNamespace, "leader-elect-namespace", o.LeaderElectNamespace, "Namespace of the leader election Lease (default $POD_NAMESPACE or keeplb-system).")
	fs.StringVar(&o.LeaderElectName, "leader-elect-name", o.LeaderElectName, "Name of the leader election Lease.")
	fs.DurationVar(&o.LeaseDuration, "leader-elect-lease-duration", o.LeaseDuration, "How long a non-renewed Lease stays valid.")
	fs.DurationVar(&o.RenewDeadline, "leader-elect-renew-deadline", o.RenewDeadline, "How long the leader tries to renew before giving up leadership.")
	fs.DurationVar(&o.RetryPeriod, "leader-elect-retry-period", o.RetryPeriod, "How often candidates try to acquire or renew the Lease.")
	fs.StringVar(&o.Identity, "leader-elect-identity", o.Identity, "This replica's identity in the Lease (default $POD_NAME or the hostname).")
	fs.Float32Var(&o.KubeAPIQPS, "kube-api-qps", o.KubeAPIQPS, "Queries per second to the API server, for each writer (the upstream service controller, the class controller, the pool status writer and the event writer have a client each).")
	fs.IntVar(&o.KubeAPIBurst, "kube-api-burst", o.KubeAPIBurst, "Burst of queries to the API server, for each writer.")
	fs.Float32Var(&o.EventQPS, "event-qps", o.EventQPS, "Events written per second at most: events queue behind the Service writes (up to 10,000 distinct ones; what is dropped is counted in keeplb_controller_events_dropped_total).")
	fs.IntVar(&o.EventBurst, "event-burst", o.EventBurst, "Burst of events written at once.")
}

// Validate reports every invalid option at once.
func (o *Options) Validate() error {
	var errs []error
	if err := annotations.ValidateClass("--load-balancer-class", o.LoadBalancerClass); err != nil {
		errs = append(errs, err)
	}
	if o.Workers < 1 {
		errs = append(errs, fmt.Errorf("--workers must be at least 1, got %d", o.Workers))
	}
	if o.RetryInterval < time.Second {
		errs = append(errs, fmt.Errorf("--retry-interval must be at least 1s, got %s", o.RetryInterval))
	}
	if o.MetricsBindAddress != "0" {
		if err := o.serveConfig().Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if o.LeaderElect {
		if o.LeaderElectNamespace == "" || o.LeaderElectName == "" || o.Identity == "" {
			errs = append(errs, errors.New("--leader-elect needs --leader-elect-namespace, --leader-elect-name and an identity"))
		}
		if !(o.LeaseDuration > o.RenewDeadline && o.RenewDeadline > o.RetryPeriod && o.RetryPeriod > 0) {
			errs = append(errs, fmt.Errorf("leader election needs lease-duration > renew-deadline > retry-period > 0, got %s, %s, %s", o.LeaseDuration, o.RenewDeadline, o.RetryPeriod))
		} else if o.writeTimeout() < 500*time.Millisecond {
			// A leader that lost the Lease must have time to finish its
			// writes before another one may start.
			errs = append(errs, fmt.Errorf("leader election needs lease-duration at least renew-deadline + retry-period + 500ms, got %s, %s, %s", o.LeaseDuration, o.RenewDeadline, o.RetryPeriod))
		}
	}
	if _, err := o.unmanaged(); err != nil {
		errs = append(errs, err)
	}
	if o.KubeAPIQPS <= 0 || o.KubeAPIBurst < 1 {
		errs = append(errs, errors.New("--kube-api-qps and --kube-api-burst must be positive"))
	}
	if o.EventQPS <= 0 || o.EventBurst < 1 {
		errs = append(errs, errors.New("--event-qps and --event-burst must be positive"))
	}
	return errors.Join(errs...)
}

// writeTimeout bounds each API write of the controller's work. A leader
// that cannot renew gives up at the latest RetryPeriod + RenewDeadline after
// its last renewal, and the others may take the Lease LeaseDuration after
// they saw that renewal: a write sent just before the leader gives up must
// be over within the difference.
func (o *Options) writeTimeout() time.Duration {
	if !o.LeaderElect {
		return time.Minute
	}
	return o.LeaseDuration - o.RenewDeadline - o.RetryPeriod
}

// unmanaged parses AllowUnmanagedIPs.
func (o *Options) unmanaged() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, c := range o.AllowUnmanagedIPs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		switch {
		case err != nil:
			return nil, fmt.Errorf("--allow-unmanaged-ips %q: want CIDRs such as 203.0.113.0/28 (it used to be a boolean: list the ranges tenants may claim instead): %w", c, err)
		case p.Masked() != p:
			return nil, fmt.Errorf("--allow-unmanaged-ips %q has host bits set; did you mean %s?", c, p.Masked())
		case p.Addr().Is4In6():
			return nil, fmt.Errorf("--allow-unmanaged-ips %q: write IPv4 ranges as IPv4", c)
		}
		out = append(out, p)
	}
	return out, nil
}

// serveConfig is the metrics and health server's share of the options.
func (o *Options) serveConfig() serve.Config {
	c := serve.Config{BindAddress: o.MetricsBindAddress, Insecure: !o.MetricsSecure, CertFile: o.MetricsCertFile, KeyFile: o.MetricsKeyFile}
	c.Defaults()
	return c
}
