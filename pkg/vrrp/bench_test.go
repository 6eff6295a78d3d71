package vrrp

import (
	"fmt"
	"net/netip"
	"testing"
)

// benchInput has n VIPs over 3 pools (one of them IPv6) on 3 nodes, one VIP
// in ten of a Local Service.
func benchInput(n int) Input {
	in := Input{
		Nodes: readyNodes(3),
		Pools: []Pool{
			{Name: "a", FirstVRID: 1, LastVRID: 80},
			{Name: "b", FirstVRID: 81, LastVRID: 160, Unicast: true},
			{Name: "c", FirstVRID: 161, LastVRID: 255},
		},
	}
	firsts := []string{"10.0.0.1", "10.1.0.1", "2001:db8::1"}
	for i, first := range firsts {
		pool := in.Pools[i].Name
		for j, a := range seq(first, n/3+boolInt(i < n%3)) {
			v := VIP{Addr: a, Pool: pool, Service: fmt.Sprintf("ns/svc-%d-%d", i, j)}
			if j%10 == 0 {
				v = local(pool, a, j, in.Nodes[j%3].Name)
			}
			in.VIPs = append(in.VIPs, v)
		}
	}
	return in
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// BenchmarkCompute measures a full plan for 1,000 VIPs over 3 pools and 3
// nodes (what every speaker recomputes on a change), and the per-node work
// on top of it.
func BenchmarkCompute(b *testing.B) {
	in := benchInput(1000)
	if got := len(placements(Compute(in))); got != 1000 {
		b.Fatalf("%d VIPs planned, want 1000", got)
	}
	b.Run("plan", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			Compute(in)
		}
	})
	// The same VIPs in a cluster of 1,000 nodes, labelled as kubelets
	// label them: sorting the nodes must not cost a formatting of each
	// node per comparison.
	big := in
	big.Nodes = readyNodes(1000)
	for i := range big.Nodes {
		big.Nodes[i].Labels = map[string]string{"kubernetes.io/hostname": big.Nodes[i].Name, "kubernetes.io/os": "linux", "topology.kubernetes.io/zone": "z1"}
	}
	b.Run("plan, 1,000 nodes", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			Compute(big)
		}
	})
	p := Compute(in)
	b.Run("track values", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			TrackValues(p, "node-1", in, true)
		}
	})
	b.Run("unicast peers", func(b *testing.B) {
		b.ReportAllocs()
		mine := p.For("node-1")
		for b.Loop() {
			for _, inst := range mine {
				UnicastPeers(inst, "node-1", in.Nodes)
			}
		}
	})
	ifaces := []Interface{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/15")}, DefaultRoute4: true, DefaultRoute6: true}}
	b.Run("place", func(b *testing.B) {
		b.ReportAllocs()
		mine := p.For("node-1")
		for b.Loop() {
			for _, inst := range mine {
				_, _ = Place(inst, ifaces)
			}
		}
	})
}
