package controller

import (
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
		o := NewOptions()
		o.Identity = "test"
		o.AllowUnmanagedIPs = tc.in
		err := o.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.in, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: error %v, want one containing %q", tc.in, err, tc.want)
		}
	}
}
