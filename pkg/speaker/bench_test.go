package speaker

import (
	"fmt"
	"net/netip"
	"testing"

	v1 "k8s.io/api/core/v1"

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
