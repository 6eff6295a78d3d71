package controller

import (
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// kickableServices wraps the Service informer handed to the service
// controllers and remembers the event handlers they register. The upstream
// service controller re-reads a Service only on its own retry schedule (up
// to five minutes) or when the Service changes; replaying an add event
// through its handler is the one way to have it retry a pending Service at
// once when an address is freed or a pool appears.
//
// It also decides which Services a reconciler sees at all: with a filter,
// its handlers get only the events of Services the filter accepts (an
// update by the Service's new state, a deletion by its last known one), and
// Kick replays only those. The upstream controller acts on every Service it
// is shown, whatever its class; the filter is what keeps it off Services
// that are not keeplb's (see forUpstream).
type kickableServices struct {
	coreinformers.ServiceInformer
	filter func(*v1.Service) bool

	mu       sync.Mutex
	handlers []cache.ResourceEventHandler
}

// newKickableServices wraps inf; filter may be nil to pass every Service.
func newKickableServices(inf coreinformers.ServiceInformer, filter func(*v1.Service) bool) *kickableServices {
	return &kickableServices{ServiceInformer: inf, filter: filter}
}

// Informer returns the shared informer, wrapped to capture handlers.
func (k *kickableServices) Informer() cache.SharedIndexInformer {
	return &capturingInformer{SharedIndexInformer: k.ServiceInformer.Informer(), parent: k}
}

// Kick replays an add event for each Service key through every handler.
func (k *kickableServices) Kick(keys []string) {
	if len(keys) == 0 {
		return
	}
	k.mu.Lock()
	handlers := append([]cache.ResourceEventHandler(nil), k.handlers...)
	k.mu.Unlock()
	lister := k.ServiceInformer.Lister()
	for _, key := range keys {
		ns, name, err := cache.SplitMetaNamespaceKey(key)
		if err != nil {
			continue
		}
		svc, err := lister.Services(ns).Get(name)
		if err != nil {
			continue
		}
		for _, h := range handlers {
			h.OnAdd(svc, false)
		}
	}
}

// add remembers h and returns what to register with the informer: h
// behind the filter.
func (k *kickableServices) add(h cache.ResourceEventHandler) cache.ResourceEventHandler {
	if k.filter != nil {
		h = filtered{h: h, pass: k.filter}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.handlers = append(k.handlers, h)
	return h
}

// filtered passes on the events of the Services pass accepts. Unlike
// cache.FilteringResourceEventHandler it never turns an update into a
// deletion: a Service that leaves the filter (its type changed) was not
// deleted, and telling the upstream controller so would have it tear down
// what the class controller cleans up.
type filtered struct {
	h    cache.ResourceEventHandler
	pass func(*v1.Service) bool
}

// OnAdd passes on the Services f passes.
func (f filtered) OnAdd(obj any, initial bool) {
	if svc, ok := obj.(*v1.Service); ok && f.pass(svc) {
		f.h.OnAdd(obj, initial)
	}
}

// OnUpdate passes on the updates of the Services f passes, by their new
// state.
func (f filtered) OnUpdate(old, cur any) {
	if svc, ok := cur.(*v1.Service); ok && f.pass(svc) {
		f.h.OnUpdate(old, cur)
	}
}

// OnDelete passes on the deletions of the Services f passed last.
func (f filtered) OnDelete(obj any) {
	last := obj
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		last = d.Obj
	}
	if svc, ok := last.(*v1.Service); ok && f.pass(svc) {
		f.h.OnDelete(obj)
	}
}

type capturingInformer struct {
	cache.SharedIndexInformer
	parent *kickableServices
}

// AddEventHandler registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandler(h cache.ResourceEventHandler) (cache.ResourceEventHandlerRegistration, error) {
	return c.SharedIndexInformer.AddEventHandler(c.parent.add(h))
}

// AddEventHandlerWithResyncPeriod registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandlerWithResyncPeriod(h cache.ResourceEventHandler, resync time.Duration) (cache.ResourceEventHandlerRegistration, error) {
	return c.SharedIndexInformer.AddEventHandlerWithResyncPeriod(c.parent.add(h), resync)
}

// AddEventHandlerWithOptions registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandlerWithOptions(h cache.ResourceEventHandler, opts cache.HandlerOptions) (cache.ResourceEventHandlerRegistration, error) {
	return c.SharedIndexInformer.AddEventHandlerWithOptions(c.parent.add(h), opts)
}

// quietNodes hands the upstream service controller the Node lister it
// needs (it lists nodes for EnsureLoadBalancer) but none of the Node events.
// Those drive its node sync, which calls UpdateLoadBalancer for every
// Service on each node change: keeplb's addresses do not depend on nodes
// (the speakers follow nodes), and that sync reads the controller's Service
// cache without the lock its workers write it under, a data race in
// k8s.io/cloud-provider v0.37 that the race detector reports.
type quietNodes struct {
	coreinformers.NodeInformer
}

// Informer returns the shared Node informer, with handler registration
// turned into a no-op.
func (q quietNodes) Informer() cache.SharedIndexInformer {
	return noHandlers{q.NodeInformer.Informer()}
}

type noHandlers struct {
	cache.SharedIndexInformer
}

// AddEventHandlerWithResyncPeriod registers nothing; see quietNodes.
func (noHandlers) AddEventHandlerWithResyncPeriod(cache.ResourceEventHandler, time.Duration) (cache.ResourceEventHandlerRegistration, error) {
	return nil, nil
}

// AddEventHandler registers nothing; see quietNodes.
func (noHandlers) AddEventHandler(cache.ResourceEventHandler) (cache.ResourceEventHandlerRegistration, error) {
	return nil, nil
}

// AddEventHandlerWithOptions registers nothing; see quietNodes.
func (noHandlers) AddEventHandlerWithOptions(cache.ResourceEventHandler, cache.HandlerOptions) (cache.ResourceEventHandlerRegistration, error) {
	return nil, nil
}
