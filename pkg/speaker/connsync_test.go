package speaker

import (
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/conntrack"
	conntracktesting "github.com/keeplb/keeplb/pkg/conntrack/testing"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/nft"
)

// TestSyncRunsConnSyncBehindItsGuard: with --conn-sync a sync writes the
// sync guard into keeplb's table (every thread's port; the other Nodes'
// InternalIPs) and runs both daemons on the link of the node's own
// InternalIP. A Node's new address reaches the guard with the next sync,
// an incremental one. When a write of the table fails, the backup stops
// in that sync and the master goes on; the backup is back once a write
// succeeds. A kernel that refuses the daemons gets one Warning event on
// the Node while it lasts, and forwarding goes on. A clean exit stops
// them.
func TestSyncRunsConnSyncBehindItsGuard(t *testing.T) {
	nf := &failingNFT{Fake: knftables.NewFake(nft.Family, nft.Table)}
	s, k, _ := syncSpeaker(t, nftCluster(), nf)
	kernel := k.IPVS.(*ipvstesting.Fake)
	s.opts.ConnSync.Enabled, s.opts.ConnSync.SyncID = true, 5
	k.Sync = kernel
	s.cs = newSyncStep(s.opts, k, s.metrics, s.recorder)
	events := s.recorder.(*record.FakeRecorder).Events

	daemons := func() []ipvs.SyncDaemon {
		t.Helper()
		ds, err := kernel.SyncDaemons()
		if err != nil {
			t.Fatal(err)
		}
		return ds
	}
	master := ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: "eth0", SyncID: 5}
	backup := ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "eth0", SyncID: 5}

	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := daemons(); !slices.Equal(got, []ipvs.SyncDaemon{master, backup}) {
		t.Fatalf("daemons after the first sync: %v", got)
	}
	wantElements(t, nf.Fake, "sync-peers-v4", "10.0.0.2", "10.0.0.3")
	// The masquerade follows the VIP, and every VIP's routed flows take
	// the transit zone.
	if n := len(nftElements(t, nf.Fake, "snat-vip-v4")); n == 0 || len(nftElements(t, nf.Fake, "snat-v4")) != 0 {
		t.Errorf("snat-vip-v4 has %d elements, snat-v4 %v; want every masqueraded real server in snat-vip-v4", n, nftElements(t, nf.Fake, "snat-v4"))
	}
	if vips, transit := nftElements(t, nf.Fake, "vips-v4"), nftElements(t, nf.Fake, "transit-v4"); len(vips) == 0 || !slices.Equal(vips, transit) {
		t.Errorf("transit-v4 %v; want every VIP, %v", transit, vips)
	}
	if ports := nftElements(t, nf.Fake, "sync-ports"); len(ports) != 64 || !slices.Contains(ports, "8848") || !slices.Contains(ports, "8911") {
		t.Errorf("sync-ports %v; want 8848 to 8911", ports)
	}
	// Nodeport forwarding sends no new connection to the NodePort of the
	// node that would take the VIP from n1 (vrrp.Plan.Successors).
	// (The forwarding step's Nodes are those of the last full sync.)
	addrs := map[string]netip.Addr{"n2": netip.MustParseAddr("10.0.0.2"), "n3": netip.MustParseAddr("10.0.0.3")}
	successorAtZero := func(vip string, port uint16, nodePort uint16) {
		t.Helper()
		next := s.lastVRRP.successors[netip.MustParseAddr(vip)]
		want, ok := addrs[next]
		if !ok {
			t.Fatalf("%s's successor from n1 is %q, want n2 or n3", vip, next)
		}
		e, ok := kernel.Table()[ipvs.Key{Address: netip.MustParseAddr(vip), Protocol: ipvs.TCP, Port: port}]
		if !ok {
			t.Fatalf("no virtual server %s:%d", vip, port)
		}
		var zero []netip.Addr
		for _, r := range e.Reals {
			if r.Weight == 0 {
				zero = append(zero, r.Address)
			}
		}
		if len(zero) != 1 || zero[0] != want || len(e.Reals) < 2 {
			t.Errorf("%s:%d real servers %v: want %s's NodePort (%s:%d) alone at weight 0", vip, port, e.Reals, next, want, nodePort)
		}
	}
	successorAtZero("192.0.2.4", 8080, 30808)

	// n2 moves to another address: a Service-only sync would not rewrite
	// the table, the guard's change alone does.
	n2 := node("n2", "10.0.0.22")
	_ = s.nodes.GetStore().Update(n2)
	svc := fwdService("touch", "192.0.2.9", 80, 30099)
	_ = s.services.GetStore().Add(svc)
	s.pending.service(svc)
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	wantElements(t, nf.Fake, "sync-peers-v4", "10.0.0.22", "10.0.0.3")
	successorAtZero("192.0.2.9", 80, 30099) // a Service of an incremental sync

	nf.fail = true
	svc = fwdService("touch2", "192.0.2.10", 80, 30100)
	_ = s.services.GetStore().Add(svc)
	s.pending.service(svc)
	if err := s.sync(t.Context()); err == nil {
		t.Fatal("a sync whose table write failed succeeded")
	}
	if got := daemons(); !slices.Equal(got, []ipvs.SyncDaemon{master}) {
		t.Fatalf("daemons after a failed write of the table: %v; want the master alone", got)
	}
	nf.fail = false
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := daemons(); !slices.Equal(got, []ipvs.SyncDaemon{master, backup}) {
		t.Fatalf("daemons once the table is written again: %v", got)
	}
	for len(events) > 0 {
		if e := <-events; strings.Contains(e, EventConnSyncFailed) {
			t.Errorf("an event while the daemons ran as asked: %s", e)
		}
	}

	// A kernel without the daemons.
	if err := s.cs.exit(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := daemons(); len(got) != 0 {
		t.Fatalf("daemons after exit: %v", got)
	}
	kernel.FailWith(func(c ipvstesting.Call) error {
		if c.Method == "StartSyncDaemon" {
			return syscall.ENOPROTOOPT
		}
		return nil
	})
	for range 2 {
		if err := s.sync(t.Context()); err != nil {
			t.Fatalf("a sync failed because the kernel refused the sync daemons: %v", err)
		}
	}
	var warned []string
	for len(events) > 0 {
		if e := <-events; strings.Contains(e, EventConnSyncFailed) {
			warned = append(warned, e)
		}
	}
	if len(warned) != 1 || !strings.Contains(warned[0], v1.EventTypeWarning) || !strings.Contains(warned[0], "start the IPVS sync master daemon") {
		t.Errorf("events over two syncs with the daemons refused: %q; want one Warning naming the daemon", warned)
	}
	if len(kernel.Table()) == 0 {
		t.Error("no virtual server: forwarding stopped with the sync daemons")
	}
}

// TestConnSyncFindsUnlistedDaemons: a daemon this speaker did not list
// (its first listing failed; a previous speaker left it) makes the start
// fail with EEXIST; the next sync lists the kernel's daemons again and
// replaces it with the wanted one.
func TestConnSyncFindsUnlistedDaemons(t *testing.T) {
	s, k, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	kernel := k.IPVS.(*ipvstesting.Fake)
	if err := kernel.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: "eth9", SyncID: 1}); err != nil {
		t.Fatal(err)
	}
	s.opts.ConnSync.Enabled = true
	k.Sync = kernel
	s.cs = newSyncStep(s.opts, k, s.metrics, s.recorder)
	s.cs.listed = true // as if listed, and found nothing
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if s.cs.listed {
		t.Fatal("an EEXIST from the kernel left the step trusting its listing")
	}
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	want := []ipvs.SyncDaemon{{State: ipvs.SyncMaster, Interface: "eth0"}, {State: ipvs.SyncBackup, Interface: "eth0"}}
	if got, _ := kernel.SyncDaemons(); !slices.Equal(got, want) {
		t.Errorf("daemons after the second sync: %v; want %v", got, want)
	}
}

// TestHoldingForgetsFlows: with --conn-sync the masquerade follows the
// VIP, and the node's VRRP states decide which conntrack entries of a
// VIP's flows go: those of the transit zone when the node becomes its
// holder, those of the default zone when it stops being it. Nothing else.
func TestHoldingForgetsFlows(t *testing.T) {
	s, k, _ := syncSpeaker(t, nftCluster(), knftables.NewFake(nft.Family, nft.Table))
	s.opts.ConnSync.Enabled = true
	k.Sync = k.IPVS.(*ipvstesting.Fake)
	s.cs = newSyncStep(s.opts, k, s.metrics, s.recorder)
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	ct := k.Conntrack.(*conntracktesting.Fake)
	vip := netip.MustParseAddr("192.0.2.1")
	tuple := func(src, dst string) conntrack.Tuple {
		return conntrack.Tuple{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}
	}
	held := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("198.51.100.7:40000", "192.0.2.1:80"), Reply: tuple("10.1.0.5:8080", "192.0.2.1:40000")}
	routed := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.1:40001", "10.1.0.5:8080"), Reply: tuple("10.1.0.5:8080", "192.0.2.1:40001"), Zone: nft.TransitZone}
	other := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.3:40002", "10.1.0.5:8080"), Reply: tuple("10.1.0.5:8080", "192.0.2.3:40002"), Zone: nft.TransitZone}
	ct.Add(held, routed, other)

	s.applyHolders(t.Context(), nil, map[netip.Addr]float64{vip: 1, netip.MustParseAddr("192.0.2.3"): 0})
	if got, want := ct.Flows(), []conntrack.Flow{held, other}; !slices.Equal(got, want) {
		t.Errorf("after taking %s over, flows\n%+v\nwant\n%+v", vip, got, want)
	}
	ct.Add(routed)
	s.applyHolders(t.Context(), nil, map[netip.Addr]float64{vip: 1, netip.MustParseAddr("192.0.2.3"): 0})
	if got, want := ct.Flows(), []conntrack.Flow{held, other, routed}; !slices.Equal(got, want) {
		t.Errorf("holding %s still, flows\n%+v\nwant\n%+v", vip, got, want)
	}
	s.applyHolders(t.Context(), nil, map[netip.Addr]float64{vip: 0, netip.MustParseAddr("192.0.2.3"): 0})
	if got, want := ct.Flows(), []conntrack.Flow{other, routed}; !slices.Equal(got, want) {
		t.Errorf("after giving %s up, flows\n%+v\nwant\n%+v", vip, got, want)
	}
}
