package allocator

import (
	"errors"
	"fmt"
	"math/big"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
)

// FuzzParseRange checks that whatever ParseRange accepts is a range the
// allocator can trust: no zone, no IPv4-mapped address, one family, First
// not after Last, nothing of ::ffff:0:0/96 in an IPv6 range, and String
// parses back to the same range.
func FuzzParseRange(f *testing.F) {
	for _, s := range []string{
		"192.0.2.0/28", "192.0.2.7/32", "0.0.0.0/0", "2001:db8::/64", "2001:db8::/127", "::/0", "::/80", "::/96",
		"::ffff:192.0.2.0/120", "::ffff:0:0/96", "::fffe:0:0/95", " 192.0.2.10 - 192.0.2.20 ", "192.0.2.20-192.0.2.10",
		"192.0.2.1-2001:db8::1", "::ffff:192.0.2.1-::ffff:192.0.2.9", "::1-::1:0:0:0", "2001:db8::1%eth0-2001:db8::5",
		"fe80::/64%eth0", "192.0.2.5/24", "foo", "-", "1-2-3",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRange(s)
		if err != nil {
			if r != (Range{}) {
				t.Fatalf("ParseRange(%q) failed but returned %v", s, r)
			}
			return
		}
		checkRange(t, s, r)
		back, err := ParseRange(r.String())
		if err != nil || back != r {
			t.Fatalf("ParseRange(%q) = %v; its String %q parses to %v, %v", s, r, r.String(), back, err)
		}
	})
}

// checkRange fails t unless r, parsed from s, is a range the allocator can
// trust.
func checkRange(t testing.TB, s string, r Range) {
	t.Helper()
	for _, a := range []netip.Addr{r.First, r.Last} {
		if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
			t.Fatalf("ParseRange(%q) = %v: bound %s is invalid, zoned or IPv4-mapped", s, r, a)
		}
	}
	if r.First.Is4() != r.Last.Is4() || r.Last.Less(r.First) {
		t.Fatalf("ParseRange(%q) = %v: mixed families or inverted", s, r)
	}
	if r.First.Is6() && r.First.Compare(mappedLast) <= 0 && mappedFirst.Compare(r.Last) <= 0 {
		t.Fatalf("ParseRange(%q) = %v reaches into ::ffff:0:0/96", s, r)
	}
	if ac, ok := r.anycast(); ok && (!r.Contains(ac) || ac != r.First) {
		t.Fatalf("ParseRange(%q) = %v: anycast %s is not its first address", s, r, ac)
	}
}

// FuzzAllocator drives the allocator with a sequence of operations decoded
// from the input, as the controller would (see runOps), and checks its
// invariants after each.
func FuzzAllocator(f *testing.F) {
	for seed := range uint64(8) {
		f.Add(randomOps(seed, 200))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		runOps(t, data)
	})
}

// TestAllocatorOpSequences runs the operation sequences of FuzzAllocator
// from a fixed set of seeds, so that plain go test covers them.
func TestAllocatorOpSequences(t *testing.T) {
	n, length := uint64(300), 400
	if testing.Short() {
		n = 30
	}
	for seed := range n {
		data := randomOps(seed, length)
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runOps(t, data) })
	}
}

func randomOps(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 9))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.UintN(256))
	}
	return b
}

// The menus the operations pick from: pool entries that overlap, cross a
// .255/.0 boundary and have or lack a subnet-router anycast address;
// addresses in and out of them, buggy, anycast, IPv4-mapped and zoned; a
// few Services in two namespaces, and two of another implementation.
var (
	fuzzRanges = []string{
		"192.0.2.0/30", "192.0.2.2-192.0.2.6", "192.0.2.252-192.0.3.3", "192.0.2.255/32", "198.51.100.0/31",
		"2001:db8::/126", "2001:db8::2-2001:db8::5", "2001:db8::/127", "2001:db8::4/126",
	}
	fuzzAddrs = []string{
		"192.0.2.0", "192.0.2.1", "192.0.2.3", "192.0.2.255", "192.0.3.0", "192.0.3.1", "198.51.100.1", "100.64.0.1",
		"2001:db8::", "2001:db8::1", "2001:db8::4", "2001:db8::9", "::ffff:192.0.2.1", "2001:db8::1%eth0",
	}
	fuzzPools    = []string{"a", "b", "c", "nope"}
	fuzzServices = []string{"ns1/s0", "ns1/s1", "ns1/s2", "ns1/s3", "ns2/s0", "ns2/s1"}
	fuzzForeign  = []string{"other/f0", "other/f1"}
	fuzzFamilies = []struct {
		p  Policy
		fs []Family
	}{
		{SingleStack, []Family{IPv4}}, {SingleStack, []Family{IPv6}},
		{PreferDualStack, []Family{IPv4, IPv6}}, {PreferDualStack, []Family{IPv6, IPv4}},
		{RequireDualStack, []Family{IPv4, IPv6}}, {RequireDualStack, []Family{IPv6, IPv4}},
	}
)

// bytesIn hands out small numbers from the fuzz input; once it runs dry it
// hands out zeros and says so.
type bytesIn struct {
	data []byte
	i    int
}

func (b *bytesIn) done() bool { return b.i >= len(b.data) }

func (b *bytesIn) n(k int) int {
	if b.done() {
		b.i++
		return 0
	}
	v := int(b.data[b.i]) % k
	b.i++
	return v
}

// world is the allocator and what the cluster looks like around it: the
// Services as they are now and what the controller wrote in their status.
type world struct {
	t         testing.TB
	a         *Allocator
	unmanaged []netip.Prefix
	pools     []Pool
	svcs      map[string]*fuzzSvc
	foreign   map[string][]netip.Addr
	clock     int
	log       []string
}

type fuzzSvc struct {
	req      Request      // the Service as it is now
	status   []netip.Addr // what the controller last wrote: its last successful Assign
	ok       bool         // it has an allocation made for req (its last Assign succeeded)
	live     bool         // of type LoadBalancer, not released
	deleting bool         // released for deletion; its status stays until it is gone
	created  int          // creation order, for restarts
}

// runOps decodes data into operations: SetPools, Assign (followed by the
// status write the controller makes), Release (for a type change, after
// which the upstream controller clears the status, or for a deletion,
// after which the status stays until the object is gone), the end of a
// deletion, another implementation's status, a resync of every status, and
// a restart (a new allocator, SetPools, SetStatus for every status, Restore
// of keeplb's Services oldest first, deleting ones left out). After each it
// checks the invariants.
func runOps(t testing.TB, data []byte) {
	if len(data) > 4096 {
		data = data[:4096] // long enough for any story; keeps each run fast
	}
	in := &bytesIn{data: data}
	w := &world{t: t, svcs: map[string]*fuzzSvc{}, foreign: map[string][]netip.Addr{}}
	if in.n(2) == 1 {
		// Wide enough for every address the ops name outside the pools.
		w.unmanaged = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	}
	w.a = New(w.unmanaged...)
	for step := 0; !in.done(); step++ {
		switch in.n(10) {
		case 0:
			w.setPools(in)
		case 1, 2, 3, 4:
			w.assign(in)
		case 5:
			w.release(in)
		case 6:
			w.forget(in)
		case 7:
			w.foreignStatus(in)
		case 8:
			w.restart()
		case 9:
			w.resync()
		}
		w.check(step)
	}
}

func (s *fuzzSvc) statusOrNil() []netip.Addr {
	if s == nil {
		return nil
	}
	return s.status
}

// resync replays every status, as an informer resync does: SetStatus with
// what was recorded already must change nothing.
func (w *world) resync() {
	w.logf("Resync")
	for _, k := range fuzzServices {
		if w.a.SetStatus(k, w.svcs[k].statusOrNil()) {
			w.fatalf("replaying %s's status freed an address", k)
		}
	}
	for k, addrs := range w.foreign {
		if w.a.SetStatus(k, addrs) {
			w.fatalf("replaying %s's status freed an address", k)
		}
	}
}

func (w *world) logf(format string, args ...any) {
	w.log = append(w.log, fmt.Sprintf(format, args...))
}

func (w *world) fatalf(format string, args ...any) {
	w.t.Helper()
	w.t.Fatalf("%s\noperations:\n  %s", fmt.Sprintf(format, args...), strings.Join(w.log, "\n  "))
}

func (w *world) setPools(in *bytesIn) {
	w.pools = nil
	for i := range in.n(4) {
		p := Pool{Name: fuzzPools[i], AutoAssign: in.n(4) != 0, AvoidBuggyIPs: in.n(2) == 1, Priority: int32(in.n(3)), Order: in.n(4)}
		for range 1 + in.n(3) {
			r, err := ParseRange(fuzzRanges[in.n(len(fuzzRanges))])
			if err != nil {
				w.fatalf("menu entry: %v", err)
			}
			p.Ranges = append(p.Ranges, r)
		}
		if in.n(4) == 0 {
			p.Namespaces = []string{"ns1"}
		}
		w.pools = append(w.pools, p)
	}
	w.logf("SetPools %s", poolsString(w.pools))
	w.a.SetPools(w.pools)
}

func poolsString(ps []Pool) string {
	var out []string
	for _, p := range ps {
		out = append(out, fmt.Sprintf("{%s %v auto=%v buggy=%v prio=%d order=%d ns=%v}", p.Name, p.Ranges, p.AutoAssign, p.AvoidBuggyIPs, p.Priority, p.Order, p.Namespaces))
	}
	return "[" + strings.Join(out, " ") + "]"
}

func (w *world) request(in *bytesIn, key string) Request {
	ns, _, _ := strings.Cut(key, "/")
	fam := fuzzFamilies[in.n(len(fuzzFamilies))]
	r := Request{Key: key, Namespace: ns, Policy: fam.p, Families: fam.fs, IPsSource: "keeplb.io/ips", Backends: "cluster"}
	if in.n(3) == 0 {
		r.Pool = fuzzPools[in.n(len(fuzzPools))]
	}
	if in.n(3) == 0 {
		for range 1 + in.n(2) {
			r.IPs = append(r.IPs, netip.MustParseAddr(fuzzAddrs[in.n(len(fuzzAddrs))]))
		}
	}
	r.ShareKey = []string{"", "", "k", "j"}[in.n(4)]
	ports := in.n(8)
	for i, p := range []int32{80, 443, 53} {
		if ports&(1<<i) != 0 {
			r.Ports = append(r.Ports, Port{Protocol: "TCP", Port: p})
		}
	}
	if in.n(4) == 0 {
		r.Backends = "app=x"
	}
	return r
}

func (w *world) assign(in *bytesIn) {
	key := fuzzServices[in.n(len(fuzzServices))]
	r := w.request(in, key)
	s := w.svcs[key]
	if s != nil && s.deleting {
		return // no Service of that name until the object is gone
	}
	if s == nil {
		s = &fuzzSvc{created: w.clock}
		w.clock++
		w.svcs[key] = s
	}
	before := w.snapshot()
	prev, had := w.a.Lookup(key)
	al, err := w.a.Assign(r)
	w.logf("Assign %s %v pool=%q ips=%v share=%q ports=%v backends=%s: %v %v", key, r.Families, r.Pool, r.IPs, r.ShareKey, r.Ports, r.Backends, al, err)
	s.req, s.live = r, true
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			w.fatalf("Assign(%s) = %v, not an *Error", key, err)
		}
		now, has := w.a.Lookup(key)
		if has != had || !slices.Equal(now.Addrs, prev.Addrs) {
			w.fatalf("a failed Assign(%s) changed its allocation from %v to %v", key, prev, now)
		}
		if has {
			s.ok = false // it keeps an allocation made for an older spec
		}
		return
	}
	for _, addr := range al.Addrs {
		if addr.Zone() != "" || addr.Is4In6() {
			w.fatalf("Assign(%s) handed out %s", key, addr)
		}
		if slices.Contains(prev.Addrs, addr) {
			continue
		}
		// (e) a newly taken address is listed by no status but of its holders.
		for _, k := range before.refs[addr] {
			if k != key && !slices.Contains(before.owners[addr], k) {
				w.fatalf("Assign(%s) handed out %s, which the status of %s lists", key, addr, k)
			}
		}
	}
	s.ok, s.status = true, slices.Clone(al.Addrs)
	w.a.SetStatus(key, al.Addrs)
}

type snapshot struct {
	owners map[netip.Addr][]string
	refs   map[netip.Addr][]string
}

func (w *world) snapshot() snapshot {
	w.a.mu.Lock()
	defer w.a.mu.Unlock()
	s := snapshot{owners: map[netip.Addr][]string{}, refs: map[netip.Addr][]string{}}
	for addr, st := range w.a.addrs {
		s.owners[addr] = slices.Clone(st.owners)
	}
	for addr, ks := range w.a.refs {
		s.refs[addr] = slices.Clone(ks)
	}
	return s
}

func (w *world) release(in *bytesIn) {
	key := fuzzServices[in.n(len(fuzzServices))]
	deleting := in.n(2) == 1
	w.logf("Release %s (deleting %v)", key, deleting)
	w.a.Release(key)
	s := w.svcs[key]
	if s == nil {
		return
	}
	s.live, s.ok = false, false
	if deleting {
		s.deleting = true
		return
	}
	s.status = nil
	w.a.SetStatus(key, nil)
}

// forget ends the deletion of a released Service: its status goes with it.
func (w *world) forget(in *bytesIn) {
	key := fuzzServices[in.n(len(fuzzServices))]
	if s := w.svcs[key]; s != nil && s.deleting {
		w.logf("Gone %s", key)
		w.a.SetStatus(key, nil)
		delete(w.svcs, key)
	}
}

func (w *world) foreignStatus(in *bytesIn) {
	key := fuzzForeign[in.n(len(fuzzForeign))]
	var addrs []netip.Addr
	for range in.n(3) {
		addrs = append(addrs, netip.MustParseAddr(fuzzAddrs[in.n(len(fuzzAddrs))]))
	}
	w.logf("SetStatus %s %v", key, addrs)
	w.a.SetStatus(key, addrs)
	w.foreign[key] = addrs
}

// restart does what the controller does at start, and checks (d): every
// Service whose status was written from its allocation, made for the
// Service as it is now, and whose sharers are in the same case, gets the
// same addresses back.
func (w *world) restart() {
	w.logf("Restart")
	want := map[string][]netip.Addr{}
	for key, s := range w.svcs {
		if al, ok := w.a.Lookup(key); ok && w.settled(key, s, al) {
			want[key] = al.Addrs
		}
	}
	b := New(w.unmanaged...)
	b.SetPools(w.pools)
	for k, addrs := range w.foreign {
		b.SetStatus(k, addrs)
	}
	keys := make([]string, 0, len(w.svcs))
	for k, s := range w.svcs {
		b.SetStatus(k, s.status)
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return w.svcs[keys[i]].created < w.svcs[keys[j]].created })
	for _, k := range keys {
		s := w.svcs[k]
		s.ok = false
		if !s.live || len(s.status) == 0 {
			continue
		}
		err := b.Restore(s.req, s.status)
		w.logf("  Restore %s %v: %v", k, s.status, err)
		s.ok = err == nil
	}
	for key, addrs := range want {
		if got, _ := b.Lookup(key); !slices.Equal(got.Addrs, addrs) {
			w.fatalf("(d) after a restart %s has %v, want %v", key, got.Addrs, addrs)
		}
	}
	w.a = b
}

// settled reports whether key's allocation al is what its status shows and
// was made for the Service as it is now, and the same holds for every
// Service sharing one of its addresses.
func (w *world) settled(key string, s *fuzzSvc, al Allocation) bool {
	if !s.live || !s.ok || !slices.Equal(s.status, al.Addrs) {
		return false
	}
	w.a.mu.Lock()
	defer w.a.mu.Unlock()
	for _, addr := range al.Addrs {
		for _, o := range w.a.addrs[addr].owners {
			if os := w.svcs[o]; o != key && (os == nil || !os.live || !os.ok) {
				return false
			}
		}
	}
	return true
}

// check verifies the allocator's invariants:
// (a) an address has two owners only when they share it legally;
// (b) nothing owned or listed in a status is in a free set;
// (c) per pool and family, free addresses plus the owned or listed ones
// the pool does not skip make up its total;
// and the consistency of its indexes.
func (w *world) check(step int) {
	a := w.a
	a.mu.Lock()
	defer a.mu.Unlock()
	w.t.Helper()
	for key, s := range a.services {
		for _, addr := range s.alloc.Addrs {
			if st := a.addrs[addr]; st == nil || !slices.Contains(st.owners, key) {
				w.fatalf("step %d: %s's address %s does not list it as owner", step, key, addr)
			}
		}
	}
	for addr, st := range a.addrs {
		if addr.Zone() != "" || addr.Is4In6() {
			w.fatalf("step %d: recorded %s", step, addr)
		}
		if len(st.owners) == 0 {
			w.fatalf("step %d: %s recorded without owner", step, addr)
		}
		for i, o := range st.owners {
			svc := a.services[o]
			if svc == nil || !slices.Contains(svc.alloc.Addrs, addr) {
				w.fatalf("step %d: %s lists owner %s, which does not hold it", step, addr, o)
			}
			for _, p := range st.owners[i+1:] {
				if why := illegalShare(svc.req, a.services[p].req); why != "" {
					w.fatalf("(a) step %d: %s held by %s and %s: %s", step, addr, o, p, why)
				}
			}
		}
	}
	taken := map[netip.Addr]bool{}
	for addr := range a.addrs {
		taken[addr] = true
	}
	for addr, ks := range a.refs {
		taken[addr] = true
		if addr.Zone() != "" || addr.Is4In6() || len(ks) == 0 {
			w.fatalf("step %d: status reference %s %v", step, addr, ks)
		}
	}
	for addr := range taken {
		for _, ps := range a.pools {
			if ps.free[FamilyOf(addr)].contains(addr) {
				w.fatalf("(b) step %d: %s is owned or listed, yet in the free set of pool %s", step, addr, ps.Name)
			}
		}
	}
	for _, ps := range a.pools {
		for f := IPv4; f <= IPv6; f++ {
			fs := ps.free[f]
			n := fs.size()
			for addr := range taken {
				if FamilyOf(addr) == f && a.lookup(addr) == ps && !fs.skips(addr) {
					n.Add(n, big.NewInt(1))
				}
			}
			if n.Cmp(ps.total[f]) != 0 {
				w.fatalf("(c) step %d: pool %s %s: free %s + taken = %s, total %s", step, ps.Name, f, fs.size(), n, ps.total[f])
			}
			for i, sp := range fs.spans {
				if !fs.usable(sp) || a.lookup(sp.First) != ps || a.lookup(sp.Last) != ps || i > 0 && !fs.spans[i-1].Last.Next().Less(sp.First) {
					w.fatalf("step %d: pool %s free span %s out of order, empty or outside the pool", step, ps.Name, sp)
				}
			}
		}
	}
}

// illegalShare says why two Services may not hold one address, or "".
func illegalShare(x, y Request) string {
	switch {
	case x.Namespace != y.Namespace:
		return "different namespaces"
	case x.ShareKey == "" || x.ShareKey != y.ShareKey:
		return fmt.Sprintf("share keys %q and %q", x.ShareKey, y.ShareKey)
	case x.Backends != y.Backends:
		return "different backends"
	}
	for _, p := range x.Ports {
		if slices.Contains(y.Ports, p) {
			return "both use " + p.String()
		}
	}
	return ""
}
