//go:build linux

package ipvs

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// TestDaemonAttrRoundTrip checks that what daemonAttr sends is what
// parseDaemonMsg reads back, for every field at its limits, and that the
// optional attributes are left out at their defaults (kernels before 4.3
// know only state, interface and sync ID).
func TestDaemonAttrRoundTrip(t *testing.T) {
	for _, d := range []SyncDaemon{
		{State: SyncMaster, Interface: "e", SyncID: 0},
		{State: SyncBackup, Interface: "eth0.4094-vrrp1", SyncID: 255, MaxLen: 65535, Group: netip.MustParseAddr("239.255.255.255"), Port: 65535, TTL: 255},
		{State: SyncMaster, Interface: "bond0", SyncID: 1, MaxLen: 1, Group: netip.MustParseAddr("ff02::1:3"), Port: 1, TTL: 1},
	} {
		b := daemonAttr(d).Serialize()
		got, ok, err := parseDaemonMsg(b)
		if err != nil || !ok || got != d {
			t.Errorf("round trip of %v: %v, %v, %v", d, got, ok, err)
		}
	}
	b := daemonAttr(SyncDaemon{State: SyncMaster, Interface: "eth0"}).Serialize()
	if inner, err := nl.ParseRouteAttr(b[unix.SizeofRtAttr:]); err != nil || len(inner) != 3 {
		t.Errorf("a daemon with defaults sends %d attributes (%v), want 3", len(inner), err)
	}
}

func TestSyncDaemonValidate(t *testing.T) {
	ok := SyncDaemon{State: SyncBackup, Interface: "eth0"}
	if err := ok.Validate(); err != nil {
		t.Errorf("%v: %v", ok, err)
	}
	for _, bad := range []SyncDaemon{
		{State: 0, Interface: "eth0"},
		{State: 3, Interface: "eth0"},
		{State: SyncMaster},
		{State: SyncMaster, Interface: "sixteen-bytes-xx"},
		{State: SyncMaster, Interface: "eth0", Group: netip.MustParseAddr("10.0.0.1")},
		{State: SyncMaster, Interface: "eth0", Group: netip.MustParseAddr("::ffff:239.0.0.1")},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%v: valid, want an error", bad)
		}
	}
}

// FuzzParseDaemonMsg checks that no answer, however malformed, panics, and
// that a daemon read from one is one the kernel could run.
func FuzzParseDaemonMsg(f *testing.F) {
	f.Add(daemonAttr(SyncDaemon{State: SyncBackup, Interface: "eth0", SyncID: 9, Group: netip.MustParseAddr("239.0.0.81"), Port: 8848, TTL: 1}).Serialize())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, m []byte) {
		d, ok, err := parseDaemonMsg(slices.Clone(m))
		if err != nil || !ok {
			return
		}
		if d.State == 0 {
			t.Fatalf("ok without a state: %v", d)
		}
		_ = d.String()
	})
}
