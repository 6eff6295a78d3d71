package nodeview

import (
	"slices"

	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/keeplb/keeplb/pkg/allocator"
)

// ByService groups EndpointSlices by their Service, "namespace/name" (the
// kubernetes.io/service-name label); slices without it belong to none.
func ByService(ss []*discoveryv1.EndpointSlice) map[string][]*discoveryv1.EndpointSlice {
	out := map[string][]*discoveryv1.EndpointSlice{}
	for _, s := range ss {
		if name := s.Labels[discoveryv1.LabelServiceName]; name != "" {
			k := s.Namespace + "/" + name
			out[k] = append(out[k], s)
		}
	}
	return out
}

// InFamily reports whether s lists endpoints of the family. FQDN slices
// are of neither.
func InFamily(s *discoveryv1.EndpointSlice, fam allocator.Family) bool {
	if fam == allocator.IPv6 {
		return s.AddressType == discoveryv1.AddressTypeIPv6
	}
	return s.AddressType == discoveryv1.AddressTypeIPv4
}

// Weight returns an endpoint's share of new connections: 1 when ready and
// not terminating, 0 when terminating but still serving (its established
// connections drain), and false for any other, which takes no traffic.
// An endpoint without a ready condition is ready, as the API defines.
func Weight(ep discoveryv1.Endpoint) (int, bool) {
	ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
	serving := ready
	if ep.Conditions.Serving != nil {
		serving = *ep.Conditions.Serving
	}
	terminating := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
	switch {
	case ready && !terminating:
		return 1, true
	case serving && terminating:
		return 0, true
	}
	return 0, false
}

// LocalWeights sums the weights of one Service's endpoints of the family
// per node (its slices, as ByService gives them): a node with only
// terminating, serving endpoints maps to 0; a node with none is absent.
// This is what externalTrafficPolicy Local forwards by, and holds VIPs by.
func LocalWeights(ss []*discoveryv1.EndpointSlice, fam allocator.Family) map[string]int {
	out := map[string]int{}
	for _, s := range ss {
		if !InFamily(s, fam) {
			continue
		}
		for _, ep := range s.Endpoints {
			w, ok := Weight(ep)
			if !ok || ep.NodeName == nil {
				continue
			}
			out[*ep.NodeName] += w
		}
	}
	return out
}

// LocalNodes returns, sorted, the nodes with at least one ready endpoint
// of the family (LocalWeights above 0): those where a Local Service's VIP
// of that family is best held.
func LocalNodes(ss []*discoveryv1.EndpointSlice, fam allocator.Family) []string {
	var out []string
	for n, w := range LocalWeights(ss, fam) {
		if w > 0 {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}
