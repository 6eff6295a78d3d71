package vrrp

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/keepalived"
)

// readyNodes returns n Ready nodes node-0..node-(n-1), each with an IPv4
// and an IPv6 InternalIP.
func readyNodes(n int) []Node {
	out := make([]Node, n)
	for i := range out {
		out[i] = Node{
			Name:  fmt.Sprintf("node-%d", i),
			Ready: true,
			InternalIPs: []netip.Addr{
				netip.AddrFrom4([4]byte{10, 1, 0, byte(10 + i)}),
				netip.MustParseAddr(fmt.Sprintf("fd00::%x", 10+i)),
			},
		}
	}
	return out
}

// seq returns n consecutive addresses from first.
func seq(first string, n int) []netip.Addr {
	a := netip.MustParseAddr(first)
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = a
		a = a.Next()
	}
	return out
}

// shared returns one Service of policy Cluster per address.
func shared(pool string, as []netip.Addr) []VIP {
	out := make([]VIP, len(as))
	for i, a := range as {
		out[i] = VIP{Addr: a, Pool: pool, Service: "default/svc-" + addrName(a)}
	}
	return out
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// local returns a Local Service for a, created i minutes after t0.
func local(pool string, a netip.Addr, i int, endpoints ...string) VIP {
	return VIP{Addr: a, Pool: pool, Service: "default/local-" + addrName(a), Local: true, LocalNodes: endpoints, Created: t0.Add(time.Duration(i) * time.Minute)}
}

// where is what must not change for a VIP when another VIP comes or goes.
type where struct {
	Instance   string
	VRID       int
	Master     string
	Priorities map[string]int
}

func placements(p Plan) map[netip.Addr]where {
	out := make(map[netip.Addr]where)
	for _, inst := range p.Instances {
		for _, a := range inst.VIPs {
			out[a] = where{inst.Name, inst.VRID, inst.Master(), inst.Priorities}
		}
	}
	return out
}

func instanceByName(t *testing.T, p Plan, name string) Instance {
	t.Helper()
	for _, inst := range p.Instances {
		if inst.Name == name {
			return inst
		}
	}
	t.Fatalf("no instance %s in plan; have %v", name, names(p))
	return Instance{}
}

func names(p Plan) []string {
	var out []string
	for _, inst := range p.Instances {
		out = append(out, inst.Name)
	}
	return out
}

func instanceOf(t *testing.T, p Plan, a string) Instance {
	t.Helper()
	addr := netip.MustParseAddr(a)
	for _, inst := range p.Instances {
		if slices.Contains(inst.VIPs, addr) {
			return inst
		}
	}
	t.Fatalf("VIP %s is in no instance", a)
	return Instance{}
}

func problemsWith(p Plan, reason string) []Problem {
	var out []Problem
	for _, pr := range p.Problems {
		if pr.Reason == reason {
			out = append(out, pr)
		}
	}
	return out
}

// stabilityInput has two pools, both families, and Local Services.
func stabilityInput() Input {
	in := Input{
		Nodes: readyNodes(4),
		Pools: []Pool{
			{Name: "web", FirstVRID: 10, LastVRID: 120, Order: 0},
			{Name: "db", FirstVRID: 130, LastVRID: 200, Order: 1, Unicast: true},
		},
	}
	in.VIPs = append(in.VIPs, shared("web", seq("192.0.2.1", 150))...)
	in.VIPs = append(in.VIPs, shared("web", seq("2001:db8::1", 40))...)
	in.VIPs = append(in.VIPs, shared("db", seq("198.51.100.1", 60))...)
	for i, a := range seq("203.0.113.1", 12) {
		in.VIPs = append(in.VIPs, local("web", a, i, fmt.Sprintf("node-%d", i%4)))
	}
	return in
}

func TestAddVIPMovesNoOtherVIP(t *testing.T) {
	tests := []struct {
		name string
		add  VIP
	}{
		{"IPv4 next in line", shared("web", seq("192.0.2.151", 1))[0]},
		{"IPv4 filling a hole far away", shared("web", seq("192.0.2.200", 1))[0]},
		{"IPv6", shared("web", seq("2001:db8::ff", 1))[0]},
		{"other pool", shared("db", seq("198.51.100.200", 1))[0]},
		{"Local, youngest", local("web", netip.MustParseAddr("203.0.113.99"), 100)},
		{"Local sharing a shared VIP's address", local("web", netip.MustParseAddr("192.0.2.7"), 100)},
	}
	in := stabilityInput()
	before := placements(Compute(in))
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			next := in
			next.VIPs = append(slices.Clone(in.VIPs), tc.add)
			after := placements(Compute(next))
			if _, ok := after[tc.add.Addr]; !ok {
				t.Fatalf("added VIP %s is not in the plan", tc.add.Addr)
			}
			for a, w := range before {
				if a == tc.add.Addr {
					continue
				}
				if !reflect.DeepEqual(after[a], w) {
					t.Errorf("VIP %s moved from %+v to %+v", a, w, after[a])
				}
			}
		})
	}
}

// Sixty Local Services arrive one by one into 89 Local VRIDs, so many want
// a VRID an older one holds: none of them ever moves an older VIP.
func TestAddLocalVIPsOneByOne(t *testing.T) {
	in := stabilityInput()
	before := placements(Compute(in))
	for i, a := range seq("203.0.114.1", 60) {
		in.VIPs = append(in.VIPs, local("web", a, 100+i))
		after := placements(Compute(in))
		for addr, w := range before {
			if !reflect.DeepEqual(after[addr], w) {
				t.Fatalf("adding %s moved %s from %+v to %+v", a, addr, w, after[addr])
			}
		}
		if !strings.HasPrefix(after[a].Instance, "kl_web_v4_203-0-114") {
			t.Fatalf("Local VIP %s is in %s, not its own instance", a, after[a].Instance)
		}
		before = after
	}
}

func TestRemoveVIPMovesNoOtherVIP(t *testing.T) {
	in := stabilityInput()
	before := placements(Compute(in))
	for _, remove := range []string{"192.0.2.1", "192.0.2.77", "2001:db8::10", "198.51.100.60", "203.0.113.5"} {
		t.Run(remove, func(t *testing.T) {
			addr := netip.MustParseAddr(remove)
			next := in
			next.VIPs = slices.DeleteFunc(slices.Clone(in.VIPs), func(v VIP) bool { return v.Addr == addr })
			after := placements(Compute(next))
			if _, ok := after[addr]; ok {
				t.Fatalf("removed VIP %s is still in the plan", addr)
			}
			for a, w := range before {
				if a != addr && !reflect.DeepEqual(after[a], w) {
					t.Errorf("VIP %s moved from %+v to %+v", a, w, after[a])
				}
			}
		})
	}
}

// A Local address that lost its best VRID to an older one takes it when the
// older one goes: the only way removing a VIP moves another (see the
// package documentation). Find such a pair, then check exactly that.
func TestRemoveLocalVIPMovesOnlyItsDisplaced(t *testing.T) {
	in := Input{Nodes: readyNodes(3), Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 64}}}
	var older, younger netip.Addr
	for i, a := range seq("192.0.2.1", 200) {
		in.VIPs = append(in.VIPs, local("p", a, i))
		p := Compute(in)
		got := instanceOf(t, p, a.String()).VRID
		alone := Compute(Input{Nodes: in.Nodes, Pools: in.Pools, VIPs: []VIP{local("p", a, 0)}})
		if want := instanceOf(t, alone, a.String()).VRID; got != want {
			younger = a
			for _, inst := range p.Instances {
				if inst.VRID == want {
					older = inst.VIPs[0]
				}
			}
			break
		}
	}
	if !older.IsValid() {
		t.Fatal("found no Local address displaced by an older one")
	}
	before := Compute(in)
	freed := instanceOf(t, before, older.String()).VRID
	in.VIPs = slices.DeleteFunc(in.VIPs, func(v VIP) bool { return v.Addr == older })
	after := placements(Compute(in))
	for a, w := range placements(before) {
		if a == older {
			continue
		}
		switch {
		case a == younger:
			if after[a].VRID != freed {
				t.Errorf("displaced VIP %s has VRID %d, want the freed %d", a, after[a].VRID, freed)
			}
		case !reflect.DeepEqual(after[a], w):
			t.Errorf("VIP %s moved from %+v to %+v", a, w, after[a])
		}
	}
	t.Logf("removing %s (VRID %d) moved only %s, which had wanted that VRID", older, freed, younger)
}

func TestMoreVIPsThanVRIDs(t *testing.T) {
	in := Input{
		Nodes: readyNodes(3),
		Pools: []Pool{{Name: "big", FirstVRID: 1, LastVRID: 255}},
		VIPs:  append(shared("big", seq("10.0.0.1", 1000)), shared("big", seq("2001:db8::1", 300))...),
	}
	p := Compute(in)
	if len(p.Problems) != 0 {
		t.Fatalf("problems: %v", p.Problems)
	}
	got := placements(p)
	if len(got) != 1300 {
		t.Fatalf("%d VIPs planned, want 1300", len(got))
	}
	vrids := map[allocator.Family]map[int]bool{allocator.IPv4: {}, allocator.IPv6: {}}
	for _, inst := range p.Instances {
		if vrids[inst.Family][inst.VRID] {
			t.Errorf("VRID %d used twice in %s", inst.VRID, inst.Family)
		}
		vrids[inst.Family][inst.VRID] = true
		if inst.VRID < 1 || inst.VRID > maxBuckets {
			t.Errorf("%s has VRID %d, want the first %d of the range", inst.Name, inst.VRID, maxBuckets)
		}
		if !slices.IsSortedFunc(inst.VIPs, netip.Addr.Compare) {
			t.Errorf("%s VIPs not sorted", inst.Name)
		}
		for _, a := range inst.VIPs {
			if allocator.FamilyOf(a) != inst.Family {
				t.Errorf("%s (%s) holds %s", inst.Name, inst.Family, a)
			}
		}
	}
	if len(p.Instances) != 2*maxBuckets {
		t.Errorf("%d instances, want %d", len(p.Instances), 2*maxBuckets)
	}
}

func TestInstanceFields(t *testing.T) {
	in := Input{
		Nodes: readyNodes(2),
		Pools: []Pool{
			{Name: "edge.example", FirstVRID: 40, LastVRID: 50, Interface: "eth1", Unicast: true, Advert: 100 * time.Millisecond},
			{Name: "def", FirstVRID: 60, LastVRID: 255},
		},
		VIPs: []VIP{
			{Addr: netip.MustParseAddr("192.0.2.1"), Pool: "edge.example", Service: "a/b"},
			{Addr: netip.MustParseAddr("2001:db8::1"), Pool: "edge.example", Service: "a/b"},
			local("edge.example", netip.MustParseAddr("192.0.2.9"), 0),
			local("edge.example", netip.MustParseAddr("2001:db8::9"), 0),
			{Addr: netip.MustParseAddr("::ffff:198.51.100.3"), Pool: "def", Service: "a/c"},
		},
	}
	p := Compute(in)
	want := []string{
		"kl_def_v4_b03",
		"kl_edge.example_v4_192-0-2-9",
		"kl_edge.example_v4_b03",
		"kl_edge.example_v6_2001-db8--9",
		"kl_edge.example_v6_b01",
	}
	if got := names(p); !reflect.DeepEqual(got, want) {
		t.Fatalf("instances %v, want %v", got, want)
	}
	b := instanceByName(t, p, "kl_edge.example_v6_b01")
	if b.Family != allocator.IPv6 || b.VRID != 41 || b.Version != 3 || b.Advert != 100*time.Millisecond ||
		!b.Unicast || b.Interface != "eth1" || b.TrackFile || b.HoldDown != PreemptDelay {
		t.Errorf("shared instance %+v", b)
	}
	// 11 VRIDs: 6 shared instances on 40-45, Local ones on 46-50.
	l := instanceByName(t, p, "kl_edge.example_v4_192-0-2-9")
	if !l.TrackFile || l.VRID < 46 || l.VRID > 50 {
		t.Errorf("Local instance %+v, want TrackFile and a VRID in 46-50", l)
	}
	for _, prio := range l.Priorities {
		if prio > LocalTopPriority {
			t.Errorf("Local base priority %d above %d", prio, LocalTopPriority)
		}
	}
	d := instanceByName(t, p, "kl_def_v4_b03")
	if d.Advert != DefaultAdvert || d.VIPs[0] != netip.MustParseAddr("198.51.100.3") {
		t.Errorf("default pool instance %+v", d)
	}
	if len(p.Problems) != 0 {
		t.Errorf("problems: %v", p.Problems)
	}
}

func TestPriorities(t *testing.T) {
	p := Compute(Input{Nodes: readyNodes(5), Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: shared("p", seq("192.0.2.1", 100))})
	for _, inst := range p.Instances {
		var got []int
		for _, v := range inst.Priorities {
			got = append(got, v)
		}
		slices.Sort(got)
		// The first two choices one apart, then BackupGap below the
		// second: the handover goes to the second choice well before any
		// other backup's skew time.
		if want := []int{218, 219, 220, 253, 254}; !reflect.DeepEqual(got, want) {
			t.Errorf("%s priorities %v, want %v", inst.Name, got, want)
		}
	}
	many := readyNodes(300)
	p = Compute(Input{Nodes: many, Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: shared("p", seq("192.0.2.1", 1))})
	low := 0
	for _, v := range p.Instances[0].Priorities {
		if v < 1 || v > 254 {
			t.Fatalf("priority %d outside 1-254", v)
		}
		if v == 1 {
			low++
		}
	}
	if want := 300 - 253 + BackupGap; low != want {
		t.Errorf("%d nodes at priority 1, want %d", low, want)
	}
}

// TestSuccessors: from the planned master a shared VIP's successor is the
// planned second choice (254 then 253), from every other node the planned
// master; an unready node is no one's successor; Local VIPs have none.
func TestSuccessors(t *testing.T) {
	in := stabilityInput()
	in.Nodes[3].Ready = false
	p := Compute(in)
	byPrio := func(inst Instance, prio int) string {
		for n, v := range inst.Priorities {
			if v == prio {
				return n
			}
		}
		return ""
	}
	for _, n := range in.Nodes {
		succ := p.Successors(n.Name)
		for _, inst := range p.Instances {
			for _, v := range inst.VIPs {
				got, ok := succ[v]
				want := inst.Master()
				if want == n.Name {
					want = byPrio(inst, TopPriority-1)
				}
				switch {
				case inst.Local && ok:
					t.Errorf("from %s, Local %s has a successor, %s", n.Name, v, got)
				case !inst.Local && (got != want || got == "" || got == n.Name || got == "node-3"):
					t.Errorf("from %s, the successor of %s (%s, priorities %v) is %q, want %q", n.Name, v, inst.Name, inst.Priorities, got, want)
				}
			}
		}
	}
	one := Compute(Input{Nodes: readyNodes(1), Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: shared("p", seq("192.0.2.1", 3))})
	if got := one.Successors("node-0"); len(got) != 0 {
		t.Errorf("a lone node's successors: %v, want none", got)
	}
}

func TestNodeLeavesAndReturns(t *testing.T) {
	for _, n := range []int{2, 3, 5, 7} {
		t.Run(fmt.Sprint(n, " nodes"), func(t *testing.T) {
			in := Input{
				Nodes: readyNodes(n),
				Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}},
				VIPs:  append(shared("p", seq("192.0.2.1", 200)), shared("p", seq("2001:db8::1", 100))...),
			}
			up := Compute(in)
			leaving := "node-1"
			down := in
			down.Nodes = slices.Clone(in.Nodes)
			down.Nodes[1].Ready = false
			gone := Compute(down)

			var had []string
			for i, inst := range up.Instances {
				after := gone.Instances[i]
				if after.Name != inst.Name {
					t.Fatalf("instance set changed: %s vs %s", inst.Name, after.Name)
				}
				if _, ok := after.Priorities[leaving]; ok {
					t.Errorf("%s still lists NotReady %s", inst.Name, leaving)
				}
				if inst.Master() == leaving {
					had = append(had, inst.Name)
					if n > 1 && after.Master() == "" {
						t.Errorf("%s has no master left", inst.Name)
					}
					continue
				}
				if after.Master() != inst.Master() {
					t.Errorf("%s moved from %s to %s although %s was not its master", inst.Name, inst.Master(), after.Master(), leaving)
				}
			}
			if len(had) == 0 {
				t.Fatalf("%s mastered nothing", leaving)
			}

			back := Compute(in)
			var moved []string
			for i, inst := range back.Instances {
				if inst.Master() != gone.Instances[i].Master() {
					moved = append(moved, inst.Name)
					if inst.HoldDown <= 0 {
						t.Errorf("%s moves back with no preempt delay", inst.Name)
					}
				}
			}
			if !reflect.DeepEqual(moved, had) {
				t.Errorf("on return, moved %v; want exactly what %s mastered before: %v", moved, leaving, had)
			}
			t.Logf("%d nodes: %s mastered %d of %d instances; on return those %d move back, each after PreemptDelay %s",
				n, leaving, len(had), len(up.Instances), len(moved), back.Instances[0].HoldDown)
		})
	}
}

// Deleting a Node object (or changing labels) changes the membership the
// balance is computed over; that may move a few instances of other nodes.
// This test only reports how many.
func TestMembershipChangeReport(t *testing.T) {
	in := Input{Nodes: readyNodes(5), Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: shared("p", seq("192.0.2.1", 320))}
	before := Compute(in)
	in.Nodes = in.Nodes[:4]
	after := Compute(in)
	deleted, others := 0, 0
	for i, inst := range before.Instances {
		switch {
		case inst.Master() == "node-4":
			deleted++
		case after.Instances[i].Master() != inst.Master():
			others++
		}
	}
	t.Logf("deleting node-4 of 5: its %d instances moved, and %d of the other %d", deleted, others, len(before.Instances)-deleted)
}

func TestEligibility(t *testing.T) {
	nodes := []Node{
		{Name: "a", Ready: true, Labels: map[string]string{"zone": "x"}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
		{Name: "b", Ready: true, Labels: map[string]string{"zone": "y"}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}},
		{Name: "c", Ready: false, Labels: map[string]string{"zone": "x"}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.3"), netip.MustParseAddr("fd00::3")}},
		{Name: "d", Ready: true, Labels: map[string]string{"zone": "x", ExcludeLabel: ""}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.4")}},
		{Name: "e", Ready: true, Labels: map[string]string{"zone": "x"}, InternalIPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}},
	}
	zoneX := labels.SelectorFromSet(labels.Set{"zone": "x"})
	tests := []struct {
		name string
		pool Pool
		vip  string
		want []string
	}{
		{"all Ready, not excluded", Pool{}, "192.0.2.1", []string{"a", "b", "e"}},
		{"node selector", Pool{NodeSelector: zoneX}, "192.0.2.1", []string{"a", "e"}},
		{"unicast IPv6 needs an IPv6 InternalIP", Pool{Unicast: true}, "2001:db8::1", []string{"b", "e"}},
		{"multicast IPv6 does not", Pool{}, "2001:db8::1", []string{"a", "b", "e"}},
		{"unicast IPv4 with selector", Pool{Unicast: true, NodeSelector: zoneX}, "192.0.2.1", []string{"a", "e"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.pool.Name, tc.pool.FirstVRID, tc.pool.LastVRID = "p", 1, 255
			for _, loc := range []bool{false, true} {
				v := VIP{Addr: netip.MustParseAddr(tc.vip), Pool: "p", Service: "ns/s", Local: loc, LocalNodes: []string{"a"}}
				p := Compute(Input{Nodes: nodes, Pools: []Pool{tc.pool}, VIPs: []VIP{v}})
				inst := instanceOf(t, p, tc.vip)
				var got []string
				for n := range inst.Priorities {
					got = append(got, n)
				}
				slices.Sort(got)
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("Local=%v: eligible %v, want %v", loc, got, tc.want)
				}
				for _, n := range nodes {
					if in := len(p.For(n.Name)) == 1; in != slices.Contains(tc.want, n.Name) {
						t.Errorf("Local=%v: For(%s) takes part = %v", loc, n.Name, in)
					}
				}
			}
		})
	}
}

func TestLocalPlanIgnoresEndpoints(t *testing.T) {
	in := stabilityInput()
	base := Compute(in)
	changed := in
	changed.VIPs = slices.Clone(in.VIPs)
	for i := range changed.VIPs {
		if changed.VIPs[i].Local {
			changed.VIPs[i].LocalNodes = []string{"node-3", "node-0"}
		}
	}
	if got := Compute(changed); !reflect.DeepEqual(got, base) {
		t.Fatal("the plan changed with the endpoints; endpoint churn would reload keepalived")
	}
	if tv := TrackValues(base, "node-3", changed, true); reflect.DeepEqual(tv, TrackValues(base, "node-3", in, true)) {
		t.Fatal("track values did not change with the endpoints")
	}
}

func TestDeterminism(t *testing.T) {
	for seed := range 50 {
		r := rand.New(rand.NewPCG(uint64(seed), 1))
		in := randomInput(r)
		want := Compute(in)
		for range 3 {
			shuffled := Input{Nodes: slices.Clone(in.Nodes), Pools: slices.Clone(in.Pools), VIPs: slices.Clone(in.VIPs)}
			r.Shuffle(len(shuffled.Nodes), func(i, j int) { shuffled.Nodes[i], shuffled.Nodes[j] = shuffled.Nodes[j], shuffled.Nodes[i] })
			r.Shuffle(len(shuffled.Pools), func(i, j int) { shuffled.Pools[i], shuffled.Pools[j] = shuffled.Pools[j], shuffled.Pools[i] })
			r.Shuffle(len(shuffled.VIPs), func(i, j int) { shuffled.VIPs[i], shuffled.VIPs[j] = shuffled.VIPs[j], shuffled.VIPs[i] })
			if got := Compute(shuffled); !reflect.DeepEqual(got, want) {
				t.Fatalf("seed %d: shuffled input gives a different plan", seed)
			}
		}
		if len(want.Instances) == 0 {
			t.Fatalf("seed %d: empty plan", seed)
		}
	}
}

// Duplicate names cannot happen in a cluster, but if they reach Compute the
// plan must still not depend on input order.
func TestDeterminismWithDuplicates(t *testing.T) {
	nodes := readyNodes(3)
	twin := nodes[1]
	twin.Ready = false
	pools := []Pool{
		{Name: "p", FirstVRID: 1, LastVRID: 100},
		{Name: "p", FirstVRID: 101, LastVRID: 200},
	}
	vips := shared("p", seq("192.0.2.1", 40))
	a := Compute(Input{Nodes: append(slices.Clone(nodes), twin), Pools: pools, VIPs: vips})
	b := Compute(Input{Nodes: append([]Node{twin}, nodes...), Pools: []Pool{pools[1], pools[0]}, VIPs: vips})
	if !reflect.DeepEqual(a, b) {
		t.Fatal("duplicate nodes or pools make the plan depend on input order")
	}
	if len(problemsWith(a, ReasonDuplicatePool)) != 1 {
		t.Errorf("problems %v, want one %s", a.Problems, ReasonDuplicatePool)
	}
}

// randomInput has 2-7 nodes (some NotReady or excluded), 1-3 pools with
// random VRID ranges (possibly overlapping), and both families, Local VIPs
// and shared addresses.
func randomInput(r *rand.Rand) Input {
	var in Input
	for i := range 2 + r.IntN(6) {
		n := Node{Name: fmt.Sprintf("n%x", r.Uint32()), Ready: r.IntN(5) > 0, Labels: map[string]string{"rack": fmt.Sprint(i % 2)},
			InternalIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, byte(i), 1}), netip.AddrFrom16([16]byte{0xfd, 15: byte(i)})}}
		if r.IntN(8) == 0 {
			n.Labels[ExcludeLabel] = "true"
		}
		in.Nodes = append(in.Nodes, n)
	}
	for i := range 1 + r.IntN(3) {
		first := 1 + r.IntN(200)
		p := Pool{Name: fmt.Sprintf("pool-%d", i), FirstVRID: first, LastVRID: first + r.IntN(256-first), Unicast: r.IntN(2) == 0, Order: r.IntN(3)}
		if r.IntN(3) == 0 {
			p.NodeSelector = labels.SelectorFromSet(labels.Set{"rack": "0"})
		}
		in.Pools = append(in.Pools, p)
		for j := range r.IntN(300) {
			a := netip.AddrFrom4([4]byte{192, byte(i), byte(j >> 8), byte(j)})
			if r.IntN(4) == 0 {
				a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 4: byte(i), 14: byte(j >> 8), 15: byte(j)})
			}
			v := VIP{Addr: a, Pool: p.Name, Service: fmt.Sprintf("ns/s%d", r.IntN(1000))}
			if r.IntN(10) == 0 {
				v.Local, v.Created = true, t0.Add(time.Duration(r.IntN(100))*time.Second)
				v.LocalNodes = []string{in.Nodes[r.IntN(len(in.Nodes))].Name}
			}
			in.VIPs = append(in.VIPs, v)
			if r.IntN(20) == 0 { // a second Service sharing the address
				v.Service += "-shared"
				in.VIPs = append(in.VIPs, v)
			}
		}
	}
	return in
}

func TestProblems(t *testing.T) {
	other := Pool{Name: "other", FirstVRID: 200, LastVRID: 255, Interface: "eth9", Order: -1}
	otherVIPs := append(shared("other", seq("198.51.100.1", 40)), local("other", netip.MustParseAddr("198.51.100.99"), 0))
	tests := []struct {
		name     string
		pools    []Pool
		vips     []VIP
		sev      Severity
		reason   string
		pool     string
		contains []string
		check    func(t *testing.T, p Plan)
	}{{
		name:  "VRID range too small for the Local VIPs",
		pools: []Pool{{Name: "tiny", FirstVRID: 10, LastVRID: 13}},
		vips: append(shared("tiny", seq("192.0.2.1", 5)),
			local("tiny", netip.MustParseAddr("192.0.2.50"), 1),
			local("tiny", netip.MustParseAddr("192.0.2.51"), 2),
			local("tiny", netip.MustParseAddr("192.0.2.52"), 3)),
		sev: Error, reason: ReasonVRIDsExhausted, pool: "tiny",
		contains: []string{"IPPool tiny", "4 usable IPv4 VRIDs (of 10-13)", "2 shared instances and 3 Local VIPs", "192.0.2.52 are held as if", "at least 6 usable VRIDs"},
		check: func(t *testing.T, p Plan) {
			if inst := instanceOf(t, p, "192.0.2.52"); inst.Local {
				t.Errorf("youngest Local VIP got its own instance %s although VRIDs ran out", inst.Name)
			}
			for _, a := range []string{"192.0.2.50", "192.0.2.51"} {
				if inst := instanceOf(t, p, a); !inst.Local {
					t.Errorf("older Local VIP %s lost its instance", a)
				}
			}
		},
	}, {
		name: "overlapping ranges on one interface",
		pools: []Pool{
			{Name: "old", FirstVRID: 10, LastVRID: 50, Interface: "eth0", Order: 1},
			{Name: "new", FirstVRID: 40, LastVRID: 120, Interface: "eth0", Order: 2},
		},
		vips: append(shared("old", seq("192.0.2.1", 100)), shared("new", seq("192.0.3.1", 100))...),
		sev:  Warning, reason: ReasonVRIDOverlap, pool: "new",
		contains: []string{"IPPools old and new both use VRIDs 40-50 on interface eth0", "old, the older, keeps them", "own spec.vrrp.virtualRouterIDs range"},
		check: func(t *testing.T, p Plan) {
			for _, inst := range p.Instances {
				if inst.Pool == "new" && inst.VRID >= 40 && inst.VRID <= 50 {
					t.Errorf("%s uses VRID %d of the older pool", inst.Name, inst.VRID)
				}
			}
		},
	}, {
		name: "overlap with a pool that picks its interface per node",
		pools: []Pool{
			{Name: "a", FirstVRID: 1, LastVRID: 100, Interface: "eth0"},
			{Name: "b", FirstVRID: 100, LastVRID: 199},
		},
		vips: append(shared("a", seq("192.0.2.1", 10)), shared("b", seq("192.0.3.1", 10))...),
		sev:  Warning, reason: ReasonVRIDOverlap, pool: "b",
		contains: []string{"IPPools a and b both use VRIDs 100 and may meet on one interface", "pin them to different interfaces"},
	}, {
		name: "range wholly inside an older pool's",
		pools: []Pool{
			{Name: "a", FirstVRID: 1, LastVRID: 150},
			{Name: "b", FirstVRID: 5, LastVRID: 9},
		},
		vips: append(shared("a", seq("192.0.2.1", 10)), shared("b", seq("192.0.3.1", 10))...),
		sev:  Error, reason: ReasonVRIDsExhausted, pool: "b",
		contains: []string{"IPPool b has no VRID left", "all of 5-9", "its 10 VIPs are not announced"},
		check: func(t *testing.T, p Plan) {
			for _, inst := range p.Instances {
				if inst.Pool == "b" {
					t.Errorf("pool b still has instance %s", inst.Name)
				}
			}
		},
	}, {
		name:  "invalid range",
		pools: []Pool{{Name: "bad", FirstVRID: 20, LastVRID: 10}},
		vips:  shared("bad", seq("192.0.2.1", 3)),
		sev:   Error, reason: ReasonInvalidVRIDs, pool: "bad",
		contains: []string{"IPPool bad has VRID range 20-10", "not announced"},
	}, {
		name: "unknown pool",
		vips: shared("gone", seq("192.0.2.1", 1)),
		sev:  Error, reason: ReasonUnknownPool, pool: "gone",
		contains: []string{"VIP 192.0.2.1 of Service default/svc-192-0-2-1", `IPPool "gone", which does not exist`},
	}, {
		name:  "advert interval rounded",
		pools: []Pool{{Name: "fast", FirstVRID: 1, LastVRID: 150, Advert: 1234 * time.Millisecond}},
		vips:  shared("fast", seq("192.0.2.1", 1)),
		sev:   Warning, reason: ReasonAdvertInterval, pool: "fast",
		contains: []string{"1.234s", "speakers use 1.23s"},
		check: func(t *testing.T, p Plan) {
			if a := instanceOf(t, p, "192.0.2.1").Advert; a != 1230*time.Millisecond {
				t.Errorf("advert %s, want 1.23s", a)
			}
		},
	}, {
		name:  "advert interval too short",
		pools: []Pool{{Name: "fast", FirstVRID: 1, LastVRID: 150, Advert: time.Millisecond}},
		vips:  shared("fast", seq("192.0.2.1", 1)),
		sev:   Warning, reason: ReasonAdvertInterval, pool: "fast",
		contains: []string{"speakers use 10ms"},
	}, {
		name:  "no eligible node",
		pools: []Pool{{Name: "sel", FirstVRID: 1, LastVRID: 150, NodeSelector: labels.SelectorFromSet(labels.Set{"role": "edge"})}},
		vips:  shared("sel", seq("192.0.2.1", 2)),
		sev:   Error, reason: ReasonNoEligibleNode, pool: "sel",
		contains: []string{"no Ready node may hold the 2 IPv4 VIPs of IPPool sel"},
	}, {
		name:  "too few shared instances for the nodes",
		pools: []Pool{{Name: "narrow", FirstVRID: 1, LastVRID: 2}},
		vips:  shared("narrow", seq("192.0.2.1", 2)),
		sev:   Warning, reason: ReasonLimitedSpread, pool: "narrow",
		contains: []string{"IPPool narrow has 1 shared IPv4 instances for 3 nodes", "at least 64 usable VRIDs"},
	}, {
		name: "address in two pools",
		pools: []Pool{
			{Name: "a", FirstVRID: 1, LastVRID: 50, Interface: "x"},
			{Name: "b", FirstVRID: 1, LastVRID: 50, Interface: "y"},
		},
		vips: []VIP{
			{Addr: netip.MustParseAddr("192.0.2.1"), Pool: "a", Service: "ns/one"},
			{Addr: netip.MustParseAddr("192.0.2.1"), Pool: "b", Service: "ns/two"},
		},
		sev: Warning, reason: ReasonAddressConflict, pool: "b",
		contains: []string{"VIP 192.0.2.1 is given to Service ns/two from IPPool b but is announced with IPPool a"},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := Input{Nodes: readyNodes(3), Pools: append(slices.Clone(tc.pools), other), VIPs: append(slices.Clone(tc.vips), otherVIPs...)}
			p := Compute(in)
			found := false
			for _, pr := range problemsWith(p, tc.reason) {
				matches := pr.Pool == tc.pool && pr.Severity == tc.sev
				for _, s := range tc.contains {
					matches = matches && strings.Contains(pr.Message, s)
				}
				found = found || matches
			}
			if !found {
				t.Fatalf("no %s %s problem for pool %q saying %q; problems:\n%v", tc.sev, tc.reason, tc.pool, tc.contains, p.Problems)
			}
			if tc.check != nil {
				tc.check(t, p)
			}
			// The problem stays with its pool: "other" plans as if alone.
			alone := Compute(Input{Nodes: in.Nodes, Pools: []Pool{other}, VIPs: otherVIPs})
			var mine []Instance
			for _, inst := range p.Instances {
				if inst.Pool == "other" {
					mine = append(mine, inst)
				}
			}
			if !reflect.DeepEqual(mine, alone.Instances) {
				t.Errorf("pool other was affected")
			}
			for _, pr := range p.Problems {
				if pr.Pool == "other" {
					t.Errorf("problem reported against pool other: %v", pr)
				}
			}
		})
	}
}

func TestParseVRIDRange(t *testing.T) {
	tests := []struct {
		in          string
		first, last int
		err         string
	}{
		{in: "", first: 1, last: 255},
		{in: "10-20", first: 10, last: 20},
		{in: " 7 ", first: 7, last: 7},
		{in: "1 - 255", first: 1, last: 255},
		{in: "0-10", err: "VRID 0 is outside 1-255"},
		{in: "10-256", err: "VRID 256 is outside 1-255"},
		{in: "20-10", err: "starts after it ends; write 10-20"},
		{in: "a-b", err: `"a" is not a number`},
		{in: "10-", err: `"" is not a number`},
	}
	for _, tc := range tests {
		first, last, err := ParseVRIDRange(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseVRIDRange(%q) error = %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || first != tc.first || last != tc.last {
			t.Errorf("ParseVRIDRange(%q) = %d, %d, %v; want %d, %d", tc.in, first, last, err, tc.first, tc.last)
		}
	}
}

func TestBucketCount(t *testing.T) {
	for s, want := range map[int]int{0: 0, 1: 1, 2: 1, 3: 2, 10: 5, 63: 32, 64: 32, 255: 32} {
		if got := bucketCount(s); got != want {
			t.Errorf("bucketCount(%d) = %d, want %d", s, got, want)
		}
	}
}

// TestLongNamesFit: whatever the IPPool's name (up to 253 characters) and
// address, instance names fit keepalived.MaxNameLen, keep their family and
// bucket or address, and stay distinct; names that fit are unchanged.
func TestLongNamesFit(t *testing.T) {
	long := strings.Repeat("edge-routers.", 19) + "example" // 254: one more than the API allows, to be safe
	long2 := long[:len(long)-1] + "f"                       // differs only past where names are cut
	twenty := "edge-pool-ipv6-local"
	v6 := netip.MustParseAddr("2001:db8:85a3:8d3:1319:8a2e:370:7348")
	v6long := netip.MustParseAddr("fd12:3456:789a:bcde:f012:3456:789a:bcde") // 39 characters, the longest spelling
	in := Input{
		Nodes: readyNodes(2),
		Pools: []Pool{
			{Name: long, FirstVRID: 1, LastVRID: 40},
			{Name: long2, FirstVRID: 41, LastVRID: 80, Interface: "eth1"},
			{Name: twenty, FirstVRID: 81, LastVRID: 90},
			{Name: "short", FirstVRID: 91, LastVRID: 100},
		},
		VIPs: append(append(shared(long, seq("192.0.2.1", 40)), shared(long2, seq("198.51.100.1", 40))...),
			local(long, netip.MustParseAddr("192.0.2.200"), 0),
			local(long2, v6, 1),
			local(twenty, v6long, 2),
			local("short", netip.MustParseAddr("203.0.113.9"), 3),
			VIP{Addr: netip.MustParseAddr("203.0.113.1"), Pool: "short", Service: "a/b"},
		),
	}
	p := Compute(in)
	if len(p.Problems) != 0 {
		t.Fatalf("problems: %v", p.Problems)
	}
	seen := map[string]bool{}
	for _, inst := range p.Instances {
		if len(inst.Name) > keepalived.MaxNameLen {
			t.Errorf("instance %s: %d characters, above keepalived.MaxNameLen", inst.Name, len(inst.Name))
		}
		if seen[inst.Name] {
			t.Errorf("two instances named %s", inst.Name)
		}
		seen[inst.Name] = true
		fam := "_v4_"
		if inst.Family == allocator.IPv6 {
			fam = "_v6_"
		}
		suffix := fmt.Sprintf("%s%s", fam, addrName(inst.VIPs[0]))
		if !inst.Local {
			suffix = fam + "b"
		}
		if !strings.Contains(inst.Name, suffix) || !strings.HasPrefix(inst.Name, "kl_") {
			t.Errorf("instance %s (pool %s) lost its kl_ prefix or its %s part", inst.Name, inst.Pool, suffix)
		}
	}
	// Short names are what they always were.
	short := netip.MustParseAddr("203.0.113.1")
	for _, name := range []string{fmt.Sprintf("kl_short_v4_b%02d", bucketOf(short, bucketCount(10))), "kl_short_v4_203-0-113-9"} {
		instanceByName(t, p, name)
	}
	if full := "kl_" + twenty + "_v6_" + addrName(v6long); instanceOf(t, p, v6long.String()).Name == full {
		t.Errorf("Local IPv6 instance of a 20-character pool kept its %d-character name %s", len(full), full)
	}
	// The same input gives the same names: every speaker agrees on them.
	if !reflect.DeepEqual(names(Compute(in)), names(p)) {
		t.Error("names differ between two computations")
	}
}

func TestSanitize(t *testing.T) {
	if got := sanitize("edge-1.example"); got != "edge-1.example" {
		t.Errorf("valid name changed to %q", got)
	}
	a, b := sanitize("a/b"), sanitize("a b")
	if a == b || strings.ContainsAny(a+b, "/ ") || !strings.HasPrefix(a, "a_b_") {
		t.Errorf("sanitize gave %q and %q", a, b)
	}
}
