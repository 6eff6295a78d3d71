package controller

import (
	"fmt"
	"strings"
	"testing"
)

func TestAllowUnmanagedIPsValidation(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string // "" for valid
	}{
		{nil, ""},
		{[]string{"203.0.113.0/28", "2001:db8::/64"}, ""},
		{[]string{"true"}, "it used to be a boolean"},
		{[]string{"203.0.113.1/28"}, "did you mean 203.0.113.0/28"},
		{[]string{"::ffff:203.0.113.0/124"}, "write IPv4 ranges as IPv4"},
		{[]string{"203.0.113.7"}, "want CIDRs"},
	} {
		checkValidate(t, fmt.Sprint(tc.in), func(o *Options) { o.AllowUnmanagedIPs = tc.in }, tc.want)
	}
}

// checkValidate validates the defaults changed by mod, and wants an error
// containing want, or none if want is "".
func checkValidate(t *testing.T, name string, mod func(*Options), want string) {
	t.Helper()
	o := NewOptions()
	o.Identity = "test"
	mod(o)
	err := o.Validate()
	switch {
	case want == "" && err != nil:
		t.Errorf("%s: %v", name, err)
	case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
		t.Errorf("%s: error %v, want one containing %q", name, err, want)
	}
}

func TestRateLimitValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Options)
		want string // "" for valid
	}{
		{"defaults", func(*Options) {}, ""},
		{"no writer qps", func(o *Options) { o.KubeAPIQPS = 0 }, "--kube-api-qps and --kube-api-burst must be positive"},
		{"no event qps", func(o *Options) { o.EventQPS = 0 }, "--event-qps and --event-burst must be positive"},
		{"no event burst", func(o *Options) { o.EventBurst = 0 }, "--event-qps and --event-burst must be positive"},
	} {
		checkValidate(t, tc.name, tc.mod, tc.want)
	}
}
