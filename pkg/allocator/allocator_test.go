package allocator

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

func pool(t testing.TB, name string, addrs ...string) Pool {
	return Pool{Name: name, Ranges: mustRanges(t, addrs...), AutoAssign: true}
}

func req(key string, mods ...func(*Request)) Request {
	ns, _, _ := strings.Cut(key, "/")
	r := Request{Key: key, Namespace: ns, Families: []Family{IPv4}, Backends: "cluster", Ports: []Port{{"TCP", 80}}, IPsSource: "keeplb.io/ips"}
	for _, m := range mods {
		m(&r)
	}
	return r
}

func withPool(p string) func(*Request) { return func(r *Request) { r.Pool = p } }
func withIPs(ips ...string) func(*Request) {
	return func(r *Request) {
		for _, s := range ips {
			r.IPs = append(r.IPs, netip.MustParseAddr(s))
		}
	}
}
func withShare(k string, ports ...int32) func(*Request) {
	return func(r *Request) {
		r.ShareKey = k
		r.Ports = nil
		for _, p := range ports {
			r.Ports = append(r.Ports, Port{"TCP", p})
		}
	}
}
func withFamilies(p Policy, fs ...Family) func(*Request) {
	return func(r *Request) { r.Policy, r.Families = p, fs }
}

func addrs(al Allocation) string {
	s := make([]string, len(al.Addrs))
	for i, a := range al.Addrs {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func mustAssign(t *testing.T, a *Allocator, r Request) Allocation {
	t.Helper()
	al, err := a.Assign(r)
	if err != nil {
		t.Fatalf("Assign(%s): %v", r.Key, err)
	}
	return al
}

func wantErr(t *testing.T, err error, reason Reason, field, text string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error = %v, want *Error %s", err, reason)
	}
	if e.Reason != reason || e.Field != field || !strings.Contains(e.Msg, text) {
		t.Fatalf("error = {%s %s %q}, want {%s %s ...%q...}", e.Reason, e.Field, e.Msg, reason, field, text)
	}
}

func TestAssignSequentialAndStable(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	for i, want := range []string{"192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"} {
		al := mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i)))
		if addrs(al) != want || al.Pool != "p" {
			t.Fatalf("s%d got %s from %s, want %s from p", i, addrs(al), al.Pool, want)
		}
	}
	// Asking again returns the same address.
	if al := mustAssign(t, a, req("ns/s1")); addrs(al) != "192.0.2.1" {
		t.Fatalf("re-assign moved s1 to %s", addrs(al))
	}
	_, err := a.Assign(req("ns/s4"))
	wantErr(t, err, ReasonExhausted, "", "IPPool p has no free IPv4 address")
	if got := a.Pending(); !slices.Equal(got, []string{"ns/s4"}) {
		t.Fatalf("Pending = %v", got)
	}
	if !a.Release("ns/s2") {
		t.Fatal("Release freed nothing")
	}
	if al := mustAssign(t, a, req("ns/s4")); addrs(al) != "192.0.2.2" {
		t.Fatalf("s4 got %s, want the freed 192.0.2.2", addrs(al))
	}
	if len(a.Pending()) != 0 {
		t.Fatalf("Pending = %v after success", a.Pending())
	}
}

func TestFreedAddressIsReusedLast(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/29")})
	mustAssign(t, a, req("ns/a"))
	mustAssign(t, a, req("ns/b"))
	a.Release("ns/a")
	if got := addrs(mustAssign(t, a, req("ns/c"))); got != "192.0.2.2" {
		t.Fatalf("c got %s, want 192.0.2.2 (not the just-freed .0)", got)
	}
}

func TestPoolSelection(t *testing.T) {
	manual := pool(t, "manual", "198.51.100.0/30")
	manual.AutoAssign = false
	low := pool(t, "low", "192.0.2.0/30")
	high := pool(t, "high", "203.0.113.0/30")
	high.Priority = 10
	teamOnly := pool(t, "team", "192.0.2.128/30")
	teamOnly.Priority = 20
	teamOnly.Namespaces = []string{"team"}
	labelled := pool(t, "labelled", "192.0.2.64/30")
	labelled.Priority = 30
	labelled.ServiceSelector = labels.SelectorFromSet(labels.Set{"tier": "edge"})
	nsSel := pool(t, "nssel", "192.0.2.96/30")
	nsSel.AutoAssign = false
	nsSel.NamespaceSelector = labels.SelectorFromSet(labels.Set{"env": "prod"})

	a := New()
	a.SetPools([]Pool{manual, low, high, teamOnly, labelled, nsSel})
	tests := []struct {
		name      string
		r         Request
		want      string
		wantPool  string
		reason    Reason
		field     string
		errSubstr string
	}{
		{name: "highest priority admitting pool", r: req("ns/a"), want: "203.0.113.0", wantPool: "high"},
		{name: "namespace pool first for its namespace", r: req("team/a"), want: "192.0.2.128", wantPool: "team"},
		{name: "service selector", r: req("ns/b", func(r *Request) { r.ServiceLabels = map[string]string{"tier": "edge"} }), want: "192.0.2.64", wantPool: "labelled"},
		{name: "named non-auto pool", r: req("ns/c", withPool("manual")), want: "198.51.100.0", wantPool: "manual"},
		{name: "address in non-auto pool", r: req("ns/d", withIPs("198.51.100.3")), want: "198.51.100.3", wantPool: "manual"},
		{name: "unknown pool", r: req("ns/e", withPool("nope")), reason: ReasonPoolNotFound, field: "keeplb.io/pool", errSubstr: `IPPool "nope" does not exist`},
		{name: "namespace not admitted", r: req("ns/f", withPool("team")), reason: ReasonNotAdmitted, field: "keeplb.io/pool", errSubstr: "admits only namespaces team"},
		{name: "namespace selector not matching", r: req("ns/g", withPool("nssel")), reason: ReasonNotAdmitted, field: "keeplb.io/pool", errSubstr: "namespaces with labels env=prod"},
		{name: "namespace selector matching", r: req("ns/h", withPool("nssel"), func(r *Request) { r.NamespaceLabels = map[string]string{"env": "prod"} }), want: "192.0.2.96", wantPool: "nssel"},
		{name: "address outside pools", r: req("ns/i", withIPs("100.64.0.1")), reason: ReasonOutsidePools, field: "keeplb.io/ips", errSubstr: "100.64.0.1 is in no IPPool"},
		{name: "address and pool disagree", r: req("ns/j", withIPs("192.0.2.1"), withPool("high")), reason: ReasonInvalid, field: "keeplb.io/ips", errSubstr: "not in the IPPool high"},
		{name: "address taken", r: req("ns/k", withIPs("203.0.113.0")), reason: ReasonAddressInUse, field: "keeplb.io/ips", errSubstr: "already used by Service ns/a"},
		{name: "address in pool not admitting", r: req("ns/l", withIPs("192.0.2.129")), reason: ReasonNotAdmitted, field: "keeplb.io/ips", errSubstr: "does not admit"},
		{name: "wrong family address", r: req("ns/m", withIPs("2001:db8::1")), reason: ReasonFamily, field: "keeplb.io/ips", errSubstr: "is IPv6 but the Service's spec.ipFamilies is [IPv4]"},
		// Regression: a SingleStack Service (one family in
		// spec.ipFamilies, as the API server requires) given two
		// addresses was told its IPv6 address has the wrong family; the
		// SingleStack message could never be reached.
		{name: "two addresses single stack", r: req("ns/n", withIPs("192.0.2.1", "2001:db8::1"), withFamilies(SingleStack, IPv4)), reason: ReasonFamily, field: "keeplb.io/ips",
			errSubstr: "gives 2 addresses (192.0.2.1, 2001:db8::1) but the Service is SingleStack; give only its IPv4 address, or set spec.ipFamilyPolicy to PreferDualStack or RequireDualStack"},
		{name: "two addresses single stack IPv6", r: req("ns/n6", withIPs("192.0.2.1", "2001:db8::1"), withFamilies(SingleStack, IPv6)), reason: ReasonFamily, field: "keeplb.io/ips", errSubstr: "give only its IPv6 address"},
		{name: "two of one family", r: req("ns/o", withIPs("192.0.2.1", "192.0.2.2")), reason: ReasonInvalid, field: "keeplb.io/ips", errSubstr: "two IPv4 addresses"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			al, err := a.Assign(tc.r)
			if tc.reason != "" {
				wantErr(t, err, tc.reason, tc.field, tc.errSubstr)
				if _, ok := a.Lookup(tc.r.Key); ok {
					t.Fatal("a failed Assign recorded an allocation")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if addrs(al) != tc.want || al.Pool != tc.wantPool {
				t.Fatalf("got %s from %q, want %s from %q", addrs(al), al.Pool, tc.want, tc.wantPool)
			}
		})
	}
}

// TestSingleStackTwoAddressesEvent checks the whole AllocationFailed event
// text (the provider records "<reason>: <error>") for a SingleStack Service
// whose keeplb.io/ips gives both families.
func TestSingleStackTwoAddressesEvent(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30", "2001:db8::/126")})
	_, err := a.Assign(req("ns/s", withIPs("192.0.2.1", "2001:db8::1"), withFamilies(SingleStack, IPv4)))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error = %v", err)
	}
	want := "FamilyUnavailable: keeplb.io/ips: gives 2 addresses (192.0.2.1, 2001:db8::1) but the Service is SingleStack; give only its IPv4 address, or set spec.ipFamilyPolicy to PreferDualStack or RequireDualStack"
	if got := fmt.Sprintf("%s: %v", e.Reason, err); got != want {
		t.Fatalf("event message\n got %s\nwant %s", got, want)
	}
}

func TestNoPoolAdmits(t *testing.T) {
	p := pool(t, "team", "192.0.2.0/30")
	p.Namespaces = []string{"team"}
	a := New()
	a.SetPools([]Pool{p})
	_, err := a.Assign(req("other/a"))
	wantErr(t, err, ReasonNoPool, "", "IPPool team admits only namespaces team")
	a2 := New()
	_, err = a2.Assign(req("other/a"))
	wantErr(t, err, ReasonNoPool, "", "create an IPPool for namespace other")
}

func TestUnmanagedAddresses(t *testing.T) {
	a := New(netip.MustParsePrefix("100.64.0.0/10"))
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	al := mustAssign(t, a, req("ns/a", withIPs("100.64.0.1")))
	if al.Pool != "" || addrs(al) != "100.64.0.1" {
		t.Fatalf("got %v", al)
	}
	_, err := a.Assign(req("ns/b", withIPs("100.64.0.1")))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "already used by Service ns/a")
	// Dropping the annotation keeps the address: nothing moves silently.
	if got := mustAssign(t, a, req("ns/a")); addrs(got) != "100.64.0.1" {
		t.Fatalf("without the annotation got %v, want to keep 100.64.0.1", got)
	}
	// Naming a pool moves it, and frees the unmanaged address.
	if got := mustAssign(t, a, req("ns/a", withPool("p"))); got.Pool != "p" {
		t.Fatalf("with keeplb.io/pool got %v, want an address of pool p", got)
	}
	if got := mustAssign(t, a, req("ns/b", withIPs("100.64.0.1"))); addrs(got) != "100.64.0.1" {
		t.Fatalf("the unmanaged address was not released: %v", got)
	}
}

// TestUnmanagedOnlyFromTheAllowList: outside the pools a tenant may name
// only what the operator listed, and never with kube-proxy forwarding. On
// main --allow-unmanaged-ips let any Service claim any address, a public
// resolver or the API server's included, and with kube-proxy forwarding
// have every node intercept it (CVE-2020-8554).
func TestUnmanagedOnlyFromTheAllowList(t *testing.T) {
	a := New(netip.MustParsePrefix("203.0.113.0/28"), netip.MustParsePrefix("2001:db8:f::/64"))
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	mustAssign(t, a, req("ns/in", withIPs("203.0.113.5")))
	_, err := a.Assign(req("ns/resolver", withIPs("8.8.8.8")))
	wantErr(t, err, ReasonOutsidePools, "keeplb.io/ips", "--allow-unmanaged-ips 203.0.113.0/28,2001:db8:f::/64")
	_, err = a.Assign(req("ns/edge", withIPs("203.0.113.16")))
	wantErr(t, err, ReasonOutsidePools, "keeplb.io/ips", "nor in the ranges the controller allows")
	kubeProxy := func(r *Request) { r.KubeProxy = true }
	_, err = a.Assign(req("ns/intercept", withIPs("203.0.113.6"), kubeProxy))
	wantErr(t, err, ReasonOutsidePools, "keeplb.io/forwarding", "kube-proxy on every node would intercept it")
	// In a pool, kube-proxy forwarding is the operator's choice.
	mustAssign(t, a, req("ns/pooled", withIPs("192.0.2.1"), kubeProxy))

	// Without a list, nothing outside the pools.
	b := New()
	b.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	_, err = b.Assign(req("ns/in", withIPs("203.0.113.5")))
	wantErr(t, err, ReasonOutsidePools, "keeplb.io/ips", "is in no IPPool; add it")
}

// TestNothingMovesSilently covers pool edits and restarts that must leave
// every address where it is.
func TestNothingMovesSilently(t *testing.T) {
	t.Run("restart outside every pool", func(t *testing.T) {
		a := New()
		a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
		if err := a.Restore(req("ns/a"), []netip.Addr{netip.MustParseAddr("198.51.100.7")}); err != nil {
			t.Fatal(err)
		}
		if got := mustAssign(t, a, req("ns/a")); addrs(got) != "198.51.100.7" {
			t.Fatalf("after a restart the out-of-pool address moved to %v", got)
		}
	})
	t.Run("older pool widened over a named pool's address", func(t *testing.T) {
		older := pool(t, "older", "192.0.2.0/30")
		older.Order = 1
		newer := pool(t, "newer", "192.0.2.8/30")
		newer.Order = 2
		a := New()
		a.SetPools([]Pool{older, newer})
		first := mustAssign(t, a, req("ns/a", withPool("newer")))
		older.Ranges = mustRanges(t, "192.0.2.0/28")
		orphaned := a.SetPools([]Pool{older, newer})
		if !slices.Equal(orphaned, []string{"ns/a"}) {
			t.Fatalf("orphaned = %v; the Service's pool lost its address and must be warned", orphaned)
		}
		if got := mustAssign(t, a, req("ns/a", withPool("newer"))); addrs(got) != addrs(first) || got.Pool != "newer" {
			t.Fatalf("widening an older pool moved the Service from %v to %v", first, got)
		}
		st := a.Stats()
		if st["newer"].OutOfRange != 1 || st["newer"].Families[IPv4].Used != 1 || st["older"].Families[IPv4].Used != 0 {
			t.Fatalf("stats: newer %+v older %+v", st["newer"], st["older"])
		}
		// After a restart too.
		b := New()
		b.SetPools([]Pool{older, newer})
		if err := b.Restore(req("ns/a", withPool("newer")), first.Addrs); err != nil {
			t.Fatal(err)
		}
		if got := mustAssign(t, b, req("ns/a", withPool("newer"))); addrs(got) != addrs(first) {
			t.Fatalf("after a restart the Service moved from %v to %v", first, got)
		}
		// Deleting its pool while another contains the address, then
		// re-creating the pool, moves nothing either.
		b.SetPools([]Pool{older})
		if got := mustAssign(t, b, req("ns/a", withPool("newer"))); addrs(got) != addrs(first) {
			t.Fatalf("deleting the pool moved the Service from %v to %v", first, got)
		}
		b.SetPools([]Pool{older, newer})
		if got := mustAssign(t, b, req("ns/a", withPool("newer"))); addrs(got) != addrs(first) {
			t.Fatalf("re-creating the pool moved the Service from %v to %v", first, got)
		}
		// Its address is not handed to anyone else.
		for i := range 15 {
			if got := mustAssign(t, b, req(fmt.Sprintf("ns/o%d", i), withPool("older"))); addrs(got) == addrs(first) {
				t.Fatalf("%s handed out twice", addrs(got))
			}
		}
	})
	t.Run("PreferDualStack fallback is stable", func(t *testing.T) {
		a := New()
		a.SetPools([]Pool{pool(t, "v6", "2001:db8::/126")})
		r := req("ns/a", withFamilies(PreferDualStack, IPv4, IPv6))
		first := mustAssign(t, a, r)
		for range 5 {
			if got := mustAssign(t, a, r); addrs(got) != addrs(first) {
				t.Fatalf("a fallen-back PreferDualStack Service moved from %v to %v", first, got)
			}
		}
		// When the primary family appears, it is added and the IPv6 kept.
		a.SetPools([]Pool{pool(t, "v6", "2001:db8::/126", "192.0.2.0/30")})
		if got := mustAssign(t, a, r); addrs(got) != "192.0.2.0,"+addrs(first) {
			t.Fatalf("got %v", got)
		}
	})
}

func TestSharing(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	web := mustAssign(t, a, req("ns/web", withShare("k", 80, 443)))
	dns := mustAssign(t, a, req("ns/dns", withShare("k", 53)))
	if addrs(web) != addrs(dns) {
		t.Fatalf("sharers got %s and %s", addrs(web), addrs(dns))
	}
	_, err := a.Assign(req("ns/clash", withShare("k", 443)))
	wantErr(t, err, ReasonSharingConflict, "keeplb.io/share-key", "both use port TCP/443")
	_, err = a.Assign(req("ns/local", withShare("k", 8080), func(r *Request) { r.Backends = "app=x" }))
	wantErr(t, err, ReasonSharingConflict, "keeplb.io/share-key", "externalTrafficPolicy Cluster")
	// Same key, other namespace: a different group.
	if other := mustAssign(t, a, req("other/web", withShare("k", 80))); addrs(other) == addrs(web) {
		t.Fatal("a share key crossed namespaces")
	}
	// Explicit address of a group without the key is refused.
	_, err = a.Assign(req("ns/x", withIPs(addrs(web)), withShare("", 9)))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "give both Services the same keeplb.io/share-key")
	// Explicit address with the key joins.
	if got := mustAssign(t, a, req("ns/y", withIPs(addrs(web)), withShare("k", 9))); addrs(got) != addrs(web) {
		t.Fatalf("joining by address got %s", addrs(got))
	}
	// The address is freed only with its last owner.
	a.Release("ns/web")
	a.Release("ns/dns")
	if got := mustAssign(t, a, req("ns/z", withShare("k", 10))); addrs(got) != addrs(web) {
		t.Fatalf("the group lost its address while ns/y holds it: %s", addrs(got))
	}
	// Leaving the group gives the Service its own address.
	left := mustAssign(t, a, req("ns/z", withShare("", 10)))
	if addrs(left) == addrs(web) {
		t.Fatal("a Service that dropped its share key kept the shared address")
	}
}

func TestDualStack(t *testing.T) {
	v4only := pool(t, "v4", "192.0.2.0/30")
	v4only.Priority = 5
	both := pool(t, "both", "198.51.100.0/31", "2001:db8::/127")
	a := New()
	a.SetPools([]Pool{v4only, both})

	got := mustAssign(t, a, req("ns/req", withFamilies(RequireDualStack, IPv4, IPv6)))
	if addrs(got) != "198.51.100.0,2001:db8::" || got.Pool != "both" {
		t.Fatalf("RequireDualStack got %v", got)
	}
	got = mustAssign(t, a, req("ns/v6first", withFamilies(RequireDualStack, IPv6, IPv4)))
	if addrs(got) != "2001:db8::1,198.51.100.1" {
		t.Fatalf("primary family must come first: %v", got)
	}
	_, err := a.Assign(req("ns/req2", withFamilies(RequireDualStack, IPv4, IPv6)))
	wantErr(t, err, ReasonExhausted, "", "IPPool both has no free IPv4+IPv6 address")
	got = mustAssign(t, a, req("ns/prefer", withFamilies(PreferDualStack, IPv4, IPv6)))
	if addrs(got) != "192.0.2.0" || got.Pool != "v4" {
		t.Fatalf("PreferDualStack must fall back to one family: %v", got)
	}
	_, err = a.Assign(req("ns/single6", withFamilies(SingleStack, IPv6)))
	wantErr(t, err, ReasonExhausted, "", "IPPool both has no free IPv6 address")
	a2 := New()
	a2.SetPools([]Pool{v4only})
	_, err = a2.Assign(req("ns/req", withFamilies(RequireDualStack, IPv4, IPv6)))
	wantErr(t, err, ReasonFamily, "", "no admissible IPPool has both IPv4 and IPv6")
	_, err = a2.Assign(req("ns/s6", withFamilies(SingleStack, IPv6)))
	wantErr(t, err, ReasonFamily, "", "no admissible IPPool has IPv6 addresses")

	// Growing a single-stack Service to dual-stack keeps its IPv4 address.
	a3 := New()
	a3.SetPools([]Pool{pool(t, "both", "198.51.100.0/30", "2001:db8::/126")})
	first := mustAssign(t, a3, req("ns/s"))
	grown := mustAssign(t, a3, req("ns/s", withFamilies(RequireDualStack, IPv4, IPv6)))
	if grown.Addrs[0] != first.Addrs[0] || len(grown.Addrs) != 2 {
		t.Fatalf("growing to dual-stack moved the address: %v -> %v", first, grown)
	}
	shrunk := mustAssign(t, a3, req("ns/s"))
	if addrs(shrunk) != addrs(first) {
		t.Fatalf("shrinking to single-stack: %v", shrunk)
	}
	if st := a3.Stats()["both"].Families[IPv6]; st.Used != 0 || st.Free.Int64() != 3 {
		t.Fatalf("the IPv6 address was not released: %+v", st)
	}
	if got := mustAssign(t, a3, req("ns/t", withFamilies(SingleStack, IPv6))); addrs(got) != "2001:db8::2" {
		t.Fatalf("got %v, want 2001:db8::2 (the cursor goes on past the released 2001:db8::1)", got)
	}
}

func TestPoolEditsNeverMoveAddresses(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/29")})
	for i := range 6 {
		mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i)))
	}
	orphaned := a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	if want := []string{"ns/s4", "ns/s5"}; !slices.Equal(orphaned, want) {
		t.Fatalf("orphaned = %v, want %v", orphaned, want)
	}
	if got := mustAssign(t, a, req("ns/s5")); addrs(got) != "192.0.2.5" {
		t.Fatalf("shrinking the pool moved s5 to %s", addrs(got))
	}
	st := a.Stats()["p"]
	if st.Families[IPv4].Used != 6 || st.OutOfRange != 2 || st.Families[IPv4].Free.Sign() != 0 || st.Families[IPv4].Total.Int64() != 4 {
		t.Fatalf("stats = %+v", st)
	}
	// Deleting the pool keeps every address; nothing is orphaned twice.
	if orphaned := a.SetPools(nil); len(orphaned) != 4 {
		t.Fatalf("orphaned on delete = %v", orphaned)
	}
	if got := mustAssign(t, a, req("ns/s0")); addrs(got) != "192.0.2.0" {
		t.Fatalf("deleting the pool moved s0 to %s", addrs(got))
	}
	// Growing it back re-attributes them and does not hand them out again.
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/28")})
	if got := mustAssign(t, a, req("ns/new")); addrs(got) != "192.0.2.6" {
		t.Fatalf("new Service got %s, want 192.0.2.6", addrs(got))
	}
	if st := a.Stats()["p"]; st.OutOfRange != 0 || st.Families[IPv4].Used != 7 || st.Families[IPv4].Free.Int64() != 9 {
		t.Fatalf("stats after growing = %+v", st)
	}
}

func TestConflictingPools(t *testing.T) {
	older := pool(t, "older", "192.0.2.0/30")
	older.Order = 1
	newer := pool(t, "newer", "192.0.2.2-192.0.2.5")
	newer.Order = 2
	newer.Priority = 100
	a := New()
	a.SetPools([]Pool{newer, older})
	st := a.Stats()
	if !slices.Equal(st["newer"].ConflictsWith, []string{"older"}) || len(st["older"].ConflictsWith) != 0 {
		t.Fatalf("conflicts: %+v", st)
	}
	if st["newer"].Families[IPv4].Total.Int64() != 2 {
		t.Fatalf("newer must allocate only outside the overlap: %+v", st["newer"])
	}
	if got := mustAssign(t, a, req("ns/a", withIPs("192.0.2.3"))); got.Pool != "older" {
		t.Fatalf("overlap attributed to %s", got.Pool)
	}
	for _, want := range []string{"192.0.2.4", "192.0.2.5"} {
		if got := mustAssign(t, a, req("ns/"+want, withPool("newer"))); addrs(got) != want {
			t.Fatalf("newer gave %s, want %s", addrs(got), want)
		}
	}
	_, err := a.Assign(req("ns/b", withPool("newer")))
	wantErr(t, err, ReasonExhausted, "keeplb.io/pool", "IPPool newer has no free")
}

func TestAvoidBuggyIPs(t *testing.T) {
	p := pool(t, "p", "192.0.2.254-192.0.3.1")
	p.AvoidBuggyIPs = true
	a := New()
	a.SetPools([]Pool{p})
	var got []string
	for i := range 2 {
		got = append(got, addrs(mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i)))))
	}
	if strings.Join(got, ",") != "192.0.2.254,192.0.3.1" {
		t.Fatalf("got %v", got)
	}
	// Named explicitly, a .0 address is allowed, and not reused when freed.
	mustAssign(t, a, req("ns/x", withIPs("192.0.3.0")))
	a.Release("ns/x")
	a.Release("ns/s0")
	if got := addrs(mustAssign(t, a, req("ns/y"))); got != "192.0.2.254" {
		t.Fatalf("got %s, want 192.0.2.254", got)
	}
}

// TestAvoidBuggyIPsIsCheap is a regression test: avoidBuggyIPs cut a pool
// into one range per /24, 27.6 MiB for a /8 and about 7 GiB for 0.0.0.0/0.
// The .0 and .255 addresses are now skipped lazily, so a pool costs the same
// whatever its size, and its counts stay exact.
func TestAvoidBuggyIPsIsCheap(t *testing.T) {
	for _, tc := range []struct {
		cidr  string
		total int64 // 2^(32-bits) less two addresses per /24
		first string
	}{
		{"10.0.0.0/8", 1<<24 - 1<<17, "10.0.0.1"}, // first, so the old code fails before 0.0.0.0/0 eats the machine
		{"0.0.0.0/0", 1<<32 - 1<<25, "0.0.0.1"},
	} {
		p := pool(t, "p", tc.cidr)
		p.AvoidBuggyIPs = true
		a := New()
		if heap := allocated(func() { a.SetPools([]Pool{p}) }); heap > 64<<10 {
			t.Fatalf("SetPools(%s with avoidBuggyIPs) allocated %d bytes, want at most 64 KiB", tc.cidr, heap)
		}
		st := a.Stats()["p"].Families[IPv4]
		if st.Total.Int64() != tc.total || st.Free.Int64() != tc.total {
			t.Fatalf("%s: total %s free %s, want both %d", tc.cidr, st.Total, st.Free, tc.total)
		}
		if got := addrs(mustAssign(t, a, req("ns/a"))); got != tc.first {
			t.Fatalf("%s: first address %s, want %s", tc.cidr, got, tc.first)
		}
		if st := a.Stats()["p"].Families[IPv4]; st.Free.Int64() != tc.total-1 || st.Used != 1 {
			t.Fatalf("%s: after one Assign free %s used %d", tc.cidr, st.Free, st.Used)
		}
	}
}

// allocated returns the bytes f allocates on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestAvoidBuggyIPsFillsExactly fills a pool that crosses /24 boundaries
// and checks that every address but the .0 and .255 ones is handed out,
// once, with exact counts all along.
func TestAvoidBuggyIPsFillsExactly(t *testing.T) {
	p := pool(t, "p", "192.0.2.0/23", "198.51.100.255/32", "198.51.100.0-198.51.100.2")
	p.AvoidBuggyIPs = true
	a := New()
	a.SetPools([]Pool{p})
	const total = 2*254 + 2
	seen := map[netip.Addr]bool{}
	for i := range total {
		al := mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i)))
		addr := al.Addrs[0]
		if isBuggy(addr) || seen[addr] {
			t.Fatalf("s%d got %s (buggy %v, twice %v)", i, addr, isBuggy(addr), seen[addr])
		}
		seen[addr] = true
		if st := a.Stats()["p"].Families[IPv4]; st.Total.Int64() != total || st.Free.Int64() != int64(total-i-1) {
			t.Fatalf("after s%d: total %s free %s, want %d and %d", i, st.Total, st.Free, total, total-i-1)
		}
	}
	_, err := a.Assign(req("ns/more"))
	wantErr(t, err, ReasonExhausted, "", "IPPool p has no free IPv4 address")
	if !a.Release("ns/s300") || a.Stats()["p"].Families[IPv4].Free.Int64() != 1 {
		t.Fatal("releasing one address did not free one")
	}
}

// TestIPv6SubnetRouterAnycastSkipped is a regression test: the first IPv6
// Service of a pool 2001:db8::/64 was given 2001:db8::, the subnet-router
// anycast address (RFC 4291 2.6.1), which every router of the subnet
// answers. A CIDR's first address is skipped; a first-last range is taken
// literally; a /127 and a /128 have no such address.
func TestIPv6SubnetRouterAnycastSkipped(t *testing.T) {
	v6 := withFamilies(SingleStack, IPv6)
	for _, tc := range []struct {
		entry, first, total string
	}{
		{"2001:db8::/64", "2001:db8::1", "18446744073709551615"},
		{"2001:db8::/126", "2001:db8::1", "3"},
		{"2001:db8::-2001:db8::3", "2001:db8::", "4"},
		{"2001:db8::/127", "2001:db8::", "2"},
		{"2001:db8::/128", "2001:db8::", "1"},
		{"192.0.2.0/30", "192.0.2.0", "4"}, // IPv4 has no such address
	} {
		a := New()
		a.SetPools([]Pool{pool(t, "p", tc.entry)})
		r := req("ns/a", v6)
		f := IPv6
		if !strings.Contains(tc.entry, ":") {
			r, f = req("ns/a"), IPv4
		}
		if got := addrs(mustAssign(t, a, r)); got != tc.first {
			t.Errorf("%s: first address %s, want %s", tc.entry, got, tc.first)
		}
		if got := a.Stats()["p"].Families[f].Total.String(); got != tc.total {
			t.Errorf("%s: total %s, want %s", tc.entry, got, tc.total)
		}
	}

	// Named explicitly, the address is given (as a .0 is with
	// avoidBuggyIPs), and not put back when released.
	a := New()
	a.SetPools([]Pool{pool(t, "p", "2001:db8::/126")})
	if got := addrs(mustAssign(t, a, req("ns/x", v6, withIPs("2001:db8::")))); got != "2001:db8::" {
		t.Fatalf("named explicitly got %s", got)
	}
	if a.Release("ns/x") {
		t.Fatal("releasing the anycast address put it in the free set")
	}
	for i := range 3 {
		if got := addrs(mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i), v6))); got == "2001:db8::" {
			t.Fatalf("s%d was given the released anycast address", i)
		}
	}

	// Where an older pool lists the address literally, it is that pool's.
	older := pool(t, "older", "2001:db8::-2001:db8::1")
	older.Order, older.Priority = 1, 10
	newer := pool(t, "newer", "2001:db8::/126")
	newer.Order = 2
	b := New()
	b.SetPools([]Pool{older, newer})
	if got := mustAssign(t, b, req("ns/a", v6)); addrs(got) != "2001:db8::" || got.Pool != "older" {
		t.Fatalf("got %v, want 2001:db8:: from older", got)
	}
	if st := b.Stats()["newer"].Families[IPv6]; st.Total.Int64() != 2 {
		t.Fatalf("newer total %s, want 2 (2001:db8::2 and ::3)", st.Total)
	}
}

func TestRestore(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/29")})
	if err := a.Restore(req("ns/a"), []netip.Addr{netip.MustParseAddr("192.0.2.3")}); err != nil {
		t.Fatal(err)
	}
	if err := a.Restore(req("ns/dup"), []netip.Addr{netip.MustParseAddr("192.0.2.3")}); err == nil {
		t.Fatal("Restore accepted one address for two non-sharing Services")
	}
	if got := addrs(mustAssign(t, a, req("ns/a"))); got != "192.0.2.3" {
		t.Fatalf("restored Service moved to %s", got)
	}
	if got := addrs(mustAssign(t, a, req("ns/dup"))); got != "192.0.2.4" {
		t.Fatalf("the duplicate got %s; new allocations go after the highest restored address", got)
	}
	// Restoring before the pools exist works too.
	b := New()
	if err := b.Restore(req("ns/a"), []netip.Addr{netip.MustParseAddr("192.0.2.0")}); err != nil {
		t.Fatal(err)
	}
	b.SetPools([]Pool{pool(t, "p", "192.0.2.0/31")})
	if got := addrs(mustAssign(t, b, req("ns/b"))); got != "192.0.2.1" {
		t.Fatalf("got %s, want 192.0.2.1", got)
	}
}

// TestZonedAddressesRefused is a regression test: a zoned address (a
// spec.loadBalancerIP of 2001:db8::5%eth0, which the API server only warns
// about) was recorded as a pool address, split the free set at zoned bounds,
// and later Services were handed zoned addresses.
func TestZonedAddressesRefused(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "v6", "2001:db8::/125")})
	zoned := req("ns/z", withFamilies(SingleStack, IPv6), func(r *Request) {
		r.IPs, r.IPsSource = []netip.Addr{netip.MustParseAddr("2001:db8::5%eth0")}, "spec.loadBalancerIP"
	})
	_, err := a.Assign(zoned)
	wantErr(t, err, ReasonInvalid, "spec.loadBalancerIP", "2001:db8::5%eth0 has a zone")
	err = a.Restore(req("ns/r", withFamilies(SingleStack, IPv6)), []netip.Addr{netip.MustParseAddr("2001:db8::6%eth0")})
	wantErr(t, err, ReasonInvalid, "status.loadBalancer.ingress", "has a zone")
	if _, ok := a.Lookup("ns/r"); ok {
		t.Fatal("Restore recorded a zoned address")
	}
	for i := range 7 { // 2001:db8::/125 less its subnet-router anycast address
		al := mustAssign(t, a, req(fmt.Sprintf("ns/s%d", i), withFamilies(SingleStack, IPv6)))
		if al.Addrs[0].Zone() != "" {
			t.Fatalf("s%d was handed the zoned %s", i, al.Addrs[0])
		}
	}
	if st := a.Stats()["v6"].Families[IPv6]; st.Used != 7 || st.Free.Sign() != 0 {
		t.Fatalf("stats = %+v, want all 7 used and none free", st)
	}
}

// TestMappedAddressesAreIPv4 checks that an IPv4-mapped address given to
// Assign or Restore is the IPv4 address: one key per address.
func TestMappedAddressesAreIPv4(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "192.0.2.0/30")})
	if err := a.Restore(req("ns/a"), []netip.Addr{netip.MustParseAddr("::ffff:192.0.2.1")}); err != nil {
		t.Fatal(err)
	}
	if al, _ := a.Lookup("ns/a"); addrs(al) != "192.0.2.1" {
		t.Fatalf("restored %s, want 192.0.2.1", addrs(al))
	}
	_, err := a.Assign(req("ns/b", withIPs("::ffff:192.0.2.1")))
	wantErr(t, err, ReasonAddressInUse, "keeplb.io/ips", "192.0.2.1 is already used by Service ns/a")
}

func TestConcurrentAssignNeverDuplicates(t *testing.T) {
	a := New()
	a.SetPools([]Pool{pool(t, "p", "10.0.0.0/22")})
	const n = 1000
	var wg sync.WaitGroup
	results := make([]Allocation, n)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				al, err := a.Assign(req(fmt.Sprintf("ns/s%d", i)))
				if err != nil {
					t.Error(err)
					return
				}
				results[i] = al
				if i%3 == 0 {
					a.Release(fmt.Sprintf("ns/s%d", i))
					results[i] = Allocation{}
				}
			}
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]int{}
	for i, al := range results {
		for _, addr := range al.Addrs {
			if j, dup := seen[addr]; dup {
				t.Fatalf("%s given to s%d and s%d", addr, j, i)
			}
			seen[addr] = i
		}
	}
	if got := a.Stats()["p"].Families[IPv4].Used; got != int64(len(seen)) {
		t.Fatalf("Used = %d, live allocations %d", got, len(seen))
	}
}
