package speaker

import (
	"sync"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/keeplb/keeplb/pkg/nodeview"
)

// serviceIndex indexes the EndpointSlices by their Service,
// "namespace/name", so that a sync reads the slices of the Services that
// changed without listing every slice.
const serviceIndex = "service"

// sliceService returns the Service, "namespace/name", that s belongs to,
// by nodeview's rule; "" when none.
func sliceService(s *discoveryv1.EndpointSlice) string {
	for k := range nodeview.ByService([]*discoveryv1.EndpointSlice{s}) {
		return k
	}
	return ""
}

// indexByService is the EndpointSlice informer's serviceIndex.
func indexByService(obj any) ([]string, error) {
	if s, ok := obj.(*discoveryv1.EndpointSlice); ok {
		if k := sliceService(s); k != "" {
			return []string{k}, nil
		}
	}
	return nil, nil
}

// changes is what the informers' handlers saw change since the last sync
// took them. Handlers only record here and trigger the runner; the sync
// decides what to recompute from it (see Speaker.observe).
type changes struct {
	// all says something every Service's state depends on changed (a
	// Node, an IPPool), or that the last sync failed: the next sync
	// computes everything.
	all bool
	// services are the Services whose object changed, endpoints those
	// whose EndpointSlices changed, "namespace/name".
	services, endpoints map[string]bool
}

// pending holds the changes not synced yet. The zero value is ready.
type pending struct {
	mu sync.Mutex
	ch changes
}

// take returns the changes recorded since the last take, and forgets them.
func (p *pending) take() changes {
	p.mu.Lock()
	defer p.mu.Unlock()
	ch := p.ch
	p.ch = changes{}
	return ch
}

// everything asks the next sync to compute everything.
func (p *pending) everything() {
	p.mu.Lock()
	p.ch.all = true
	p.mu.Unlock()
}

func (p *pending) add(set *map[string]bool, key string) {
	if key == "" {
		return
	}
	p.mu.Lock()
	if *set == nil {
		*set = map[string]bool{}
	}
	(*set)[key] = true
	p.mu.Unlock()
}

// service records a change of a Service (an object or the tombstone of
// a deleted one).
func (p *pending) service(obj any) {
	if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
		p.add(&p.ch.services, key)
	}
}

// slice records a change of an EndpointSlice (an object or the tombstone
// of a deleted one): its Service's endpoints changed.
func (p *pending) slice(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if s, ok := obj.(*discoveryv1.EndpointSlice); ok {
		p.add(&p.ch.endpoints, sliceService(s))
	}
}

// nodeHandlers are handlers(everything, trigger) for Nodes, except that an
// update leaving keeplb's view of the Node as it was (nodeview.Same) is
// no change at all: kubelets rewrite their Node's status for heartbeats
// and image lists, several times a second at a thousand nodes, and each
// would make the next sync compute everything.
func nodeHandlers(everything func(any), trigger func()) cache.ResourceEventHandlerFuncs {
	h := handlers(everything, trigger)
	update := h.UpdateFunc
	h.UpdateFunc = func(old, obj any) {
		o, ok1 := old.(*v1.Node)
		n, ok2 := obj.(*v1.Node)
		if ok1 && ok2 && nodeview.Same(o, n) {
			return
		}
		update(old, obj)
	}
	return h
}

// handlers returns the informers' event handlers: record tells what an
// object's change means (both the old and the new object of an update,
// since a slice may change Service), then the runner is triggered.
func handlers(record func(any), trigger func()) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { record(obj); trigger() },
		UpdateFunc: func(old, obj any) {
			record(old)
			record(obj)
			trigger()
		},
		DeleteFunc: func(obj any) { record(obj); trigger() },
	}
}
