// Package classcontroller reconciles LoadBalancer Services that set keeplb's
// spec.loadBalancerClass. The upstream k8s.io/cloud-provider service
// controller skips every Service with a class, so keeplb needs this small
// controller of its own for them; it drives the same cloudprovider
// LoadBalancer and uses the upstream service helpers for the finalizer and
// the status patch, so both paths behave alike.
package classcontroller

import (
	"context"
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
	// Known reports whether keeplb holds addresses for a Service key.
	Known func(key string) bool
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

// relevant filters events: Services of our class, and classless Services
// this controller may have to clean up.
func (c *Controller) relevant(svc *v1.Service) bool {
	cls := svc.Spec.LoadBalancerClass
	return cls != nil && *cls == c.class || cls == nil && !c.defaultClass
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
	case ours || cls == nil && !c.defaultClass && (c.known(key) || servicehelper.HasLBFinalizer(svc) && svc.Spec.Type != v1.ServiceTypeLoadBalancer):
		return c.cleanup(ctx, svc)
	}
	return nil
}

func (c *Controller) ensure(ctx context.Context, svc *v1.Service) error {
	if !servicehelper.HasLBFinalizer(svc) {
		updated := svc.DeepCopy()
		updated.Finalizers = append(updated.Finalizers, servicehelper.LoadBalancerCleanupFinalizer)
		var err error
		if svc, err = servicehelper.PatchService(c.client.CoreV1(), svc, updated); err != nil {
			return fmt.Errorf("add finalizer: %w", err)
		}
	}
	status, err := c.balancer.EnsureLoadBalancer(ctx, c.clusterName, svc, nil)
	if err != nil {
		return err
	}
	return c.patchStatus(svc, status, false)
}

func (c *Controller) cleanup(ctx context.Context, svc *v1.Service) error {
	if err := c.balancer.EnsureLoadBalancerDeleted(ctx, c.clusterName, svc); err != nil {
		return err
	}
	return c.patchStatus(svc, &v1.LoadBalancerStatus{}, true)
}

// patchStatus writes status and, on cleanup, removes the finalizer, in one
// patch, and only when something changes.
func (c *Controller) patchStatus(svc *v1.Service, status *v1.LoadBalancerStatus, removeFinalizer bool) error {
	updated := svc.DeepCopy()
	updated.Status.LoadBalancer = *status
	if removeFinalizer {
		updated.Finalizers = nil
		for _, f := range svc.Finalizers {
			if f != servicehelper.LoadBalancerCleanupFinalizer {
				updated.Finalizers = append(updated.Finalizers, f)
			}
		}
	}
	if servicehelper.LoadBalancerStatusEqual(&svc.Status.LoadBalancer, status) && len(updated.Finalizers) == len(svc.Finalizers) {
		return nil
	}
	_, err := servicehelper.PatchService(c.client.CoreV1(), svc, updated)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
