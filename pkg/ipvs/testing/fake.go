// Package ipvstesting has a fake of ipvs.Interface that models the kernel's
// table: virtual servers and their real servers, with the kernel's errors
// for duplicates and missing entries. Tests compare its end state (Table),
// not the calls that led there.
package ipvstesting

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// Schedulers are the scheduler names the fake accepts, as a kernel with
// every IPVS scheduler module.
var Schedulers = []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos"}

// Call is one call to the fake, for counting and error injection.
type Call struct {
	// Method is the Interface method name, such as "AddRealServer".
	Method string
	// Virtual is the virtual server the call is about (zero for
	// VirtualServers).
	Virtual ipvs.Key
	// Real is the real server the call is about, if any.
	Real netip.AddrPort
}

// IsWrite reports whether the call changes the kernel's state.
func (c Call) IsWrite() bool {
	return c.Method != "VirtualServers" && c.Method != "RealServers" && c.Method != "SyncDaemons"
}

// String returns e.g. "AddRealServer TCP/192.0.2.1:80 10.0.0.1:30080".
func (c Call) String() string {
	s := c.Method
	if c.Virtual.Address.IsValid() {
		s += " " + c.Virtual.String()
	}
	if c.Real.IsValid() {
		s += " " + c.Real.String()
	}
	return s
}

type entry struct {
	vs    ipvs.VirtualServer // Stats zero: stats are kept apart
	stats ipvs.Stats
	reals map[netip.AddrPort]ipvs.RealServer
}

// Fake is a state-modelling ipvs.Interface. It is safe for concurrent use.
type Fake struct {
	mu    sync.Mutex
	table map[ipvs.Key]*entry
	calls []Call
	fail  func(Call) error
	// schedulers the kernel has; nil means Schedulers.
	schedulers []string
	// daemons are the running sync daemons, by state.
	daemons map[ipvs.SyncState]ipvs.SyncDaemon
}

var (
	_ ipvs.Interface   = (*Fake)(nil)
	_ ipvs.SyncDaemons = (*Fake)(nil)
)

// New returns an empty Fake.
func New() *Fake {
	return &Fake{table: map[ipvs.Key]*entry{}, daemons: map[ipvs.SyncState]ipvs.SyncDaemon{}}
}

// Seed puts a virtual server and its real servers in the table without
// recording calls, as another program (kube-proxy, an operator with
// ipvsadm) would have. It replaces an existing entry of the same key.
func (f *Fake) Seed(vs ipvs.VirtualServer, reals ...ipvs.RealServer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := &entry{vs: vs, stats: vs.Stats, reals: map[netip.AddrPort]ipvs.RealServer{}}
	e.vs.Stats = ipvs.Stats{}
	for _, r := range reals {
		e.reals[r.AddrPort()] = r
	}
	f.table[vs.Key()] = e
}

// SeedTable seeds every entry of t.
func (f *Fake) SeedTable(t ipvs.Table) {
	for _, e := range t {
		f.Seed(e.Virtual, e.Reals...)
	}
}

// SetStats sets the counters of the virtual server k, as traffic would;
// false if there is no such virtual server. VirtualServers reports them;
// updates keep them; a deleted and re-added virtual server starts at zero.
func (f *Fake) SetStats(k ipvs.Key, st ipvs.Stats) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := f.table[k]
	if e == nil {
		return false
	}
	e.stats = st
	return true
}

// Table returns a copy of the whole table, real servers sorted.
func (f *Fake) Table() ipvs.Table {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := make(ipvs.Table, len(f.table))
	for k, e := range f.table {
		t[k] = ipvs.Entry{Virtual: e.vs, Reals: slices.SortedFunc(maps.Values(e.reals), ipvs.CompareReal)}
	}
	return t
}

// Calls returns the calls made so far (Seed is not a call).
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// Writes returns the calls made so far that change the table.
func (f *Fake) Writes() []Call {
	var out []Call
	for _, c := range f.Calls() {
		if c.IsWrite() {
			out = append(out, c)
		}
	}
	return out
}

// ResetCalls forgets the calls made so far.
func (f *Fake) ResetCalls() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = nil
}

// FailWith makes every call for which fn returns an error fail with it,
// before it changes anything. nil stops injecting errors.
func (f *Fake) FailWith(fn func(Call) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = fn
}

func (f *Fake) begin(c Call) error {
	f.calls = append(f.calls, c)
	if f.fail != nil {
		return f.fail(c)
	}
	return nil
}

func errorf(errno syscall.Errno, format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), errno)
}

// VirtualServers is part of ipvs.Interface.
func (f *Fake) VirtualServers() ([]ipvs.VirtualServer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "VirtualServers"}); err != nil {
		return nil, err
	}
	out := make([]ipvs.VirtualServer, 0, len(f.table))
	for _, e := range f.table {
		vs := e.vs
		vs.Stats = e.stats
		out = append(out, vs)
	}
	return out, nil
}

// RealServers is part of ipvs.Interface.
func (f *Fake) RealServers(k ipvs.Key) ([]ipvs.RealServer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "RealServers", Virtual: k}); err != nil {
		return nil, err
	}
	e, err := f.lookup(k)
	if err != nil {
		return nil, err
	}
	return slices.Collect(maps.Values(e.reals)), nil
}

func (f *Fake) lookup(k ipvs.Key) (*entry, error) {
	e := f.table[k]
	if e == nil {
		return nil, errorf(syscall.ESRCH, "no virtual server %s", k)
	}
	return e, nil
}

// SetSchedulers makes the fake a kernel with only these IPVS schedulers
// (as when the other modules are missing): adding or changing a virtual
// server to another one fails with ENOENT, as the kernel does.
func (f *Fake) SetSchedulers(names ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.schedulers = slices.Clone(names)
}

func (f *Fake) validVirtual(vs ipvs.VirtualServer) error {
	schedulers := f.schedulers
	if schedulers == nil {
		schedulers = Schedulers
	}
	switch {
	case !vs.Address.IsValid():
		return errorf(syscall.EINVAL, "virtual server %s has no address", vs.Key())
	case vs.Protocol != ipvs.TCP && vs.Protocol != ipvs.UDP && vs.Protocol != ipvs.SCTP:
		return errorf(syscall.EPROTONOSUPPORT, "virtual server %s: protocol %q", vs.Key(), vs.Protocol)
	case !slices.Contains(schedulers, vs.Scheduler):
		return errorf(syscall.ENOENT, "virtual server %s: no scheduler %q", vs.Key(), vs.Scheduler)
	}
	return nil
}

// AddVirtualServer is part of ipvs.Interface.
func (f *Fake) AddVirtualServer(vs ipvs.VirtualServer) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := vs.Key()
	if err := f.begin(Call{Method: "AddVirtualServer", Virtual: k}); err != nil {
		return err
	}
	if err := f.validVirtual(vs); err != nil {
		return err
	}
	if f.table[k] != nil {
		return errorf(syscall.EEXIST, "virtual server %s exists", k)
	}
	vs.Stats = ipvs.Stats{} // the kernel ignores counters in a write
	f.table[k] = &entry{vs: vs, reals: map[netip.AddrPort]ipvs.RealServer{}}
	return nil
}

// UpdateVirtualServer is part of ipvs.Interface.
func (f *Fake) UpdateVirtualServer(vs ipvs.VirtualServer) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := vs.Key()
	if err := f.begin(Call{Method: "UpdateVirtualServer", Virtual: k}); err != nil {
		return err
	}
	e, err := f.lookup(k)
	if err != nil {
		return err
	}
	if err := f.validVirtual(vs); err != nil {
		return err
	}
	vs.Stats = ipvs.Stats{} // the kernel ignores counters in a write
	e.vs = vs
	return nil
}

// DeleteVirtualServer is part of ipvs.Interface.
func (f *Fake) DeleteVirtualServer(k ipvs.Key) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "DeleteVirtualServer", Virtual: k}); err != nil {
		return err
	}
	if _, err := f.lookup(k); err != nil {
		return err
	}
	delete(f.table, k)
	return nil
}

func validReal(k ipvs.Key, rs ipvs.RealServer) error {
	switch {
	case !rs.Address.IsValid():
		return errorf(syscall.EINVAL, "real server of %s has no address", k)
	case rs.Weight < 0:
		return errorf(syscall.ERANGE, "real server %s of %s: negative weight", rs, k)
	case rs.Address.Is4() != k.Address.Is4() && rs.Method != ipvs.Tunnel:
		// The kernel mixes families only for tunnelling.
		return errorf(syscall.EINVAL, "real server %s of %s: address family differs", rs, k)
	}
	return nil
}

// AddRealServer is part of ipvs.Interface.
func (f *Fake) AddRealServer(k ipvs.Key, rs ipvs.RealServer) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "AddRealServer", Virtual: k, Real: rs.AddrPort()}); err != nil {
		return err
	}
	e, err := f.lookup(k)
	if err != nil {
		return err
	}
	if err := validReal(k, rs); err != nil {
		return err
	}
	if _, ok := e.reals[rs.AddrPort()]; ok {
		return errorf(syscall.EEXIST, "real server %s of %s exists", rs.AddrPort(), k)
	}
	e.reals[rs.AddrPort()] = rs
	return nil
}

// UpdateRealServer is part of ipvs.Interface.
func (f *Fake) UpdateRealServer(k ipvs.Key, rs ipvs.RealServer) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "UpdateRealServer", Virtual: k, Real: rs.AddrPort()}); err != nil {
		return err
	}
	e, err := f.lookup(k)
	if err != nil {
		return err
	}
	if err := validReal(k, rs); err != nil {
		return err
	}
	if _, ok := e.reals[rs.AddrPort()]; !ok {
		return errorf(syscall.ENOENT, "no real server %s in %s", rs.AddrPort(), k)
	}
	e.reals[rs.AddrPort()] = rs
	return nil
}

// DeleteRealServer is part of ipvs.Interface.
func (f *Fake) DeleteRealServer(k ipvs.Key, rs netip.AddrPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "DeleteRealServer", Virtual: k, Real: rs}); err != nil {
		return err
	}
	e, err := f.lookup(k)
	if err != nil {
		return err
	}
	if _, ok := e.reals[rs]; !ok {
		return errorf(syscall.ENOENT, "no real server %s in %s", rs, k)
	}
	delete(e.reals, rs)
	return nil
}

// SyncDaemons is part of ipvs.SyncDaemons: the running daemons, master
// first, as the kernel lists them.
func (f *Fake) SyncDaemons() ([]ipvs.SyncDaemon, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "SyncDaemons"}); err != nil {
		return nil, err
	}
	var out []ipvs.SyncDaemon
	for _, s := range []ipvs.SyncState{ipvs.SyncMaster, ipvs.SyncBackup} {
		if d, ok := f.daemons[s]; ok {
			out = append(out, d)
		}
	}
	return out, nil
}

// StartSyncDaemon is part of ipvs.SyncDaemons: EEXIST if a daemon of the
// state runs, EINVAL for what Validate rejects.
func (f *Fake) StartSyncDaemon(d ipvs.SyncDaemon) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "StartSyncDaemon"}); err != nil {
		return err
	}
	if err := d.Validate(); err != nil {
		return errors.Join(err, syscall.EINVAL) // the kernel answers a bare EINVAL
	}
	if _, ok := f.daemons[d.State]; ok {
		return errorf(syscall.EEXIST, "start the IPVS sync daemon (%s)", d)
	}
	f.daemons[d.State] = d
	return nil
}

// StopSyncDaemon is part of ipvs.SyncDaemons: ESRCH if none of the state
// runs.
func (f *Fake) StopSyncDaemon(s ipvs.SyncState) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(Call{Method: "StopSyncDaemon"}); err != nil {
		return err
	}
	if _, ok := f.daemons[s]; !ok {
		return errorf(syscall.ESRCH, "stop the IPVS %s sync daemon", s)
	}
	delete(f.daemons, s)
	return nil
}
