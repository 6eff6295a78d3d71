package speaker

import (
	"sync"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
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
	case *v1.Node:
		o.Status.Images = nil
		o.Status.VolumesInUse = nil
		o.Status.VolumesAttached = nil
	case *discoveryv1.EndpointSlice:
		// Its annotations are the EndpointSlice controller's trigger
		// time, distinct on every slice; its owner is the Service, known
		// by the label.
		o.Annotations, o.OwnerReferences = nil, nil
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
