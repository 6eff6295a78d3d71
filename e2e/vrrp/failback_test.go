package vrrp

import (
	"fmt"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// poolAndIP puts a Service in the named IPPool at the given address.
func poolAndIP(pool, ip string) func(*v1.Service) {
	return func(s *v1.Service) {
		s.Annotations = map[string]string{v1alpha1.AnnotationPool: pool, v1alpha1.AnnotationIPs: ip}
	}
}

// TestFailbackPolicies: a VIP of a failback Never pool stays on the node
// that took it over when its planned master comes back, while a VIP of a
// failback Immediate pool with the same planned master goes back to it at
// once. The second VIP is the witness that the planned master's keepalived
// is up and winning elections while the first one stays away.
func TestFailbackPolicies(t *testing.T) {
	c := newCluster(t)
	const returns, stays = "10.77.0.210", "10.77.0.200"
	keeplbtest.CreatePool(t, c.dyn, "immediate", `{addresses: ["10.77.0.210-10.77.0.219"], vrrp: {advertisementInterval: "100ms", virtualRouterIDs: "80-99", failback: Immediate}}`)
	c.service("returns", poolAndIP("immediate", returns))
	if got := c.vip("returns"); got != returns {
		t.Fatalf("returns got %s, want %s", got, returns)
	}
	m := c.plannedMaster(returns)

	// The Never pool's name decides its instance's planned master: try
	// names until it is m, with the Service it will have.
	never := ""
	for i := range 30 {
		name := fmt.Sprintf("never-%d", i)
		keeplbtest.CreatePool(t, c.dyn, name, `{addresses: ["10.77.0.200-10.77.0.209"], vrrp: {advertisementInterval: "100ms", virtualRouterIDs: "60-79", failback: Never}}`)
		svc := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: "stays", Annotations: map[string]string{v1alpha1.AnnotationPool: name}},
			Spec:       v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP}}},
			Status:     v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: stays}}}},
		}
		if c.plannedMaster(stays, svc) == m {
			never = name
			break
		}
		if err := c.dyn.Resource(v1alpha1.IPPoolResource).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if never == "" {
		t.Fatalf("no Never pool name of 30 tried gives planned master %s", m)
	}
	c.service("stays", poolAndIP(never, stays))
	if got := c.vip("stays"); got != stays || c.plannedMaster(stays) != m {
		t.Fatalf("stays got %s, planned on %s; want %s on %s", got, c.plannedMaster(stays), stays, m)
	}

	// m starts first, so holds both; it leaves gracefully; both move.
	c.startMasterFirst(stays)
	eventually(t, 15*time.Second, "both VIPs on "+m, func() bool {
		return slices.Equal(c.tp.holders(stays), []string{m}) && slices.Equal(c.tp.holders(returns), []string{m})
	})
	c.stopSpeaker(m)
	taker := ""
	eventually(t, 10*time.Second, "both VIPs to leave "+m, func() bool {
		hs, hr := c.tp.holders(stays), c.tp.holders(returns)
		if len(hs) == 1 && hs[0] != m && len(hr) == 1 && hr[0] != m {
			taker = hs[0]
			return true
		}
		return false
	})

	// m comes back: Immediate's VIP returns, Never's stays.
	c.startSpeaker(m)
	start := time.Now()
	eventually(t, 20*time.Second, returns+" (Immediate) back on "+m, func() bool {
		return slices.Equal(c.tp.holders(returns), []string{m}) && slices.Equal(c.tp.holders(stays), []string{taker})
	})
	t.Logf("failback Immediate: %s back on %s %s after its speaker started", returns, m, time.Since(start).Round(10*time.Millisecond))
	c.steady("failback Never, "+m+" back and master of the Immediate pool", []string{stays}, map[string][]string{stays: {taker}}, 5*time.Second)
	t.Logf("failback Never: %s stayed on %s for 5 s (50 adverts) with its planned master %s up", stays, taker, m)
}
