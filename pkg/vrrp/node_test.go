package vrrp

import (
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestTrackValues(t *testing.T) {
	nodes := readyNodes(4)
	nodes[3].Ready = false
	pool := Pool{Name: "p", FirstVRID: 1, LastVRID: 255}
	addr := netip.MustParseAddr("192.0.2.10")
	name := "kl_p_v4_192-0-2-10"
	svc := func(service string, endpoints ...string) VIP {
		return VIP{Addr: addr, Pool: "p", Service: service, Local: true, LocalNodes: endpoints}
	}
	tests := []struct {
		name string
		vips []VIP
		want map[string]int // node -> value; node-3 is NotReady and takes no part
	}{
		{"endpoints on one node", []VIP{svc("ns/a", "node-1")},
			map[string]int{"node-0": TrackFault, "node-1": LocalLift, "node-2": TrackFault}},
		{"endpoints on two nodes", []VIP{svc("ns/a", "node-0", "node-2")},
			map[string]int{"node-0": LocalLift, "node-1": TrackFault, "node-2": LocalLift}},
		{"no endpoints: every eligible node may hold it", []VIP{svc("ns/a")},
			map[string]int{"node-0": 0, "node-1": 0, "node-2": 0}},
		{"endpoints only on a NotReady node count as none", []VIP{svc("ns/a", "node-3")},
			map[string]int{"node-0": 0, "node-1": 0, "node-2": 0}},
		{"endpoints on an unknown node count as none", []VIP{svc("ns/a", "gone")},
			map[string]int{"node-0": 0, "node-1": 0, "node-2": 0}},
		{"shared address: nodes serving every Service", []VIP{svc("ns/a", "node-0", "node-1"), svc("ns/b", "node-1", "node-2")},
			map[string]int{"node-0": TrackFault, "node-1": LocalLift, "node-2": TrackFault}},
		{"shared address, no node serves both: nodes serving any", []VIP{svc("ns/a", "node-0"), svc("ns/b", "node-2")},
			map[string]int{"node-0": LocalLift, "node-1": TrackFault, "node-2": LocalLift}},
		{"shared with a Cluster Service: still Local", []VIP{svc("ns/a", "node-2"), {Addr: addr, Pool: "p", Service: "ns/c"}},
			map[string]int{"node-0": TrackFault, "node-1": TrackFault, "node-2": LocalLift}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := Input{Nodes: nodes, Pools: []Pool{pool}, VIPs: append(tc.vips, shared("p", seq("192.0.2.100", 3))...)}
			p := Compute(in)
			for _, n := range nodes {
				got := TrackValues(p, n.Name, in, true)
				want := map[string]int{}
				if v, ok := tc.want[n.Name]; ok {
					want[name] = v
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("TrackValues(%s) = %v, want %v", n.Name, got, want)
				}
			}
			// The effective priorities (base + value, as keepalived adds
			// them with weight 1): every endpoint node above every other,
			// and faulted nodes out of the running.
			inst := instanceByName(t, p, name)
			lowestLifted, highestOther := 255, 0
			for n, base := range inst.Priorities {
				switch v := TrackValues(p, n, in, true)[name]; v {
				case LocalLift:
					lowestLifted = min(lowestLifted, base+v)
				case 0:
					highestOther = max(highestOther, base)
				}
				if base+LocalLift > 254 {
					t.Errorf("%s: base %d + lift exceeds 254", n, base)
				}
			}
			if lowestLifted <= highestOther {
				t.Errorf("a node with endpoints (%d) does not outrank one without (%d)", lowestLifted, highestOther)
			}
			if TrackFault*1 >= -253 {
				t.Errorf("TrackFault %d does not put keepalived in FAULT", TrackFault)
			}
		})
	}
}

func TestTrackValuesOnlyForLocal(t *testing.T) {
	in := stabilityInput()
	p := Compute(in)
	got := TrackValues(p, "node-0", in, true)
	want := 0
	for _, inst := range p.For("node-0") {
		if inst.TrackFile {
			want++
			if _, ok := got[inst.Name]; !ok {
				t.Errorf("no value for Local instance %s", inst.Name)
			}
		} else if _, ok := got[inst.Name]; ok {
			t.Errorf("value for shared instance %s", inst.Name)
		}
	}
	if want != 12 || len(got) != want {
		t.Errorf("%d values for %d Local instances, want 12", len(got), want)
	}
}

func TestUnicastPeers(t *testing.T) {
	nodes := []Node{
		{Name: "a", Ready: true, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("fd00::3"), netip.MustParseAddr("10.9.9.9")}},
		{Name: "b", Ready: true, InternalIPs: []netip.Addr{netip.MustParseAddr("fd00::1"), netip.MustParseAddr("10.0.0.1")}},
		{Name: "c", Ready: true, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		{Name: "d", Ready: false, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.4"), netip.MustParseAddr("fd00::4")}},
	}
	in := Input{
		Nodes: nodes,
		Pools: []Pool{{Name: "u", FirstVRID: 1, LastVRID: 255, Unicast: true}},
		VIPs:  []VIP{{Addr: netip.MustParseAddr("192.0.2.1"), Pool: "u", Service: "ns/s"}, {Addr: netip.MustParseAddr("2001:db8::1"), Pool: "u", Service: "ns/s"}},
	}
	p := Compute(in)
	v4, v6 := instanceOf(t, p, "192.0.2.1"), instanceOf(t, p, "2001:db8::1")
	tests := []struct {
		inst  Instance
		self  string
		src   string
		peers []string
	}{
		{v4, "a", "10.0.0.3", []string{"10.0.0.1", "10.0.0.2"}},
		{v4, "c", "10.0.0.2", []string{"10.0.0.1", "10.0.0.3"}},
		{v6, "a", "fd00::3", []string{"fd00::1"}},
		{v6, "b", "fd00::1", []string{"fd00::3"}},
		{v6, "c", "invalid IP", []string{"fd00::1", "fd00::3"}}, // c has no IPv6: not a member
	}
	for _, tc := range tests {
		src, peers := UnicastPeers(tc.inst, tc.self, nodes)
		var got []string
		for _, a := range peers {
			got = append(got, a.String())
		}
		if src.String() != tc.src || !reflect.DeepEqual(got, tc.peers) {
			t.Errorf("UnicastPeers(%s, %s) = %s %v, want %s %v", tc.inst.Family, tc.self, src, got, tc.src, tc.peers)
		}
	}
	if _, ok := v6.Priorities["c"]; ok {
		t.Error("node c without an IPv6 InternalIP takes part in a unicast IPv6 instance")
	}
}

func TestChooseInterface(t *testing.T) {
	pfx := netip.MustParsePrefix
	ifaces := []Interface{
		{Name: "eth0", Prefixes: []netip.Prefix{pfx("10.0.0.5/16"), pfx("fe80::1/64")}, DefaultRoute4: true},
		{Name: "eth1", Prefixes: []netip.Prefix{pfx("10.0.1.5/24"), pfx("2001:db8:1::5/64")}},
		{Name: "eth2", Prefixes: []netip.Prefix{pfx("192.0.2.7/32"), pfx("2001:db8:2::5/64")}, DefaultRoute6: true},
		{Name: "lo", Prefixes: []netip.Prefix{pfx("127.0.0.1/8"), pfx("::1/128")}},
	}
	tests := []struct {
		name     string
		explicit string
		vip      string
		ifaces   []Interface
		want     string
		err      string
	}{
		{"explicit", "eth2", "10.0.1.9", ifaces, "eth2", ""},
		{"explicit missing", "bond0", "10.0.1.9", ifaces, "", "spec.vrrp.interface bond0 does not exist"},
		{"most specific subnet", "", "10.0.1.9", ifaces, "eth1", ""},
		{"wider subnet", "", "10.0.200.9", ifaces, "eth0", ""},
		{"IPv6 subnet", "", "2001:db8:1::99", ifaces, "eth1", ""},
		{"v4-mapped VIP", "", "::ffff:10.0.1.9", ifaces, "eth1", ""},
		{"host prefix is not a subnet: IPv4 default route", "", "192.0.2.7", ifaces, "eth0", ""},
		{"IPv4 default route", "", "198.51.100.1", ifaces, "eth0", ""},
		{"IPv6 default route", "", "2001:db8:9::1", ifaces, "eth2", ""},
		{"no IPv6 route", "", "2001:db8:9::1", ifaces[:2], "", "no interface has a subnet containing it or an IPv6 default route"},
		{"nothing", "", "198.51.100.1", nil, "", "set spec.vrrp.interface"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ChooseInterface(tc.explicit, netip.MustParseAddr(tc.vip), tc.ifaces)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrNoInterface) {
					t.Fatalf("got %q, %v; want an ErrNoInterface containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestPlace(t *testing.T) {
	ifaces := []Interface{
		{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("192.0.2.1/24")}},
		{Name: "eth1", Prefixes: []netip.Prefix{netip.MustParsePrefix("198.51.100.1/24")}},
	}
	inst := Instance{VIPs: []netip.Addr{
		netip.MustParseAddr("10.9.9.9"), netip.MustParseAddr("192.0.2.50"), netip.MustParseAddr("198.51.100.50"),
	}}
	pl, err := Place(inst, ifaces)
	if err == nil || !strings.Contains(err.Error(), "10.9.9.9") {
		t.Errorf("error %v, want one naming 10.9.9.9", err)
	}
	if want := (Placement{Interface: "eth0", Devs: []string{"", "eth0", "eth1"}}); !reflect.DeepEqual(pl, want) {
		t.Errorf("Place = %+v, want %+v", pl, want)
	}
	inst.Interface = "eth1"
	pl, err = Place(inst, ifaces)
	if want := (Placement{Interface: "eth1", Devs: []string{"eth1", "eth1", "eth1"}}); err != nil || !reflect.DeepEqual(pl, want) {
		t.Errorf("Place with explicit interface = %+v, %v; want %+v", pl, err, want)
	}
}

func TestMasterDown(t *testing.T) {
	tests := []struct {
		advert   time.Duration
		priority int
		want     time.Duration
	}{
		{time.Second, 254, 3*time.Second + 2*time.Second/256},
		{time.Second, 128, 3*time.Second + 500*time.Millisecond},
		{100 * time.Millisecond, 1, 300*time.Millisecond + 255*100*time.Millisecond/256},
	}
	for _, tc := range tests {
		if got := MasterDown(tc.advert, tc.priority); got != tc.want {
			t.Errorf("MasterDown(%s, %d) = %s, want %s", tc.advert, tc.priority, got, tc.want)
		}
	}
}

// TestTrackValuesCannotForward checks the rule for nodes that cannot
// forward with IPVS, for every set of such nodes: in an instance with a
// Forwarded VIP, each of them ranks below every node that can, the order
// within each group is the plan's, and none faults because of it, so the
// VIP is held where the plan puts it even when no node can forward.
// Instances without a Forwarded VIP are not tracked at all.
func TestTrackValuesCannotForward(t *testing.T) {
	nodes := readyNodes(4)
	fwd := func(vs []VIP) []VIP {
		for i := range vs {
			vs[i].Forwarded = true
		}
		return vs
	}
	mixed := shared("mix", seq("192.0.2.129", 4))
	mixed[0].Forwarded = true
	lv := local("fwd", netip.MustParseAddr("198.51.100.7"), 0, "node-1", "node-2")
	lv.Forwarded = true
	in := Input{
		Nodes: nodes,
		Pools: []Pool{
			{Name: "fwd", FirstVRID: 1, LastVRID: 20},
			{Name: "kp", FirstVRID: 21, LastVRID: 40},
			{Name: "mix", FirstVRID: 41, LastVRID: 42}, // one shared instance
		},
		VIPs: slices.Concat(fwd(shared("fwd", seq("192.0.2.1", 40))), shared("kp", seq("192.0.2.65", 40)), mixed, []VIP{lv}),
	}
	p := Compute(in)
	tracked := 0
	for _, inst := range p.Instances {
		if want := inst.Pool != "kp"; inst.TrackFile != want {
			t.Fatalf("%s: TrackFile %v, want %v", inst.Name, inst.TrackFile, want)
		}
		if inst.TrackFile {
			tracked++
		}
	}
	if tracked < 10 {
		t.Fatalf("only %d tracked instances", tracked)
	}
	for _, n := range nodes {
		for name, v := range TrackValues(p, n.Name, in, true) {
			if inst := instanceByName(t, p, name); !inst.Local && v != 0 {
				t.Errorf("%s can forward: value %d for shared instance %s, want 0 (base priority unchanged)", n.Name, v, name)
			}
		}
	}
	for mask := range 1 << len(nodes) {
		unable := func(n string) bool {
			i := slices.IndexFunc(nodes, func(x Node) bool { return x.Name == n })
			return mask&(1<<i) != 0
		}
		values := map[string]map[string]int{}
		for _, n := range nodes {
			values[n.Name] = TrackValues(p, n.Name, in, !unable(n.Name))
		}
		for _, inst := range p.Instances {
			if !inst.TrackFile {
				continue
			}
			// The running nodes by effective priority, as keepalived adds
			// the value with weight 1; faulted ones (no endpoint) are out.
			type ranked struct {
				node          string
				base, eff     int
				cannotForward bool
			}
			var rs []ranked
			for n, base := range inst.Priorities {
				v := values[n][inst.Name]
				if v == TrackFault {
					continue
				}
				if base+v < 1 || v <= -254 {
					t.Fatalf("mask %04b %s: %s at %d%+d would fault or leave 1-254", mask, inst.Name, n, base, v)
				}
				rs = append(rs, ranked{n, base, base + v, unable(n)})
			}
			slices.SortFunc(rs, func(a, b ranked) int { return b.eff - a.eff })
			for i := 1; i < len(rs); i++ {
				a, b := rs[i-1], rs[i]
				if a.eff == b.eff {
					t.Fatalf("mask %04b %s: %s and %s tie at %d", mask, inst.Name, a.node, b.node, a.eff)
				}
				if a.cannotForward && !b.cannotForward {
					t.Errorf("mask %04b %s: %s, which cannot forward (%d), outranks %s, which can (%d)", mask, inst.Name, a.node, a.eff, b.node, b.eff)
				}
				if a.cannotForward == b.cannotForward && a.base < b.base && values[a.node][inst.Name] == values[b.node][inst.Name] {
					t.Errorf("mask %04b %s: %s (base %d) outranks %s (base %d) of its own group", mask, inst.Name, a.node, a.base, b.node, b.base)
				}
			}
		}
	}
	// The Local instance: of its two endpoint nodes, the one that can
	// forward holds it; if neither can, one of them still does.
	name := "kl_fwd_v4_198-51-100-7"
	inst := instanceByName(t, p, name)
	eff := func(n string, canForward bool) int {
		return inst.Priorities[n] + TrackValues(p, n, in, canForward)[name]
	}
	if eff("node-1", false) >= eff("node-2", true) || eff("node-2", false) >= eff("node-1", true) {
		t.Errorf("an endpoint node that cannot forward outranks one that can")
	}
	if v := TrackValues(p, "node-0", in, true)[name]; v != TrackFault {
		t.Errorf("node-0 without endpoints: %d, want TrackFault", v)
	}
	if eff("node-1", false) <= inst.Priorities["node-0"] || eff("node-2", false) <= inst.Priorities["node-3"] {
		t.Errorf("endpoint nodes that cannot forward fell below nodes without endpoints")
	}
}
