package vrrp

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// holderChanges counts the changes of the Service's holder annotation the
// API server reports for d, and returns them with the last value.
func (c *cluster) holderChanges(name string, d time.Duration) (int, string) {
	c.t.Helper()
	svc, err := c.client.CoreV1().Services("e2e").Get(c.t.Context(), name, metav1.GetOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	last := svc.Annotations[annotations.Holder]
	ctx, cancel := context.WithTimeout(c.t.Context(), d)
	defer cancel()
	w, err := c.client.CoreV1().Services("e2e").Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name, ResourceVersion: svc.ResourceVersion})
	if err != nil {
		c.t.Fatal(err)
	}
	defer w.Stop()
	changes := 0
	for ev := range w.ResultChan() {
		if ev.Type != watch.Modified {
			continue
		}
		if v := ev.Object.(*v1.Service).Annotations[annotations.Holder]; v != last {
			changes, last = changes+1, v
		}
	}
	return changes, last
}

// TestHolderDualStack covers issue 9 item 9 with real keepalived: a
// dual-stack Service whose IPv4 and IPv6 VIPs have different masters. With
// one node name in keeplb.io/holder, each master rewrote it whenever it
// named the other, at the sync rate, for as long as both held. Now each
// writes its own VIP's entry once, and the annotation stays put.
func TestHolderDualStack(t *testing.T) {
	c := newClusterWith(t, topoOptions{nodes: 3, ipv6: true})
	keeplbtest.CreatePool(t, c.dyn, "dual", `{addresses: ["10.77.0.200-10.77.0.250", "`+v6Subnet+`100/120"], vrrp: {advertisementInterval: "1s"}}`)

	// Addresses whose planned masters differ, found with the plan itself.
	try := func(a string) string {
		s := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: "try"}, Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer},
			Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: a}}}}}
		return c.plannedMaster(a, s)
	}
	v4 := "10.77.0.200"
	m4 := try(v4)
	v6, m6 := "", ""
	for a := netip.MustParseAddr(v6Subnet + "100"); v6 == ""; a = a.Next() {
		if m := try(a.String()); m != m4 {
			v6, m6 = a.String(), m
		}
	}
	c.service("web", func(s *v1.Service) {
		s.Annotations = map[string]string{annotations.IPs: v4 + "," + v6}
		policy := v1.IPFamilyPolicyRequireDualStack
		s.Spec.IPFamilyPolicy, s.Spec.IPFamilies = &policy, []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol}
	})
	eventually(t, 30*time.Second, "both VIPs of web", func() bool {
		s, err := c.client.CoreV1().Services("e2e").Get(t.Context(), "web", metav1.GetOptions{})
		return err == nil && len(s.Status.LoadBalancer.Ingress) == 2
	})
	for _, ns := range c.tp.nodes {
		c.startSpeaker(ns)
	}
	// Speakers that start afresh leave the instances of other planned
	// masters to them for a few seconds (vrrp.Hold), so each starts on
	// its planned master: well within the preempt delay.
	eventually(t, 30*time.Second, fmt.Sprintf("%s on %s and %s on %s", v4, m4, v6, m6), func() bool {
		return slices.Equal(c.tp.holders(v4), []string{m4}) && slices.Equal(c.tp.holders(v6), []string{m6})
	})
	want := fmt.Sprintf("%s=%s,%s=%s", v4, m4, v6, m6)
	eventually(t, 15*time.Second, "keeplb.io/holder "+want, func() bool {
		s, err := c.client.CoreV1().Services("e2e").Get(t.Context(), "web", metav1.GetOptions{})
		return err == nil && s.Annotations[annotations.Holder] == want
	})

	const d = 30 * time.Second
	changes, last := c.holderChanges("web", d)
	t.Logf("%s held by %s and %s by %s: %d changes of keeplb.io/holder in %s; last %q", v4, m4, v6, m6, changes, d, last)
	if changes != 0 || last != want {
		t.Errorf("keeplb.io/holder changed %d times in %s while the holders stayed put, ending at %q; want no change from %q", changes, d, last, want)
	}
	if h4, h6 := c.tp.holders(v4), c.tp.holders(v6); !slices.Equal(h4, []string{m4}) || !slices.Equal(h6, []string{m6}) {
		t.Fatalf("the holders moved meanwhile: %v and %v", h4, h6)
	}

	// A failover rewrites only the moved VIP's entry.
	c.stopSpeaker(m6)
	next := ""
	eventually(t, 15*time.Second, v6+" on another node", func() bool {
		h := c.tp.holders(v6)
		if len(h) == 1 && h[0] != m6 {
			next = h[0]
		}
		return next != ""
	})
	eventually(t, 15*time.Second, "keeplb.io/holder naming "+next+" for "+v6, func() bool {
		s, err := c.client.CoreV1().Services("e2e").Get(t.Context(), "web", metav1.GetOptions{})
		if err != nil {
			return false
		}
		h := annotations.ParseHolders(s.Annotations[annotations.Holder], []netip.Addr{netip.MustParseAddr(v4), netip.MustParseAddr(v6)})
		return h[netip.MustParseAddr(v6)] == next && h[netip.MustParseAddr(v4)] == m4
	})
	if out, _ := c.client.CoreV1().Services("e2e").Get(t.Context(), "web", metav1.GetOptions{}); out != nil {
		t.Logf("after %s stopped: keeplb.io/holder %q", m6, out.Annotations[annotations.Holder])
		if strings.Count(out.Annotations[annotations.Holder], "=") == 1 {
			t.Errorf("keeplb.io/holder %q lost an entry", out.Annotations[annotations.Holder])
		}
	}
}
