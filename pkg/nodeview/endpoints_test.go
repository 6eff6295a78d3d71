package nodeview

import (
	"slices"
	"testing"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
)

func ep(node string, ready, serving, terminating *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{NodeName: &node, Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating}}
}

func TestWeight(t *testing.T) {
	yes, no := new(bool), new(bool)
	*yes = true
	for _, c := range []struct {
		name             string
		ready, srv, term *bool
		want             int
		ok               bool
	}{
		{"no conditions: ready", nil, nil, nil, 1, true},
		{"ready", yes, nil, nil, 1, true},
		{"not ready", no, nil, nil, 0, false},
		{"terminating, serving", no, yes, yes, 0, true},
		{"terminating, not serving", no, no, yes, 0, false},
		{"ready yet terminating (not by the API's rules): drains", yes, nil, yes, 0, true},
	} {
		w, ok := Weight(ep("n", c.ready, c.srv, c.term))
		if w != c.want || ok != c.ok {
			t.Errorf("%s: Weight = %d, %v; want %d, %v", c.name, w, ok, c.want, c.ok)
		}
	}
}

// A dual-stack Service's endpoints count for the VIP of their own family
// only: n2 has only IPv6 endpoints, so it is no local node of the IPv4 VIP.
func TestLocalNodesByFamily(t *testing.T) {
	yes, no := new(bool), new(bool)
	*yes = true
	slice := func(name string, fam discoveryv1.AddressType, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: fam, Endpoints: eps}
	}
	all := []*discoveryv1.EndpointSlice{
		slice("web-4", discoveryv1.AddressTypeIPv4, ep("n1", yes, nil, nil), ep("n3", no, yes, yes)),
		slice("web-6", discoveryv1.AddressTypeIPv6, ep("n1", nil, nil, nil), ep("n2", yes, nil, nil), ep("n2", yes, nil, nil)),
		slice("web-fqdn", discoveryv1.AddressTypeFQDN, ep("n4", yes, nil, nil)),
		{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "orphan"}, AddressType: discoveryv1.AddressTypeIPv4, Endpoints: []discoveryv1.Endpoint{ep("n5", yes, nil, nil)}},
	}
	by := ByService(all)
	if len(by) != 1 || len(by["ns/web"]) != 3 {
		t.Fatalf("ByService = %v, want the three slices of ns/web", by)
	}
	if got := LocalNodes(by["ns/web"], allocator.IPv4); !slices.Equal(got, []string{"n1"}) {
		t.Errorf("IPv4 local nodes %v, want [n1] (n3 only drains)", got)
	}
	if got := LocalNodes(by["ns/web"], allocator.IPv6); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Errorf("IPv6 local nodes %v, want [n1 n2]", got)
	}
	if got := LocalWeights(by["ns/web"], allocator.IPv4); len(got) != 2 || got["n1"] != 1 || got["n3"] != 0 {
		t.Errorf("IPv4 weights %v, want n1:1 n3:0", got)
	}
	if got := LocalWeights(by["ns/web"], allocator.IPv6); got["n2"] != 2 {
		t.Errorf("IPv6 weights %v, want n2:2", got)
	}
}
