package dataplane

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

func key(proto, addrPort string) ipvs.Key {
	ap := netip.MustParseAddrPort(addrPort)
	return ipvs.Key{Address: ap.Addr(), Protocol: proto, Port: ap.Port()}
}

// TestGuard checks what the VIP port guard admits: every VIP of a Service
// keeplb handles, in any forwarding mode, with exactly its Services'
// ports; the same on a node that may not hold the pool's VIPs; echo as
// the pool says.
func TestGuard(t *testing.T) {
	in := cluster(v1alpha1.ForwardingNodePort)
	quiet := pool("quiet", v1alpha1.ForwardingPod, "198.51.100.0/28")
	quiet.Spec.ICMPEcho = v1alpha1.ICMPEchoDrop
	// Only "edge" nodes may hold quiet's VIPs: n1 is none, and guards them all the same.
	quiet.Spec.VRRP = &v1alpha1.VRRP{NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"edge": "true"}}}
	in.Pools = append(in.Pools, quiet)
	other := service("other-class", []string{"192.0.2.50"})
	other.Spec.LoadBalancerClass = ptr("example.com/other")
	in.Services = []*v1.Service{
		service("web", []string{"192.0.2.1", "2001:db8::1"}, ports(
			v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080},
			v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, NodePort: 30053})),
		// Shares web's IPv4 VIP: the VIP admits the union of their ports.
		service("sctp", []string{"192.0.2.1"}, ports(v1.ServicePort{Name: "diameter", Protocol: v1.ProtocolSCTP, Port: 3868, NodePort: 31868})),
		// Forwarded by kube-proxy: keeplb programs nothing, but guards it.
		service("kp", []string{"192.0.2.2"}, annotate(annotations.Forwarding, string(v1alpha1.ForwardingKubeProxy)),
			ports(v1.ServicePort{Name: "https", Protocol: v1.ProtocolTCP, Port: 443, NodePort: 30443})),
		service("quiet", []string{"198.51.100.1"}),
		service("outside", []string{"203.0.113.1"}),
		other,
	}
	st, _ := Desired(in, "n1")
	want := nft.Guard{
		VIPs: []netip.Addr{addr("192.0.2.1"), addr("192.0.2.2"), addr("198.51.100.1"), addr("2001:db8::1")},
		Ports: []ipvs.Key{
			key(ipvs.SCTP, "192.0.2.1:3868"), key(ipvs.TCP, "192.0.2.1:80"), key(ipvs.UDP, "192.0.2.1:53"),
			key(ipvs.TCP, "192.0.2.2:443"),
			key(ipvs.TCP, "198.51.100.1:80"),
			key(ipvs.TCP, "[2001:db8::1]:80"), key(ipvs.UDP, "[2001:db8::1]:53"),
		},
		Echo: []netip.Addr{addr("192.0.2.1"), addr("192.0.2.2"), addr("2001:db8::1")},
	}
	slices.SortFunc(want.Ports, ipvs.Key.Compare)
	if !reflect.DeepEqual(st.Guard, want) {
		t.Errorf("guard on n1:\n got %+v\nwant %+v", st.Guard, want)
	}
	if _, ok := st.IPVS[key(ipvs.TCP, "198.51.100.1:80")]; ok {
		t.Error("n1 programs a virtual server of a pool whose VIPs it may not hold; the fixture does not test what it says")
	}
	// Every node has the same guard, whatever it may hold or forward.
	for _, n := range []string{"n2", "down", "not-a-node"} {
		if got, _ := Desired(in, n); !reflect.DeepEqual(got.Guard, st.Guard) {
			t.Errorf("guard on %s differs from n1's:\n%+v\n%+v", n, got.Guard, st.Guard)
		}
	}
	// Without Services, nothing is guarded (no VIP is held either).
	in.Services = nil
	if st, _ := Desired(in, "n1"); len(st.Guard.VIPs)+len(st.Guard.Ports)+len(st.Guard.Echo) != 0 {
		t.Errorf("guard without Services: %+v", st.Guard)
	}
}

// TestSourceRanges checks how loadBalancerSourceRanges become filters:
// per family, as kube-proxy reads them, and closed when they do not parse.
func TestSourceRanges(t *testing.T) {
	v4, v6 := key(ipvs.TCP, "192.0.2.1:80"), key(ipvs.TCP, "[2001:db8::1]:80")
	pfx := func(ss ...string) []netip.Prefix {
		out := []netip.Prefix{}
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		name       string
		field      []string
		annotation string
		// want maps each VIP's key to its ranges; absent: open to all.
		want    map[ipvs.Key][]netip.Prefix
		problem string
	}{
		{name: "none", want: map[ipvs.Key][]netip.Prefix{}},
		{name: "both families", field: []string{"198.51.100.0/24", "2001:db8:1::/48"},
			want: map[ipvs.Key][]netip.Prefix{v4: pfx("198.51.100.0/24"), v6: pfx("2001:db8:1::/48")}},
		// kube-proxy decides allow-all per family: 0.0.0.0/0 opens IPv4 only.
		{name: "IPv4 zero CIDR", field: []string{"0.0.0.0/0", "2001:db8:1::/48"},
			want: map[ipvs.Key][]netip.Prefix{v6: pfx("2001:db8:1::/48")}},
		{name: "IPv6 zero CIDR", field: []string{"198.51.100.0/24", "::/0"},
			want: map[ipvs.Key][]netip.Prefix{v4: pfx("198.51.100.0/24")}},
		{name: "both zero CIDRs", field: []string{"::/0", "0.0.0.0/0"}, want: map[ipvs.Key][]netip.Prefix{}},
		// A family without a range of its own admits nobody.
		{name: "IPv4 only", field: []string{"198.51.100.7/32"},
			want: map[ipvs.Key][]netip.Prefix{v4: pfx("198.51.100.7/32"), v6: {}}},
		{name: "annotation", annotation: " 10.0.0.0/8 , 2001:db8:2::/48 ",
			want: map[ipvs.Key][]netip.Prefix{v4: pfx("10.0.0.0/8"), v6: pfx("2001:db8:2::/48")}},
		{name: "annotation, IPv4 zero CIDR", annotation: "0.0.0.0/0",
			want: map[ipvs.Key][]netip.Prefix{v6: {}}},
		{name: "empty annotation", annotation: "  ", want: map[ipvs.Key][]netip.Prefix{}},
		{name: "invalid annotation", annotation: "10.0.0.0/8,not-a-cidr",
			want:    map[ipvs.Key][]netip.Prefix{v4: {}, v6: {}},
			problem: `ns/web: ` + v1.AnnotationLoadBalancerSourceRangesKey + `: "10.0.0.0/8,not-a-cidr" is not a comma-separated list of CIDRs; until it is (e.g. 203.0.113.0/24,198.51.100.7/32), the VIP's ports are closed to every client`},
		// The field wins over the annotation, as in the cloud-provider library.
		{name: "field and annotation", field: []string{"198.51.100.0/24"}, annotation: "not-a-cidr",
			want: map[ipvs.Key][]netip.Prefix{v4: pfx("198.51.100.0/24"), v6: {}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := cluster(v1alpha1.ForwardingNodePort)
			svc := service("web", []string{"192.0.2.1", "2001:db8::1"})
			svc.Spec.LoadBalancerSourceRanges = tc.field
			if tc.annotation != "" {
				svc.Annotations = map[string]string{v1.AnnotationLoadBalancerSourceRangesKey: tc.annotation}
			}
			in.Services = []*v1.Service{svc}
			st, problems := Desired(in, "n1")
			if len(st.IPVS) != 2 {
				t.Fatalf("%d virtual servers, want 2: source ranges never withhold a virtual server here", len(st.IPVS))
			}
			if !reflect.DeepEqual(st.SourceRanges, tc.want) {
				t.Errorf("source ranges %v, want %v", st.SourceRanges, tc.want)
			}
			var got []string
			for _, p := range problems {
				got = append(got, p.String())
			}
			if tc.problem != "" {
				if want := []string{tc.problem}; !slices.Equal(got, want) {
					t.Errorf("problems %q, want %q (one per Service, not per address)", got, want)
				}
			} else if len(got) != 0 {
				t.Errorf("problems %q, want none", strings.Join(got, "; "))
			}
		})
	}
}
