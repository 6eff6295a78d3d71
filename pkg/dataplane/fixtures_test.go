package dataplane

import (
	"net/netip"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

const class = "keeplb.io/vip"

func ptr[T any](v T) *T { return &v }

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func node(name string, ready bool, ips ...string) *v1.Node {
	st := v1.ConditionFalse
	if ready {
		st = v1.ConditionTrue
	}
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: v1.NodeStatus{Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: st}}}}
	for _, ip := range ips {
		n.Status.Addresses = append(n.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: ip})
	}
	return n
}

func pool(name string, fwd v1alpha1.Forwarding, addrs ...string) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.IPPoolSpec{Addresses: addrs, Forwarding: fwd}}
}

// svcOpt changes a test Service.
type svcOpt func(*v1.Service)

func service(name string, vips []string, opts ...svcOpt) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, CreationTimestamp: metav1.NewTime(time.Unix(100, 0))},
		Spec: v1.ServiceSpec{
			Type:  v1.ServiceTypeLoadBalancer,
			Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: 30080}},
		},
	}
	for _, ip := range vips {
		s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip})
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func local(s *v1.Service) { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal }

func annotate(k, v string) svcOpt {
	return func(s *v1.Service) {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations[k] = v
	}
}

func affinity(seconds int32) svcOpt {
	return func(s *v1.Service) {
		s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		if seconds > 0 {
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: &seconds}}
		}
	}
}

func ports(ps ...v1.ServicePort) svcOpt { return func(s *v1.Service) { s.Spec.Ports = ps } }

// ep is an endpoint: address, node, and its state.
type ep struct {
	ip, node string
	state    string // "ready", "terminating" (serving), "gone" (terminating, not serving), "notready"
}

func slice(svc, name string, fam discoveryv1.AddressType, sp []discoveryv1.EndpointPort, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: fam,
		Ports:       sp,
	}
	for _, e := range eps {
		c := discoveryv1.EndpointConditions{}
		switch e.state {
		case "ready":
			c = discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}
		case "terminating":
			c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		case "gone":
			c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false), Terminating: ptr(true)}
		case "notready":
			c = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false), Terminating: ptr(false)}
		}
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{e.ip}, NodeName: ptr(e.node), Conditions: c})
	}
	return s
}

func httpPort(port int32) []discoveryv1.EndpointPort {
	return []discoveryv1.EndpointPort{{Name: ptr("http"), Protocol: ptr(v1.ProtocolTCP), Port: ptr(port)}}
}

func vs(ip, proto string, port uint16, sched string) ipvs.VirtualServer {
	return ipvs.VirtualServer{Address: addr(ip), Protocol: proto, Port: port, Scheduler: sched}
}

func rs(ip string, port uint16, w int) ipvs.RealServer {
	return ipvs.RealServer{Address: addr(ip), Port: port, Weight: w}
}

func entry(v ipvs.VirtualServer, reals ...ipvs.RealServer) ipvs.Entry {
	return ipvs.Entry{Virtual: v, Reals: reals}
}

func table(es ...ipvs.Entry) ipvs.Table {
	t := ipvs.Table{}
	for _, e := range es {
		t[e.Virtual.Key()] = e
	}
	return t
}

// cluster is three Ready nodes (dual-stack) and one NotReady, with a pool
// for 192.0.2.0/24 and 2001:db8::/64.
func cluster(fwd v1alpha1.Forwarding) Inputs {
	return Inputs{
		Class: class, DefaultClass: true,
		Nodes: []*v1.Node{
			node("n1", true, "10.0.0.1", "fd00::1"),
			node("n2", true, "10.0.0.2", "fd00::2"),
			node("n3", true, "10.0.0.3", "fd00::3"),
			node("down", false, "10.0.0.9", "fd00::9"),
		},
		Pools: []*v1alpha1.IPPool{pool("p", fwd, "192.0.2.0/24", "2001:db8::/64")},
	}
}
