package speaker

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// The speaker runs in the host network: its metrics, which name Services,
// VIPs and nodes, must not answer on every address of the node, each VIP
// it holds included, unless asked to; and they are guarded unless asked
// not to be.
func TestMetricsDefaults(t *testing.T) {
	o := NewOptions()
	o.NodeName = "n"
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	c := o.serveConfig()
	if c.Wildcard() || c.Insecure || c.BindAddress != "127.0.0.1:10261" {
		t.Errorf("default metrics config %+v: want loopback, secure", c)
	}

	fs := pflag.NewFlagSet("speaker", pflag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse([]string{"--metrics-bind-address=[10.0.0.7]:10261", "--metrics-secure=false"}); err != nil {
		t.Fatal(err)
	}
	if c := o.serveConfig(); c.BindAddress != "[10.0.0.7]:10261" || !c.Insecure {
		t.Errorf("flags gave %+v", c)
	}
	if err := o.Validate(); err != nil {
		t.Errorf("the DaemonSet's bracketed node address: %v", err)
	}
	o.MetricsCertFile = "tls.crt"
	if err := o.Validate(); err == nil {
		t.Error("Validate accepts --metrics-cert-file without --metrics-key-file (and without --metrics-secure)")
	}
}

// TestNegativeDurationsRefused: a negative interval is a typo, not a mode.
func TestNegativeDurationsRefused(t *testing.T) {
	for _, flag := range []string{"--ipvs-stats-max-age=-1s", "--min-sync-interval=-1ms", "--reload-window=-1s"} {
		o := NewOptions()
		o.NodeName = "n"
		fs := pflag.NewFlagSet("speaker", pflag.ContinueOnError)
		o.AddFlags(fs)
		if err := fs.Parse([]string{flag}); err != nil {
			t.Fatal(err)
		}
		if err := o.Validate(); err == nil {
			t.Errorf("Validate accepts %s", flag)
		}
	}
}

// TestConnSyncFlags: the --conn-sync flags reach connsync.Config, and
// Validate names the flag at fault.
func TestConnSyncFlags(t *testing.T) {
	parse := parseFlags
	o, err := parse("--conn-sync", "--conn-sync-interface=bond0", "--conn-sync-id=42", "--conn-sync-group=239.8.8.48", "--conn-sync-port=9000")
	if err != nil {
		t.Fatal(err)
	}
	if c := o.ConnSync; !c.Enabled || c.Interface != "bond0" || c.SyncID != 42 || c.Group.String() != "239.8.8.48" || c.Port != 9000 {
		t.Errorf("flags gave %+v", c)
	}
	if o, err := parse(); err != nil || o.ConnSync.Enabled {
		t.Errorf("by default: %+v, %v; want off", o.ConnSync, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--conn-sync", "--ipvs=false"}, "--conn-sync needs --ipvs"},
		{[]string{"--conn-sync", "--conn-sync-group=10.0.0.1"}, "not a multicast address"},
		{[]string{"--conn-sync", "--conn-sync-port=65500"}, "--conn-sync-port 65500"},
		{[]string{"--conn-sync-group=not-an-address"}, "conn-sync-group"},
		{[]string{"--conn-sync-id=256"}, "conn-sync-id"},
	} {
		if _, err := parse(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v; want an error saying %q", tc.args, err, tc.want)
		}
	}
}

// TestHandoffFlags: the hand-off's flags and their checks.
func TestHandoffFlags(t *testing.T) {
	parse := parseFlags
	o, err := parse("--handoff=always", "--handoff-dir=/run/keeplb-handoff", "--handoff-timeout=1m")
	if err != nil || o.Handoff != HandoffAlways || o.HandoffDir != "/run/keeplb-handoff" || o.HandoffTimeout != time.Minute {
		t.Errorf("flags gave %q %q %v, %v", o.Handoff, o.HandoffDir, o.HandoffTimeout, err)
	}
	if o, err := parse(); err != nil || o.Handoff != HandoffAuto || o.HandoffTimeout != 30*time.Second {
		t.Errorf("by default: %q %v, %v; want auto, 30s", o.Handoff, o.HandoffTimeout, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--handoff=sometimes"}, `--handoff="sometimes"`},
		{[]string{"--handoff=always"}, "needs --handoff-dir"},
		{[]string{"--handoff-timeout=0s"}, "--handoff-timeout=0s"},
		{[]string{"--handoff-timeout=3m"}, "at most 2m2.85s"},
	} {
		if _, err := parse(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v; want an error saying %q", tc.args, err, tc.want)
		}
	}
}

// parseFlags parses args as the speaker's flags, for node "n", and
// validates them.
func parseFlags(args ...string) (*Options, error) {
	o := NewOptions()
	o.NodeName = "n"
	fs := pflag.NewFlagSet("speaker", pflag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	err := o.Validate()
	return o, err
}
