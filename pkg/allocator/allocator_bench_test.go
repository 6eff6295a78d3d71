package allocator

import (
	"fmt"
	"net/netip"
	"testing"
)

// naiveAllocator is the baseline: it scans the pool from its first address
// on every allocation, as allocators that keep only a set of taken addresses
// do. It exists only to be measured against.
type naiveAllocator struct {
	r     Range
	taken map[netip.Addr]string
	svc   map[string]netip.Addr
}

func (n *naiveAllocator) assign(key string) bool {
	for a := n.r.First; n.r.Contains(a); a = a.Next() {
		if _, ok := n.taken[a]; !ok {
			n.taken[a] = key
			n.svc[key] = a
			return true
		}
	}
	return false
}

func (n *naiveAllocator) release(key string) {
	delete(n.taken, n.svc[key])
	delete(n.svc, key)
}

const benchPool = "10.0.0.0/15" // 131,072 addresses

var fills = []int{10, 50, 99}

// BenchmarkAssign measures one allocation (and its release, to keep the
// fill level) in a /15 filled to 10%, 50% and 99%, one allocation at a time.
func BenchmarkAssign(b *testing.B) {
	r := mustRanges(b, benchPool)[0]
	size := int(r.Size().Int64())
	for _, pct := range fills {
		b.Run(fmt.Sprintf("keeplb/full=%d%%", pct), func(b *testing.B) {
			a := New()
			a.SetPools([]Pool{{Name: "p", Ranges: []Range{r}, AutoAssign: true}})
			for i := range size * pct / 100 {
				if _, err := a.Assign(req(fmt.Sprintf("ns/fill%d", i))); err != nil {
					b.Fatal(err)
				}
			}
			rq := req("ns/bench")
			b.ResetTimer()
			for range b.N {
				if _, err := a.Assign(rq); err != nil {
					b.Fatal(err)
				}
				a.Release(rq.Key)
			}
		})
		b.Run(fmt.Sprintf("naive/full=%d%%", pct), func(b *testing.B) {
			n := &naiveAllocator{r: r, taken: map[netip.Addr]string{}, svc: map[string]netip.Addr{}}
			for i := range size * pct / 100 {
				n.taken[fromV4(v4(r.First)+uint32(i))] = fmt.Sprintf("ns/fill%d", i)
			}
			b.ResetTimer()
			for range b.N {
				if !n.assign("ns/bench") {
					b.Fatal("pool full")
				}
				n.release("ns/bench")
			}
		})
	}
}

// BenchmarkFill fills the whole /15, one Service at a time; ns/op is the
// cost of filling it all, and ns/alloc the mean per allocation.
func BenchmarkFill(b *testing.B) {
	r := mustRanges(b, benchPool)[0]
	size := int(r.Size().Int64())
	reqs := make([]Request, size)
	for i := range reqs {
		reqs[i] = req(fmt.Sprintf("ns/s%d", i))
	}
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		a := New()
		a.SetPools([]Pool{{Name: "p", Ranges: []Range{r}, AutoAssign: true}})
		b.StartTimer()
		for _, rq := range reqs {
			if _, err := a.Assign(rq); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*size), "ns/alloc")
}

// BenchmarkSetPoolsAvoidBuggy measures loading one huge pool with
// avoidBuggyIPs: B/op must not grow with the pool (it grew by 27.6 MiB for
// a /8 when the pool was cut at every /24).
func BenchmarkSetPoolsAvoidBuggy(b *testing.B) {
	for _, cidr := range []string{"10.0.0.0/8", "0.0.0.0/0"} {
		b.Run(cidr, func(b *testing.B) {
			p := Pool{Name: "p", Ranges: mustRanges(b, cidr), AutoAssign: true, AvoidBuggyIPs: true}
			b.ReportAllocs()
			for range b.N {
				New().SetPools([]Pool{p})
			}
		})
	}
}
