package speaker

import (
	"fmt"
	"net/netip"
	"strconv"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// BenchmarkRender measures one speaker sync's pure work for 1,000 VIPs over
// 3 pools and 3 nodes: API state to plan input, the plan, this node's
// keepalived configuration, and rendering it to bytes.
func BenchmarkRender(b *testing.B) {
	in := dataplane.Inputs{Class: "keeplb.io/vip", DefaultClass: true,
		Nodes: []*v1.Node{node("n1", "10.0.0.1"), node("n2", "10.0.0.2"), node("n3", "10.0.0.3")},
		Pools: []*v1alpha1.IPPool{
			ippool("a", []string{"10.1.0.0/22"}, &v1alpha1.VRRP{VirtualRouterIDs: "1-80"}),
			ippool("b", []string{"10.2.0.0/22"}, &v1alpha1.VRRP{VirtualRouterIDs: "81-160"}),
			ippool("c", []string{"10.3.0.0/22"}, &v1alpha1.VRRP{VirtualRouterIDs: "161-240"}),
		},
	}
	for i := range 1000 {
		pool := byte(1 + i%3)
		addr := netip.AddrFrom4([4]byte{10, pool, byte(i / 3 / 256), byte(i / 3 % 256)})
		in.Services = append(in.Services, lbService("ns", fmt.Sprintf("s%d", i), addr.String(), false, nil))
	}
	links := []hostnet.Link{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/8")}, DefaultRoute4: true}}
	l := Layout{RunDir: "/run/keeplb"}
	var size int
	b.ResetTimer()
	for range b.N {
		pin, _ := PlanInput(in)
		plan := vrrp.Compute(pin)
		cfg, errs := KeepalivedConfig(plan, "n1", pin, links, l)
		if len(errs) > 0 {
			b.Fatal(errs)
		}
		data, err := keepalived.Render(cfg)
		if err != nil {
			b.Fatal(err)
		}
		size = len(data)
	}
	b.ReportMetric(float64(size), "config-bytes")
}

// BenchmarkSyncEndpointChange measures the speaker's side of one endpoint
// change, from its informer's handler to the desired state and its Delta,
// with n Services forwarded to pods, 10 ready endpoints each, on 10 nodes:
// the handler records the change, observe reads the changed objects (the
// EndpointSlices through the informer's service index), compute updates
// the forwarding state (dataplane.Cache.Update) and keeps the VRRP step's
// share. The baseline, in the same run, is a sync that computes
// everything: every object listed, dataplane.Cache.Compute (reusing the
// Services whose resourceVersions did not change), the VRRP plan and
// keepalived.conf. Applying is left out (the knftables fake cannot hold
// 100,000 elements in reasonable time): the kernel side of the change is
// dataplane's BenchmarkEndpointChange (the diff) and the tests that count
// the kernel's operations.
func BenchmarkSyncEndpointChange(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		in := podServices(n)
		s, _, _ := syncSpeaker(b, in, nil)
		es := in.Slices[n/2]
		rv := 1 << 20
		flip := func() *discoveryv1.EndpointSlice {
			es = es.DeepCopy()
			c := &es.Endpoints[3].Conditions
			if *c.Ready {
				*c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
			} else {
				*c = discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}
			}
			rv++
			es.ResourceVersion = strconv.Itoa(rv)
			if err := s.slices.GetStore().Update(es); err != nil {
				b.Fatal(err)
			}
			return es
		}
		sync := func(ch changes) desired {
			obs, err := s.observe(ch, time.Now())
			if err != nil {
				b.Fatal(err)
			}
			return s.compute(obs)
		}
		sync(changes{all: true})
		b.Run(fmt.Sprintf("%dx10/everything", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				flip()
				if want := sync(changes{all: true}); want.reused || len(want.forwarding.IPVS) != n {
					b.Fatalf("reused VRRP %v, %d virtual servers; want a full computation of %d", want.reused, len(want.forwarding.IPVS), n)
				}
			}
		})
		b.Run(fmt.Sprintf("%dx10/changed", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				s.pending.slice(flip()) // the informer's handler
				want := sync(s.pending.take())
				if !want.reused || len(want.forwardingDelta.Virtuals) != 1 || want.forwardingDelta.NFT {
					b.Fatalf("reused VRRP %v, Delta %d virtual servers, NFT %v; want reused, 1, false", want.reused, len(want.forwardingDelta.Virtuals), want.forwardingDelta.NFT)
				}
			}
		})
	}
}

// podServices is n Services of a pod-forwarding pool, 10 ready endpoints
// each, on 10 nodes, versioned as the API server would.
func podServices(n int) dataplane.Inputs {
	p := ippool("p", []string{"172.16.0.0/16"}, nil)
	p.Spec.Forwarding = v1alpha1.ForwardingPod
	p.ResourceVersion = "1"
	in := dataplane.Inputs{Class: "keeplb.io/vip", DefaultClass: true, Pools: []*v1alpha1.IPPool{p}}
	for i := range 10 {
		nd := node(fmt.Sprintf("n%d", i), fmt.Sprintf("10.0.0.%d", i+1))
		nd.ResourceVersion = "1"
		in.Nodes = append(in.Nodes, nd)
	}
	in.Nodes[0].Name = "n1" // syncSpeaker's node
	in.Nodes[1].Name = "n01"
	for i := range n {
		name := fmt.Sprintf("s%05d", i)
		svc := fwdService(name, netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}).String(), 80, 30080)
		svc.UID, svc.ResourceVersion = types.UID("svc-"+name), "1"
		in.Services = append(in.Services, svc)
		es := podSlice(name, "n1", "n01", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9")
		es.UID, es.ResourceVersion = types.UID("es-"+name), "1"
		for j := range es.Endpoints {
			es.Endpoints[j].Addresses = []string{netip.AddrFrom4([4]byte{10, byte(j + 1), byte(i >> 8), byte(i)}).String()}
		}
		in.Slices = append(in.Slices, es)
	}
	return in
}
