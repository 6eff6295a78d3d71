package vrrp

import (
	"cmp"
	"slices"

	"github.com/keeplb/keeplb/pkg/rendezvous"
)

// balancedOrders returns, for each of the shared instances keyed by keys, a
// preference order over members (sorted, unique): the instance's master is
// the first eligible node of its order. The orders depend only on keys and
// members, never on which members are Ready, so a node going NotReady moves
// only the instances it was first eligible for, and coming back moves only
// those back.
//
// Pure rendezvous hashing gives a node Binomial(K, 1/N) first places, which
// for 16 instances and 7 nodes exceeds twice the fair share about one time in
// four. So the first two places are balanced:
//
//   - first places: pairs (instance, node) are taken by descending score, a
//     node taking at most ceil(K/N) instances;
//   - second places: the instances first-placed on a node x are spread over
//     the other nodes the same way, at most ceil(|x's|/(N-1)) each, so that
//     when x is down its instances do not all land on one node;
//   - the remaining places follow the score.
func balancedOrders(keys []string, members []string) [][]string {
	k, n := len(keys), len(members)
	orders := make([][]string, k)
	for i, key := range keys {
		orders[i] = rendezvous.Order(key, members)
	}
	if n < 2 {
		return orders
	}
	type pair struct {
		inst, node int
		s          uint64
	}
	byScore := func(ps []pair) {
		slices.SortFunc(ps, func(a, b pair) int {
			if c := cmp.Compare(b.s, a.s); c != 0 {
				return c
			}
			if c := cmp.Compare(a.inst, b.inst); c != 0 {
				return c
			}
			return cmp.Compare(a.node, b.node)
		})
	}
	scores := make([][]uint64, k)
	pairs := make([]pair, 0, k*n)
	for i, key := range keys {
		scores[i] = make([]uint64, n)
		for j, m := range members {
			scores[i][j] = rendezvous.Score(key, m)
			pairs = append(pairs, pair{i, j, scores[i][j]})
		}
	}
	byScore(pairs)

	first := make([]int, k)
	for i := range first {
		first[i] = -1
	}
	load := make([]int, n)
	capFirst := (k + n - 1) / n
	for _, p := range pairs {
		if first[p.inst] < 0 && load[p.node] < capFirst {
			first[p.inst] = p.node
			load[p.node]++
		}
	}

	second := make([]int, k)
	for x := range n {
		var mine []int
		for i := range k {
			if first[i] == x {
				mine = append(mine, i)
			}
		}
		if len(mine) == 0 {
			continue
		}
		ps := make([]pair, 0, len(mine)*(n-1))
		for _, i := range mine {
			second[i] = -1
			for j := range n {
				if j != x {
					ps = append(ps, pair{i, j, scores[i][j]})
				}
			}
		}
		byScore(ps)
		capSecond := (len(mine) + n - 2) / (n - 1)
		got := make([]int, n)
		for _, p := range ps {
			if second[p.inst] < 0 && got[p.node] < capSecond {
				second[p.inst] = p.node
				got[p.node]++
			}
		}
	}

	for i := range k {
		f, s := members[first[i]], members[second[i]]
		order := make([]string, 0, n)
		order = append(order, f, s)
		for _, m := range orders[i] {
			if m != f && m != s {
				order = append(order, m)
			}
		}
		orders[i] = order
	}
	return orders
}

// priorities gives the eligible nodes of order their base priorities: top
// for the first, one less for the second, and BackupGap less again for
// the third and each after (one less each), never below 1.
//
// The gap is for the graceful handover: a master that leaves sends
// priority 0, and each backup takes over after its skew time,
// (256-priority)/256 of an advert interval. Priorities one apart put the
// first and second backups' skew times 0.4 ms apart at 100 ms adverts,
// which a busy keepalived loses: the VIP then went to the third choice and
// moved twice more, back to the second once its preempt delay passed.
func priorities(order []string, eligible map[string]bool, top int) map[string]int {
	out := make(map[string]int)
	r := 0
	for _, n := range order {
		if !eligible[n] {
			continue
		}
		p := top - r
		if r >= 2 {
			p -= BackupGap
		}
		out[n] = max(1, p)
		r++
	}
	return out
}
