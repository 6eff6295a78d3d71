package vrrp

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// vipSet generates the addresses of one pool the way a model says.
type vipSet func(r *rand.Rand, base netip.Addr, v int) []netip.Addr

var (
	// inOrder is what the allocator hands out: it takes the next free
	// address after the last one it gave.
	inOrder vipSet = func(r *rand.Rand, base netip.Addr, v int) []netip.Addr {
		return seq(base.String(), v)
	}
	// churned is a pool after many Services came and went: v addresses
	// scattered over 1.5v to 2.5v consecutive ones.
	churned vipSet = func(r *rand.Rand, base netip.Addr, v int) []netip.Addr {
		span := seq(base.String(), v+v/2+r.IntN(v+1))
		r.Shuffle(len(span), func(i, j int) { span[i], span[j] = span[j], span[i] })
		return span[:v]
	}
	// uniform is v addresses drawn at random from 65,536: no structure at
	// all, e.g. addresses picked by hand all over a large pool.
	uniform vipSet = func(r *rand.Rand, base netip.Addr, v int) []netip.Addr {
		seen := make(map[netip.Addr]bool, v)
		var out []netip.Addr
		for len(out) < v {
			b := base.As16()
			off := r.IntN(1 << 16)
			b[14], b[15] = b[14]+byte(off>>8), b[15]+byte(off) // wraps within a /112 (or /16): still 65,536 addresses
			a := netip.AddrFrom16(b)
			if base.Is4() {
				a = a.Unmap()
			}
			if !seen[a] {
				seen[a] = true
				out = append(out, a)
			}
		}
		return out
	}
)

// spreadCase builds a random input: n nodes of which down are NotReady,
// 1-3 pools of random families sharing v VIPs, every VIP not Local.
func spreadCase(r *rand.Rand, n, down, v int, model vipSet) Input {
	var in Input
	for i := range n {
		in.Nodes = append(in.Nodes, Node{Name: fmt.Sprintf("node-%08x", r.Uint32()), Ready: i >= down})
	}
	pools := 1 + r.IntN(3)
	left := v
	for i := range pools {
		name := fmt.Sprintf("pool-%d", i)
		in.Pools = append(in.Pools, Pool{Name: name, FirstVRID: 1 + 80*i, LastVRID: 80 + 80*i})
		share := left
		if i < pools-1 {
			share = r.IntN(left + 1)
		}
		left -= share
		base := netip.AddrFrom4([4]byte{10, byte(i), byte(r.IntN(256)), byte(r.IntN(256))})
		if r.IntN(2) == 0 {
			base = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 4: byte(i), 13: byte(r.IntN(256)), 14: byte(r.IntN(256))})
		}
		in.VIPs = append(in.VIPs, shared(name, model(r, base, share))...)
	}
	return in
}

// mastered counts the VIPs each node masters.
func mastered(p Plan) map[string]int {
	out := make(map[string]int)
	for _, inst := range p.Instances {
		if m := inst.Master(); m != "" {
			out[m] += len(inst.VIPs)
		}
	}
	return out
}

// TestSpread checks over many random inputs (2-7 eligible nodes, 20-2000
// VIPs in 1-3 pools of either family) that no node masters more than twice
// its fair share, ceil(VIPs/eligible nodes).
//
// It cannot hold for every set of VIPs. Keeping VIPs in place when others
// come and go makes a VIP's node a function of the VIP alone, so v VIPs
// with no structure fall on nodes like v balls in random bins, and a small v
// overshoots now and then. So the bound is asserted where it held in every
// one of 20,000 inputs per case while this was written (worst 1.83x from
// 100 VIPs), and for smaller sets the overshoot rate is only reported:
//
//   - in allocation order (what the allocator hands out), all nodes Ready or
//     one down: every size. Two down: from 100 VIPs (1 in 20,000 sets of
//     20-200 VIPs overshot).
//   - after churn: from 100 VIPs (below, about 1 in 5,000 overshot).
//   - uniform over 65,536 addresses: from 300 VIPs.
func TestSpread(t *testing.T) {
	cases := 300
	if testing.Short() {
		cases = 60
	}
	models := []struct {
		name string
		set  vipSet
		down int
		minV int // asserted from here; smaller sets are reported
	}{
		{"in allocation order", inOrder, 0, 20},
		{"in allocation order", inOrder, 1, 20},
		{"in allocation order", inOrder, 2, 100},
		{"after churn", churned, 0, 100},
		{"after churn", churned, 1, 100},
		{"after churn", churned, 2, 100},
		{"uniform", uniform, 0, 300},
		{"uniform", uniform, 1, 300},
		{"uniform", uniform, 2, 300},
	}
	for _, m := range models {
		t.Run(fmt.Sprintf("%s, %d down", m.name, m.down), func(t *testing.T) {
			t.Parallel()
			r := rand.New(rand.NewPCG(uint64(m.down), 42))
			run := func(lo, hi int, assert bool) (over int, worst float64) {
				for range cases {
					eligible := 2 + r.IntN(6)
					v := lo + r.IntN(hi-lo+1)
					if r.IntN(3) == 0 {
						v = lo + r.IntN(min(180, hi-lo+1)) // small sets are the hard ones
					}
					p := Compute(spreadCase(r, eligible+m.down, m.down, v, m.set))
					if len(p.Problems) != 0 {
						t.Fatalf("problems: %v", p.Problems)
					}
					fair := (v + eligible - 1) / eligible
					total, most := 0, 0
					for _, c := range mastered(p) {
						total += c
						most = max(most, c)
					}
					if total != v {
						t.Fatalf("%d of %d VIPs have a master", total, v)
					}
					worst = max(worst, float64(most)/float64(fair))
					if most > 2*fair {
						over++
						if assert {
							t.Errorf("%d VIPs on %d eligible nodes (%d down): a node masters %d, over 2 x %d", v, eligible, m.down, most, fair)
						}
					}
				}
				return over, worst
			}
			_, worst := run(m.minV, 2000, true)
			t.Logf("%s, %d down: %d inputs of %d-2000 VIPs: the busiest node had %.2f x its fair share", m.name, m.down, cases, m.minV, worst)
			if m.minV > 20 {
				over, worst := run(20, m.minV-1, false)
				t.Logf("%s, %d down: %d inputs of 20-%d VIPs (not asserted): %d over 2x, worst %.2f x", m.name, m.down, cases, m.minV-1, over, worst)
			}
		})
	}
}

func TestSpreadTwentyOnThree(t *testing.T) {
	worst := 0
	for seed := range 200 {
		r := rand.New(rand.NewPCG(uint64(seed), 3))
		in := Input{Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: shared("p", seq("192.0.2.1", 20))}
		for range 3 {
			in.Nodes = append(in.Nodes, Node{Name: fmt.Sprintf("node-%08x", r.Uint32()), Ready: true})
		}
		counts := mastered(Compute(in))
		for _, n := range in.Nodes {
			// fair share ceil(20/3) = 7: at most 14, and each of the 32
			// shared instances holds one VIP, so at most ceil(32/3) = 11.
			if c := counts[n.Name]; c > 11 {
				t.Errorf("seed %d: %s masters %d of 20 VIPs (fair share 7): %v", seed, n.Name, c, counts)
			}
			worst = max(worst, counts[n.Name])
		}
	}
	t.Logf("20 VIPs on 3 nodes, 200 sets of node names: the busiest node masters at most %d (fair share 7, bound 14)", worst)
}
