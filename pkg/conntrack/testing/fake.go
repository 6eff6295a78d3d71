// Package conntracktesting has a fake of conntrack.Interface that models
// the kernel's conntrack table as a set of flows. Tests seed flows and
// compare the flows left, not the calls made.
package conntracktesting

import (
	"net/netip"
	"slices"
	"sync"

	"github.com/keeplb/keeplb/pkg/conntrack"
)

// Fake is a state-modelling conntrack.Interface. It is safe for
// concurrent use.
type Fake struct {
	mu    sync.Mutex
	flows []conntrack.Flow
	err   error
}

var _ conntrack.Interface = (*Fake)(nil)

// New returns a Fake whose table holds flows.
func New(flows ...conntrack.Flow) *Fake { return &Fake{flows: slices.Clone(flows)} }

// Add puts flows in the table, as traffic would.
func (f *Fake) Add(flows ...conntrack.Flow) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.flows = append(f.flows, flows...)
}

// Flows returns the flows in the table.
func (f *Fake) Flows() []conntrack.Flow {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.flows)
}

// FailWith makes DeleteUDP and DeleteOfVIPs fail with err, deleting nothing; nil stops it.
func (f *Fake) FailWith(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// DeleteUDP is part of conntrack.Interface.
func (f *Fake) DeleteUDP(vip, real netip.AddrPort) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return 0, f.err
	}
	before := len(f.flows)
	f.flows = slices.DeleteFunc(f.flows, func(fl conntrack.Flow) bool { return conntrack.Matches(fl, vip, real) })
	return before - len(f.flows), nil
}

// DeleteOfVIPs is part of conntrack.Interface.
func (f *Fake) DeleteOfVIPs(vips []netip.Addr, zone uint16, node []netip.Addr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return 0, f.err
	}
	vipSet, own := conntrack.AddrSet(vips), conntrack.AddrSet(node)
	before := len(f.flows)
	f.flows = slices.DeleteFunc(f.flows, func(fl conntrack.Flow) bool { return conntrack.OfVIPs(fl, vipSet, own, zone) })
	return before - len(f.flows), nil
}
