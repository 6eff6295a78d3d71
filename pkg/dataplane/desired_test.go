package dataplane

import (
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// webSlices: on n1 one ready pod, on n2 one ready and one gone, on n3 one
// terminating (still serving) and one not ready; and one IPv6 pod on n1.
func webSlices() []*discoveryv1.EndpointSlice {
	return []*discoveryv1.EndpointSlice{
		slice("web", "web-4", discoveryv1.AddressTypeIPv4, httpPort(8080),
			ep{"10.1.1.1", "n1", "ready"}, ep{"10.1.2.1", "n2", "ready"}, ep{"10.1.2.2", "n2", "gone"},
			ep{"10.1.3.1", "n3", "terminating"}, ep{"10.1.3.2", "n3", "notready"}),
		slice("web", "web-6", discoveryv1.AddressTypeIPv6, httpPort(8080), ep{"fd01::1", "n1", "ready"}),
	}
}

func TestDesired(t *testing.T) {
	const vip, vip6 = "192.0.2.1", "2001:db8::1"
	// nodeport on n1: the other nodes' NodePorts, and n1's own pod in
	// place of n1's NodePort (a Service without slices has none).
	remotes := []ipvs.RealServer{rs("10.0.0.2", 30080, 1), rs("10.0.0.3", 30080, 1)}
	nodePorts := append(slices.Clone(remotes), rs("10.1.1.1", 8080, 1))
	pods := []ipvs.RealServer{rs("10.1.1.1", 8080, 1), rs("10.1.2.1", 8080, 1), rs("10.1.3.1", 8080, 0)}
	persist := func(v ipvs.VirtualServer, d time.Duration) ipvs.VirtualServer {
		v.Persistent, v.Timeout = true, d
		return v
	}
	tests := []struct {
		name     string
		fwd      v1alpha1.Forwarding // pool default
		svcs     []*v1.Service
		edit     func(*Inputs)
		want     ipvs.Table
		noSNAT   bool     // no real server needs masquerading
		keepSrc  []string // real servers (ip:port) not masqueraded
		problems []string // fields of the expected problems
	}{
		{
			name: "nodeport cluster",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip})},
			want: table(entry(vs(vip, "TCP", 80, "rr"), nodePorts...)),
		},
		{
			name: "nodeport is the default mode",
			svcs: []*v1.Service{service("web", []string{vip})},
			want: table(entry(vs(vip, "TCP", 80, "rr"), nodePorts...)),
		},
		{
			name:    "nodeport local: nodes with endpoints, terminating-only at weight 0",
			fwd:     v1alpha1.ForwardingNodePort,
			svcs:    []*v1.Service{service("web", []string{vip}, local)},
			want:    table(entry(vs(vip, "TCP", 80, "rr"), rs("10.0.0.2", 30080, 1), rs("10.0.0.3", 30080, 0), rs("10.1.1.1", 8080, 1))),
			keepSrc: []string{"10.1.1.1:8080"},
		},
		{
			name: "nodeport local weights by ready endpoints",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip}, local)},
			edit: func(in *Inputs) {
				in.Slices = []*discoveryv1.EndpointSlice{slice("web", "w", discoveryv1.AddressTypeIPv4, httpPort(8080),
					ep{"10.1.2.1", "n2", "ready"}, ep{"10.1.2.3", "n2", "ready"}, ep{"10.1.2.4", "n2", "terminating"})}
			},
			want: table(entry(vs(vip, "TCP", 80, "rr"), rs("10.0.0.2", 30080, 2))),
		},
		{
			name: "pod cluster: ready and terminating, not gone or not ready",
			fwd:  v1alpha1.ForwardingPod,
			svcs: []*v1.Service{service("web", []string{vip})},
			want: table(entry(vs(vip, "TCP", 80, "rr"), pods...)),
		},
		{
			name:   "pod local: only this node's pods, client IP kept",
			fwd:    v1alpha1.ForwardingPod,
			svcs:   []*v1.Service{service("web", []string{vip}, local)},
			want:   table(entry(vs(vip, "TCP", 80, "rr"), rs("10.1.1.1", 8080, 1))),
			noSNAT: true,
		},
		{
			name: "kube-proxy: nothing",
			fwd:  v1alpha1.ForwardingKubeProxy,
			svcs: []*v1.Service{service("web", []string{vip})},
			want: table(),
		},
		{
			name: "annotation overrides the pool",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip}, annotate(annotations.Forwarding, "pod"))},
			want: table(entry(vs(vip, "TCP", 80, "rr"), pods...)),
		},
		{
			name:     "invalid forwarding annotation falls back to the pool",
			fwd:      v1alpha1.ForwardingPod,
			svcs:     []*v1.Service{service("web", []string{vip}, annotate(annotations.Forwarding, "dsr"))},
			want:     table(entry(vs(vip, "TCP", 80, "rr"), pods...)),
			problems: []string{annotations.Forwarding},
		},
		{
			name: "UDP and SCTP, with persistence",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("dns", []string{vip}, affinity(0), ports(
				v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, NodePort: 30053},
				v1.ServicePort{Name: "dns-tcp", Protocol: v1.ProtocolTCP, Port: 53, NodePort: 30054},
				v1.ServicePort{Name: "sig", Protocol: v1.ProtocolSCTP, Port: 3868, NodePort: 30068},
			))},
			want: table(
				// No slice of "dns": no pod of n1 stands in for its NodePort.
				entry(persist(vs(vip, "UDP", 53, "rr"), 3*time.Hour), rs("10.0.0.2", 30053, 1), rs("10.0.0.3", 30053, 1)),
				entry(persist(vs(vip, "TCP", 53, "rr"), 3*time.Hour), rs("10.0.0.2", 30054, 1), rs("10.0.0.3", 30054, 1)),
				entry(persist(vs(vip, "SCTP", 3868, "rr"), 3*time.Hour), rs("10.0.0.2", 30068, 1), rs("10.0.0.3", 30068, 1)),
			),
		},
		{
			name: "affinity timeout and pod forwarding over UDP",
			fwd:  v1alpha1.ForwardingPod,
			svcs: []*v1.Service{service("dns", []string{vip}, affinity(60), ports(v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353)}))},
			edit: func(in *Inputs) {
				in.Slices = []*discoveryv1.EndpointSlice{slice("dns", "d", discoveryv1.AddressTypeIPv4,
					[]discoveryv1.EndpointPort{{Name: ptr("dns"), Protocol: ptr(v1.ProtocolUDP), Port: ptr(int32(5353))}},
					ep{"10.1.1.5", "n2", "ready"})}
			},
			want: table(entry(persist(vs(vip, "UDP", 53, "rr"), time.Minute), rs("10.1.1.5", 5353, 1))),
		},
		{
			name: "dual stack: each VIP to its own family",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip, vip6})},
			want: table(
				entry(vs(vip, "TCP", 80, "rr"), nodePorts...),
				entry(vs(vip6, "TCP", 80, "rr"), rs("fd00::2", 30080, 1), rs("fd00::3", 30080, 1), rs("fd01::1", 8080, 1)),
			),
		},
		{
			name: "IPv6 pods",
			fwd:  v1alpha1.ForwardingPod,
			svcs: []*v1.Service{service("web", []string{vip6})},
			want: table(entry(vs(vip6, "TCP", 80, "rr"), rs("fd01::1", 8080, 1))),
		},
		{
			name: "named targetPort resolved per slice",
			fwd:  v1alpha1.ForwardingPod,
			svcs: []*v1.Service{service("web", []string{vip}, ports(v1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("web")}))},
			edit: func(in *Inputs) {
				in.Slices = []*discoveryv1.EndpointSlice{
					slice("web", "a", discoveryv1.AddressTypeIPv4, httpPort(8080), ep{"10.1.1.1", "n1", "ready"}),
					slice("web", "b", discoveryv1.AddressTypeIPv4, httpPort(9090), ep{"10.1.2.1", "n2", "ready"}),
					// resolves no "http" port: not a backend of it
					slice("web", "c", discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Name: ptr("metrics"), Port: ptr(int32(9100))}}, ep{"10.1.3.1", "n3", "ready"}),
				}
			},
			want: table(entry(vs(vip, "TCP", 80, "rr"), rs("10.1.1.1", 8080, 1), rs("10.1.2.1", 9090, 1))),
		},
		{
			name: "endpoint in two slices while it moves: counted once, ready wins",
			fwd:  v1alpha1.ForwardingPod,
			svcs: []*v1.Service{service("web", []string{vip})},
			edit: func(in *Inputs) {
				in.Slices = []*discoveryv1.EndpointSlice{
					slice("web", "a", discoveryv1.AddressTypeIPv4, httpPort(8080), ep{"10.1.1.1", "n1", "terminating"}),
					slice("web", "b", discoveryv1.AddressTypeIPv4, httpPort(8080), ep{"10.1.1.1", "n1", "ready"}),
				}
			},
			want: table(entry(vs(vip, "TCP", 80, "rr"), rs("10.1.1.1", 8080, 1))),
		},
		{
			name: "excluded and NotReady nodes get no NodePort traffic",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip})},
			edit: func(in *Inputs) { in.Nodes[1].Labels = map[string]string{vrrp.ExcludeLabel: ""} },
			want: table(entry(vs(vip, "TCP", 80, "rr"), rs("10.0.0.3", 30080, 1), rs("10.1.1.1", 8080, 1))),
		},
		{
			name: "an excluded node holds no VIP, so programs nothing",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip})},
			edit: func(in *Inputs) { in.Nodes[0].Labels = map[string]string{vrrp.ExcludeLabel: "true"} },
			want: table(),
		},
		{
			name: "pool nodeSelector not matching this node",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip})},
			edit: func(in *Inputs) {
				in.Pools[0].Spec.VRRP = &v1alpha1.VRRP{NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"edge": "true"}}}
			},
			want: table(),
		},
		{
			name: "pool nodeSelector matching this node",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip})},
			edit: func(in *Inputs) {
				in.Pools[0].Spec.VRRP = &v1alpha1.VRRP{NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"edge": "true"}}}
				in.Nodes[0].Labels = map[string]string{"edge": "true"}
			},
			want: table(entry(vs(vip, "TCP", 80, "rr"), nodePorts...)),
		},
		{
			name: "allocateLoadBalancerNodePorts false falls back to pods",
			fwd:  v1alpha1.ForwardingNodePort,
			svcs: []*v1.Service{service("web", []string{vip}, func(s *v1.Service) {
				s.Spec.AllocateLoadBalancerNodePorts = ptr(false)
				s.Spec.Ports[0].NodePort = 0
			})},
			want:     table(entry(vs(vip, "TCP", 80, "rr"), pods...)),
			problems: []string{"spec.allocateLoadBalancerNodePorts"},
		},
		{
			name: "known scheduler",
			svcs: []*v1.Service{service("web", []string{vip}, annotate(annotations.Scheduler, "wlc"))},
			want: table(entry(vs(vip, "TCP", 80, "wlc"), nodePorts...)),
		},
		{
			name:     "unknown scheduler: rr and a problem",
			svcs:     []*v1.Service{service("web", []string{vip}, annotate(annotations.Scheduler, "fastest"))},
			want:     table(entry(vs(vip, "TCP", 80, "rr"), nodePorts...)),
			problems: []string{annotations.Scheduler},
		},
		{
			name: "not ours: other class, not LoadBalancer, VIP outside pools",
			svcs: []*v1.Service{
				service("a", []string{vip}, func(s *v1.Service) { s.Spec.LoadBalancerClass = ptr("example.com/other") }),
				service("b", []string{vip}, func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort }),
				service("c", []string{"198.51.100.1"}),
				service("d", []string{"not-an-ip"}),
			},
			want: table(),
		},
		{
			name: "explicit class ours",
			svcs: []*v1.Service{service("a", []string{vip}, func(s *v1.Service) { s.Spec.LoadBalancerClass = ptr(class) })},
			want: table(entry(vs(vip, "TCP", 80, "rr"), remotes...)),
		},
		{
			name: "shared VIP: different ports coexist, the older Service keeps a contested port",
			svcs: []*v1.Service{
				service("young", []string{vip}, func(s *v1.Service) { s.CreationTimestamp = metav1.NewTime(time.Unix(200, 0)) },
					ports(v1.ServicePort{Port: 80, NodePort: 31000}, v1.ServicePort{Name: "b", Port: 81, NodePort: 31001})),
				service("old", []string{vip}),
			},
			want: table(
				entry(vs(vip, "TCP", 80, "rr"), remotes...),
				entry(vs(vip, "TCP", 81, "rr"), rs("10.0.0.2", 31001, 1), rs("10.0.0.3", 31001, 1)),
			),
			problems: []string{"spec.ports[80]"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := cluster(tt.fwd)
			in.Services = tt.svcs
			in.Slices = webSlices()
			if tt.edit != nil {
				tt.edit(&in)
			}
			st, problems := Desired(in, "n1")
			if !st.IPVS.Equal(tt.want) {
				t.Errorf("table =\n%s\nwant\n%s", st.IPVS, tt.want)
			}
			var fields []string
			for _, p := range problems {
				fields = append(fields, p.Field)
				if p.Message == "" || p.Service == "" {
					t.Errorf("problem without service or message: %+v", p)
				}
			}
			if !slices.Equal(fields, tt.problems) {
				t.Errorf("problems = %v, want fields %v", problems, tt.problems)
			}
			var wantSNAT []string
			if !tt.noSNAT {
				for k, e := range tt.want {
					for _, r := range e.Reals {
						if !slices.Contains(tt.keepSrc, r.AddrPort().String()) {
							wantSNAT = append(wantSNAT, k.String()+" -> "+r.AddrPort().String())
						}
					}
				}
			}
			if !sameSNAT(snatPairs(st.SNAT), wantSNAT) {
				t.Errorf("SNAT = %v, want %v", st.SNAT, wantSNAT)
			}
			for k := range st.IPVS {
				if !st.Owns(k) {
					t.Errorf("Owns(%s) = false for a desired virtual server", k)
				}
				if st.Owners[k] == "" {
					t.Errorf("no owner recorded for %s", k)
				}
			}
		})
	}
}

func sameSNAT(a, b []string) bool {
	a, b = slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b))
	return slices.Equal(a, b)
}

func TestOwns(t *testing.T) {
	in := cluster(v1alpha1.ForwardingNodePort)
	in.Services = []*v1.Service{
		service("kp", []string{"192.0.2.1"}, annotate(annotations.Forwarding, "kube-proxy")),
		service("np", []string{"192.0.2.1"}, ports(v1.ServicePort{Port: 81, NodePort: 31001})),
	}
	st, _ := Desired(in, "n1")
	for _, tt := range []struct {
		k    ipvs.Key
		want bool
	}{
		{ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 80}, false}, // kube-proxy's
		{ipvs.Key{Address: addr("192.0.2.1"), Protocol: "TCP", Port: 81}, true},
		{ipvs.Key{Address: addr("192.0.2.1"), Protocol: "UDP", Port: 80}, true},
		{ipvs.Key{Address: addr("192.0.2.200"), Protocol: "TCP", Port: 80}, true}, // in the pool, no Service
		{ipvs.Key{Address: addr("10.96.0.1"), Protocol: "TCP", Port: 443}, false},
		{ipvs.Key{Address: addr("2001:db8::5"), Protocol: "TCP", Port: 80}, true},
	} {
		if got := st.Owns(tt.k); got != tt.want {
			t.Errorf("Owns(%s) = %v, want %v", tt.k, got, tt.want)
		}
	}
	if len(st.IPVS) != 1 {
		t.Errorf("table =\n%s\nwant only port 81", st.IPVS)
	}
}

func TestDesiredIsDeterministic(t *testing.T) {
	in := cluster(v1alpha1.ForwardingPod)
	in.Slices = webSlices()
	in.Services = []*v1.Service{service("web", []string{"192.0.2.1", "2001:db8::1"}), service("web2", []string{"192.0.2.2"})}
	a, pa := Desired(in, "n1")
	slices.Reverse(in.Services)
	slices.Reverse(in.Slices)
	slices.Reverse(in.Nodes)
	b, pb := Desired(in, "n1")
	if !a.IPVS.Equal(b.IPVS) || !slices.Equal(snatPairs(a.SNAT), snatPairs(b.SNAT)) || len(pa) != len(pb) {
		t.Errorf("input order changes the result:\n%s\n%s", a.IPVS, b.IPVS)
	}
	for _, e := range a.IPVS {
		if !slices.IsSortedFunc(e.Reals, ipvs.CompareReal) {
			t.Errorf("real servers of %s not sorted", e.Virtual)
		}
	}
	if !strings.Contains(Problem{Service: "ns/a", Field: "f", Message: "m"}.String(), "ns/a: f: m") {
		t.Errorf("Problem.String")
	}
}
