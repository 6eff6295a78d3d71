// Package rendezvous is keeplb's one home of rendezvous (highest random
// weight) hashing: every choice gets a score for a key from a hash of
// both, and the key's choices are the best-scored ones. Every speaker
// computes the same choice from the same objects, with no coordination,
// and the choice is stable: a choice leaving changes only the keys it was
// chosen for (each gets the next-best instead), and one joining changes
// only the keys it scores into. A consistent-hash ring would be as stable
// but needs virtual nodes to spread evenly; here each key is an
// independent draw, so load evens out over keys.
//
// It has two scores, both frozen for good: speakers of two versions would
// disagree during an upgrade, and a change moves every choice at once.
// Score hashes two strings, for the VRRP plan's few choices per key (which
// node is master of an instance, which VRID a Local address gets). Choose
// works on names hashed once (NodeHash, KeyHash), for nodeport subsets,
// where every one of thousands of Services scores every one of up to
// thousands of nodes at each full computation.
package rendezvous

import (
	"cmp"
	"slices"
)

// Score is the weight of choice (a node, or a VRID) for key (a VRRP
// instance, or a Local address) in the VRRP plan. Every speaker must
// compute the same scores, across versions too: changing this function
// moves VIPs cluster-wide, and a mixed-version cluster would disagree about
// them during a rollout.
func Score(key, choice string) uint64 {
	// FNV-1a 64 over key, a zero byte and choice, then the splitmix64
	// finaliser: FNV alone spreads short, similar strings poorly.
	h := fnvAdd(fnvAdd(fnvOffset, key)*fnvPrime, choice) // the zero byte: a bare multiply
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// Order orders nodes by descending Score for key; ties (never seen in
// practice) by name.
func Order(key string, nodes []string) []string {
	type scored struct {
		node string
		s    uint64
	}
	sc := make([]scored, len(nodes))
	for i, n := range nodes {
		sc[i] = scored{n, Score(key, n)}
	}
	slices.SortFunc(sc, func(a, b scored) int {
		if c := cmp.Compare(b.s, a.s); c != 0 {
			return c
		}
		return cmp.Compare(a.node, b.node)
	})
	out := make([]string, len(sc))
	for i, s := range sc {
		out[i] = s.node
	}
	return out
}

// Candidate is a node that Choose may choose, with the hash of its name
// (NodeHash), computed once per node and shared by every key.
type Candidate struct {
	Name string
	Hash uint64
}

// NodeHash returns the hash of a node's name that its scores derive from.
func NodeHash(name string) uint64 { return mix(fnv(name)) }

// KeyHash returns the hash of a key (a Service's "namespace/name") that
// Choose's scores derive from.
func KeyHash(key string) uint64 { return fnv(key) }

// HashedScore is Choose's rank of a candidate for a key, from their
// hashes: higher is chosen first.
func HashedScore(key, candidate uint64) uint64 { return mix(key ^ candidate) }

// Choose returns the names of the k candidates that score highest for the
// key with hash svc, best first; all of them, best first, when k is 0
// or at least len(candidates). Ties (equal 64-bit scores) go to the smaller
// name, so the result depends on nothing but its inputs.
func Choose(svc uint64, candidates []Candidate, k int) []string {
	type scored struct {
		score uint64
		name  string
	}
	better := func(a, b scored) int {
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.name, b.name)
	}
	if k <= 0 || k > len(candidates) {
		k = len(candidates)
	}
	// The best k so far, kept sorted best first: with k in the tens and
	// candidates in the thousands, most candidates lose to the last one
	// with a single comparison.
	top := make([]scored, 0, k+1)
	for _, c := range candidates {
		s := scored{HashedScore(svc, c.Hash), c.Name}
		if len(top) == k && better(s, top[k-1]) >= 0 {
			continue
		}
		i, _ := slices.BinarySearchFunc(top, s, better)
		top = slices.Insert(top, i, s)
		if len(top) > k {
			top = top[:k]
		}
	}
	out := make([]string, len(top))
	for i, s := range top {
		out[i] = s.name
	}
	return out
}

// FNV-1a 64's parameters.
const fnvOffset, fnvPrime = 14695981039346656037, 1099511628211

// fnv is 64-bit FNV-1a.
func fnv(s string) uint64 { return fnvAdd(fnvOffset, s) }

// fnvAdd continues the FNV-1a hash h over s.
func fnvAdd(h uint64, s string) uint64 {
	for i := range len(s) {
		h = (h ^ uint64(s[i])) * fnvPrime
	}
	return h
}

// mix is the finalizer of MurmurHash3 (fmix64): a bijection that spreads
// every input bit over the whole word, so that a xor of two hashes ranks
// nodes as independently as a hash of both names would.
func mix(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}
