package controller

import (
	"sync"
	"time"

	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// kickableServices wraps the Service informer handed to the service
// controllers and remembers the event handlers they register. The upstream
// service controller re-reads a Service only on its own retry schedule (up
// to five minutes) or when the Service changes; replaying an add event
// through its handler is the one way to have it retry a pending Service at
// once when an address is freed or a pool appears.
type kickableServices struct {
	coreinformers.ServiceInformer

	mu       sync.Mutex
	handlers []cache.ResourceEventHandler
}

func newKickableServices(inf coreinformers.ServiceInformer) *kickableServices {
	return &kickableServices{ServiceInformer: inf}
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

func (k *kickableServices) add(h cache.ResourceEventHandler) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.handlers = append(k.handlers, h)
}

type capturingInformer struct {
	cache.SharedIndexInformer
	parent *kickableServices
}

// AddEventHandler registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandler(h cache.ResourceEventHandler) (cache.ResourceEventHandlerRegistration, error) {
	c.parent.add(h)
	return c.SharedIndexInformer.AddEventHandler(h)
}

// AddEventHandlerWithResyncPeriod registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandlerWithResyncPeriod(h cache.ResourceEventHandler, resync time.Duration) (cache.ResourceEventHandlerRegistration, error) {
	c.parent.add(h)
	return c.SharedIndexInformer.AddEventHandlerWithResyncPeriod(h, resync)
}

// AddEventHandlerWithOptions registers h and remembers it for Kick.
func (c *capturingInformer) AddEventHandlerWithOptions(h cache.ResourceEventHandler, opts cache.HandlerOptions) (cache.ResourceEventHandlerRegistration, error) {
	c.parent.add(h)
	return c.SharedIndexInformer.AddEventHandlerWithOptions(h, opts)
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
