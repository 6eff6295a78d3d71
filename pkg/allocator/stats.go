package allocator

import (
	"math/big"
	"slices"
)

// FamilyStats counts one family of a pool.
type FamilyStats struct {
	// Total counts the addresses the pool may hand out: its own after
	// overlaps with older pools, less those it skips (avoidBuggyIPs, the
	// subnet-router anycast address of an IPv6 CIDR).
	Total *big.Int
	// Free counts those of Total that no Service holds and no Service's
	// status lists.
	Free *big.Int
	// Used counts the addresses Services hold that were drawn from the
	// pool, including those it no longer contains.
	Used int64
}

// PoolStats is what the controller publishes in an IPPool's status.
type PoolStats struct {
	Families [2]FamilyStats
	// OutOfRange counts addresses attributed to the pool that it no longer
	// contains.
	OutOfRange int64
	// ConflictsWith names older pools that overlap this one.
	ConflictsWith []string
}

// Stats returns the statistics of every pool, and of the pools that are
// gone but still have addresses attributed to them.
func (a *Allocator) Stats() map[string]PoolStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]PoolStats, len(a.pools))
	for name, ps := range a.pools {
		s := PoolStats{ConflictsWith: slices.Clone(ps.conflicts)}
		for f := IPv4; f <= IPv6; f++ {
			s.Families[f] = FamilyStats{Total: new(big.Int).Set(ps.total[f]), Free: ps.free[f].size()}
		}
		out[name] = s
	}
	for addr, st := range a.addrs {
		if st.pool == "" {
			continue
		}
		s, ok := out[st.pool]
		if !ok {
			s.Families = [2]FamilyStats{{Total: new(big.Int), Free: new(big.Int)}, {Total: new(big.Int), Free: new(big.Int)}}
		}
		s.Families[FamilyOf(addr)].Used++
		if !st.inRange {
			s.OutOfRange++
		}
		out[st.pool] = s
	}
	return out
}
