package dataplane

import (
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// versioned gives every object a UID and resourceVersion, as the API
// server would, so that the Cache may reuse parts.
func versioned(in Inputs) Inputs {
	rv := 0
	next := func() string { rv++; return strconv.Itoa(rv) }
	for _, s := range in.Services {
		s.UID, s.ResourceVersion = types.UID("svc-"+s.Name), next()
	}
	for _, s := range in.Slices {
		s.UID, s.ResourceVersion = types.UID("es-"+s.Name), next()
	}
	for _, n := range in.Nodes {
		n.ResourceVersion = next()
	}
	for _, p := range in.Pools {
		p.ResourceVersion = next()
	}
	return in
}

// TestCacheMatchesDesired changes the inputs step by step and checks, at
// each step, that the Cache gives exactly what a fresh Desired gives, and
// recomputes only what changed.
func TestCacheMatchesDesired(t *testing.T) {
	in := cacheInputs()
	ca := &Cache{}
	rv := 1000
	bump := func(m *metav1.ObjectMeta) { rv++; m.ResourceVersion = strconv.Itoa(rv) }
	steps := []struct {
		name         string
		change       func()
		misses, hits int
	}{
		{"first sync", func() {}, 4, 0},
		{"nothing changed", func() {}, 0, 4},
		{"one endpoint of b terminates", func() {
			in.Slices[1].Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
			bump(&in.Slices[1].ObjectMeta)
		}, 1, 3},
		{"a's ports change", func() {
			in.Services[0].Spec.Ports[0].Port = 81
			bump(&in.Services[0].ObjectMeta)
		}, 1, 3},
		{"a node goes NotReady", func() {
			in.Nodes[1].Status.Conditions[0].Status = v1.ConditionFalse
			bump(&in.Nodes[1].ObjectMeta)
		}, 4, 0},
		{"c is deleted", func() { in.Services = in.Services[:2:2]; in.Services = append(in.Services, nil)[:2] }, 0, 2},
		{"the pool changes forwarding", func() {
			in.Pools[0].Spec.Forwarding = v1alpha1.ForwardingNodePort
			bump(&in.Pools[0].ObjectMeta)
		}, 2, 0},
	}
	for _, st := range steps {
		st.change()
		got, gotProblems := ca.Desired(in, "n1")
		sameAsDesired(t, st.name, in, got, gotProblems)
		if ca.Misses != st.misses || ca.Hits != st.hits {
			t.Errorf("%s: %d recomputed, %d reused; want %d, %d", st.name, ca.Misses, ca.Hits, st.misses, st.hits)
		}
	}
}

// cacheInputs are four Services of a pod-forwarding pool, then extra:
// a (the oldest), b (Local, with source ranges), c (contesting a's
// port), d (with an unknown scheduler); each with a slice of two ready
// endpoints; versioned.
func cacheInputs(extra ...*v1.Service) Inputs {
	in := cluster(v1alpha1.ForwardingPod)
	older := service("a", []string{"192.0.2.1"})
	older.CreationTimestamp = metav1.NewTime(time.Unix(50, 0))
	in.Services = append([]*v1.Service{
		older,
		service("b", []string{"192.0.2.2"}, local),
		service("c", []string{"192.0.2.1"}), // contests a's port 80
		service("d", []string{"192.0.2.4"}, annotate("keeplb.io/scheduler", "nope")),
	}, extra...)
	in.Services[1].Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24"}
	for _, s := range in.Services {
		in.Slices = append(in.Slices, slice(s.Name, s.Name+"-1", discoveryv1.AddressTypeIPv4, httpPort(8080),
			ep{"10.1.0.1", "n1", "ready"}, ep{"10.1.0.2", "n2", "ready"}))
	}
	return versioned(in)
}

// sameAsDesired checks that got and its problems are exactly what a
// fresh Desired gives for in on n1, and returns that.
func sameAsDesired(t *testing.T, step string, in Inputs, got State, gotProblems []Problem) State {
	t.Helper()
	want, wantProblems := Desired(in, "n1")
	if !got.IPVS.Equal(want.IPVS) {
		t.Errorf("%s: table\n%s\nwant\n%s", step, got.IPVS, want.IPVS)
	}
	if !slices.Equal(snatPairs(got.SNAT), snatPairs(want.SNAT)) || !reflect.DeepEqual(got.Owners, want.Owners) {
		t.Errorf("%s: SNAT %v, owners %v; want %v, %v", step, got.SNAT, got.Owners, want.SNAT, want.Owners)
	}
	if !reflect.DeepEqual(got.Guard, want.Guard) || !reflect.DeepEqual(got.SourceRanges, want.SourceRanges) {
		t.Errorf("%s: guard %+v, source ranges %v; want %+v, %v", step, got.Guard, got.SourceRanges, want.Guard, want.SourceRanges)
	}
	if !reflect.DeepEqual(got.kubeProxy, want.kubeProxy) {
		t.Errorf("%s: kube-proxy ports %v; want %v", step, got.kubeProxy, want.kubeProxy)
	}
	if !reflect.DeepEqual(gotProblems, wantProblems) {
		t.Errorf("%s: problems %v; want %v", step, gotProblems, wantProblems)
	}
	return want
}

// TestCacheWithoutVersions: objects without resourceVersions are always
// recomputed, so a hand-made input that changes in place is never stale.
func TestCacheWithoutVersions(t *testing.T) {
	in := cluster(v1alpha1.ForwardingPod)
	in.Services = []*v1.Service{service("a", []string{"192.0.2.1"})}
	in.Slices = []*discoveryv1.EndpointSlice{slice("a", "a-1", discoveryv1.AddressTypeIPv4, httpPort(8080), ep{"10.1.0.1", "n1", "ready"})}
	ca := &Cache{}
	ca.Desired(in, "n1")
	in.Slices[0].Endpoints[0].Addresses = []string{"10.1.0.9"}
	got, _ := ca.Desired(in, "n1")
	k := ipvs.Key{Address: addr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80}
	if reals := got.IPVS[k].Reals; len(reals) != 1 || reals[0].Address != addr("10.1.0.9") {
		t.Errorf("after the endpoint moved: %v; want 10.1.0.9:8080", reals)
	}
	if ca.Misses != 1 || ca.Hits != 0 {
		t.Errorf("%d recomputed, %d reused; want 1, 0", ca.Misses, ca.Hits)
	}
}

// benchInputs is n pod-forwarded Services with 10 ready endpoints each,
// on 10 nodes, versioned as the API server would.
func benchInputs(n int) Inputs {
	in := Inputs{Class: class, DefaultClass: true, Pools: []*v1alpha1.IPPool{pool("p", v1alpha1.ForwardingPod, "172.16.0.0/16")}}
	for i := range 10 {
		in.Nodes = append(in.Nodes, node(fmt.Sprintf("n%d", i), true, fmt.Sprintf("10.0.0.%d", i+1)))
	}
	for i := range n {
		vip := netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})
		name := fmt.Sprintf("s%05d", i)
		in.Services = append(in.Services, service(name, []string{vip.String()}))
		var eps []ep
		for j := range 10 {
			eps = append(eps, ep{netip.AddrFrom4([4]byte{10, byte(j + 1), byte(i >> 8), byte(i)}).String(), fmt.Sprintf("n%d", j), "ready"})
		}
		in.Slices = append(in.Slices, slice(name, name+"-1", discoveryv1.AddressTypeIPv4, httpPort(8080), eps...))
	}
	return versioned(in)
}

// BenchmarkEndpointChange measures a sync's pure work, from the objects
// an informer event changed to the IPVS diff, when one endpoint of one
// Service flips between ready and terminating, for 1,000 and 10,000
// Services forwarded to pods, 10 ready endpoints each, on 10 nodes,
// objects with resourceVersions as the API server gives them:
//
//   - full: the baseline: every Service computed (Desired, as a first
//     sync), then the full diff against the kernel's table (here the
//     previous desired table).
//   - cache: Cache.Compute given every object, reusing the Services whose
//     resourceVersions did not change, then the full diff: the speaker's
//     sync before Update.
//   - delta: Cache.Update given the one Service the event named, then the
//     diff of its virtual servers against what was programmed (the
//     diffDelta of Reconciler.SyncDelta): the speaker's sync now.
//
// Each op checks that the diff is the one weight change.
func BenchmarkEndpointChange(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		in := benchInputs(n)
		ours := func(ipvs.Key) bool { return true }
		i := n / 2
		s, svc := in.Slices[i], in.Services[i]
		rv := 1 << 20
		flip := func() {
			c := &s.Endpoints[3].Conditions
			if *c.Ready {
				*c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
			} else {
				*c = discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}
			}
			rv++
			s.ResourceVersion = strconv.Itoa(rv)
		}
		b.Run(fmt.Sprintf("%dx10/full", n), func(b *testing.B) {
			cur, _ := Desired(in, "n0")
			b.ReportAllocs()
			for b.Loop() {
				flip()
				want, _ := Desired(in, "n0")
				if ops := Diff(cur.IPVS, want.IPVS, ours); len(ops) != 1 {
					b.Fatalf("%d ops; want 1", len(ops))
				}
				cur = want
			}
		})
		b.Run(fmt.Sprintf("%dx10/cache", n), func(b *testing.B) {
			ca := &Cache{}
			st, _ := ca.Desired(in, "n0")
			cur := maps.Clone(st.IPVS)
			b.ReportAllocs()
			for b.Loop() {
				flip()
				want, _ := ca.Desired(in, "n0")
				if ops := Diff(cur, want.IPVS, ours); len(ops) != 1 || ca.Misses != 1 {
					b.Fatalf("%d ops, %d recomputed; want 1, 1", len(ops), ca.Misses)
				}
				cur = maps.Clone(want.IPVS)
			}
		})
		b.Run(fmt.Sprintf("%dx10/delta", n), func(b *testing.B) {
			ca := &Cache{}
			st, _, _ := ca.Compute(in, "n0")
			programmed := maps.Clone(st.IPVS)
			b.ReportAllocs()
			for b.Loop() {
				flip()
				st, _, d, _ := ca.Update(map[string]ServiceInputs{svc.Namespace + "/" + svc.Name: {Service: svc, Slices: []*discoveryv1.EndpointSlice{s}}}, nil)
				ops, want := diffDelta(programmed, st, d)
				if len(ops) != 1 || ops[0].Kind != UpdateReal || d.NFT {
					b.Fatalf("%v, nftables changed %v; want one UpdateReal, no nftables change", ops, d.NFT)
				}
				maps.Copy(programmed, want)
			}
		})
		// An endpoint that comes and goes changes the masquerading too,
		// which the Cache rebuilds whole (see Cache.snat).
		b.Run(fmt.Sprintf("%dx10/delta-add-remove", n), func(b *testing.B) {
			ca := &Cache{}
			st, _, _ := ca.Compute(in, "n0")
			programmed := maps.Clone(st.IPVS)
			extra := s.Endpoints[0]
			extra.Addresses = []string{"10.99.0.1"}
			full := s.Endpoints
			b.ReportAllocs()
			for b.Loop() {
				if len(s.Endpoints) == len(full) {
					s.Endpoints = append(slices.Clip(full), extra)
				} else {
					s.Endpoints = full
				}
				st, _, d, _ := ca.Update(map[string]ServiceInputs{svc.Namespace + "/" + svc.Name: {Service: svc, Slices: []*discoveryv1.EndpointSlice{s}}}, nil)
				ops, want := diffDelta(programmed, st, d)
				if len(ops) != 1 || !d.NFT {
					b.Fatalf("%v, nftables changed %v; want one op and an nftables change", ops, d.NFT)
				}
				maps.Copy(programmed, want)
			}
			s.Endpoints = full
		})
	}
}

// TestUpdateMatchesDesired changes Services and their EndpointSlices step
// by step, tells Update which Services changed, and checks at each step
// that it gives exactly what a full Desired gives, that it recomputed only
// those Services, and that its Delta names every virtual server whose
// entry changed and says whether the nftables side changed.
func TestUpdateMatchesDesired(t *testing.T) {
	in := cacheInputs(service("e", []string{"192.0.2.5", "2001:db8::5"}, annotate("keeplb.io/forwarding", "nodeport")))
	older := in.Services[0]
	byName := func(name string) *v1.Service {
		for _, s := range in.Services {
			if s.Name == name {
				return s
			}
		}
		return nil
	}
	sliceOf := func(name string) *discoveryv1.EndpointSlice {
		for _, s := range in.Slices {
			if s.Labels[discoveryv1.LabelServiceName] == name {
				return s
			}
		}
		return nil
	}
	ca := &Cache{}
	prev, _, d := ca.Compute(in, "n1")
	if !d.Full || !d.NFT {
		t.Fatalf("first Compute: Delta %+v; want Full and NFT", d)
	}
	contested := ipvs.Key{Address: addr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80}
	if owner := prev.Owners[contested]; owner != "ns/a" {
		t.Fatalf("%s is forwarded for %q; want the older ns/a", contested, owner)
	}
	prevIPVS := maps.Clone(prev.IPVS)
	prevSNAT, prevGuard, prevRanges := snatPairs(prev.SNAT), prev.Guard, maps.Clone(prev.SourceRanges)
	steps := []struct {
		name    string
		changed []string
		change  func()
		// owner is who should forward the contested port, when the step
		// is about it.
		owner string
	}{
		{"one endpoint of b terminates", []string{"b"}, func() {
			sliceOf("b").Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		}, ""},
		{"an endpoint joins d", []string{"d"}, func() {
			s := sliceOf("d")
			s.Endpoints = append(s.Endpoints, slice("d", "x", discoveryv1.AddressTypeIPv4, nil, ep{"10.1.0.3", "n3", "ready"}).Endpoints...)
		}, ""},
		{"an endpoint leaves d", []string{"d"}, func() {
			s := sliceOf("d")
			s.Endpoints = s.Endpoints[1:]
		}, ""},
		{"nothing changed, yet told so", []string{"a"}, func() {}, ""},
		{"a is deleted: c takes its port", []string{"a"}, func() {
			in.Services = slices.DeleteFunc(in.Services, func(s *v1.Service) bool { return s.Name == "a" })
		}, "ns/c"},
		{"a comes back, older: it takes the port again", []string{"a"}, func() { in.Services = append(in.Services, older) }, "ns/a"},
		{"c moves to another port", []string{"c"}, func() { byName("c").Spec.Ports[0].Port = 8080 }, ""},
		{"b's source ranges change", []string{"b"}, func() {
			byName("b").Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/25"}
		}, ""},
		{"d goes to kube-proxy", []string{"d"}, func() { byName("d").Annotations["keeplb.io/forwarding"] = "kube-proxy" }, ""},
		{"a new Service f, and its slice", []string{"f"}, func() {
			f := service("f", []string{"192.0.2.6"})
			f.UID, f.ResourceVersion = "svc-f", "1"
			in.Services = append(in.Services, f)
			in.Slices = append(in.Slices, slice("f", "f-1", discoveryv1.AddressTypeIPv4, httpPort(9090), ep{"10.1.0.7", "n2", "ready"}))
		}, ""},
		{"e's slice goes", []string{"e"}, func() {
			in.Slices = slices.DeleteFunc(in.Slices, func(s *discoveryv1.EndpointSlice) bool { return s.Name == "e-1" })
		}, ""},
		{"e is another class's now", []string{"e"}, func() { byName("e").Spec.LoadBalancerClass = ptr("other") }, ""},
		{"two at once", []string{"b", "f"}, func() {
			sliceOf("b").Endpoints[1].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false), Terminating: ptr(true)}
			byName("f").Spec.SessionAffinity = v1.ServiceAffinityClientIP
		}, ""},
	}
	for _, st := range steps {
		st.change()
		changed := map[string]ServiceInputs{}
		for _, name := range st.changed {
			var si ServiceInputs
			si.Service = byName(name)
			for _, s := range in.Slices {
				if s.Labels[discoveryv1.LabelServiceName] == name {
					si.Slices = append(si.Slices, s)
				}
			}
			changed["ns/"+name] = si
		}
		got, gotProblems, d, ok := ca.Update(changed, nil)
		if !ok {
			t.Fatalf("%s: Update refused after a Compute", st.name)
		}
		want := sameAsDesired(t, st.name, in, got, gotProblems)
		if ca.RealServers() != countReals(want.IPVS) {
			t.Errorf("%s: %d real servers counted; want %d", st.name, ca.RealServers(), countReals(want.IPVS))
		}
		if d.Full {
			t.Errorf("%s: Delta is Full", st.name)
		}
		if st.owner != "" && got.Owners[contested] != st.owner {
			t.Errorf("%s: %s is forwarded for %q; want %q", st.name, contested, got.Owners[contested], st.owner)
		}
		for k := range keysOf(prevIPVS, got.IPVS) {
			if !prevIPVS[k].Equal(got.IPVS[k]) && !slices.Contains(d.Virtuals, k) {
				t.Errorf("%s: %s changed, but the Delta names only %v", st.name, k, d.Virtuals)
			}
		}
		nftChanged := !slices.Equal(prevSNAT, snatPairs(got.SNAT)) || !reflect.DeepEqual(prevGuard, got.Guard) || !reflect.DeepEqual(prevRanges, got.SourceRanges)
		if nftChanged && !d.NFT {
			t.Errorf("%s: masquerading, guard or source ranges changed, but the Delta says not", st.name)
		}
		if !nftChanged && d.NFT && st.name == "one endpoint of b terminates" {
			t.Errorf("%s: the Delta says the nftables side changed; it did not", st.name)
		}
		prevIPVS, prevSNAT, prevGuard, prevRanges = maps.Clone(got.IPVS), snatPairs(got.SNAT), got.Guard, maps.Clone(got.SourceRanges)
	}
}

// TestUpdateNeedsCompute: Update has no Nodes or pools to work with before
// a Compute.
func TestUpdateNeedsCompute(t *testing.T) {
	if _, _, _, ok := (&Cache{}).Update(map[string]ServiceInputs{"ns/a": {}}, nil); ok {
		t.Error("Update before any Compute succeeded; want false")
	}
}

func countReals(t ipvs.Table) int {
	n := 0
	for _, e := range t {
		n += len(e.Reals)
	}
	return n
}

func keysOf(a, b ipvs.Table) map[ipvs.Key]bool {
	out := map[ipvs.Key]bool{}
	for k := range a {
		out[k] = true
	}
	for k := range b {
		out[k] = true
	}
	return out
}
