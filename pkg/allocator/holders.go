package allocator

import (
	"net/netip"
	"slices"
)

// Holders returns the keys of the Services addr is allocated to, sorted;
// none when it is free or only listed in some status.
func (a *Allocator) Holders(addr netip.Addr) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.addrs[addr.Unmap().WithZone("")]
	if st == nil {
		return nil
	}
	return slices.Sorted(slices.Values(st.owners))
}
