package speaker

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	hostnettesting "github.com/keeplb/keeplb/pkg/hostnet/testing"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

func TestPrepare(t *testing.T) {
	withIPVS := func() (ipvs.Interface, error) { return ipvstesting.New(), nil }
	noIPVS := func() (ipvs.Interface, error) {
		return nil, fmt.Errorf("%w: generic netlink family \"IPVS\" not found", ipvs.ErrNoIPVS)
	}
	// A node as it boots: every sysctl at the kernel's default.
	defaults := func() map[string]string {
		return map[string]string{
			"net.ipv4.ip_nonlocal_bind": "0", "net.ipv4.conf.all.arp_ignore": "0", "net.ipv4.conf.all.arp_announce": "0",
			"net.ipv4.ip_forward": "0", "net.ipv4.vs.conntrack": "0", "net.ipv4.vs.expire_nodest_conn": "0",
		}
	}
	vrrpWant := map[string]string{"net.ipv4.ip_nonlocal_bind": "1", "net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}
	ipvsWant := map[string]string{"net.ipv4.ip_forward": "1", "net.ipv4.vs.conntrack": "1", "net.ipv4.vs.expire_nodest_conn": "1"}
	for _, tc := range []struct {
		name      string
		withIPVS  bool
		open      func() (ipvs.Interface, error)
		readOnly  string
		want      map[string]string // after prepare
		wantError string            // substring; "" for none
	}{
		{name: "IPVS: all sysctls", withIPVS: true, open: withIPVS, want: merge(vrrpWant, ipvsWant)},
		{name: "no IPVS in the kernel: VRRP's only, no error", withIPVS: true, open: noIPVS,
			want: merge(vrrpWant, map[string]string{"net.ipv4.ip_forward": "0", "net.ipv4.vs.conntrack": "0"})},
		{name: "--ipvs=false: VRRP's only, IPVS not opened", withIPVS: false,
			open: func() (ipvs.Interface, error) { return nil, errors.New("must not be called") },
			want: merge(vrrpWant, map[string]string{"net.ipv4.vs.conntrack": "0"})},
		{name: "IPVS fails otherwise: an error", withIPVS: true,
			open:      func() (ipvs.Interface, error) { return nil, errors.New("permission denied") },
			wantError: "open IPVS: permission denied"},
		{name: "a read-only sysctl is named, the others are set", withIPVS: true, open: withIPVS, readOnly: "net.ipv4.vs.conntrack",
			want:      merge(vrrpWant, map[string]string{"net.ipv4.ip_forward": "1", "net.ipv4.vs.conntrack": "0", "net.ipv4.vs.expire_nodest_conn": "1"}),
			wantError: "net.ipv4.vs.conntrack=1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			net := hostnettesting.New(nil, defaults())
			if tc.readOnly != "" {
				net.MakeReadOnly(tc.readOnly)
			}
			err := prepare(t.Context(), tc.withIPVS, tc.open, net)
			if tc.wantError == "" && err != nil {
				t.Fatal(err)
			}
			if tc.wantError != "" && (err == nil || !strings.Contains(err.Error(), tc.wantError)) {
				t.Fatalf("error = %v, want one containing %q", err, tc.wantError)
			}
			for name, want := range tc.want {
				if got, _ := net.Sysctl(name); got != want {
					t.Errorf("%s = %s, want %s", name, got, want)
				}
			}
		})
	}
}

func merge(ms ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}
