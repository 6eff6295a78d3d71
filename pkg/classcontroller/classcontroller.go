// Package classcontroller reconciles LoadBalancer Services that set keeplb's
// spec.loadBalancerClass. The upstream k8s.io/cloud-provider service
// controller skips every Service with a class, so keeplb needs this small
// controller of its own for them; it drives the same cloudprovider
// LoadBalancer and uses the upstream service helpers for the finalizer and
// the status patch, so both paths behave alike.
//
// It also cleans up after every Service that stopped being a LoadBalancer
// while keeplb still held something for it: the upstream controller is shown
// only classless LoadBalancer Services (its cleanup path ignores the class,
// and would strip another implementation's finalizer), and the API server
// clears spec.loadBalancerClass when the type changes, so the class alone
// cannot tell whose such a Service was. What keeplb holds can: an address
// in its allocator, or the cleanup finalizer that keeplb's field manager
// added (OwnsFinalizer). Each Service thus has exactly one reconciler.
package classcontroller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	cloudprovider "k8s.io/cloud-provider"
	"k8s.io/cloud-provider/api"
	servicehelper "k8s.io/cloud-provider/service/helpers"
	"k8s.io/klog/v2"
)

// Controller reconciles Services of one load balancer class.
type Controller struct {
	class        string
	defaultClass bool
	clusterName  string
	client       kubernetes.Interface
	balancer     cloudprovider.LoadBalancer
	known        func(key string) bool
	manager      string
	lister       corelisters.ServiceLister
	synced       cache.InformerSynced
	queue        workqueue.TypedRateLimitingInterface[string]
}

// Config holds what New needs.
type Config struct {
	// Class is the spec.loadBalancerClass to handle.
	Class string
	// DefaultClass says whether Services without a class are keeplb's; they
	// are reconciled by the upstream controller, but when they are not
	// keeplb's this controller releases what they still hold.
	DefaultClass bool
	// ClusterName is passed to the balancer.
	ClusterName string
	// Client patches Services.
	Client kubernetes.Interface
	// Balancer is keeplb's LoadBalancer implementation.
	Balancer cloudprovider.LoadBalancer
	// Known reports whether keeplb holds addresses for a Service key, or
	// tried to give it some.
	Known func(key string) bool
	// Manager is the field manager keeplb writes Services as (its user
	// agent): the cleanup finalizer it owns is recorded under this name.
	Manager string
	// Services is the Service informer.
	Services coreinformers.ServiceInformer
}

// New returns a Controller and registers its event handlers.
func New(cfg Config) (*Controller, error) {
	c := &Controller{
		class:        cfg.Class,
		defaultClass: cfg.DefaultClass,
		clusterName:  cfg.ClusterName,
		client:       cfg.Client,
		balancer:     cfg.Balancer,
		known:        cfg.Known,
		manager:      cfg.Manager,
		lister:       cfg.Services.Lister(),
		synced:       cfg.Services.Informer().HasSynced,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, 5*time.Minute),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "keeplb-class"},
		),
	}
	_, err := cfg.Services.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    c.enqueue,
		UpdateFunc: func(_, cur any) { c.enqueue(cur) },
		DeleteFunc: c.enqueue,
	})
	return c, err
}

func (c *Controller) enqueue(obj any) {
	if svc, ok := obj.(*v1.Service); ok && !c.relevant(svc) {
		return
	}
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		utilruntime.HandleError(err)
		return
	}
	c.queue.Add(key)
}

// relevant filters events: Services of our class, and Services this
// controller may have to clean up (see mayOwe).
func (c *Controller) relevant(svc *v1.Service) bool {
	switch cls := svc.Spec.LoadBalancerClass; {
	case cls != nil:
		return *cls == c.class
	case svc.Spec.Type == v1.ServiceTypeLoadBalancer && c.defaultClass:
		return false // the upstream controller's
	}
	return c.mayOwe(svc)
}

// mayOwe reports whether keeplb may still hold something for a Service
// that is not (or no longer) its: an address, or its cleanup finalizer.
func (c *Controller) mayOwe(svc *v1.Service) bool {
	key, _ := cache.MetaNamespaceKeyFunc(svc)
	return c.known(key) || OwnsFinalizer(svc, c.manager)
}

// OwnsFinalizer reports whether svc carries the cleanup finalizer and the
// field manager named manager added it. Other implementations put the same
// standard finalizer on their own Services; only the managed fields tell
// whose it is.
func OwnsFinalizer(svc *v1.Service, manager string) bool {
	if !servicehelper.HasLBFinalizer(svc) {
		return false
	}
	key := `v:"` + servicehelper.LoadBalancerCleanupFinalizer + `"`
	for _, mf := range svc.ManagedFields {
		if mf.Manager != manager || mf.FieldsV1 == nil {
			continue
		}
		var fields struct {
			Metadata struct {
				Finalizers map[string]json.RawMessage `json:"f:finalizers"`
			} `json:"f:metadata"`
		}
		if json.Unmarshal(mf.FieldsV1.GetRawBytes(), &fields) == nil {
			if _, ok := fields.Metadata.Finalizers[key]; ok {
				return true
			}
		}
	}
	return false
}

// Run reconciles with workers goroutines until ctx is done.
func (c *Controller) Run(ctx context.Context, workers int) {
	defer utilruntime.HandleCrash()
	defer c.queue.ShutDown()
	logger := klog.FromContext(ctx)
	logger.Info("Starting controller for load balancer class", "class", c.class)
	if !cache.WaitForNamedCacheSyncWithContext(ctx, c.synced) {
		return
	}
	for range workers {
		go wait.UntilWithContext(ctx, c.worker, time.Second)
	}
	<-ctx.Done()
}

func (c *Controller) worker(ctx context.Context) {
	for c.processNext(ctx) {
	}
}

func (c *Controller) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	err := c.sync(ctx, key)
	var re *api.RetryError
	switch {
	case err == nil:
		c.queue.Forget(key)
	case errors.As(err, &re):
		c.queue.AddAfter(key, re.RetryAfter())
	default:
		utilruntime.HandleErrorWithContext(ctx, err, "Syncing Service failed, retrying", "service", key)
		c.queue.AddRateLimited(key)
	}
	return true
}

func (c *Controller) sync(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		// Not a key the informer makes: retrying cannot help.
		utilruntime.HandleError(fmt.Errorf("classcontroller: dropping invalid key %q: %w", key, err))
		return nil
	}
	svc, err := c.lister.Services(ns).Get(name)
	if apierrors.IsNotFound(err) {
		// Deleted without our finalizer (or before we saw it): release.
		return c.balancer.EnsureLoadBalancerDeleted(ctx, c.clusterName, &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}})
	}
	if err != nil {
		return err
	}
	cls := svc.Spec.LoadBalancerClass
	ours := cls != nil && *cls == c.class
	switch {
	case ours && svc.Spec.Type == v1.ServiceTypeLoadBalancer && svc.DeletionTimestamp == nil:
		return c.ensure(ctx, svc)
	case ours:
		return c.cleanup(ctx, svc)
	case cls == nil && (svc.Spec.Type != v1.ServiceTypeLoadBalancer || !c.defaultClass) && c.mayOwe(svc):
		return c.cleanup(ctx, svc)
	}
	return nil
}

// ensure allocates first and then writes the finalizer with the status in
// one patch. Adding the finalizer on its own first would cost a second
// write, and its update event would run a Service that cannot get an
// address through a second failing attempt (and event) at once. Until the
// patch lands nothing outside this process holds the address, and a
// Service deleted meanwhile is released by the NotFound path of sync.
func (c *Controller) ensure(ctx context.Context, svc *v1.Service) error {
	status, err := c.balancer.EnsureLoadBalancer(ctx, c.clusterName, svc, nil)
	if err != nil {
		return err
	}
	return c.patch(svc, status, true)
}

func (c *Controller) cleanup(ctx context.Context, svc *v1.Service) error {
	if err := c.balancer.EnsureLoadBalancerDeleted(ctx, c.clusterName, svc); err != nil {
		return err
	}
	// A Service keeplb gave an address to before it stopped being keeplb's
	// may carry a cleanup finalizer that is not keeplb's: keep that one.
	cls := svc.Spec.LoadBalancerClass
	ours := cls != nil && *cls == c.class
	keep := !ours && servicehelper.HasLBFinalizer(svc) && !OwnsFinalizer(svc, c.manager)
	return c.patch(svc, &v1.LoadBalancerStatus{}, keep)
}

// patch writes status and the cleanup finalizer (kept or added with
// finalizer, else removed) in one patch, and only when something changes.
func (c *Controller) patch(svc *v1.Service, status *v1.LoadBalancerStatus, finalizer bool) error {
	updated := svc.DeepCopy()
	updated.Status.LoadBalancer = *status
	updated.Finalizers = nil
	for _, f := range svc.Finalizers {
		if f != servicehelper.LoadBalancerCleanupFinalizer {
			updated.Finalizers = append(updated.Finalizers, f)
		}
	}
	if finalizer {
		updated.Finalizers = append(updated.Finalizers, servicehelper.LoadBalancerCleanupFinalizer)
	}
	if servicehelper.LoadBalancerStatusEqual(&svc.Status.LoadBalancer, status) && servicehelper.HasLBFinalizer(svc) == finalizer {
		return nil
	}
	_, err := servicehelper.PatchService(c.client.CoreV1(), svc, updated)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
