package dataplane_e2e

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/testing/netns"
)

// TestGuardWithIPVS checks the VIP port guard with IPVS in the kernel: on
// the holder (lb), listeners on the wildcard address stand for sshd, the
// kubelet, the speaker's metrics port bound to all addresses and a
// NodePort; they answer through the VIPs until keeplb's table is written,
// and not after, while IPVS goes on forwarding the Service ports of a
// nodeport Service (IPv4 and IPv6) and of a pod Service to the backend.
// For a kube-proxy Service (no kube-proxy here) the guard must accept its
// port and drop the others: its VIP:port is checked in the table's sets,
// and a listener on another port of its VIP stops answering.
func TestGuardWithIPVS(t *testing.T) {
	if ranInVM(t, "guard") {
		return
	}

	client, lb, backend := netns.New(t, "gclient"), netns.New(t, "glb"), netns.New(t, "gbackend")
	ip := func(ns string, args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
		}
	}
	ip(lb, "link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", client)
	ip(lb, "link", "add", "l1", "type", "veth", "peer", "name", "b0", "netns", backend)
	for _, a := range []string{"10.62.0.100/24", "fd62::100/64"} {
		ip(client, "addr", "add", a, "dev", "c0", "nodad")
	}
	// lb's address and the VIPs as keepalived adds them.
	for _, a := range []string{"10.62.0.10/24", "fd62::10/64", "10.62.0.200/32", "10.62.0.201/32", "10.62.0.202/32", "fd62::200/128"} {
		ip(lb, "addr", "add", a, "dev", "l0", "nodad")
	}
	for _, a := range []string{"10.63.0.1/24", "fd63::1/64"} {
		ip(lb, "addr", "add", a, "dev", "l1", "nodad")
	}
	for _, a := range []string{"10.63.0.2/24", "fd63::2/64"} {
		ip(backend, "addr", "add", a, "dev", "b0", "nodad")
	}
	ip(client, "link", "set", "c0", "up")
	ip(lb, "link", "set", "l0", "up")
	ip(lb, "link", "set", "l1", "up")
	ip(backend, "link", "set", "b0", "up")
	for _, kv := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.vs.conntrack=1"} {
		if out, err := exec.Command("ip", "netns", "exec", lb, "sysctl", "-w", kv).CombinedOutput(); err != nil {
			t.Fatalf("sysctl -w %s: %v: %s", kv, err, out)
		}
	}
	// The backend: a NodePort responder and a pod responder, dual-stack.
	startServer(t, backend, ":30080")
	startServer(t, backend, ":8080")
	// lb's host-network listeners: sshd, the kubelet, the speaker's
	// metrics port on all addresses, a NodePort; and one on the kube-proxy
	// Service's VIP port 80, which is not a port of that Service.
	for _, port := range []string{"2222", "10250", "10261", "30080", "80"} {
		startServer(t, lb, ":"+port)
	}

	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "backend"},
		Status: v1.NodeStatus{
			Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}},
			Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "10.63.0.2"}, {Type: v1.NodeInternalIP, Address: "fd63::2"}},
		},
	}
	svc := func(name string, fwd v1alpha1.Forwarding, port int32, vips ...string) *v1.Service {
		s := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, CreationTimestamp: metav1.NewTime(time.Unix(100, 0)),
				Annotations: map[string]string{"keeplb.io/forwarding": string(fwd)}},
			Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer,
				Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: port, TargetPort: intstr.FromInt32(8080), NodePort: 30080}}},
		}
		for _, v := range vips {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: v})
		}
		return s
	}
	ready := true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "pods-1", Labels: map[string]string{discoveryv1.LabelServiceName: "pods"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptrTo("http"), Port: ptrTo[int32](8080), Protocol: ptrTo(v1.ProtocolTCP)}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.63.0.2"}, NodeName: ptrTo("backend"), Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}
	in := dataplane.Inputs{
		DefaultClass: true,
		Nodes:        []*v1.Node{node},
		Pools: []*v1alpha1.IPPool{{ObjectMeta: metav1.ObjectMeta{Name: "pool"},
			Spec: v1alpha1.IPPoolSpec{Addresses: []string{"10.62.0.200-10.62.0.209", "fd62::200/124"}}}},
		Services: []*v1.Service{
			svc("web", v1alpha1.ForwardingNodePort, 80, "10.62.0.200", "fd62::200"),
			svc("pods", v1alpha1.ForwardingPod, 8443, "10.62.0.201"),
			svc("kp", v1alpha1.ForwardingKubeProxy, 443, "10.62.0.202"),
		},
		Slices: []*discoveryv1.EndpointSlice{slice},
	}
	st, problems := dataplane.Desired(in, "glb")
	if len(problems) > 0 {
		t.Fatalf("Desired reported problems: %v", problems)
	}
	h, nf := kernelIn(t, lb)
	r := dataplane.NewReconciler("glb", dataplane.Kernel{IPVS: h, NFT: nf})
	sync := func(st dataplane.State) {
		t.Helper()
		if rep, err := r.Sync(context.Background(), st); err != nil {
			t.Fatalf("Reconciler.Sync in %s: %v (%s)", lb, err, rep.Result)
		}
	}
	// Masquerading only, no guard yet: what keeplb wrote before.
	unguarded := st
	unguarded.Guard, unguarded.SourceRanges = nft.Guard{}, nil
	sync(unguarded)

	type check struct {
		url     string
		backend bool // answered by the backend through IPVS, with the guard
	}
	checks := []check{
		{"http://10.62.0.200:80/", true},    // web, nodeport forwarding
		{"http://[fd62::200]:80/", true},    // web over IPv6
		{"http://10.62.0.201:8443/", true},  // pods, pod forwarding
		{"http://10.62.0.200:2222/", false}, // sshd
		{"http://[fd62::200]:2222/", false},
		{"http://10.62.0.200:10250/", false}, // the kubelet
		{"http://10.62.0.200:10261/", false}, // metrics on all addresses
		{"http://[fd62::200]:10261/", false},
		{"http://10.62.0.200:30080/", false}, // a NodePort of lb
		{"http://10.62.0.201:2222/", false},
		{"http://10.62.0.202:80/", false}, // the kube-proxy VIP, not its port
		{"http://10.62.0.202:10250/", false},
	}
	answered := func(url string) (string, bool) {
		body, err := request(client, url)
		return body, err == nil
	}
	for _, c := range checks {
		if _, ok := answered(c.url); !ok {
			t.Fatalf("without the guard %s does not answer: the test would prove nothing", c.url)
		}
	}

	sync(st)
	if out, err := exec.Command("ip", "netns", "exec", lb, "nft", "list", "table", "inet", "keeplb").CombinedOutput(); err == nil {
		t.Logf("nft list table inet keeplb in lb:\n%s", out)
	}
	for _, c := range checks {
		body, ok := answered(c.url)
		switch {
		case c.backend && !ok:
			t.Errorf("with the guard, the Service port %s does not answer", c.url)
		case c.backend && !strings.HasPrefix(body, "remote=10.63.0.1:") && !strings.HasPrefix(body, "remote=[fd63::1]:"):
			t.Errorf("with the guard, %s answered %q; want the backend, reached through IPVS and masqueraded by lb", c.url, body)
		case !c.backend && ok:
			t.Errorf("with the guard, %s still answers (%q)", c.url, body)
		}
	}
	// The kube-proxy Service's port is accepted: in the guard's sets.
	out, err := exec.Command("ip", "netns", "exec", lb, "nft", "list", "set", "inet", "keeplb", "ports-v4").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10.62.0.202 . tcp . 443") && !strings.Contains(string(out), "10.62.0.202 . 6 . 443") {
		t.Errorf("ports-v4 lacks the kube-proxy Service's 10.62.0.202 . tcp . 443 (%v):\n%s", err, out)
	}
	drops, ok := r.GuardDropped()
	if !ok || drops == 0 {
		t.Errorf("guard counter: %d, %v; want drops counted", drops, ok)
	}
	t.Logf("the guard dropped %d packets over %d checks", drops, len(checks))
}

func ptrTo[T any](v T) *T { return &v }
