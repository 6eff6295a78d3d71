package provider

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/cloud-provider/api"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

func testProvider(t *testing.T, pools map[string]*v1alpha1.IPPool) (*Provider, *record.FakeRecorder, *int) {
	t.Helper()
	alloc := allocator.New()
	var aps []allocator.Pool
	for name, p := range pools {
		ap := allocator.Pool{Name: name, AutoAssign: p.Spec.AutoAssignEnabled()}
		for _, s := range p.Spec.Addresses {
			r, err := allocator.ParseRange(s)
			if err != nil {
				t.Fatal(err)
			}
			ap.Ranges = append(ap.Ranges, r)
		}
		aps = append(aps, ap)
	}
	alloc.SetPools(aps)
	rec := record.NewFakeRecorder(100)
	freed := 0
	p := New(Config{
		Allocator:     alloc,
		Pools:         func(n string) *v1alpha1.IPPool { return pools[n] },
		Recorder:      rec,
		RetryInterval: 7 * time.Second,
		OnFreed:       func() { freed++ },
	})
	return p, rec, &freed
}

func svc(name string, ann map[string]string) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Annotations: ann},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, IPFamilies: []v1.IPFamily{v1.IPv4Protocol},
			Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP}}},
	}
}

func events(rec *record.FakeRecorder) []string {
	var out []string
	for {
		select {
		case e := <-rec.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

func TestEnsureLoadBalancer(t *testing.T) {
	pools := map[string]*v1alpha1.IPPool{
		"np": {Spec: v1alpha1.IPPoolSpec{Addresses: []string{"192.0.2.0/30"}}},
		"kp": {Spec: v1alpha1.IPPoolSpec{Addresses: []string{"198.51.100.0/30"}, AutoAssign: new(bool), Forwarding: v1alpha1.ForwardingKubeProxy}},
	}
	p, rec, freed := testProvider(t, pools)
	ctx := context.Background()

	tests := []struct {
		name     string
		ann      map[string]string
		wantIP   string
		wantMode v1.LoadBalancerIPMode
	}{
		{"default", nil, "192.0.2.0", v1.LoadBalancerIPModeProxy},
		{"kube-proxy pool", map[string]string{annotations.Pool: "kp"}, "198.51.100.0", v1.LoadBalancerIPModeVIP},
		{"annotation overrides pool", map[string]string{annotations.Pool: "kp", annotations.Forwarding: "pod"}, "198.51.100.1", v1.LoadBalancerIPModeProxy},
		{"annotation kube-proxy", map[string]string{annotations.Forwarding: "kube-proxy"}, "192.0.2.1", v1.LoadBalancerIPModeVIP},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := svc(tc.name, tc.ann)
			st, err := p.EnsureLoadBalancer(ctx, "c", s, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Ingress) != 1 || st.Ingress[0].IP != tc.wantIP || *st.Ingress[0].IPMode != tc.wantMode {
				t.Fatalf("status = %+v, want %s %s", st.Ingress, tc.wantIP, tc.wantMode)
			}
			if ev := events(rec); len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal IPAllocated Allocated "+tc.wantIP) {
				t.Fatalf("events = %v", ev)
			}
			// Idempotent: same status, no second event.
			st2, _ := p.EnsureLoadBalancer(ctx, "c", s, nil)
			if st2.Ingress[0].IP != tc.wantIP || len(events(rec)) != 0 {
				t.Fatal("a second Ensure changed the address or repeated the event")
			}
			s.Status.LoadBalancer = *st
			if got, ok, _ := p.GetLoadBalancer(ctx, "c", s); !ok || got.Ingress[0].IP != tc.wantIP {
				t.Fatalf("GetLoadBalancer = %v %v", got, ok)
			}
		})
	}

	s := svc("default", nil)
	if err := p.EnsureLoadBalancerDeleted(ctx, "c", s); err != nil || *freed != 1 {
		t.Fatalf("delete: %v, freed %d", err, *freed)
	}
	if err := p.EnsureLoadBalancerDeleted(ctx, "c", s); err != nil || *freed != 1 {
		t.Fatalf("second delete: %v, freed %d", err, *freed)
	}
	if _, ok, _ := p.GetLoadBalancer(ctx, "c", s); ok {
		t.Fatal("deleted load balancer still exists")
	}
}

func TestEnsureLoadBalancerFailures(t *testing.T) {
	p, rec, _ := testProvider(t, map[string]*v1alpha1.IPPool{"np": {Spec: v1alpha1.IPPoolSpec{Addresses: []string{"192.0.2.0/32"}}}})
	ctx := context.Background()
	for _, tc := range []struct {
		ann   map[string]string
		event string
	}{
		{map[string]string{annotations.Forwarding: "dsr"}, "Warning AllocationFailed InvalidAnnotation: keeplb.io/forwarding: \"dsr\""},
		{map[string]string{annotations.Pool: "nope", "keeplb.io/typo": "x"}, "Warning AllocationFailed PoolNotFound: keeplb.io/pool: IPPool \"nope\" does not exist"},
	} {
		_, err := p.EnsureLoadBalancer(ctx, "c", svc("bad", tc.ann), nil)
		var re *api.RetryError
		if !errors.As(err, &re) || re.RetryAfter() != 7*time.Second {
			t.Fatalf("error = %v, want a RetryError after 7s", err)
		}
		ev := events(rec)
		if !strings.HasPrefix(ev[len(ev)-1], tc.event) {
			t.Fatalf("events = %v, want one starting %q", ev, tc.event)
		}
	}
}

func TestRequestFor(t *testing.T) {
	prefer := v1.IPFamilyPolicyPreferDualStack
	s := svc("x", nil)
	s.Labels = map[string]string{"tier": "edge"}
	s.Spec.IPFamilies = []v1.IPFamily{v1.IPv6Protocol, v1.IPv4Protocol}
	s.Spec.IPFamilyPolicy = &prefer
	s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	s.Spec.Selector = map[string]string{"b": "2", "a": "1"}
	s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Port: 53, Protocol: v1.ProtocolUDP}, v1.ServicePort{Port: 8080})
	r := RequestFor(s, annotations.Config{ShareKey: "k"}, map[string]string{"env": "prod"})
	if r.Key != "ns/x" || r.Policy != allocator.PreferDualStack || r.Families[0] != allocator.IPv6 || r.Families[1] != allocator.IPv4 {
		t.Fatalf("families: %+v", r)
	}
	if r.Backends != "local:a=1,b=2" || r.ShareKey != "k" || r.NamespaceLabels["env"] != "prod" || r.ServiceLabels["tier"] != "edge" {
		t.Fatalf("request: %+v", r)
	}
	if len(r.Ports) != 3 || r.Ports[1] != (allocator.Port{Protocol: "UDP", Port: 53}) || r.Ports[2].Protocol != "TCP" {
		t.Fatalf("ports: %+v", r.Ports)
	}
}
