package dataplane

import (
	"fmt"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// TestDesiredMatrix runs every forwarding mode × traffic policy ×
// protocol × session affinity through Desired, and checks what each
// combination must give: the virtual server's protocol and persistence,
// the real servers of the mode and policy, and masquerading everywhere
// but to this node's own pods under Local.
func TestDesiredMatrix(t *testing.T) {
	const vip = "192.0.2.1"
	modes := []v1alpha1.Forwarding{v1alpha1.ForwardingNodePort, v1alpha1.ForwardingPod, v1alpha1.ForwardingKubeProxy}
	policies := []v1.ServiceExternalTrafficPolicy{v1.ServiceExternalTrafficPolicyCluster, v1.ServiceExternalTrafficPolicyLocal}
	protocols := []v1.Protocol{v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP}
	affinities := []int32{-1, 0, 600} // none; ClientIP with the default timeout; ClientIP, 600 s
	for _, mode := range modes {
		for _, policy := range policies {
			for _, proto := range protocols {
				for _, aff := range affinities {
					t.Run(fmt.Sprintf("%s/%s/%s/affinity=%d", mode, policy, proto, aff), func(t *testing.T) {
						in := cluster(mode)
						svc := service("web", []string{vip}, ports(v1.ServicePort{Name: "p", Protocol: proto, Port: 80, NodePort: 30080}))
						svc.Spec.ExternalTrafficPolicy = policy
						if aff >= 0 {
							affinity(aff)(svc)
						}
						in.Services = []*v1.Service{svc}
						sp := []discoveryv1.EndpointPort{{Name: ptr("p"), Protocol: ptr(proto), Port: ptr[int32](8080)}}
						// n1: a ready pod; n2: a ready and a terminating one; n3: none.
						in.Slices = []*discoveryv1.EndpointSlice{slice("web", "web-1", discoveryv1.AddressTypeIPv4, sp,
							ep{"10.1.1.1", "n1", "ready"}, ep{"10.1.2.1", "n2", "ready"}, ep{"10.1.2.2", "n2", "terminating"})}
						st, problems := Desired(in, "n1")
						if len(problems) > 0 {
							t.Fatalf("problems: %v", problems)
						}
						k := ipvs.Key{Address: addr(vip), Protocol: string(proto), Port: 80}
						if mode == v1alpha1.ForwardingKubeProxy {
							if len(st.IPVS) != 0 || st.Owns(k) {
								t.Fatalf("kube-proxy forwarding: table %v, owns %v; want nothing of ours", st.IPVS, st.Owns(k))
							}
							return
						}
						e, ok := st.IPVS[k]
						if !ok {
							t.Fatalf("no virtual server %s in\n%s", k, st.IPVS)
						}
						wantTimeout := time.Duration(0)
						switch aff {
						case 0:
							wantTimeout = 3 * time.Hour
						case 600:
							wantTimeout = 600 * time.Second
						}
						if e.Virtual.Persistent != (aff >= 0) || e.Virtual.Timeout != wantTimeout {
							t.Errorf("persistent %v timeout %s; want %v, %s", e.Virtual.Persistent, e.Virtual.Timeout, aff >= 0, wantTimeout)
						}
						local := policy == v1.ServiceExternalTrafficPolicyLocal
						var want []ipvs.RealServer
						switch {
						// nodeport: the other nodes' NodePorts, and this node's
						// own pods in place of its own NodePort.
						case mode == v1alpha1.ForwardingNodePort && !local:
							want = []ipvs.RealServer{rs("10.0.0.2", 30080, 1), rs("10.0.0.3", 30080, 1), rs("10.1.1.1", 8080, 1)}
						case mode == v1alpha1.ForwardingNodePort && local:
							want = []ipvs.RealServer{rs("10.0.0.2", 30080, 1), rs("10.1.1.1", 8080, 1)}
						case mode == v1alpha1.ForwardingPod && !local:
							want = []ipvs.RealServer{rs("10.1.1.1", 8080, 1), rs("10.1.2.1", 8080, 1), rs("10.1.2.2", 8080, 0)}
						default: // pod, Local: this node's pods only
							want = []ipvs.RealServer{rs("10.1.1.1", 8080, 1)}
						}
						if !slices.Equal(e.Reals, want) {
							t.Errorf("real servers %v; want %v", e.Reals, want)
						}
						wantSNAT := len(want)
						if local { // this node's own pods keep the client's address
							wantSNAT--
						}
						if got := snatPairs(st.SNAT); len(got) != wantSNAT {
							t.Errorf("%d real servers masqueraded; want %d: %v", len(got), wantSNAT, got)
						}
					})
				}
			}
		}
	}
}
