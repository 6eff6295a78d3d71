package speaker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// TestSysctlsUnder: with --sysctl-root, the sysctls are read and written
// under that folder, where the DaemonSet mounts the node's /proc/sys/net,
// and the one that cannot be written is named with the path it tried.
func TestSysctlsUnder(t *testing.T) {
	root := t.TempDir()
	files := map[string]string{
		"net/ipv4/ip_nonlocal_bind": "0\n", "net/ipv4/conf/all/arp_ignore": "1\n", "net/ipv4/conf/all/arp_announce": "0\n",
		"net/ipv4/ip_forward": "0\n",
	}
	for name, v := range files {
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, name), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// net/ipv4/vs is missing, as in a /proc/sys/net without ip_vs loaded.
	h := sysctlsUnder{Interface: hostnettesting.New(nil, nil), root: root}
	err := prepare(t.Context(), true, func() (ipvs.Interface, error) { return ipvstesting.New(), nil }, h)
	if err == nil || !strings.Contains(err.Error(), "net.ipv4.vs.expire_nodest_conn=1") || !strings.Contains(err.Error(), filepath.Join(root, "net/ipv4/vs/conntrack")) {
		t.Errorf("error = %v, want one naming the vs.* sysctls and their paths under %s", err, root)
	}
	for name, want := range map[string]string{
		"net/ipv4/ip_nonlocal_bind": "1", "net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2",
		"net/ipv4/ip_forward": "1",
	} {
		b, err := os.ReadFile(filepath.Join(root, name))
		if got := strings.TrimSpace(string(b)); err != nil || got != want {
			t.Errorf("%s = %q (%v), want %s", name, got, err, want)
		}
	}
}

func TestPrepareOptionsValidate(t *testing.T) {
	o := NewPrepareOptions()
	if err := o.Validate(); err != nil || o.SysctlRoot != "/proc/sys" {
		t.Errorf("defaults: root %q, Validate() = %v", o.SysctlRoot, err)
	}
	o.SysctlRoot = "host/proc/sys"
	if err := o.Validate(); err == nil {
		t.Error("a relative --sysctl-root was accepted")
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
