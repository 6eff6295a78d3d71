package dataplane

import (
	"fmt"
	"net/netip"
	"reflect"
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
	in := cluster(v1alpha1.ForwardingPod)
	older := service("a", []string{"192.0.2.1"})
	older.CreationTimestamp = metav1.NewTime(time.Unix(50, 0))
	in.Services = []*v1.Service{
		older,
		service("b", []string{"192.0.2.2"}, local),
		service("c", []string{"192.0.2.1"}), // contests a's port 80
		service("d", []string{"192.0.2.4"}, annotate("keeplb.io/scheduler", "nope")),
	}
	in.Services[1].Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24"}
	for _, name := range []string{"a", "b", "c", "d"} {
		in.Slices = append(in.Slices, slice(name, name+"-1", discoveryv1.AddressTypeIPv4, httpPort(8080),
			ep{"10.1.0.1", "n1", "ready"}, ep{"10.1.0.2", "n2", "ready"}))
	}
	in = versioned(in)
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
		want, wantProblems := Desired(in, "n1")
		if !got.IPVS.Equal(want.IPVS) {
			t.Errorf("%s: cached table\n%s\nwant\n%s", st.name, got.IPVS, want.IPVS)
		}
		if !reflect.DeepEqual(got.SNAT, want.SNAT) || !reflect.DeepEqual(got.Owners, want.Owners) {
			t.Errorf("%s: cached SNAT %v, owners %v; want %v, %v", st.name, got.SNAT, got.Owners, want.SNAT, want.Owners)
		}
		if !reflect.DeepEqual(got.Guard, want.Guard) || !reflect.DeepEqual(got.SourceRanges, want.SourceRanges) {
			t.Errorf("%s: cached guard %+v, source ranges %v; want %+v, %v", st.name, got.Guard, got.SourceRanges, want.Guard, want.SourceRanges)
		}
		if !reflect.DeepEqual(gotProblems, wantProblems) {
			t.Errorf("%s: cached problems %v; want %v", st.name, gotProblems, wantProblems)
		}
		if ca.Misses != st.misses || ca.Hits != st.hits {
			t.Errorf("%s: %d recomputed, %d reused; want %d, %d", st.name, ca.Misses, ca.Hits, st.misses, st.hits)
		}
	}
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

// BenchmarkDesiredAndDiff10000x10 measures a sync's pure work for 10,000
// Services of 10 endpoints each: the desired state and its diff against
// the kernel's table (here equal to the previous desired state).
//
//   - full: a first sync, or any sync without the Cache: every Service
//     is computed.
//   - one-endpoint: one endpoint of one Service flips between ready and
//     terminating at each sync; the Cache recomputes that Service only,
//     and the diff finds the one weight to change.
func BenchmarkDesiredAndDiff10000x10(b *testing.B) {
	in := benchInputs(10000)
	ours := func(ipvs.Key) bool { return true }
	b.Run("full", func(b *testing.B) {
		cur, _ := Desired(in, "n0")
		b.ReportAllocs()
		for b.Loop() {
			want, _ := Desired(in, "n0")
			if ops := Diff(cur.IPVS, want.IPVS, ours); len(ops) != 0 {
				b.Fatalf("%d ops; want 0", len(ops))
			}
		}
	})
	b.Run("one-endpoint", func(b *testing.B) {
		ca := &Cache{}
		cur, _ := ca.Desired(in, "n0")
		s := in.Slices[5000]
		rv := 1 << 20
		b.ReportAllocs()
		for b.Loop() {
			c := &s.Endpoints[3].Conditions
			if *c.Ready {
				*c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
			} else {
				*c = discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}
			}
			rv++
			s.ResourceVersion = strconv.Itoa(rv)
			want, _ := ca.Desired(in, "n0")
			if ops := Diff(cur.IPVS, want.IPVS, ours); len(ops) != 1 || ca.Misses != 1 {
				b.Fatalf("%d ops, %d recomputed; want 1, 1", len(ops), ca.Misses)
			}
			cur = want
		}
	})
}
