package vrrp

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// inPool puts a Service in the IPPool named.
func inPool(pool string) func(*v1.Service) {
	return func(s *v1.Service) {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations[annotations.Pool] = pool
	}
}

// keepalivedConf returns the keepalived.conf a node's speaker rendered.
func keepalivedConf(t *testing.T, node string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(os.TempDir(), "keeplb-e2e-"+node, "keepalived.conf"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestLongNames covers issue 9's triggers a-c with a real keepalived: Node
// names of 77 characters (router_id), an IPPool name of 66 and the Local
// IPv6 VIP of a 20-character pool (instance names) used to make every
// speaker refuse its whole keepalived.conf. Now the VIPs are held, fail
// over, and follow their endpoint.
func TestLongNames(t *testing.T) {
	c := newClusterWith(t, topoOptions{nodes: 3, ipv6: true, name: func(i int, id string) string {
		return fmt.Sprintf("kln%d-%s.rack-42.datacenter-west.example-corporation.internal.cluster.local", i+1, id)
	}})
	longPool := "pool-with-a-very-long-name-for-the-edge-routers.datacenter-west.ex"
	v6Pool := "edge-pool-ipv6-local"
	keeplbtest.CreatePool(t, c.dyn, longPool, `{addresses: ["10.77.0.200-10.77.0.220"], vrrp: {advertisementInterval: "100ms"}}`)
	// Addresses spelled with all 8 groups: the longest instance names.
	keeplbtest.CreatePool(t, c.dyn, v6Pool, `{addresses: ["`+strings.TrimSuffix(v6Subnet, ":")+`def0:1234:5678:200/120"], vrrp: {advertisementInterval: "100ms"}}`)
	for _, ns := range c.tp.nodes {
		c.startSpeaker(ns)
	}
	c.service("web", inPool(longPool))
	vip := c.vip("web")
	holder := c.holder(vip, 15*time.Second)
	conf := keepalivedConf(t, holder)
	if !strings.Contains(conf, "# IPPool "+longPool+"\n") || strings.Contains(conf, "router_id "+holder+"\n") {
		t.Fatalf("%s's keepalived.conf lacks the long pool's comment, or has the whole node name as router_id:\n%s", holder, conf)
	}

	// Graceful failover.
	c.stopSpeaker(holder)
	if h := c.holder(vip, 10*time.Second); h == holder {
		t.Fatalf("%s still holds %s after its speaker stopped", h, vip)
	}
	c.startSpeaker(holder)

	// The Local IPv6 VIP is held where its endpoint is, and follows it.
	c.service("local6", inPool(v6Pool), func(s *v1.Service) {
		s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		single := v1.IPFamilyPolicySingleStack
		s.Spec.IPFamilyPolicy, s.Spec.IPFamilies = &single, []v1.IPFamily{v1.IPv6Protocol}
	})
	lvip := c.vip("local6")
	if name := "kl_" + v6Pool + "_v6_" + strings.NewReplacer(":", "-").Replace(lvip); len(name) <= 64 {
		t.Fatalf("the Local instance name %s fits keepalived.MaxNameLen: this case tests nothing", name)
	}
	ready := true
	target := c.tp.nodes[1]
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "e2e", Name: "local6-1", Labels: map[string]string{discoveryv1.LabelServiceName: "local6"}},
		AddressType: discoveryv1.AddressTypeIPv6,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"fd00:244::5"}, NodeName: &target, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}
	created, err := c.client.DiscoveryV1().EndpointSlices("e2e").Create(t.Context(), es, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the Local IPv6 VIP "+lvip+" on its endpoint's node "+target, func() bool {
		h := c.tp.holdersOn(lvip, "eth0")
		return len(h) == 1 && h[0] == target
	})
	if conf := keepalivedConf(t, target); !strings.Contains(conf, "# IPPool "+v6Pool+", Service e2e/local6\n") {
		t.Fatalf("%s's keepalived.conf lacks the Local instance's comment:\n%s", target, conf)
	}
	next := c.tp.nodes[2]
	created.Endpoints[0].NodeName = &next
	if _, err := c.client.DiscoveryV1().EndpointSlices("e2e").Update(t.Context(), created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "the Local IPv6 VIP to follow its endpoint to "+next, func() bool {
		h := c.tp.holdersOn(lvip, "eth0")
		return len(h) == 1 && h[0] == next
	})
}

// TestBrokenPoolLeavesOthersAlone covers trigger d, and an instance
// keepalived would refuse, with a real keepalived. Pools a and b use VRID
// 40 on eth0 and eth1, which the plan allows and which used to give both
// the advert address 169.254.0.40 (refused: the whole keepalived.conf of
// every node). Pool broken hands out 169.254.0.40 itself, a's advert
// address: its instance alone is left out, with a VRRPConfigProblem event on
// the IPPool and a metric, while a's and b's VIPs are held and /healthz
// stays ok.
func TestBrokenPoolLeavesOthersAlone(t *testing.T) {
	c := newClusterWith(t, topoOptions{nodes: 3, eth1: true})
	keeplbtest.CreatePool(t, c.dyn, "a", `{addresses: ["10.77.0.200-10.77.0.210"], vrrp: {virtualRouterIDs: "40", interface: eth0, advertisementInterval: "100ms"}}`)
	keeplbtest.CreatePool(t, c.dyn, "b", `{addresses: ["10.78.0.200-10.78.0.210"], vrrp: {virtualRouterIDs: "40", interface: eth1, advertisementInterval: "100ms"}}`)
	keeplbtest.CreatePool(t, c.dyn, "broken", `{addresses: ["169.254.0.40/32"], vrrp: {virtualRouterIDs: "60", interface: eth0, advertisementInterval: "100ms"}}`)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	watched := c.tp.nodes[0]
	c.startSpeakerServing(watched, metricsAddr)
	for _, ns := range c.tp.nodes[1:] {
		c.startSpeaker(ns)
	}
	c.service("a", inPool("a"))
	c.service("b", inPool("b"))
	c.service("bad", inPool("broken"))
	va, vb, vbad := c.vip("a"), c.vip("b"), c.vip("bad")
	if vbad != "169.254.0.40" {
		t.Fatalf("Service bad got %s, want 169.254.0.40", vbad)
	}
	ha := c.holder(va, 15*time.Second)
	var hb []string
	eventually(t, 15*time.Second, "exactly one holder of "+vb+" on eth1", func() bool {
		hb = c.tp.holdersOn(vb, "eth1")
		return len(hb) == 1
	})
	// Distinct advert addresses: a keeps 169.254.0.40, b has another.
	lo := ip(t, "-n", hb[0], "-br", "-4", "addr", "show", "dev", "lo")
	if m := regexp.MustCompile(`169\.254\.([1-9]\d*)\.40/32`).FindStringSubmatch(lo); m == nil {
		t.Errorf("lo of %s, which masters b, has no advert address 169.254.N.40 with N > 0: %s", hb[0], lo)
	}

	eventually(t, 15*time.Second, "a VRRPConfigProblem event on IPPool broken", func() bool {
		evs, err := c.client.CoreV1().Events("default").List(t.Context(), metav1.ListOptions{FieldSelector: "involvedObject.name=broken,reason=" + speaker.EventVRRPConfigProblem})
		if err != nil {
			return false
		}
		for _, ev := range evs.Items {
			if ev.InvolvedObject.Kind == "IPPool" && ev.Type == v1.EventTypeWarning && strings.Contains(ev.Message, "advert address") {
				return true
			}
		}
		return false
	})
	token := keeplbtest.MetricsToken(t, c.client, "prometheus", true)
	eventually(t, 10*time.Second, "instances_dropped 1 and /healthz ok on "+watched, func() bool {
		m, _, err := keeplbtest.Scrape("https://"+metricsAddr+"/metrics", token)
		if err != nil {
			return false
		}
		_, h, err := keeplbtest.Scrape("https://"+metricsAddr+"/healthz", "")
		return err == nil && h == http.StatusOK && strings.Contains(m, "keeplb_speaker_vrrp_instances_dropped 1\n")
	})
	if h := c.tp.holders(vbad); len(h) > 0 {
		t.Errorf("the refused instance's VIP %s is on %v", vbad, h)
	}

	// VRRP goes on: a's VIP fails over.
	c.stopSpeaker(ha)
	if h := c.holder(va, 10*time.Second); h == ha {
		t.Fatalf("%s still holds %s after its speaker stopped", h, va)
	}
}
