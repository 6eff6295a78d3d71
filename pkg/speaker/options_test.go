package speaker

import (
	"testing"

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
