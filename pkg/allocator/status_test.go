package allocator

import (
	"net/netip"
	"testing"
)

func ips(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func freeIPv4(a *Allocator, pool string) int64 {
	return a.Stats()[pool].Families[IPv4].Free.Int64()
}

// TestStatusAddressNotReissued reproduces issue 9: x had 192.0.2.0 in its
// status but no allocation (its Restore was refused, or it was not seeded),
// y was given 192.0.2.0, and x was then re-assigned 192.0.2.1: two Services
// with one address in their statuses. With x's status recorded, y gets
// 192.0.2.1 and x keeps 192.0.2.0.
func TestStatusAddressNotReissued(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	a.SetStatus("ns/x", ips("192.0.2.0"))
	if got := freeIPv4(a, "p"); got != 3 {
		t.Fatalf("free = %d, want 3: an address in a status is not free", got)
	}
	if got := addrs(mustAssign(t, a, req("ns/y"))); got != "192.0.2.1" {
		t.Fatalf("y got %s, want 192.0.2.1", got)
	}
	if got := addrs(mustAssign(t, a, req("ns/x"))); got != "192.0.2.0" {
		t.Fatalf("x got %s, want its own 192.0.2.0 back", got)
	}
	_, err := a.Assign(req("ns/z", withIPs("192.0.2.0")))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "192.0.2.0 is already used by Service ns/x")
}

// TestRefusedSharerKeepsItsAddressOut reproduces "a restart forgets a
// refused sharer": after a restart, Restore gives x's and y's common address
// to the older y and refuses x; when y is released, the address must not be
// handed to a third Service while x's status lists it.
func TestRefusedSharerKeepsItsAddressOut(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/29")})
	five := ips("192.0.2.5")
	a.SetStatus("ns/y", five)
	a.SetStatus("ns/x", five)
	if err := a.Restore(req("ns/y"), five); err != nil {
		t.Fatal(err)
	}
	if err := a.Restore(req("ns/x"), five); err == nil {
		t.Fatal("Restore gave one address to two Services that may not share it")
	}
	if a.Release("ns/y") {
		t.Fatal("Release freed an address x's status lists")
	}
	if a.SetStatus("ns/y", nil) {
		t.Fatal("y's status went, x's still lists the address, yet it was freed")
	}
	for _, k := range []string{"ns/a", "ns/b", "ns/c", "ns/d", "ns/e", "ns/f", "ns/g"} {
		if got := addrs(mustAssign(t, a, req(k))); got == "192.0.2.5" {
			t.Fatalf("%s was given 192.0.2.5, which x's status lists", k)
		}
	}
	_, err := a.Assign(req("ns/h", withIPs("192.0.2.5")))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "192.0.2.5 is listed in the status of Service ns/x; choose another address")
	// x itself may have it: it is what its clients use.
	if got := addrs(mustAssign(t, a, req("ns/x"))); got != "192.0.2.5" {
		t.Fatalf("x got %s, want 192.0.2.5 back", got)
	}
}

// TestStatusConflictGetsFresh checks the quarantine: x's status lists an
// address y holds and x may not share. x is given a fresh address, without
// failing, and y keeps its own; asking for y's address by name still fails.
func TestStatusConflictGetsFresh(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	zero := ips("192.0.2.0")
	a.SetStatus("ns/y", zero)
	a.SetStatus("ns/x", zero)
	if err := a.Restore(req("ns/y"), zero); err != nil {
		t.Fatal(err)
	}
	if got := addrs(mustAssign(t, a, req("ns/x"))); got != "192.0.2.1" {
		t.Fatalf("x got %s, want a fresh 192.0.2.1", got)
	}
	if got := addrs(mustAssign(t, a, req("ns/y"))); got != "192.0.2.0" {
		t.Fatalf("y moved to %s", got)
	}
	_, err := a.Assign(req("ns/x", withIPs("192.0.2.0")))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "already used by Service ns/y")
	// Once x's status shows its new address, the old reference is gone and
	// nothing is freed: y still holds 192.0.2.0.
	if a.SetStatus("ns/x", ips("192.0.2.1")) {
		t.Fatal("dropping x's reference to y's address freed it")
	}
	if got := freeIPv4(a, "p"); got != 2 {
		t.Fatalf("free = %d, want 2", got)
	}
}

// TestReleaseWaitsForStatus checks that a released address goes back to
// its pool only when no status lists it any more, and that SetStatus says
// so.
func TestReleaseWaitsForStatus(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/31")})
	got := mustAssign(t, a, req("ns/a"))
	a.SetStatus("ns/a", got.Addrs)
	if a.Release("ns/a") {
		t.Fatal("Release freed an address the Service's own status still lists")
	}
	mustAssign(t, a, req("ns/b"))
	_, err := a.Assign(req("ns/c"))
	wantErr(t, err, ReasonExhausted, "", "IPPool p has no free IPv4 address")
	if !a.SetStatus("ns/a", nil) {
		t.Fatal("forgetting the last status listing a released address did not free it")
	}
	if got := addrs(mustAssign(t, a, req("ns/c"))); got != "192.0.2.0" {
		t.Fatalf("c got %s, want the freed 192.0.2.0", got)
	}
}

// TestForeignStatusAddressNeverHandedOut checks that an address in the
// status of a Service keeplb does not handle (another load-balancer class)
// is taken, in a pool or out of every pool.
func TestForeignStatusAddressNeverHandedOut(t *testing.T) {
	a := New(netip.MustParsePrefix("100.64.0.0/10"))
	a.SetStatus("other/lb", ips("192.0.2.1", "100.64.0.1", "::ffff:192.0.2.2", "2001:db8::1%eth0"))
	// SetPools after SetStatus keeps them out too.
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30", "2001:db8::/126")})
	if got := freeIPv4(a, "p"); got != 2 {
		t.Fatalf("free = %d, want 2 (192.0.2.1 and the mapped 192.0.2.2 are listed)", got)
	}
	if got := a.Stats()["p"].Families[IPv6].Free.Int64(); got != 2 {
		t.Fatalf("IPv6 free = %d, want 2 (::1 listed with a zone, :: the anycast address)", got)
	}
	for _, k := range []string{"ns/a", "ns/b"} {
		if got := addrs(mustAssign(t, a, req(k))); got == "192.0.2.1" || got == "192.0.2.2" {
			t.Fatalf("%s was given %s, another implementation's address", k, got)
		}
	}
	for _, ip := range []string{"192.0.2.1", "100.64.0.1"} {
		_, err := a.Assign(req("ns/c", withIPs(ip)))
		wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", ip+" is listed in the status of Service other/lb")
	}
	if !a.SetStatus("other/lb", nil) {
		t.Fatal("forgetting the foreign status freed nothing")
	}
	if got := addrs(mustAssign(t, a, req("ns/c", withIPs("100.64.0.1")))); got != "100.64.0.1" {
		t.Fatalf("got %s", got)
	}
}

// TestAdoptOnlyWhatSatisfies checks that a Service's own status addresses
// are adopted only when they satisfy its request.
func TestAdoptOnlyWhatSatisfies(t *testing.T) {
	team := pool(t, "team", "198.51.100.0/30")
	team.Namespaces = []string{"team"}
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30", "2001:db8::/126"), pool(t, "q", "203.0.113.0/30"), team})

	a.SetStatus("ns/named", ips("192.0.2.3"))
	if got := mustAssign(t, a, req("ns/named", withPool("q"))); got.Pool != "q" {
		t.Fatalf("a Service naming pool q adopted %v", got)
	}
	a.SetStatus("ns/outsider", ips("198.51.100.1"))
	if got := mustAssign(t, a, req("ns/outsider")); addrs(got) == "198.51.100.1" {
		t.Fatal("adopted an address of a pool that does not admit the Service")
	}
	a.SetStatus("ns/v6", ips("2001:db8::2"))
	if got := addrs(mustAssign(t, a, req("ns/v6"))); got == "2001:db8::2" {
		t.Fatal("adopted an IPv6 address for an IPv4 Service")
	}
	// Dual-stack: adopts the listed IPv6 address, adds IPv4 from its pool.
	a.SetStatus("ns/dual", ips("2001:db8::3"))
	if got := addrs(mustAssign(t, a, req("ns/dual", withFamilies(RequireDualStack, IPv4, IPv6)))); got != "192.0.2.2,2001:db8::3" {
		t.Fatalf("dual-stack got %s, want 192.0.2.2,2001:db8::3", got)
	}
	// Listed by two Services: neither adopts it.
	a.SetStatus("ns/one", ips("203.0.113.2"))
	a.SetStatus("ns/two", ips("203.0.113.2"))
	if got := addrs(mustAssign(t, a, req("ns/one", withPool("q")))); got == "203.0.113.2" {
		t.Fatal("adopted an address another Service's status lists too")
	}
}

// TestSharersAndStatus checks that no Service joins an address that a
// Service which does not hold it still lists, and that the address is
// freed only with the last owner and the last status gone.
func TestSharersAndStatus(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	x := mustAssign(t, a, req("ns/x", withShare("k", 80)))
	mustAssign(t, a, req("ns/y", withShare("k", 443)))
	a.SetStatus("ns/x", x.Addrs)
	a.SetStatus("ns/y", x.Addrs)
	a.Release("ns/x") // deleted; its status goes when the object does
	_, err := a.Assign(req("ns/z", withShare("k", 53)))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/share-key", "the shared address 192.0.2.0 is listed in the status of Service ns/x, which does not share it")
	_, err = a.Assign(req("ns/w", withShare("k", 22), withIPs(addrs(x))))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "192.0.2.0 is listed in the status of Service ns/x")
	// y, which holds it, is not disturbed.
	if got := mustAssign(t, a, req("ns/y", withShare("k", 443))); addrs(got) != addrs(x) {
		t.Fatalf("y moved to %s", addrs(got))
	}
	if a.SetStatus("ns/x", nil) {
		t.Fatal("freed while y holds it")
	}
	if got := mustAssign(t, a, req("ns/z", withShare("k", 53))); addrs(got) != addrs(x) {
		t.Fatalf("z joined at %s, want the group's %s", addrs(got), addrs(x))
	}
	a.Release("ns/y")
	a.Release("ns/z")
	a.SetStatus("ns/z", x.Addrs)
	if a.SetStatus("ns/y", nil) {
		t.Fatal("freed while z's status still lists it")
	}
	if !a.SetStatus("ns/z", nil) {
		t.Fatal("not freed with the last owner and the last status gone")
	}
}

// TestRefusedServiceBlocksJoiners covers the restart that would flip an
// address: o and p share it; p drops its share key, and the controller
// restarts before p is moved. The restart gives the address to the older o
// and refuses p, whose status still lists it. Had q joined o's address
// then, the next restart after o's deletion would give it to p if p is
// older than q, and take it from q.
func TestRefusedServiceBlocksJoiners(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	addr := ips("192.0.2.0")
	a.SetStatus("ns/o", addr)
	a.SetStatus("ns/p", addr)
	if err := a.Restore(req("ns/o", withShare("k", 80)), addr); err != nil {
		t.Fatal(err)
	}
	err := a.Restore(req("ns/p", withShare("", 81)), addr)
	wantErr(t, err, ReasonAddressInUse, "status.loadBalancer.ingress", "192.0.2.0 is already used by Service ns/o")
	_, err = a.Assign(req("ns/q", withShare("k", 443)))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/share-key", "listed in the status of Service ns/p")
	// p gets a fresh address; once its status shows it, q may join.
	if got := addrs(mustAssign(t, a, req("ns/p", withShare("", 81)))); got == "192.0.2.0" {
		t.Fatal("p kept an address o holds")
	}
	p, _ := a.Lookup("ns/p")
	a.SetStatus("ns/p", p.Addrs)
	if got := addrs(mustAssign(t, a, req("ns/q", withShare("k", 443)))); got != "192.0.2.0" {
		t.Fatalf("q got %s, want to join o at 192.0.2.0", got)
	}
}

// TestRestoreIsIdempotent checks that restoring a Service twice, or after
// it was assigned, changes nothing.
func TestRestoreIsIdempotent(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	if err := a.Restore(req("ns/a"), ips("192.0.2.2")); err != nil {
		t.Fatal(err)
	}
	if err := a.Restore(req("ns/a"), ips("192.0.2.3")); err != nil {
		t.Fatalf("second Restore: %v", err)
	}
	if got, _ := a.Lookup("ns/a"); addrs(got) != "192.0.2.2" {
		t.Fatalf("a second Restore changed the allocation to %s", addrs(got))
	}
	if got := freeIPv4(a, "p"); got != 3 {
		t.Fatalf("free = %d, want 3", got)
	}
}
