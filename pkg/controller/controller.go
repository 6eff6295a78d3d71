// Package controller runs keeplb's controller: the upstream cloud-provider
// service controller and keeplb's class controller over keeplb's
// LoadBalancer implementation, the IPPool status writer, leader election
// and the metrics endpoint.
package controller

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	servicecontroller "k8s.io/cloud-provider/controllers/service"
	"k8s.io/component-base/featuregate"
	controllersmetrics "k8s.io/component-base/metrics/prometheus/controllers"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/classcontroller"
	"github.com/keeplb/keeplb/pkg/kubeconfig"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/provider"
	"github.com/keeplb/keeplb/pkg/runner"
	"github.com/keeplb/keeplb/pkg/serve"
)

// Component is the name keeplb's controller records events under.
const Component = "keeplb-controller"

// Run runs the controller with the given options until ctx is done. With
// leader election it serves /healthz and /readyz as a standby until it
// leads, and returns an error if it loses the lead, so that the process
// restarts with clean state.
func Run(ctx context.Context, o *Options) error {
	cfg, err := kubeconfig.Load(o.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	return RunWithConfig(ctx, o, cfg)
}

// RunWithConfig is Run with a ready REST config, for tests and embedding;
// the client-side rate limits are the options', whatever cfg says.
func RunWithConfig(ctx context.Context, o *Options, cfg *rest.Config) error {
	if err := o.Validate(); err != nil {
		return err
	}
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = Component
	cfg.QPS, cfg.Burst = o.KubeAPIQPS, o.KubeAPIBurst
	// The Lease is renewed and released with a client of its own: the
	// fence stops every other write of this replica when it stops leading.
	leases, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	// The metrics server's reviews are POSTs that a standby must send
	// too: they go around the fence as well.
	reviews := rest.CopyConfig(cfg)
	f := newFence(o.writeTimeout())
	cfg.Wrap(f.Wrap)
	// Each writer has a client, and so a client-side rate limit, of its
	// own, as kube-controller-manager gives each of its controllers: the
	// two Service reconcilers, the pool status writer, and the events,
	// which then never take the budget of the status writes.
	clients := make([]kubernetes.Interface, 3)
	for i := range clients {
		if clients[i], err = kubernetes.NewForConfig(cfg); err != nil {
			return err
		}
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	m := metrics.NewController()
	c := &Controller{opts: o, client: clients[0], upstreamClient: clients[1], classClient: clients[2], leases: leases, dyn: dyn, fence: f, metrics: m}
	evcfg := rest.CopyConfig(cfg)
	evcfg.QPS, evcfg.Burst = o.EventQPS, o.EventBurst
	events, err := kubernetes.NewForConfig(evcfg)
	if err != nil {
		return err
	}
	c.events = newEventWriter(events.CoreV1(), metrics.NewEvents(m), klog.FromContext(ctx).WithName("events"))
	srv, err := c.server(reviews)
	if err != nil {
		return err
	}
	// A controller nobody can probe or scrape must not run on.
	return serve.Alongside(ctx, srv, func(ctx context.Context) error { return c.elect(ctx, c.run) })
}

// Controller is one running keeplb controller.
type Controller struct {
	opts *Options
	// client (the pools' status, informers), upstreamClient, classClient
	// and dyn write through fence, each with its own rate limit; leases
	// renews the Lease.
	client                      kubernetes.Interface
	upstreamClient, classClient kubernetes.Interface
	leases                      kubernetes.Interface
	dyn                         dynamic.Interface
	fence                       *fence
	metrics                     *metrics.Controller
	// events writes the events of both reconcilers.
	events *eventWriter

	// leading and seeded feed /readyz: a standby is ready, a leader is
	// ready once the allocator is seeded.
	leading, seeded atomic.Bool

	alloc *allocator.Allocator
	// services feeds the class controller; upstreamServices feeds the
	// upstream controller only the Services it may reconcile (forUpstream).
	services, upstreamServices *kickableServices
	poolInf                    cache.SharedIndexInformer
	recorder                   record.EventRecorder
	runner                     *runner.Runner

	// capacity changes whenever an address may have become available
	// (freed, pools or namespaces changed); pending Services are retried
	// when it moves.
	capacity atomic.Int64
	pools    poolMemory
}

func (c *Controller) run(ctx context.Context) error {
	c.leading.Store(true)
	defer c.leading.Store(false)
	logger := klog.FromContext(ctx)
	o := c.opts

	factory := informers.NewSharedInformerFactory(c.client, 0)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(c.dyn, 0)
	c.services = newKickableServices(factory.Core().V1().Services(), nil)
	c.upstreamServices = newKickableServices(factory.Core().V1().Services(), forUpstream)
	nodes := factory.Core().V1().Nodes()
	namespaces := factory.Core().V1().Namespaces()
	c.poolInf = dynFactory.ForResource(v1alpha1.IPPoolResource).Informer()

	c.recorder = eventRecorder{w: c.events, source: v1.EventSource{Component: Component}, logger: logger}

	unmanaged, _ := o.unmanaged() // validated
	c.alloc = allocator.New(unmanaged...)
	c.runner = runner.New(c.syncPools, time.Second, 5*time.Second, 5*time.Minute)
	prov := c.newProvider(namespaces.Lister())
	if err := c.watch(namespaces); err != nil {
		return err
	}
	upstream, class, err := c.reconcilers(prov, nodes)
	if err != nil {
		return err
	}

	// Informers are created lazily: only those asked for before Start run.
	factory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	defer factory.Shutdown()
	defer dynFactory.Shutdown()
	synced := []cache.InformerSynced{c.services.Informer().HasSynced, namespaces.Informer().HasSynced, c.poolInf.HasSynced}
	if upstream != nil {
		synced = append(synced, nodes.Informer().HasSynced)
	}
	if !cache.WaitForNamedCacheSyncWithContext(ctx, synced...) {
		return ctx.Err()
	}

	// Seed the allocator from what the API says before any allocation.
	start := time.Now()
	restored, err := c.seed(ctx, prov)
	if err != nil {
		return err
	}
	logger.Info("Allocator seeded from Service status", "services", restored, "duration", time.Since(start))
	c.seeded.Store(true)
	defer c.seeded.Store(false)

	// Each Run returns once ctx is done; the writes their stray goroutines
	// may still attempt are stopped by the fence (see elect).
	var workers sync.WaitGroup
	workers.Go(func() { c.events.run(ctx) })
	workers.Go(func() { c.runner.Run(ctx) })
	if upstream != nil {
		workers.Go(func() { upstream.Run(ctx, o.Workers, controllersmetrics.NewControllerManagerMetrics("keeplb")) })
	}
	workers.Go(func() { class.Run(ctx, o.Workers) })
	workers.Wait()
	return nil
}

// reconcilers returns the two Service reconcilers over prov: the upstream
// service controller for classless Services (nil without --default-class)
// and the class controller.
func (c *Controller) reconcilers(prov *provider.Provider, nodes coreinformers.NodeInformer) (*servicecontroller.Controller, *classcontroller.Controller, error) {
	o := c.opts
	var upstream *servicecontroller.Controller
	if o.DefaultClass {
		var err error
		upstream, err = servicecontroller.New(prov, eventsTo{Interface: c.upstreamClient, w: c.events}, c.upstreamServices, quietNodes{nodes}, o.ClusterName, featuregate.NewFeatureGate())
		if err != nil {
			return nil, nil, fmt.Errorf("create service controller: %w", err)
		}
	}
	class, err := classcontroller.New(classcontroller.Config{
		Class:        o.LoadBalancerClass,
		DefaultClass: o.DefaultClass,
		ClusterName:  o.ClusterName,
		Client:       c.classClient,
		Balancer:     prov,
		Known:        c.known,
		Manager:      Component,
		Services:     c.services,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("create class controller: %w", err)
	}
	return upstream, class, nil
}

// newProvider returns keeplb's LoadBalancer over the controller's
// allocator, pools and recorder; nsLister gives the namespace labels pool
// selectors match.
func (c *Controller) newProvider(nsLister corelisters.NamespaceLister) *provider.Provider {
	return provider.New(provider.Config{
		Allocator: c.alloc,
		Pools:     c.pool,
		Namespaces: func(ns string) map[string]string {
			if n, err := nsLister.Get(ns); err == nil {
				return n.Labels
			}
			return nil
		},
		Recorder:      c.recorder,
		Metrics:       c.metrics,
		RetryInterval: c.opts.RetryInterval,
		OnFreed:       c.capacityChanged,
		OnChange:      c.runner.Trigger,
	})
}

// watch registers the handlers that mark capacity changed when pools or
// namespace labels change, retry a pending Service when its labels change,
// and keep the allocator's view of every Service's status.
func (c *Controller) watch(namespaces coreinformers.NamespaceInformer) error {
	if _, err := c.poolInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.capacityChanged() },
		UpdateFunc: func(old, cur any) {
			if old.(*unstructured.Unstructured).GetGeneration() != cur.(*unstructured.Unstructured).GetGeneration() {
				c.capacityChanged()
			}
		},
		DeleteFunc: func(any) { c.capacityChanged() },
	}); err != nil {
		return err
	}
	// The upstream controller ignores label changes, which decide pool
	// admission (serviceSelector): retry a pending Service when they change.
	if _, err := c.services.ServiceInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(old, cur any) {
			o, n := old.(*v1.Service), cur.(*v1.Service)
			if key := n.Namespace + "/" + n.Name; !labels.Equals(o.Labels, n.Labels) && c.alloc.IsPending(key) {
				c.kick([]string{key})
			}
		},
	}); err != nil {
		return err
	}
	// Status is the truth at any time, not only at start: an address that
	// any Service lists (a late write of an old leader, an operator's edit,
	// a restore from backup, another implementation's Service) is never
	// handed to another Service while it is listed.
	if _, err := c.services.ServiceInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.statusSeen(obj.(*v1.Service)) },
		UpdateFunc: func(_, cur any) { c.statusSeen(cur.(*v1.Service)) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if svc, ok := obj.(*v1.Service); ok && c.alloc.SetStatus(svcKey(svc), nil) {
				c.capacityChanged()
			}
		},
	}); err != nil {
		return err
	}
	_, err := namespaces.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.capacityChanged() },
		UpdateFunc: func(old, cur any) {
			if !labels.Equals(old.(*v1.Namespace).Labels, cur.(*v1.Namespace).Labels) {
				c.capacityChanged()
			}
		},
	})
	return err
}

// kick has both reconcilers retry the Services with these keys at once;
// each acts only on those it is responsible for.
func (c *Controller) kick(keys []string) {
	c.upstreamServices.Kick(keys)
	c.services.Kick(keys)
}

// known reports whether keeplb holds, or tried to give, addresses to the
// Service with this key.
func (c *Controller) known(key string) bool {
	_, ok := c.alloc.Lookup(key)
	return ok || c.alloc.IsPending(key)
}

// statusSeen records the addresses svc lists in its status. When one of
// keeplb's Services lists an address keeplb did not give it (an operator's
// edit, a restore, a late write), its reconciler runs again and rewrites the
// status with the Service's own addresses: the reconcilers do not react to
// status changes by themselves. The address stays out of every free set
// until then (SetStatus), so nobody else is given it meanwhile.
func (c *Controller) statusSeen(svc *v1.Service) {
	key := svcKey(svc)
	listed := provider.StatusAddrs(svc)
	if c.alloc.SetStatus(key, listed) {
		c.capacityChanged()
	}
	al, ok := c.alloc.Lookup(key)
	if !ok || !c.ours(svc) {
		return
	}
	stale := false
	var taken []string
	for _, a := range listed {
		if slices.Contains(al.Addrs, a) {
			continue
		}
		// Most often the status is only behind: the Service was just
		// given new addresses and the reconciler is about to write them.
		// Running it again is then harmless; an event is not.
		stale = true
		if holders := c.alloc.Holders(a); len(holders) > 0 {
			taken = append(taken, fmt.Sprintf("%s (held by Service %s)", a, strings.Join(holders, ", ")))
		}
	}
	if len(taken) > 0 {
		c.recorder.Eventf(svc, v1.EventTypeWarning, provider.EventStatusOverwritten,
			"status.loadBalancer.ingress lists %s, which keeplb did not give this Service; the status is rewritten with its own %s. To ask for an address, set keeplb.io/ips",
			strings.Join(taken, ", "), al)
	}
	if stale {
		c.kick([]string{key})
	}
}

// forUpstream is the upstream service controller's share: classless
// LoadBalancer Services (it is created only with --default-class). It
// ignores the class on its cleanup path, so it is shown nothing else;
// classless Services that stop being LoadBalancers are cleaned up by the
// class controller, which can tell keeplb's from another implementation's.
func forUpstream(svc *v1.Service) bool {
	return svc.Spec.LoadBalancerClass == nil && svc.Spec.Type == v1.ServiceTypeLoadBalancer
}

func svcKey(svc *v1.Service) string {
	return svc.Namespace + "/" + svc.Name
}

// seed loads the pools and every address in Service status into the
// allocator, oldest Service first, so that if two Services claim one
// address the older keeps it.
func (c *Controller) seed(ctx context.Context, prov *provider.Provider) (int, error) {
	// Of a pool sync only the allocator's part and the warnings: the
	// runner's first sync writes the statuses and metrics and retries the
	// pending Services.
	c.takePools(planPools(c.alloc, c.observePools(ctx)))
	svcs, err := c.services.Lister().List(labels.Everything())
	if err != nil {
		return 0, err
	}
	sort.Slice(svcs, func(i, j int) bool {
		ti, tj := svcs[i].CreationTimestamp, svcs[j].CreationTimestamp
		if !ti.Equal(&tj) {
			return ti.Before(&tj)
		}
		return svcs[i].Namespace+"/"+svcs[i].Name < svcs[j].Namespace+"/"+svcs[j].Name
	})
	n := 0
	for _, svc := range svcs {
		// Every Service's status, keeplb's or not, before any Restore: an
		// address listed by a Service that cannot keep it stays out of the
		// free sets all the same.
		c.statusSeen(svc)
	}
	for _, svc := range svcs {
		// A Service being deleted keeps its addresses out of the free
		// sets through its status until it is gone, but holds nothing:
		// restored, an older one would take back an address that a
		// sharer of it holds now.
		if !c.ours(svc) || len(svc.Status.LoadBalancer.Ingress) == 0 || svc.DeletionTimestamp != nil {
			continue
		}
		if err := prov.Restore(svc); err != nil {
			c.recorder.Eventf(svc, v1.EventTypeWarning, provider.EventAllocationFailed, "address in status not kept: %v; the Service gets another address", err)
			continue
		}
		n++
	}
	return n, nil
}

// ours reports whether keeplb is responsible for svc's load balancer.
func (c *Controller) ours(svc *v1.Service) bool {
	return annotations.Handles(svc, c.opts.LoadBalancerClass, c.opts.DefaultClass)
}

func (c *Controller) capacityChanged() {
	c.capacity.Add(1)
	if c.runner != nil {
		c.runner.Trigger()
	}
}

// pool returns the named IPPool from the informer cache.
func (c *Controller) pool(name string) *v1alpha1.IPPool {
	obj, ok, err := c.poolInf.GetStore().GetByKey(name)
	if err != nil || !ok {
		return nil
	}
	p, err := v1alpha1.FromUnstructured(obj)
	if err != nil {
		return nil
	}
	return p
}

// server returns the server of /metrics, /healthz and /readyz, nil when
// disabled. kube reaches the API server for the metrics' authentication
// and authorization.
func (c *Controller) server(kube *rest.Config) (*serve.Server, error) {
	if c.opts.MetricsBindAddress == "0" {
		return nil, nil
	}
	return serve.New(c.opts.serveConfig(), kube, serve.Endpoints{
		Metrics: c.metrics.Handler(),
		Health: map[string]http.Handler{
			"/healthz": http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) }),
			"/readyz": http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				if c.leading.Load() && !c.seeded.Load() {
					http.Error(w, "leader is seeding the allocator", http.StatusServiceUnavailable)
					return
				}
				_, _ = w.Write([]byte("ok"))
			}),
		},
	})
}
