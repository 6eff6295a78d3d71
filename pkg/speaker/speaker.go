// Package speaker runs keeplb's speaker on one node: it watches Services,
// EndpointSlices, Nodes and IPPools, computes the cluster's VRRP plan (the
// same on every node), renders this node's part as keepalived.conf, keeps
// keepalived running with it, and reports which node holds each VIP.
//
// With --ipvs (on by default) it also programs the node's IPVS table for
// keeplb's VIPs after each VRRP step (see package dataplane and ipvsStep);
// with --ipvs=false it never touches IPVS.
package speaker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/runner"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// kubeIPVSLink is the dummy device where kube-proxy in IPVS mode binds
// load-balancer addresses; its addresses are kube-proxy's, never ours.
const kubeIPVSLink = "kube-ipvs0"

// Component is the name the speaker records events under.
const Component = "keeplb-speaker"

// EventVIPAcquired is recorded on a Service when a node becomes MASTER for
// one of its VIPs.
const EventVIPAcquired = "VIPAcquired"

// Run runs the speaker until ctx is done.
func Run(ctx context.Context, o *Options) error {
	if err := o.Validate(); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = o.KubeAPIQPS, o.KubeAPIBurst
	return RunWithConfig(ctx, o, cfg)
}

// RunWithConfig is Run with a ready REST config.
func RunWithConfig(ctx context.Context, o *Options, cfg *rest.Config) error {
	o = o.withDefaults()
	var net hostnet.Interface
	var err error
	if o.NetNS != "" {
		// The sysctls of another namespace are not this process's to check.
		o.SkipSysctls = true
		o.Keepalived = append([]string{"ip", "netns", "exec", o.NetNS}, o.Keepalived...)
		net, err = hostnet.NewAt("/run/netns/" + o.NetNS)
	} else {
		net, err = hostnet.New()
	}
	if err != nil {
		return err
	}
	return RunWith(ctx, o, cfg, net)
}

// RunWith is Run with a ready REST config and host network, for tests.
// With o.IPVS it opens the kernel's IPVS (of o.NetNS) all the same.
func RunWith(ctx context.Context, o *Options, cfg *rest.Config, net hostnet.Interface) error {
	if err := o.Validate(); err != nil {
		return err
	}
	logger := klog.FromContext(ctx).WithValues("node", o.NodeName)
	ctx = klog.NewContext(ctx, logger)
	cfg = rest.CopyConfig(cfg)
	cfg.UserAgent = Component
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if !o.SkipSysctls {
		if err := hostnet.Ensure(net, hostnet.VRRPSysctls()); err != nil {
			return fmt.Errorf("the speaker needs these sysctls, which its DaemonSet's init container (keeplb prepare-node) sets; see that container's log, or delete this pod to run it again: %w", err)
		}
	}
	layout := Layout{RunDir: o.RunDir}
	if err := os.MkdirAll(layout.TrackPath(""), 0o755); err != nil {
		return err
	}
	proc, err := keepalived.NewExecProcess(keepalived.ExecOptions{Command: o.Keepalived, ConfigPath: layout.ConfigPath(), RunDir: o.RunDir, Output: os.Stderr})
	if err != nil {
		return err
	}
	sup, err := keepalived.NewSupervisor(proc, keepalived.SupervisorOptions{ConfigPath: layout.ConfigPath(), ReloadWindow: o.ReloadWindow})
	if err != nil {
		return err
	}
	m := metrics.NewSpeaker()
	var dp *ipvsStep
	if o.IPVS {
		if dp, err = newIPVSStep(ctx, o, func() (ipvs.Interface, error) { return openIPVS(o.NetNS) }, net, m); err != nil {
			return err
		}
	}
	s := &Speaker{opts: o, client: client, dyn: dyn, net: net, sup: sup, layout: layout, metrics: m, dp: dp, states: map[string]keepalived.State{}}
	return s.run(ctx)
}

// Speaker is one running speaker.
type Speaker struct {
	opts    *Options
	client  kubernetes.Interface
	dyn     dynamic.Interface
	net     hostnet.Interface
	sup     *keepalived.Supervisor
	layout  Layout
	metrics *metrics.Speaker
	// dp is the IPVS dataplane, nil without --ipvs.
	dp *ipvsStep

	services  cache.SharedIndexInformer
	slices    cache.SharedIndexInformer
	nodes     cache.SharedIndexInformer
	poolInf   cache.SharedIndexInformer
	recorder  record.EventRecorder
	runner    *runner.Runner
	inputs    func() Inputs
	synced    bool
	healthyMu sync.Mutex

	lastProblems string // the plan problems last logged

	mu     sync.Mutex
	plan   vrrp.Plan
	owners map[netip.Addr][]string
	states map[string]keepalived.State // instance -> state on this node
}

func (s *Speaker) run(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	if s.dp != nil {
		defer s.dp.close()
	}
	factory := informers.NewSharedInformerFactory(s.client, 0)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(s.dyn, 0)
	s.services = factory.Core().V1().Services().Informer()
	s.slices = factory.Discovery().V1().EndpointSlices().Informer()
	s.nodes = factory.Core().V1().Nodes().Informer()
	s.poolInf = dynFactory.ForResource(v1alpha1.IPPoolResource).Informer()
	s.runner = runner.New(s.sync, s.opts.MinSyncInterval, time.Second, 5*time.Minute)
	for _, inf := range []cache.SharedIndexInformer{s.services, s.slices, s.nodes, s.poolInf} {
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { s.runner.Trigger() },
			UpdateFunc: func(any, any) { s.runner.Trigger() },
			DeleteFunc: func(any) { s.runner.Trigger() },
		}); err != nil {
			return err
		}
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: s.client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	s.recorder = broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: Component, Host: s.opts.NodeName})
	if s.dp != nil {
		s.dp.recorder = s.recorder
	}

	if s.opts.MetricsBindAddress != "0" {
		go s.serve(ctx)
	}
	factory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	defer factory.Shutdown()
	defer dynFactory.Shutdown()
	if !cache.WaitForNamedCacheSyncWithContext(ctx, s.services.HasSynced, s.slices.HasSynced, s.nodes.HasSynced, s.poolInf.HasSynced) {
		return ctx.Err()
	}

	// VIPs of our pools left on this node by a crash would answer next to
	// the real holder: remove them before keepalived starts.
	if err := s.removeVIPs(ctx); err != nil {
		return err
	}
	events, err := keepalived.WatchFIFO(ctx, s.layout.FIFOPath())
	if err != nil {
		return err
	}
	supCtx, stopSup := context.WithCancel(context.WithoutCancel(ctx))
	supDone := make(chan struct{})
	go func() { defer close(supDone); s.sup.Run(supCtx) }()
	go s.watch(ctx, events)
	s.healthyMu.Lock()
	s.synced = true
	s.healthyMu.Unlock()
	s.runner.Run(ctx)

	// Shutting down: keepalived's clean stop sends priority-0 adverts so
	// peers take over at once; then no VIP of ours may stay behind.
	stopSup()
	<-supDone
	logger.Info("keepalived stopped; removing VIPs")
	err = s.removeVIPs(context.WithoutCancel(ctx))
	if s.dp != nil {
		err = errors.Join(err, s.dp.exit(context.WithoutCancel(ctx), s.collect()))
	}
	return err
}

// sync computes the plan and applies this node's share of it.
func (s *Speaker) sync(ctx context.Context) (err error) {
	logger := klog.FromContext(ctx)
	defer func() {
		// The runner retries a failed sync; this says why it had to.
		if err != nil {
			logger.Error(err, "Sync failed; retrying, less often while it keeps failing, and at once on any change")
		}
	}()
	in := s.collect()
	// IPVS before VRRP: a new VIP then comes up with its virtual servers
	// and masquerading in place, instead of refusing connections until the
	// next step. Its error does not stop VRRP: a node whose IPVS failed
	// still holds its VIPs.
	if s.dp != nil {
		dpErr := s.dp.sync(ctx, in)
		defer func() { err = errors.Join(dpErr, err) }()
	}
	start := time.Now()
	pin, owners := PlanInput(in)
	plan := vrrp.Compute(pin)
	links, err := s.net.Links()
	if err != nil {
		return err
	}
	cfg, errs := KeepalivedConfig(plan, s.opts.NodeName, pin.Nodes, links, s.layout)
	for _, err := range errs {
		logger.Error(err, "Instance not configured on this node")
	}
	data, err := keepalived.Render(cfg)
	if err != nil {
		return fmt.Errorf("render keepalived.conf: %w", err)
	}
	s.metrics.RenderDuration.Observe(time.Since(start).Seconds())
	sev := map[string]float64{"Warning": 0, "Error": 0}
	problems := fmt.Sprint(plan.Problems)
	for _, p := range plan.Problems {
		sev[p.Severity.String()]++
		if problems != s.lastProblems {
			logger.Info("VRRP plan problem", "severity", p.Severity, "reason", p.Reason, "pool", p.Pool, "message", p.Message)
		}
	}
	s.lastProblems = problems
	for k, v := range sev {
		s.metrics.Problems.WithLabelValues(k).Set(v)
	}
	// Track files first: a reload then starts with the right priorities.
	for name, v := range vrrp.TrackValues(plan, s.opts.NodeName, pin) {
		if _, err := keepalived.WriteAtomic(s.layout.TrackPath(name), []byte(strconv.Itoa(v)+"\n")); err != nil {
			return err
		}
	}
	if changed, err := s.sup.Apply(data); err != nil {
		return err
	} else if changed {
		logger.V(2).Info("keepalived.conf changed", "instances", len(cfg.Instances))
	}
	s.mu.Lock()
	s.plan, s.owners = plan, owners
	states := maps.Clone(s.states)
	s.mu.Unlock()
	s.reconcileHolders(ctx, plan, owners, states)
	return nil
}

// refreshProcessMetrics samples keepalived's status, on every scrape.
func (s *Speaker) refreshProcessMetrics() {
	st := s.sup.Status()
	s.metrics.Reloads.Set(float64(st.Reloads))
	s.metrics.Restarts.Set(float64(st.Restarts))
	up := 0.0
	if st.Running {
		up = 1
	}
	s.metrics.KeepalivedUp.Set(up)
}

func (s *Speaker) collect() Inputs {
	in := Inputs{Class: s.opts.LoadBalancerClass, DefaultClass: s.opts.DefaultClass}
	for _, o := range s.services.GetStore().List() {
		in.Services = append(in.Services, o.(*v1.Service))
	}
	for _, o := range s.slices.GetStore().List() {
		in.Slices = append(in.Slices, o.(*discoveryv1.EndpointSlice))
	}
	for _, o := range s.nodes.GetStore().List() {
		in.Nodes = append(in.Nodes, o.(*v1.Node))
	}
	for _, o := range s.poolInf.GetStore().List() {
		if p, err := v1alpha1.FromUnstructured(o); err == nil {
			in.Pools = append(in.Pools, p)
		}
	}
	return in
}

// removeVIPs removes from this node every host address that lies in one of
// our pools and is not one of the node's own addresses.
func (s *Speaker) removeVIPs(ctx context.Context) error {
	in := s.collect()
	parsed := pools.Parse(in.Pools)
	keep := map[netip.Addr]bool{}
	for _, n := range in.Nodes {
		if n.Name != s.opts.NodeName {
			continue
		}
		for _, a := range nodeOf(n).InternalIPs {
			keep[a] = true
		}
	}
	links, err := s.net.Links()
	if err != nil {
		return err
	}
	var errs []error
	for link, ps := range hostnet.StaleVIPs(links, func(a netip.Addr) bool { return pools.Find(parsed, a) != "" }, keep) {
		if link == kubeIPVSLink {
			continue // kube-proxy's (IPVS mode) copies of kube-proxy-forwarded VIPs
		}
		for _, p := range ps {
			klog.FromContext(ctx).Info("Removing VIP", "address", p, "interface", link)
			if err := s.net.DeleteAddress(link, p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// serve serves metrics and health until ctx is done.
func (s *Speaker) serve(ctx context.Context) {
	mux := http.NewServeMux()
	metricsHandler := s.metrics.Handler()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		s.refreshProcessMetrics()
		metricsHandler.ServeHTTP(w, r)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		s.healthyMu.Lock()
		synced := s.synced
		s.healthyMu.Unlock()
		if st := s.sup.Status(); synced && !st.Running && st.Restarts > 0 {
			http.Error(w, fmt.Sprintf("keepalived is down (restarts %d, last exit %v)", st.Restarts, st.LastExit), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
	srv := &http.Server{Addr: s.opts.MetricsBindAddress, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		klog.FromContext(ctx).Error(err, "Metrics server failed")
	}
}
