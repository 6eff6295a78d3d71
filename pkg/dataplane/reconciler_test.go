package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/conntrack"
	conntracktesting "github.com/keeplb/keeplb/pkg/conntrack/testing"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/nft"
)

// elements returns the elements of a set of keeplb's table in the fake.
func elements(t *testing.T, fake *knftables.Fake, set string) []string {
	t.Helper()
	els, err := fake.ListElements(context.Background(), "set", set)
	if err != nil {
		t.Fatalf("list %s: %v", set, err)
	}
	var out []string
	for _, e := range els {
		out = append(out, strings.Join(e.Key, " . "))
	}
	slices.Sort(out)
	return out
}

// snatPairs lists what ss masquerades, one "virtual -> real server" each,
// in ss's order.
func snatPairs(ss []nft.SNAT) []string {
	var out []string
	for _, s := range ss {
		for _, r := range s.Reals {
			out = append(out, s.Virtual.String()+" -> "+r.String())
		}
	}
	return out
}

// snatElements is what st masquerades, as the fake's snat-v4 set shows it.
func snatElements(st State) []string {
	var out []string
	for _, s := range st.SNAT {
		for _, r := range s.Reals {
			if s.Virtual.Address.Is4() {
				out = append(out, fmt.Sprintf("%s . %s . %d . %s . %d", s.Virtual.Address, strings.ToLower(s.Virtual.Protocol), s.Virtual.Port, r.Addr(), r.Port()))
			}
		}
	}
	slices.Sort(out)
	return out
}

// orderingIPVS is the IPVS fake, checking at each real server added that
// keeplb's nftables table already masquerades it, and at each one deleted
// that the table still does.
type orderingIPVS struct {
	*ipvstesting.Fake
	t   *testing.T
	nft *knftables.Fake
}

func (o orderingIPVS) masqueraded(vs ipvs.Key, rs netip.AddrPort) bool {
	if !vs.Address.Is4() {
		return true // the v6 set is checked the same way; one family suffices
	}
	want := fmt.Sprintf("%s . %s . %d . %s . %d", vs.Address, strings.ToLower(vs.Protocol), vs.Port, rs.Addr(), rs.Port())
	return slices.Contains(elements(o.t, o.nft, "snat-v4"), want)
}

func (o orderingIPVS) AddRealServer(vs ipvs.Key, rs ipvs.RealServer) error {
	if !o.masqueraded(vs, rs.AddrPort()) {
		o.t.Errorf("IPVS got real server %s of %s before nftables masqueraded it", rs, vs)
	}
	return o.Fake.AddRealServer(vs, rs)
}

func (o orderingIPVS) DeleteRealServer(vs ipvs.Key, rs netip.AddrPort) error {
	if !o.masqueraded(vs, rs) {
		o.t.Errorf("nftables stopped masquerading real server %s of %s before IPVS deleted it", rs, vs)
	}
	return o.Fake.DeleteRealServer(vs, rs)
}

// withoutNode returns in with node name NotReady and a new Ready node n4:
// nodeport forwarding then loses one real server and gains one.
func withoutNode(in Inputs, name string) Inputs {
	in.Nodes = slices.Clone(in.Nodes)
	for i, n := range in.Nodes {
		if n.Name == name {
			n = n.DeepCopy()
			n.Status.Conditions[0].Status = v1.ConditionFalse
			in.Nodes[i] = n
		}
	}
	in.Nodes = append(in.Nodes, node("n4", true, "10.0.0.4", "fd00::4"))
	return in
}

// TestReconcilerMasqueradesBeforeForwarding: a real server is masqueraded
// before IPVS may send it a connection, and until IPVS stops; afterwards
// the table holds only what the desired state asks.
func TestReconcilerMasqueradesBeforeForwarding(t *testing.T) {
	fake, nf := ipvstesting.New(), knftables.NewFake(nft.Family, nft.Table)
	r := NewReconciler("n1", Kernel{IPVS: orderingIPVS{Fake: fake, t: t, nft: nf}, NFT: nf})
	in := syncInputs()
	for _, in := range []Inputs{in, withoutNode(in, "n2")} {
		st, _ := Desired(in, "n1")
		if _, err := r.Sync(t.Context(), st); err != nil {
			t.Fatal(err)
		}
		if got := fake.Table(); !got.Equal(st.IPVS) {
			t.Fatalf("IPVS table\n%s\nwant\n%s", got, st.IPVS)
		}
		if got, want := elements(t, nf, "snat-v4"), snatElements(st); !slices.Equal(got, want) {
			t.Errorf("masquerading after the sync:\n%q\nwant\n%q", got, want)
		}
	}
}

// TestReconcilerKernelFailsHalfway: the kernel refuses every op after the
// first few of a sync. The sync fails; what the kernel then holds is kept
// and masqueraded (the table follows the desired state, and masquerades
// the union of old and new until IPVS is done); the next sync, with the
// kernel well again, converges, deleting what the failed sync programmed
// and no longer is wanted, and leaving the foreign virtual servers alone.
func TestReconcilerKernelFailsHalfway(t *testing.T) {
	fake, nf := ipvstesting.New(), knftables.NewFake(nft.Family, nft.Table)
	fake.SeedTable(foreign)
	r := NewReconciler("n1", Kernel{IPVS: fake, NFT: nf})
	first, _ := Desired(syncInputs(), "n1")
	if _, err := r.Sync(t.Context(), first); err != nil {
		t.Fatal(err)
	}

	// Second sync: n2 leaves, n4 arrives, and a new Service appears; the
	// kernel fails every op after the third.
	in := withoutNode(syncInputs(), "n2")
	in.Services = append(in.Services, service("new", []string{"192.0.2.7"}))
	second, _ := Desired(in, "n1")
	ops := 0
	fake.FailWith(func(c ipvstesting.Call) error {
		if strings.HasPrefix(c.Method, "Add") || strings.HasPrefix(c.Method, "Update") || strings.HasPrefix(c.Method, "Delete") {
			if ops++; ops > 3 {
				return errors.New("injected: no buffer space available")
			}
		}
		return nil
	})
	rep, err := r.Sync(t.Context(), second)
	if err == nil || !rep.IPVSFailed || rep.Result.Failed == 0 {
		t.Fatalf("a sync the kernel failed halfway returned %v, %+v", err, rep)
	}
	halfway := fake.Table()
	if halfway.Equal(second.IPVS) || halfway.Equal(merge(first.IPVS, foreign)) {
		t.Fatalf("the injected failure did not stop the sync halfway:\n%s", halfway)
	}
	for k, e := range foreign {
		if got, ok := halfway[k]; !ok || !got.Equal(e) {
			t.Errorf("foreign virtual server %s changed: %v", k, got)
		}
	}
	if got, want := elements(t, nf, "snat-v4"), snatElements(second); !slices.Equal(got, want) {
		t.Errorf("after the failed sync the table masquerades\n%q\nwant the desired state's\n%q", got, want)
	}

	fake.FailWith(nil)
	if _, err := r.Sync(t.Context(), second); err != nil {
		t.Fatalf("sync with the kernel well again: %v", err)
	}
	if got, want := fake.Table(), merge(second.IPVS, foreign); !got.Equal(want) {
		t.Errorf("did not converge after the failure:\n%s\nwant\n%s", got, want)
	}

	// Exit removes what it programmed and its table, nothing else.
	if _, err := r.Exit(t.Context(), second.Owns); err != nil {
		t.Fatal(err)
	}
	if got := fake.Table(); !got.Equal(foreign) {
		t.Errorf("after exit the kernel holds\n%s\nwant only the foreign\n%s", got, foreign)
	}
	if nf.Table != nil {
		t.Error("exit left keeplb's table")
	}
}

// TestReconcilerNFTFailsHalfway: the table's write fails after IPVS was
// programmed (the second write of a sync). The sync fails, the node says it
// cannot forward (its VRRP priority drops), and the next sync rewrites the
// table although its text did not change.
func TestReconcilerNFTFailsHalfway(t *testing.T) {
	fake := ipvstesting.New()
	// The first sync writes once (its union is the final table); the
	// second writes the union, then fails on the final table.
	nf := &failAfter{Fake: knftables.NewFake(nft.Family, nft.Table), left: 2}
	r := NewReconciler("n1", Kernel{IPVS: fake, NFT: nf})
	first, _ := Desired(syncInputs(), "n1")
	if _, err := r.Sync(t.Context(), first); err != nil {
		t.Fatal(err)
	}
	st, _ := Desired(withoutNode(syncInputs(), "n2"), "n1")
	rep, err := r.Sync(t.Context(), st)
	if err == nil || rep.NFTFailures != 1 {
		t.Fatalf("sync with the final table write failing: %v, %d failures", err, rep.NFTFailures)
	}
	if r.CanForward() {
		t.Error("CanForward after a failed table write")
	}
	if got := fake.Table(); !got.Equal(st.IPVS) {
		t.Errorf("IPVS, programmed before the failed write:\n%s\nwant\n%s", got, st.IPVS)
	}
	if got, want := elements(t, nf.Fake, "snat-v4"), unionOf(snatElements(first), snatElements(st)); !slices.Equal(got, want) {
		t.Errorf("after the failed final write the table masquerades\n%q\nwant the union of old and new\n%q", got, want)
	}
	nf.left = -1
	if _, err := r.Sync(t.Context(), st); err != nil {
		t.Fatal(err)
	}
	if !r.CanForward() {
		t.Error("cannot forward after a good write")
	}
	if got, want := elements(t, nf.Fake, "snat-v4"), snatElements(st); !slices.Equal(got, want) {
		t.Errorf("table masquerades\n%q\nwant\n%q", got, want)
	}
}

func unionOf(a, b []string) []string {
	out := append(slices.Clone(a), b...)
	slices.Sort(out)
	return slices.Compact(out)
}

// failAfter is a knftables.Fake whose runs fail once left runs succeeded
// (never while left is negative).
type failAfter struct {
	*knftables.Fake
	left int
}

func (f *failAfter) Run(ctx context.Context, tx *knftables.Transaction) error {
	if f.left == 0 {
		return errors.New("injected: Error: Could not process rule: No buffer space available")
	}
	if f.left > 0 {
		f.left--
	}
	return f.Fake.Run(ctx, tx)
}

// TestReconcilerGuardOnly: without IPVS only the guard is written.
func TestReconcilerGuardOnly(t *testing.T) {
	nf := knftables.NewFake(nft.Family, nft.Table)
	r := NewReconciler("n1", Kernel{NFT: nf})
	st, _ := Desired(syncInputs(), "n1")
	if _, err := r.Sync(t.Context(), st); err != nil {
		t.Fatal(err)
	}
	if got := elements(t, nf, "snat-v4"); len(got) != 0 {
		t.Errorf("without IPVS the table masquerades %q", got)
	}
	if got := elements(t, nf, "vips-v4"); len(got) == 0 {
		t.Error("without IPVS the guard lists no VIP")
	}
	if r.CanForward() {
		t.Error("CanForward without IPVS")
	}
}

// TestForgetsFollowedFlows: a node whose masquerade follows the VIP
// deletes the conntrack entries of the VIPs' flows: both zones' after its
// first table, the transit zone's of the VIPs it has just acquired, the
// default zone's of those it has just released, and on exit (its pods' replies must then go to the new
// holder); never other flows, nor those of another holder's nodeport
// forwarding to this node's NodePort (kube-proxy's DNAT lives in them),
// and later writes delete nothing. A node
// that masquerades to itself deletes none, and a failing conntrack fails
// nothing.
func TestForgetsFollowedFlows(t *testing.T) {
	tuple := func(src, dst string) conntrack.Tuple {
		return conntrack.Tuple{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}
	}
	opened := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("198.51.100.7:40000", "192.0.2.1:80"), Reply: tuple("10.1.4.1:8080", "192.0.2.1:40000")}
	openedV6 := conntrack.Flow{Protocol: conntrack.UDP, Original: tuple("[2001:db8:9::7]:40000", "[2001:db8::1]:80"), Reply: tuple("[fd00::1]:8080", "[2001:db8::1]:40000")}
	transit := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.1:40001", "10.1.4.1:8080"), Reply: tuple("10.1.4.1:8080", "192.0.2.1:40001"), Zone: nft.TransitZone}
	transitReply := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("10.1.4.1:8080", "192.0.2.1:40002"), Reply: tuple("192.0.2.1:40002", "10.1.4.1:8080"), Zone: nft.TransitZone}
	other := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("198.51.100.7:40000", "10.0.0.1:22"), Reply: tuple("10.0.0.1:22", "198.51.100.7:40000")}
	// Routed to this node's pod before its table had the transit zone.
	routed := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.1:40003", "10.1.4.1:8080"), Reply: tuple("10.1.4.1:8080", "192.0.2.1:40003")}
	// Another holder's nodeport forwarding to this node's NodePort (n1 is
	// 10.0.0.1 and fd00::1), DNATed by kube-proxy: kube-proxy's, never
	// deleted.
	nodePort := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.1:40005", "10.0.0.1:30080"), Reply: tuple("10.1.4.1:8080", "10.0.0.1:40005")}
	nodePortV6 := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("[2001:db8::1]:40006", "[fd00::1]:30080"), Reply: tuple("[fd00:1::1]:8080", "[fd00::1]:40006")}
	// Of a VIP this node does not acquire.
	otherTransit := conntrack.Flow{Protocol: conntrack.TCP, Original: tuple("192.0.2.2:40004", "10.1.4.1:8080"), Reply: tuple("10.1.4.1:8080", "192.0.2.2:40004"), Zone: nft.TransitZone}
	all := []conntrack.Flow{opened, openedV6, transit, transitReply, other, routed, nodePort, nodePortV6}
	later := []conntrack.Flow{opened, routed, transit, otherTransit}

	for _, tc := range []struct {
		name      string
		followVIP bool
		fail      error
		// What each step leaves: the first sync, Acquired, then Released
		// and exit (with the flow opened in between).
		first, acquired, exit []conntrack.Flow
	}{
		{"followed", true, nil,
			[]conntrack.Flow{other, nodePort, nodePortV6},
			[]conntrack.Flow{other, nodePort, nodePortV6, opened, routed, otherTransit},
			[]conntrack.Flow{other, nodePort, nodePortV6, otherTransit}},
		{"masqueraded to the node", false, nil, all, append(slices.Clone(all), later...), append(slices.Clone(all), later...)},
		{"conntrack failing", true, errors.New("injected: operation not permitted"), all, append(slices.Clone(all), later...), append(slices.Clone(all), later...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ct := conntracktesting.New(all...)
			nf := knftables.NewFake(nft.Family, nft.Table)
			r := NewReconciler("n1", Kernel{IPVS: ipvstesting.New(), NFT: nf, Conntrack: ct})
			st, _ := Desired(syncInputs(), "n1")
			st.FollowVIP = tc.followVIP
			check := func(step string, want []conntrack.Flow) {
				t.Helper()
				ct.FailWith(nil)
				if got := ct.Flows(); !slices.Equal(got, want) {
					t.Errorf("flows left after %s\n%+v\nwant\n%+v", step, got, want)
				}
				ct.FailWith(tc.fail)
			}
			ct.FailWith(tc.fail)
			if _, err := r.Sync(t.Context(), st); err != nil {
				t.Fatal(err)
			}
			check("the first sync", tc.first)

			ct.FailWith(nil)
			ct.Add(later...)
			ct.FailWith(tc.fail)
			st.Guard.Echo = nil
			if _, err := r.Sync(t.Context(), st); err != nil {
				t.Fatal(err)
			}
			check("the second sync", append(slices.Clone(tc.first), later...))

			r.Acquired(t.Context(), []netip.Addr{netip.MustParseAddr("::ffff:192.0.2.1"), netip.MustParseAddr("203.0.113.1")})
			check("acquiring 192.0.2.1", tc.acquired)
			r.Released(t.Context(), []netip.Addr{netip.MustParseAddr("192.0.2.1")})
			check("releasing 192.0.2.1", tc.exit)
			ct.FailWith(nil)
			ct.Add(opened)
			ct.FailWith(tc.fail)

			if _, err := r.Exit(t.Context(), st.Owns); err != nil {
				t.Fatalf("exit: %v", err)
			}
			want := tc.exit
			if !tc.followVIP || tc.fail != nil {
				want = append(slices.Clone(tc.exit), opened)
			}
			check("exit", want)
			if nf.Table != nil {
				t.Error("exit left keeplb's table")
			}
		})
	}
}

// TestKeepFlowsAtAdoption: a speaker adopting a hand-off keeps every
// conntrack entry at its first table write, which deletes the VIPs'
// flows otherwise (TestForgetsFollowedFlows).
func TestKeepFlowsAtAdoption(t *testing.T) {
	tuple := func(src, dst string) conntrack.Tuple {
		return conntrack.Tuple{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}
	}
	flows := []conntrack.Flow{
		{Protocol: conntrack.TCP, Original: tuple("198.51.100.7:40000", "192.0.2.1:80"), Reply: tuple("10.1.4.1:8080", "192.0.2.1:40000")},
		{Protocol: conntrack.TCP, Original: tuple("192.0.2.1:40001", "10.1.4.1:8080"), Reply: tuple("10.1.4.1:8080", "192.0.2.1:40001"), Zone: nft.TransitZone},
	}
	for _, adopt := range []bool{true, false} {
		ct := conntracktesting.New(flows...)
		r := NewReconciler("n1", Kernel{IPVS: ipvstesting.New(), NFT: knftables.NewFake(nft.Family, nft.Table), Conntrack: ct})
		if adopt {
			r.KeepFlows()
		}
		st, _ := Desired(syncInputs(), "n1")
		st.FollowVIP = true
		if _, err := r.Sync(t.Context(), st); err != nil {
			t.Fatal(err)
		}
		if kept := len(ct.Flows()) == len(flows); kept != adopt {
			t.Errorf("adopting %v: %d of %d flows left after the first sync", adopt, len(ct.Flows()), len(flows))
		}
	}
}

// TestRulesWhole: with FollowVIP, a virtual server that masquerades all
// its real servers (a Cluster Service's) is masqueraded whatever the
// real server; one that keeps some client addresses (Local) is not; and
// without FollowVIP nothing is.
func TestRulesWhole(t *testing.T) {
	rs := func(s ...string) []ipvs.RealServer {
		var out []ipvs.RealServer
		for _, a := range s {
			ap := netip.MustParseAddrPort(a)
			out = append(out, ipvs.RealServer{Address: ap.Addr(), Port: ap.Port()})
		}
		return out
	}
	aps := func(s ...string) []netip.AddrPort {
		var out []netip.AddrPort
		for _, a := range s {
			out = append(out, netip.MustParseAddrPort(a))
		}
		return out
	}
	cluster := ipvs.Key{Address: netip.MustParseAddr("192.0.2.1"), Protocol: "TCP", Port: 80}
	local := ipvs.Key{Address: netip.MustParseAddr("192.0.2.2"), Protocol: "TCP", Port: 80}
	st := State{
		IPVS: ipvs.Table{
			cluster: {Virtual: ipvs.VirtualServer{Address: cluster.Address, Protocol: "TCP", Port: 80}, Reals: rs("10.0.0.2:30080", "10.1.1.5:8080")},
			local:   {Virtual: ipvs.VirtualServer{Address: local.Address, Protocol: "TCP", Port: 80}, Reals: rs("10.0.0.2:30081", "10.1.1.6:8080")},
		},
		SNAT: []nft.SNAT{
			{Virtual: cluster, Reals: aps("10.0.0.2:30080", "10.1.1.5:8080")},
			{Virtual: local, Reals: aps("10.0.0.2:30081")}, // its own pod keeps the client's address
		},
		FollowVIP: true,
	}
	if got := rulesOf(st).Whole; !slices.Equal(got, []ipvs.Key{cluster}) {
		t.Errorf("Whole = %v, want [%v]", got, cluster)
	}
	st.FollowVIP = false
	if got := rulesOf(st).Whole; got != nil {
		t.Errorf("Whole without FollowVIP = %v, want none", got)
	}
}

// TestAdoptProgrammed: a virtual server in a pool that no Service wants
// is left alone as another program's, unless the previous speaker handed
// it off as its own (AdoptProgrammed): then the first sync deletes it.
// That is a Service deleted while no speaker ran.
func TestAdoptProgrammed(t *testing.T) {
	st, _ := Desired(syncInputs(), "n1")
	gone := ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.9"), Protocol: "TCP", Port: 80, Scheduler: "rr"}
	if !st.Owns(gone.Key()) {
		t.Fatalf("%v is not in the test's pools: the test proves nothing", gone.Key())
	}
	for _, adopt := range []bool{false, true} {
		fake := ipvstesting.New()
		if err := fake.AddVirtualServer(gone); err != nil {
			t.Fatal(err)
		}
		r := NewReconciler("n1", Kernel{IPVS: fake, NFT: knftables.NewFake(nft.Family, nft.Table), Conntrack: conntracktesting.New()})
		if adopt {
			if err := r.AdoptProgrammed([]ipvs.Key{gone.Key()}); err != nil {
				t.Fatal(err)
			}
		}
		rep, err := r.Sync(t.Context(), st)
		if err != nil {
			t.Fatal(err)
		}
		_, left := fake.Table()[gone.Key()]
		if left == adopt {
			t.Errorf("adopted %v: the virtual server of a deleted Service left %v (foreign %v)", adopt, left, rep.Foreign)
		}
	}
}
