package rendezvous_test

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/keeplb/keeplb/pkg/rendezvous"
)

func candidates(names ...string) []rendezvous.Candidate {
	out := make([]rendezvous.Candidate, len(names))
	for i, n := range names {
		out[i] = rendezvous.Candidate{Name: n, Hash: rendezvous.NodeHash(n)}
	}
	return out
}

func nodeNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("node-%04d", i)
	}
	return out
}

// reference chooses by scoring and sorting every candidate: what Choose
// must equal, however it selects.
func reference(svc uint64, cs []rendezvous.Candidate, k int) []string {
	cs = slices.Clone(cs)
	slices.SortFunc(cs, func(a, b rendezvous.Candidate) int {
		if c := cmp.Compare(rendezvous.HashedScore(svc, b.Hash), rendezvous.HashedScore(svc, a.Hash)); c != 0 {
			return c
		}
		return cmp.Compare(a.Name, b.Name)
	})
	if k <= 0 || k > len(cs) {
		k = len(cs)
	}
	out := []string{}
	for _, c := range cs[:k] {
		out = append(out, c.Name)
	}
	return out
}

func TestChooseIsTheBestKWhateverTheOrder(t *testing.T) {
	names := nodeNames(200)
	cs := candidates(names...)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		svc := rendezvous.KeyHash(fmt.Sprintf("ns/svc-%d", i))
		k := r.IntN(40)
		want := reference(svc, cs, k)
		shuffled := slices.Clone(cs)
		r.Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
		if got := rendezvous.Choose(svc, shuffled, k); !slices.Equal(got, want) {
			t.Fatalf("service %d, k %d: Choose %v, want %v", i, k, got, want)
		}
		if k > 0 && len(want) != k {
			t.Fatalf("k %d of 200 candidates: %d chosen", k, len(want))
		}
	}
}

func TestChooseAllWhenKIsZeroOrLarge(t *testing.T) {
	cs := candidates("a", "b", "c")
	svc := rendezvous.KeyHash("ns/web")
	for _, k := range []int{0, 3, 4, 100} {
		got := rendezvous.Choose(svc, cs, k)
		if !slices.Equal(slices.Sorted(slices.Values(got)), []string{"a", "b", "c"}) {
			t.Errorf("k %d: %v, want all three", k, got)
		}
	}
	if got := rendezvous.Choose(svc, nil, 16); len(got) != 0 {
		t.Errorf("no candidates: %v", got)
	}
}

// TestStableUnderNodeChurn is the property nodeport subsetting is chosen
// for, over a random sequence of nodes joining and leaving: a node leaving
// changes only the subsets it was in, each by exactly that node and one
// replacement; a node joining changes only the subsets it enters, each by
// that node and the one it displaces.
func TestStableUnderNodeChurn(t *testing.T) {
	const services, k = 500, 16
	r := rand.New(rand.NewPCG(3, 4))
	present := map[string]bool{}
	for _, n := range nodeNames(100) {
		present[n] = true
	}
	next := 100
	subsets := func() [][]string {
		var cs []rendezvous.Candidate
		for n := range present {
			cs = append(cs, candidates(n)...)
		}
		out := make([][]string, services)
		for i := range out {
			out[i] = rendezvous.Choose(rendezvous.KeyHash(fmt.Sprintf("ns/svc-%d", i)), cs, k)
		}
		return out
	}
	before := subsets()
	for step := range 60 {
		var node string
		leaving := r.IntN(2) == 0 && len(present) > k+1
		if leaving {
			names := slices.Sorted(func(yield func(string) bool) {
				for n := range present {
					if !yield(n) {
						return
					}
				}
			})
			node = names[r.IntN(len(names))]
			delete(present, node)
		} else {
			node = fmt.Sprintf("node-%04d", next)
			next++
			present[node] = true
		}
		after := subsets()
		changed := 0
		for i := range services {
			gone, added := diff(before[i], after[i])
			if len(gone) == 0 && len(added) == 0 {
				continue
			}
			changed++
			switch {
			case leaving && (len(gone) != 1 || gone[0] != node || len(added) != 1):
				t.Fatalf("step %d, %s left: service %d lost %v and gained %v", step, node, i, gone, added)
			case !leaving && (len(added) != 1 || added[0] != node || len(gone) != 1):
				t.Fatalf("step %d, %s joined: service %d lost %v and gained %v", step, node, i, gone, added)
			}
		}
		// About k/nodes of the Services change; all of them would mean
		// the choice is not stable at all.
		if changed > services/2 {
			t.Fatalf("step %d: %d of %d subsets changed for one node", step, changed, services)
		}
		before = after
	}
}

func diff(a, b []string) (gone, added []string) {
	for _, n := range a {
		if !slices.Contains(b, n) {
			gone = append(gone, n)
		}
	}
	for _, n := range b {
		if !slices.Contains(a, n) {
			added = append(added, n)
		}
	}
	return gone, added
}

// TestSpreadsEvenly: at the scale the default is for, 10,000 Services and
// 1,000 nodes, no node carries more than 1.5 times its fair share of
// subsets, and every node carries some. The hash is fixed, so this is a
// property of it, not a matter of luck from run to run.
func TestSpreadsEvenly(t *testing.T) {
	const services, nodes, k = 10000, 1000, 16
	cs := candidates(nodeNames(nodes)...)
	load := map[string]int{}
	for i := range services {
		for _, n := range rendezvous.Choose(rendezvous.KeyHash(fmt.Sprintf("team-%d/svc-%d", i%37, i)), cs, k) {
			load[n]++
		}
	}
	fair := services * k / nodes
	lo, hi := services*k, 0
	for _, c := range cs {
		lo, hi = min(lo, load[c.Name]), max(hi, load[c.Name])
	}
	t.Logf("subsets per node: fair %d, least %d, most %d", fair, lo, hi)
	if hi > fair*3/2 || lo == 0 {
		t.Errorf("subsets per node from %d to %d, fair share %d: want at most 1.5x and none empty", lo, hi, fair)
	}
}

// TestScoresAreFrozen pins both scores: a change would move VIPs and
// subsets cluster-wide, and speakers of two versions would disagree on
// them during an upgrade. If this fails, the change is the bug.
func TestScoresAreFrozen(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uint64
	}{
		{"Score(pool/192.0.2.1, node-a)", rendezvous.Score("pool/192.0.2.1", "node-a"), 0x79ec7fd2c8d96cc},
		{"Score(name, x)", rendezvous.Score("name", "x"), 0x5dff7d29057f5e27},
		{"HashedScore(ns/web, node-a)", rendezvous.HashedScore(rendezvous.KeyHash("ns/web"), rendezvous.NodeHash("node-a")), 0xa0e5fc8880f3d735},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

func FuzzChoose(f *testing.F) {
	f.Add("ns/web", uint8(16), uint16(40))
	f.Add("", uint8(0), uint16(0))
	f.Fuzz(func(t *testing.T, key string, k uint8, n uint16) {
		cs := candidates(nodeNames(int(n % 300))...)
		svc := rendezvous.KeyHash(key)
		got := rendezvous.Choose(svc, cs, int(k))
		if want := reference(svc, cs, int(k)); !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
			t.Fatalf("Choose(%q, %d nodes, %d) = %v, want %v", key, len(cs), k, got, want)
		}
	})
}

func BenchmarkChoose1000Nodes(b *testing.B) {
	cs := candidates(nodeNames(1000)...)
	svc := rendezvous.KeyHash("ns/web")
	for b.Loop() {
		rendezvous.Choose(svc, cs, 16)
	}
}
