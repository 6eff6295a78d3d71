package speaker

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

func node(name, ip string) *v1.Node {
	return &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: v1.NodeStatus{
			Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}},
			Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: ip}},
		},
	}
}

func lbService(ns, name, ip string, local bool, class *string) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.NewTime(time.Unix(100, 0))},
		Spec:       v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, LoadBalancerClass: class},
		Status:     v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: ip}}}},
	}
	if local {
		s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	}
	return s
}

func slice(ns, svc string, ready map[string]bool) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: svc + "-x", Labels: map[string]string{discoveryv1.LabelServiceName: svc}}, AddressType: discoveryv1.AddressTypeIPv4}
	for n, r := range ready {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{NodeName: &n, Conditions: discoveryv1.EndpointConditions{Ready: &r}})
	}
	return es
}

func ippool(name string, addrs []string, v *v1alpha1.VRRP) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.IPPoolSpec{Addresses: addrs, VRRP: v}}
}

func TestPlanInputSelectsOurVIPs(t *testing.T) {
	other := "example.com/other"
	ours := "keeplb.io/vip"
	in := dataplane.Inputs{
		Class: ours, DefaultClass: true,
		Nodes: []*v1.Node{node("n1", "10.0.0.1"), node("n2", "10.0.0.2")},
		Pools: []*v1alpha1.IPPool{ippool("p", []string{"192.0.2.0/28"}, &v1alpha1.VRRP{VirtualRouterIDs: "10-20", Unicast: true, AdvertisementInterval: &metav1.Duration{Duration: 100 * time.Millisecond}})},
		Services: []*v1.Service{
			lbService("ns", "a", "192.0.2.1", false, nil),
			lbService("ns", "b", "192.0.2.1", false, &ours), // shares a's VIP
			lbService("ns", "foreign", "192.0.2.2", false, &other),
			lbService("ns", "outside", "198.51.100.1", false, nil),
			lbService("ns", "local", "192.0.2.3", true, nil),
		},
		Slices: []*discoveryv1.EndpointSlice{slice("ns", "local", map[string]bool{"n2": true, "n1": false})},
	}
	pin, owners := PlanInput(in)
	if len(pin.Pools) != 1 || pin.Pools[0].FirstVRID != 10 || pin.Pools[0].LastVRID != 20 || !pin.Pools[0].Unicast || pin.Pools[0].Advert != 100*time.Millisecond {
		t.Fatalf("pools = %+v", pin.Pools)
	}
	if got := owners[netip.MustParseAddr("192.0.2.1")]; strings.Join(got, ",") != "ns/a,ns/b" {
		t.Fatalf("owners of the shared VIP = %v", got)
	}
	if _, ok := owners[netip.MustParseAddr("192.0.2.2")]; ok {
		t.Fatal("a Service of another class was included")
	}
	if _, ok := owners[netip.MustParseAddr("198.51.100.1")]; ok {
		t.Fatal("an address outside every pool was included: the speaker must never touch it")
	}
	var local *vrrp.VIP
	for i := range pin.VIPs {
		if pin.VIPs[i].Service == "ns/local" {
			local = &pin.VIPs[i]
		}
	}
	if local == nil || !local.Local || strings.Join(local.LocalNodes, ",") != "n2" {
		t.Fatalf("Local VIP = %+v, want LocalNodes [n2] (n1's endpoint is not ready)", local)
	}
	if len(pin.Nodes) != 2 || !pin.Nodes[0].Ready || pin.Nodes[0].InternalIPs[0].String() != "10.0.0.1" {
		t.Fatalf("nodes = %+v", pin.Nodes)
	}
}

// TestFailbackRendered: a pool's failback policy reaches every instance of
// its keepalived.conf: preempt_delay for Delayed, nothing for Immediate,
// nopreempt for Never (each instance starts in BACKUP, which both need).
func TestFailbackRendered(t *testing.T) {
	for _, tc := range []struct {
		vrrp       *v1alpha1.VRRP
		want, none string
	}{
		{&v1alpha1.VRRP{}, "preempt_delay 60\n", "nopreempt"},
		{&v1alpha1.VRRP{Failback: v1alpha1.FailbackDelayed, FailbackDelay: &metav1.Duration{Duration: 2500 * time.Millisecond}}, "preempt_delay 2.5\n", "nopreempt"},
		{&v1alpha1.VRRP{Failback: v1alpha1.FailbackImmediate}, "state BACKUP", "preempt"},
		{&v1alpha1.VRRP{Failback: v1alpha1.FailbackNever}, "nopreempt\n", "preempt_delay"},
	} {
		in := dataplane.Inputs{
			Class: "keeplb.io/vip", DefaultClass: true,
			Nodes:    []*v1.Node{node("n1", "10.0.0.1"), node("n2", "10.0.0.2")},
			Pools:    []*v1alpha1.IPPool{ippool("p", []string{"10.0.0.128/25"}, tc.vrrp)},
			Services: []*v1.Service{lbService("ns", "shared", "10.0.0.129", false, nil), lbService("ns", "local", "10.0.0.130", true, nil)},
		}
		pin, _ := PlanInput(in)
		links := []hostnet.Link{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24")}, DefaultRoute4: true}}
		cfg, errs := KeepalivedConfig(vrrp.Compute(pin), "n1", pin, links, Layout{RunDir: "/run/keeplb"})
		if len(errs) > 0 || len(cfg.Instances) != 2 {
			t.Fatalf("%+v: %d instances, %v", tc.vrrp, len(cfg.Instances), errs)
		}
		data, err := keepalived.Render(cfg)
		if err != nil {
			t.Fatal(err)
		}
		text := string(data)
		if strings.Count(text, tc.want) != 2 || strings.Contains(text, tc.none) {
			t.Errorf("failback %q: want %q in both instances and no %q:\n%s", tc.vrrp.Failback, tc.want, tc.none, text)
		}
	}
}

func TestKeepalivedConfigRendersThisNodesShare(t *testing.T) {
	in := dataplane.Inputs{
		Class: "keeplb.io/vip", DefaultClass: true,
		Nodes: []*v1.Node{node("n1", "10.0.0.1"), node("n2", "10.0.0.2"), node("n3", "10.0.0.3")},
		Pools: []*v1alpha1.IPPool{ippool("p", []string{"10.0.0.128/25"}, &v1alpha1.VRRP{Unicast: true})},
	}
	for i := range 20 {
		in.Services = append(in.Services, lbService("ns", "s"+string(rune('a'+i)), netip.AddrFrom4([4]byte{10, 0, 0, byte(129 + i)}).String(), false, nil))
	}
	pin, _ := PlanInput(in)
	plan := vrrp.Compute(pin)
	links := []hostnet.Link{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24")}, DefaultRoute4: true}}
	l := Layout{RunDir: "/run/keeplb"}
	total := 0
	for _, n := range []string{"n1", "n2", "n3"} {
		cfg, errs := KeepalivedConfig(plan, n, pin, links, l)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		for _, inst := range cfg.Instances {
			if inst.Interface != "eth0" || !inst.UnicastSrc.IsValid() || len(inst.UnicastPeers) != 2 {
				t.Fatalf("%s: instance %+v", n, inst)
			}
			if n == "n1" {
				total += len(inst.VIPs)
			}
		}
		if _, err := keepalived.Render(cfg); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		if cfg.NotifyFIFO != "/run/keeplb/notify.fifo" || cfg.RouterID != n {
			t.Fatalf("global config %+v", cfg)
		}
	}
	if total != 20 {
		t.Fatalf("node n1 configures %d VIPs, want all 20 (every eligible node backs every instance)", total)
	}
	// No interface for the VIPs: reported, not rendered.
	cfg, errs := KeepalivedConfig(plan, "n1", pin, []hostnet.Link{{Name: "lo"}}, l)
	if len(errs) == 0 || len(cfg.Instances) != 0 {
		t.Fatalf("without a usable interface: %d instances, errors %v", len(cfg.Instances), errs)
	}
}
