package handoff

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

func testConfig() keepalived.Config {
	return keepalived.Config{Instances: []keepalived.Instance{
		{Name: "a", AdvertInterval: 100 * time.Millisecond, VIPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32"), netip.MustParsePrefix("10.0.0.2/32")}},
		{Name: "b", AdvertInterval: time.Second, VIPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.3/32")}},
		{Name: "c", AdvertInterval: time.Second, VIPs: []netip.Prefix{netip.MustParsePrefix("10.0.0.4/32")}},
	}}
}

func TestConfigTransforms(t *testing.T) {
	c := testConfig()
	p := Patient(c, 30*time.Second)
	for _, in := range p.Instances {
		if in.AdvertInterval != 10*time.Second {
			t.Errorf("Patient: %s announces %v, want 10s", in.Name, in.AdvertInterval)
		}
	}
	w := WithoutAdopted(c, map[netip.Prefix]bool{netip.MustParsePrefix("10.0.0.2/32"): true})
	if got := w.Instances[0].VIPs; !slices.Equal(got, []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32")}) {
		t.Errorf("WithoutAdopted: a has %v", got)
	}
	if c.Instances[0].AdvertInterval != 100*time.Millisecond || len(c.Instances[0].VIPs) != 2 {
		t.Errorf("the transforms changed their input: %+v", c.Instances[0])
	}
	states := map[string]keepalived.State{"a": keepalived.StateMaster, "b": keepalived.StateBackup}
	if got := Held(c, states); len(got) != 1 || len(got["a"]) != 2 {
		t.Errorf("Held = %v, want a's two VIPs", got)
	}
	adopting := map[netip.Prefix]bool{
		netip.MustParsePrefix("10.0.0.1/32"): true, // a: MASTER
		netip.MustParsePrefix("10.0.0.3/32"): true, // b: BACKUP
		netip.MustParsePrefix("10.0.0.9/32"): true, // in no instance
	}
	for _, expired := range []bool{false, true} {
		still, done, release := Adopt(c, states, adopting, expired)
		want3 := still
		if expired {
			want3 = release
		}
		if !done[netip.MustParsePrefix("10.0.0.1/32")] || !want3[netip.MustParsePrefix("10.0.0.3/32")] || !release[netip.MustParsePrefix("10.0.0.9/32")] ||
			len(still)+len(done)+len(release) != len(adopting) {
			t.Errorf("Adopt(expired %v) = still %v, done %v, release %v", expired, still, done, release)
		}
	}
}

func TestLifetime(t *testing.T) {
	for _, tc := range []struct{ timeout, want time.Duration }{
		{30 * time.Second, 28 * time.Second},
		{10500 * time.Millisecond, 8 * time.Second},
		{2 * time.Second, time.Second},
	} {
		if got := Lifetime(tc.timeout); got != tc.want {
			t.Errorf("Lifetime(%v) = %v, want %v", tc.timeout, got, tc.want)
		}
	}
}
