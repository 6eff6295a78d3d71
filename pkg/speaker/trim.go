package speaker

import (
	"strings"
	"sync"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"

	"github.com/keeplb/keeplb/pkg/annotations"
)

// lastApplied is the annotation kubectl apply leaves on objects: a copy of
// the whole object as last applied, often the largest part of a Service.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// maxInterned bounds the node names a trimmer shares: past it (node names
// churned through an autoscaler for months) it starts over.
const maxInterned = 20000

// trimmer is the informers' transform: it drops, before an object is
// cached, what the speaker never reads, since every speaker caches every
// Service, EndpointSlice and Node of the cluster. Measured at 10,000
// Services, the managedFields alone were 10 MB of a 167 MB live heap; a
// Node's image list is often most of the Node; an EndpointSlice's
// endpoints carry a reference to their pod, a hostname, a zone and hints,
// none of which decides forwarding. The speaker writes Services only by
// patches of its own annotation, never from a cached copy, so nothing
// dropped here can be written back.
//
// It also shares what 100,000 endpoints repeat: each endpoint's node name
// and conditions arrive as pointers of their own, decoded apart; cached
// endpoints point to one copy per node name and one per boolean. Cached
// objects are never written through (client-go's rule for a cache), so
// sharing is safe.
type trimmer struct {
	mu          sync.Mutex
	nodes       map[string]*string
	truth, lies bool // true and false, pointed to by conditions
}

func newTrimmer() *trimmer { return &trimmer{nodes: map[string]*string{}, truth: true} }

// trim is the transform.
func (t *trimmer) trim(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
		if a := m.GetAnnotations(); a != nil {
			delete(a, lastApplied)
		}
	}
	switch o := obj.(type) {
	case *v1.Service:
		// What the speaker reads of a Service is its ports, type, class,
		// traffic policy, affinity, source ranges, status and its own
		// annotations; its selector (a map per Service), cluster IPs and
		// families, labels and other controllers' annotations are kube-
		// proxy's and the EndpointSlice controller's business.
		o.Labels = nil
		o.Annotations = ownAnnotations(o.Annotations)
		o.Spec.Selector, o.Spec.ClusterIP, o.Spec.ClusterIPs, o.Spec.ExternalIPs = nil, "", nil, nil
		o.Spec.IPFamilies, o.Spec.IPFamilyPolicy, o.Spec.InternalTrafficPolicy = nil, nil, nil
		o.Status.Conditions = nil
	case *v1.Node:
		// A Node's labels (the pools' selectors), addresses and
		// conditions decide; its annotations (a CNI's, often kilobytes),
		// capacity and system info do not.
		o.Annotations, o.OwnerReferences = nil, nil
		o.Status.Images = nil
		o.Status.VolumesInUse = nil
		o.Status.VolumesAttached = nil
		o.Status.Capacity, o.Status.Allocatable = nil, nil
		o.Status.NodeInfo = v1.NodeSystemInfo{}
		o.Status.RuntimeHandlers, o.Status.Features, o.Status.Config = nil, nil, nil
	case *discoveryv1.EndpointSlice:
		// Its annotations are the EndpointSlice controller's trigger
		// time, distinct on every slice; its owner is the Service, known
		// by the label, the only one kept.
		o.Annotations, o.OwnerReferences = nil, nil
		if name, ok := o.Labels[discoveryv1.LabelServiceName]; ok {
			o.Labels = map[string]string{discoveryv1.LabelServiceName: name}
		} else {
			o.Labels = nil
		}
		t.mu.Lock()
		defer t.mu.Unlock()
		if len(t.nodes) > maxInterned {
			clear(t.nodes)
		}
		for i := range o.Endpoints {
			ep := &o.Endpoints[i]
			ep.TargetRef, ep.Hostname, ep.Zone, ep.Hints, ep.DeprecatedTopology = nil, nil, nil, nil, nil
			ep.NodeName = t.node(ep.NodeName)
			c := &ep.Conditions
			c.Ready, c.Serving, c.Terminating = t.bool(c.Ready), t.bool(c.Serving), t.bool(c.Terminating)
		}
	}
	return obj, nil
}

// ownAnnotations returns the annotations of a that the speaker reads:
// keeplb's own and the legacy loadBalancerSourceRanges annotation; nil if
// none. a itself is left alone: it is the decoded object's, about to be
// cached in its trimmed form.
func ownAnnotations(a map[string]string) map[string]string {
	var out map[string]string
	for k, v := range a {
		if strings.HasPrefix(k, annotations.Prefix) || k == v1.AnnotationLoadBalancerSourceRangesKey {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

func (t *trimmer) node(n *string) *string {
	if n == nil {
		return nil
	}
	if shared, ok := t.nodes[*n]; ok {
		return shared
	}
	t.nodes[*n] = n
	return n
}

func (t *trimmer) bool(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &t.truth
	}
	return &t.lies
}
