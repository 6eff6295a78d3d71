package speaker

import (
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
)

// lastApplied is the annotation kubectl apply leaves on objects: a copy of
// the whole object as last applied, often the largest part of a Service.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

// trim is the informers' transform: it drops, before an object is cached,
// what the speaker never reads, since every speaker caches every Service,
// EndpointSlice and Node of the cluster. Measured at 10,000 Services, the
// managedFields alone were 10 MB of a 167 MB live heap; a Node's image
// list is often most of the Node. The speaker writes Services only by
// patches of its own annotation, never from a cached copy, so nothing
// dropped here can be written back.
func trim(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
		if a := m.GetAnnotations(); a != nil {
			delete(a, lastApplied)
		}
	}
	if n, ok := obj.(*v1.Node); ok {
		n.Status.Images = nil
		n.Status.VolumesInUse = nil
		n.Status.VolumesAttached = nil
	}
	return obj, nil
}
