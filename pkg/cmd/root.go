// Package cmd builds the keeplb command line: one binary whose subcommands
// are keeplb's components, so that a single image serves them all.
package cmd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/kubeconfig"
	"github.com/keeplb/keeplb/pkg/migrate"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/status"
	"github.com/keeplb/keeplb/pkg/version"
)

// NewRootCommand returns the keeplb command with its subcommands. Errors are
// not printed by the command itself: the caller prints the one returned by
// Execute, so that each error appears exactly once.
func NewRootCommand() *cobra.Command {
	// Logging is configured per command tree rather than in package state,
	// so that tests can build as many trees as they like.
	logging := logsapi.NewLoggingConfiguration()
	root := &cobra.Command{
		Use:   "keeplb",
		Short: "Bare-metal LoadBalancer for Kubernetes",
		Long: `keeplb gives Services of type LoadBalancer a virtual IP on clusters that
have no cloud load balancer.

The controller assigns each Service addresses from IPPool resources and
publishes them, with their ipMode, in the Service status. The speaker runs on
every node, holds each address on exactly one of them with keepalived
(VRRP), and forwards its traffic to NodePorts or pods with IPVS.`,
		// A failing controller is not a usage mistake; printing the whole
		// usage after a runtime error buries the error.
		SilenceUsage:  true,
		SilenceErrors: true,
		// Applied before any subcommand runs, so that the subcommand logs
		// with the chosen format and verbosity from its first line.
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return logsapi.ValidateAndApply(logging, nil)
		},
	}
	// SilenceUsage also hides the usage on flag mistakes, where it would
	// help; point at --help instead.
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		//nolint:revive,staticcheck // the command's last word to the user: a sentence and a hint
		return fmt.Errorf("%w\nRun '%s --help' for usage.", err, c.CommandPath())
	})
	fs := root.PersistentFlags()
	// -v, -vmodule, --logging-format and friends, which set logging; they
	// reach klog when PersistentPreRunE applies the configuration.
	logsapi.AddFlags(logging, fs)
	// Any remaining klog flag that component-base still supports. The option
	// keeps it from registering -v and -vmodule a second time, directly on
	// klog, where they would bypass the configuration above.
	logs.AddFlags(fs, logs.SkipLoggingConfigurationFlags())

	root.AddCommand(newControllerCommand(), newSpeakerCommand(), newPrepareNodeCommand(), newVersionCommand(), newMigrateCommand(), newStatusCommand())
	return root
}

// runUntilSignal runs f with a context cancelled by SIGINT or SIGTERM.
func runUntilSignal(parent context.Context, f func(context.Context) error) error {
	ctx, stop := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Once the first signal started a graceful shutdown, restore the default
	// handling, so that a second signal ends a shutdown that hangs.
	context.AfterFunc(ctx, stop)
	return f(ctx)
}

// newSpeakerCommand returns `keeplb speaker`.
func newSpeakerCommand() *cobra.Command {
	o := speaker.NewOptions()
	c := &cobra.Command{
		Use:   "speaker",
		Short: "Hold VIPs on this node with keepalived (VRRP)",
		Long: `The speaker runs on every node, in the host network namespace. It computes
the cluster's VRRP plan from the Services, EndpointSlices, Nodes and IPPools
(every speaker computes the same), runs keepalived with this node's part of
it, so that each VIP is held by exactly one eligible node, and records the
holder on the Service (annotation keeplb.io/holder, event VIPAcquired).

Run it as a DaemonSet (manifests/speaker).`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Validate(); err != nil {
				return err
			}
			return runUntilSignal(c.Context(), func(ctx context.Context) error { return speaker.Run(ctx, o) })
		},
	}
	o.AddFlags(c.Flags())
	return c
}

// newPrepareNodeCommand returns `keeplb prepare-node`.
func newPrepareNodeCommand() *cobra.Command {
	o := speaker.NewPrepareOptions()
	c := &cobra.Command{
		Use:   "prepare-node",
		Short: "Load IPVS and set the sysctls the speaker needs (its init container)",
		Long: `prepare-node readies a node for the speaker: it loads IPVS (the ip_vs
module) and sets the sysctls VRRP and IPVS forwarding need, naming each one it
cannot set. The speaker DaemonSet runs it as an init container (not
privileged: root with NET_ADMIN, and SYS_MODULE for modprobe on kernels older
than 5.16), so that the speaker itself needs no more than NET_ADMIN and
NET_RAW. A container's /proc/sys is read-only, so the DaemonSet mounts the
node's /proc/sys/net at /host/proc/sys/net and passes --sysctl-root.

A kernel without IPVS is logged, not an error: the speaker then holds VIPs
with VRRP but forwards nothing.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Validate(); err != nil {
				return err
			}
			return speaker.PrepareNode(c.Context(), o)
		},
	}
	o.AddFlags(c.Flags())
	return c
}

// newControllerCommand returns `keeplb controller`.
func newControllerCommand() *cobra.Command {
	o := controller.NewOptions()
	c := &cobra.Command{
		Use:   "controller",
		Short: "Assign addresses from IPPools to LoadBalancer Services",
		Long: `The controller watches Services of type LoadBalancer with keeplb's
loadBalancerClass (and, with --default-class, those without a class), assigns
each of them addresses from the IPPools that admit it, and writes the
addresses and their ipMode to the Service status.

Run it as a Deployment with leader election (manifests/controller); only the
elected replica works.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			// Before anything reaches the network, so that a typo fails at
			// once with every mistake listed.
			if err := o.Validate(); err != nil {
				return err
			}
			return runUntilSignal(c.Context(), func(ctx context.Context) error { return controller.Run(ctx, o) })
		},
	}
	o.AddFlags(c.Flags())
	return c
}

// versionOptions are the flags of `keeplb version`.
type versionOptions struct {
	// Output is the format: text or json.
	Output string
}

// AddFlags registers the options on fs.
func (o *versionOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVarP(&o.Output, "output", "o", o.Output, "Output format: text or json.")
}

// Validate reports an unknown output format.
func (o *versionOptions) Validate() error {
	switch o.Output {
	case "text", "json":
		return nil
	}
	return fmt.Errorf("--output %q: must be text or json", o.Output)
}

// newVersionCommand returns `keeplb version`.
func newVersionCommand() *cobra.Command {
	o := &versionOptions{Output: "text"}
	c := &cobra.Command{
		Use:   "version",
		Short: "Print the version of keeplb",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Validate(); err != nil {
				return err
			}
			info := version.Get()
			if o.Output == "json" {
				enc := json.NewEncoder(c.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(info)
			}
			_, err := fmt.Fprintln(c.OutOrStdout(), info.String())
			return err
		},
	}
	o.AddFlags(c.Flags())
	return c
}

// newMigrateCommand returns `keeplb migrate`, the group of converters from
// other VIP tools.
func newMigrateCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "migrate",
		Short: "Convert the configuration of another VIP tool to keeplb resources",
		Args:  cobra.NoArgs,
	}
	c.AddCommand(newMigrateKeepalivedVIPCommand())
	return c
}

// newMigrateKeepalivedVIPCommand returns `keeplb migrate keepalived-vip`.
func newMigrateKeepalivedVIPCommand() *cobra.Command {
	var file string
	o := migrate.Options{PoolName: migrate.DefaultPoolName}
	c := &cobra.Command{
		Use:   "keepalived-vip --configmap FILE",
		Short: "Convert keepalived-vip's ConfigMap to a script that creates an IPPool and patches the Services",
		Long: `Reads the ConfigMap of kubernetes/contrib keepalived-vip (data maps
<VIP> to <namespace>/<service>[:NAT|DR|PROXY]) and prints, on stdout, a POSIX
shell script that server-side applies an IPPool holding every VIP and then
merge-patches each Service to type LoadBalancer with keeplb.io/pool,
keeplb.io/ips and keeplb.io/forwarding, touching none of its other fields.
Nothing is sent to the cluster until you run the script (with $KUBECTL, or
kubectl).

--vrid must leave out the VRID keepalived-vip runs with
(--keepalived-vip-vrid, 50 by default): both run on the same segment until
keepalived-vip is removed.

Differences to review are printed on stderr as "warning:" lines. An invalid
entry is reported and skipped; the others are still converted, and the
command then exits non-zero. See docs/migration.md.`,
		Example: `  kubectl -n kube-system get configmap vip-configmap -o yaml > vip.yaml
  keeplb migrate keepalived-vip --configmap vip.yaml --vrid 51-82 > keeplb-migrate.sh
  sh keeplb-migrate.sh`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if file == "" {
				return errors.New("--configmap is required: a file, or - for stdin")
			}
			var in []byte
			var err error
			if file == "-" {
				in, err = io.ReadAll(c.InOrStdin())
			} else {
				in, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			r, err := migrate.KeepalivedVIP(in, o)
			if err != nil {
				return err
			}
			for _, w := range r.Warnings {
				_, _ = fmt.Fprintf(c.ErrOrStderr(), "warning: %s\n", w)
			}
			if _, err := c.OutOrStdout().Write(r.Script); err != nil {
				return err
			}
			if len(r.Errors) > 0 {
				return fmt.Errorf("%d invalid entries were not converted:\n%w", len(r.Errors), errors.Join(r.Errors...))
			}
			return nil
		},
	}
	fs := c.Flags()
	fs.StringVar(&file, "configmap", "", "keepalived-vip's ConfigMap manifest (YAML or JSON), or - for stdin.")
	o.AddFlags(fs)
	return c
}

// newStatusCommand returns `keeplb status`.
func newStatusCommand() *cobra.Command {
	var kubeconfigPath string
	out := &versionOptions{Output: "text"}
	o := status.Options{LoadBalancerClass: annotations.DefaultClass, DefaultClass: true}
	c := &cobra.Command{
		Use:   "status",
		Short: "Show the IPPools and keeplb's Services with their VIPs",
		Long: `Reads the cluster and prints two tables: the IPPools with their address
counts and Ready and Conflicting conditions, and keeplb's LoadBalancer
Services with their VIPs (and ipMode), the pool each address belongs to, the
node holding it (annotation keeplb.io/holder), the forwarding mode and, for
pending Services, the most recent Warning event.

Set --load-balancer-class and --default-class as on the controller, so that
the same Services count as keeplb's. Nothing is written to the cluster.

Tenants write some of what is shown (the holder annotation, event messages),
so the text output shows control characters as escapes such as \x1b rather
than passing them to the terminal; --output json keeps them as JSON escapes.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if err := out.Validate(); err != nil {
				return err
			}
			cfg, err := kubeconfig.Load(kubeconfigPath)
			if err != nil {
				return fmt.Errorf("load kubeconfig: %w", err)
			}
			kube, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				return err
			}
			dyn, err := dynamic.NewForConfig(cfg)
			if err != nil {
				return err
			}
			r, err := status.Collect(c.Context(), kube, dyn, o)
			if err != nil {
				return err
			}
			if out.Output == "json" {
				return status.WriteJSON(c.OutOrStdout(), r)
			}
			return status.WriteText(c.OutOrStdout(), r)
		},
	}
	fs := c.Flags()
	fs.StringVar(&kubeconfigPath, "kubeconfig", "", kubeconfig.Usage)
	out.AddFlags(fs)
	fs.StringVar(&o.LoadBalancerClass, "load-balancer-class", o.LoadBalancerClass, "spec.loadBalancerClass handled by keeplb, as set on the controller.")
	fs.BoolVar(&o.DefaultClass, "default-class", o.DefaultClass, "Count LoadBalancer Services that set no spec.loadBalancerClass as keeplb's, as on the controller.")
	return c
}
