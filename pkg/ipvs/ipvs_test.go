package ipvs_test

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

var (
	vip  = netip.MustParseAddr("192.0.2.1")
	vip6 = netip.MustParseAddr("2001:db8::1")
	n1   = netip.MustParseAddr("10.0.0.1")
)

func TestStringsAndEqual(t *testing.T) {
	vs := ipvs.VirtualServer{Address: vip, Protocol: ipvs.TCP, Port: 80, Scheduler: "rr", Persistent: true, Timeout: 3 * time.Hour}
	if got, want := vs.String(), "TCP/192.0.2.1:80 rr persistent 3h0m0s"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	k6 := ipvs.Key{Address: vip6, Protocol: ipvs.UDP, Port: 53}
	if got, want := k6.String(), "UDP/[2001:db8::1]:53"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	rs := ipvs.RealServer{Address: n1, Port: 30080, Weight: 1}
	if got, want := rs.String(), "10.0.0.1:30080 w1 masq"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	other := vs
	other.Scheduler = "wrr"
	if vs.Equal(other) || !vs.Equal(vs) { //nolint:gocritic // dupArg: Equal must also hold for a value and itself
		t.Errorf("Equal ignores the scheduler")
	}
	if rs.Equal(ipvs.RealServer{Address: n1, Port: 30080, Weight: 0}) {
		t.Errorf("Equal ignores the weight")
	}
	if rs.Equal(ipvs.RealServer{Address: n1, Port: 30080, Weight: 1, Method: ipvs.Route}) {
		t.Errorf("Equal ignores the method")
	}
	a := ipvs.Entry{Virtual: vs, Reals: []ipvs.RealServer{rs, {Address: n1, Port: 1}}}
	b := ipvs.Entry{Virtual: vs, Reals: []ipvs.RealServer{{Address: n1, Port: 1}, rs}}
	if !a.Equal(b) {
		t.Errorf("Entry.Equal depends on order of real servers")
	}
	b.Reals = b.Reals[:1]
	if a.Equal(b) {
		t.Errorf("Entry.Equal ignores a missing real server")
	}
}

func TestDumpReadsOnlySelected(t *testing.T) {
	f := ipvstesting.New()
	ours := ipvs.VirtualServer{Address: vip, Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	foreign := ipvs.VirtualServer{Address: netip.MustParseAddr("10.96.0.1"), Protocol: ipvs.TCP, Port: 443, Scheduler: "rr"}
	f.Seed(ours, ipvs.RealServer{Address: n1, Port: 2, Weight: 1}, ipvs.RealServer{Address: n1, Port: 1, Weight: 1})
	f.Seed(foreign, ipvs.RealServer{Address: n1, Port: 6443, Weight: 1})

	got, err := ipvs.Dump(f, func(k ipvs.Key) bool { return k.Address == vip })
	if err != nil {
		t.Fatal(err)
	}
	want := ipvs.Table{ours.Key(): {Virtual: ours, Reals: []ipvs.RealServer{{Address: n1, Port: 1, Weight: 1}, {Address: n1, Port: 2, Weight: 1}}}}
	if !got.Equal(want) {
		t.Errorf("Dump =\n%s\nwant\n%s", got, want)
	}
	if rs := got[ours.Key()].Reals; rs[0].Port != 1 {
		t.Errorf("Dump does not sort real servers: %v", rs)
	}
	for _, c := range f.Calls() {
		if c.Method == "RealServers" && c.Virtual == foreign.Key() {
			t.Errorf("Dump read the real servers of a virtual server it was told to skip")
		}
	}
	all, err := ipvs.Dump(f, nil)
	if err != nil || len(all) != 2 {
		t.Errorf("Dump(nil) = %v, %v; want both virtual servers", all, err)
	}

	f.FailWith(func(c ipvstesting.Call) error { return syscall.EPERM })
	if _, err := ipvs.Dump(f, nil); !errors.Is(err, syscall.EPERM) {
		t.Errorf("Dump error = %v, want EPERM", err)
	}
}

// TestFakeKernelErrors pins down the errors the fake shares with the
// kernel, which Apply relies on.
func TestFakeKernelErrors(t *testing.T) {
	vs := ipvs.VirtualServer{Address: vip, Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	k := vs.Key()
	rs := ipvs.RealServer{Address: n1, Port: 30080, Weight: 1}
	missing := ipvs.Key{Address: vip, Protocol: ipvs.UDP, Port: 80}
	tests := []struct {
		name string
		do   func(f *ipvstesting.Fake) error
		want error
	}{
		{"add existing virtual", func(f *ipvstesting.Fake) error { return f.AddVirtualServer(vs) }, syscall.EEXIST},
		{"update missing virtual", func(f *ipvstesting.Fake) error {
			v := vs
			v.Protocol = ipvs.UDP
			return f.UpdateVirtualServer(v)
		}, syscall.ESRCH},
		{"delete missing virtual", func(f *ipvstesting.Fake) error { return f.DeleteVirtualServer(missing) }, syscall.ESRCH},
		{"unknown scheduler", func(f *ipvstesting.Fake) error {
			v := vs
			v.Port, v.Scheduler = 81, "nope"
			return f.AddVirtualServer(v)
		}, syscall.ENOENT},
		{"unknown protocol", func(f *ipvstesting.Fake) error {
			v := vs
			v.Protocol = "ICMP"
			return f.AddVirtualServer(v)
		}, syscall.EPROTONOSUPPORT},
		{"add existing real", func(f *ipvstesting.Fake) error { return f.AddRealServer(k, rs) }, syscall.EEXIST},
		{"real of missing virtual", func(f *ipvstesting.Fake) error { return f.AddRealServer(missing, rs) }, syscall.ESRCH},
		{"update missing real", func(f *ipvstesting.Fake) error {
			return f.UpdateRealServer(k, ipvs.RealServer{Address: n1, Port: 1})
		}, syscall.ENOENT},
		{"delete missing real", func(f *ipvstesting.Fake) error {
			return f.DeleteRealServer(k, netip.AddrPortFrom(n1, 1))
		}, syscall.ENOENT},
		{"negative weight", func(f *ipvstesting.Fake) error {
			return f.UpdateRealServer(k, ipvs.RealServer{Address: n1, Port: 30080, Weight: -1})
		}, syscall.ERANGE},
		{"mixed family NAT", func(f *ipvstesting.Fake) error {
			return f.AddRealServer(k, ipvs.RealServer{Address: netip.MustParseAddr("fd00::1"), Port: 1})
		}, syscall.EINVAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := ipvstesting.New()
			f.Seed(vs, rs)
			before := f.Table()
			err := tt.do(f)
			if !errors.Is(err, tt.want) {
				t.Fatalf("error = %v, want %v", err, tt.want)
			}
			if after := f.Table(); !after.Equal(before) {
				t.Errorf("a failed call changed the table:\n%s\nwas\n%s", after, before)
			}
		})
	}
	if !ipvs.IsNotFound(syscall.ESRCH) || !ipvs.IsNotFound(syscall.ENOENT) || ipvs.IsNotFound(syscall.EEXIST) || !ipvs.IsExist(syscall.EEXIST) {
		t.Errorf("IsNotFound/IsExist misclassify errnos")
	}
}

func TestFakeRoundTrip(t *testing.T) {
	f := ipvstesting.New()
	vs := ipvs.VirtualServer{Address: vip6, Protocol: ipvs.SCTP, Port: 9, Scheduler: "wrr"}
	k := vs.Key()
	r1 := ipvs.RealServer{Address: netip.MustParseAddr("fd00::1"), Port: 9, Weight: 1}
	r2 := ipvs.RealServer{Address: netip.MustParseAddr("fd00::2"), Port: 9, Weight: 1}
	for _, err := range []error{
		f.AddVirtualServer(vs),
		f.AddRealServer(k, r1),
		f.AddRealServer(k, r2),
		f.UpdateRealServer(k, ipvs.RealServer{Address: r2.Address, Port: 9, Weight: 0}),
		f.DeleteRealServer(k, r1.AddrPort()),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	vs.Persistent, vs.Timeout = true, time.Minute
	if err := f.UpdateVirtualServer(vs); err != nil {
		t.Fatal(err)
	}
	want := ipvs.Table{k: {Virtual: vs, Reals: []ipvs.RealServer{{Address: r2.Address, Port: 9, Weight: 0}}}}
	if got := f.Table(); !got.Equal(want) {
		t.Errorf("table =\n%s\nwant\n%s", got, want)
	}
	if n := len(f.Writes()); n != 6 {
		t.Errorf("Writes() = %d calls, want 6", n)
	}
	if err := f.DeleteVirtualServer(k); err != nil || len(f.Table()) != 0 {
		t.Errorf("DeleteVirtualServer: %v, table %v", err, f.Table())
	}
}

// Counters change with traffic, not with settings: a virtual server whose
// counters moved is still the one programmed, or every sync would update.
func TestVirtualServerEqualIgnoresStats(t *testing.T) {
	a := ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	b := a
	b.Stats = ipvs.Stats{Connections: 5, BytesIn: 100}
	if !a.Equal(b) {
		t.Error("virtual servers differing only in stats are not Equal")
	}
	b.Scheduler = "wrr"
	if a.Equal(b) {
		t.Error("virtual servers with different schedulers are Equal")
	}
}
