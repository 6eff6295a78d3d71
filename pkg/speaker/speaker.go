// Package speaker runs keeplb's speaker on one node: it watches Services,
// EndpointSlices, Nodes and IPPools, computes the cluster's VRRP plan (the
// same on every node), renders this node's part as keepalived.conf, keeps
// keepalived running with it, and reports which node holds each VIP.
//
// With --ipvs (on by default) it also programs the node's IPVS table for
// keeplb's VIPs after each VRRP step (see package dataplane and ipvsStep);
// with --ipvs=false it never touches IPVS, and writes keeplb's nftables
// table with the VIP port guard alone (newGuardStep).
package speaker

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
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
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/runner"
	"github.com/keeplb/keeplb/pkg/serve"
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

// EventVRRPConfigProblem is a Warning recorded on the IPPool, Service or
// Node to fix when a node leaves a VRRP instance, or a unicast peer of one,
// out of its keepalived.conf (see ConfigProblem). Once per problem and
// node, until the problem goes away.
const EventVRRPConfigProblem = "VRRPConfigProblem"

// keepalivedStartGrace is how long keepalived may take to start after the
// caches synced (the first sync, then the start) before /healthz fails.
const keepalivedStartGrace = 30 * time.Second

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
	// What goes in keepalived.conf's global settings comes from here and
	// is checked here, so that no sync can fail on it.
	if err := (keepalived.Config{RouterID: keepalived.FitName(o.NodeName, 0), NotifyFIFO: layout.FIFOPath(),
		TrackFiles: []keepalived.TrackFile{{Name: "t", Path: layout.TrackPath("t")}}}).Validate(); err != nil {
		return fmt.Errorf("--run-dir %q cannot be written in keepalived.conf: %w", o.RunDir, err)
	}
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
	} else {
		dp = newGuardStep(ctx, o, m)
	}
	s := &Speaker{opts: o, client: client, dyn: dyn, net: net, sup: sup, layout: layout, metrics: m, dp: dp, states: map[string]keepalived.State{}}
	srv, err := s.server(ctx, cfg)
	if err != nil {
		return err
	}
	return serve.Alongside(ctx, srv, s.run)
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
	inputs    func() dataplane.Inputs
	healthyMu sync.Mutex
	health    health

	// reported holds the problems of the last sync (the plan's and this
	// node's ConfigProblems), so that each is logged, and recorded as an
	// event, once while it lasts.
	reported map[string]bool

	holders    holderWrites      // limits holder annotation writes (holder.go)
	nodeWarned map[string]string // Node -> its ignored InternalIPs last reported (nodes.go)

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
	s.metrics.NotifyFIFOUp.Set(1)
	supCtx, stopSup := context.WithCancel(context.WithoutCancel(ctx))
	supDone := make(chan struct{})
	go func() { defer close(supDone); s.sup.Run(supCtx) }()
	go func() {
		s.watch(ctx, events)
		if ctx.Err() == nil {
			// Holders, state metrics and VIPAcquired events would freeze.
			logger.Error(nil, "keepalived's notify FIFO can no longer be read, so VRRP state changes go unseen; /healthz fails, so that the kubelet restarts the speaker")
			s.metrics.NotifyFIFOUp.Set(0)
			s.healthyMu.Lock()
			s.health.fifoDead = true
			s.healthyMu.Unlock()
		}
	}()
	s.healthyMu.Lock()
	s.health.synced = time.Now()
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
		} else {
			s.metrics.LastSyncSuccess.SetToCurrentTime()
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
	s.observe(ctx, in, plan)
	err = s.applyVRRP(ctx, in, pin, plan, start)
	s.healthyMu.Lock()
	s.health.vrrpErr = err
	s.healthyMu.Unlock()
	if err != nil {
		s.metrics.VRRPSyncErrors.Inc()
		return err
	}
	s.mu.Lock()
	s.plan, s.owners = plan, owners
	states := maps.Clone(s.states)
	s.mu.Unlock()
	s.reconcileHolders(ctx, plan, owners, states)
	return nil
}

// applyVRRP renders this node's keepalived.conf for the plan, reports what
// it had to leave out, writes the track files and hands the configuration
// to the supervisor. It fails only when nothing could be applied.
func (s *Speaker) applyVRRP(ctx context.Context, in dataplane.Inputs, pin vrrp.Input, plan vrrp.Plan, start time.Time) error {
	links, err := s.net.Links()
	if err != nil {
		return err
	}
	data, problems, err := renderVRRP(plan, s.opts.NodeName, pin, links, s.layout)
	if err != nil {
		return fmt.Errorf("render keepalived.conf: %w", err)
	}
	s.metrics.RenderDuration.Observe(time.Since(start).Seconds())
	s.report(ctx, in, plan, problems)
	// Track files first: a reload then starts with the right priorities.
	for name, v := range vrrp.TrackValues(plan, s.opts.NodeName, pin, s.dp.canForward()) {
		if _, err := keepalived.WriteAtomic(s.layout.TrackPath(name), []byte(strconv.Itoa(v)+"\n")); err != nil {
			return err
		}
	}
	if changed, err := s.sup.Apply(data); err != nil {
		return err
	} else if changed {
		klog.FromContext(ctx).V(2).Info("keepalived.conf changed", "bytes", len(data))
	}
	return nil
}

// renderVRRP is the pure part of a sync's VRRP step: this node's
// keepalived.conf for the plan, without what cannot be configured, which it
// returns. Its error is for keepalived.conf's global settings only, which
// RunWith checked: no value in the API can make it fail.
func renderVRRP(plan vrrp.Plan, node string, pin vrrp.Input, links []hostnet.Link, l Layout) ([]byte, []ConfigProblem, error) {
	cfg, problems := KeepalivedConfig(plan, node, pin, links, l)
	data, dropped, err := keepalived.RenderValid(cfg)
	if err != nil {
		return nil, nil, err
	}
	services := localServices(pin.VIPs)
	for _, d := range dropped {
		p := ConfigProblem{Instance: d.Instance, Dropped: true, Kind: KindIPPool,
			Message: fmt.Sprintf("node %s leaves out VRRP instance %s, which keepalived would refuse: %v", node, d.Instance, d.Err)}
		i, ok := slices.BinarySearchFunc(plan.Instances, d.Instance, func(in vrrp.Instance, name string) int { return strings.Compare(in.Name, name) })
		if !ok {
			continue // not from the plan: KeepalivedConfig makes none
		}
		inst := plan.Instances[i]
		p.Name = inst.Pool
		svcs := servicesOf(inst, services)
		if len(svcs) == 0 {
			problems = append(problems, p)
		}
		for _, svc := range svcs {
			p.Kind, p.Name = KindService, svc
			problems = append(problems, p)
		}
	}
	return data, problems, nil
}

// report logs the plan's problems and this node's ConfigProblems when they
// appear, records a VRRPConfigProblem event for each ConfigProblem on the
// object to fix, and sets their metrics. A problem that lasts is reported
// once; again only if it went away and came back.
func (s *Speaker) report(ctx context.Context, in dataplane.Inputs, plan vrrp.Plan, problems []ConfigProblem) {
	logger := klog.FromContext(ctx)
	seen := make(map[string]bool, len(plan.Problems)+len(problems))
	sev := map[string]float64{"Warning": 0, "Error": 0}
	for _, p := range plan.Problems {
		sev[p.Severity.String()]++
		key := fmt.Sprintf("plan %s %s", p.Pool, p)
		if seen[key] = true; !s.reported[key] {
			logger.Info("VRRP plan problem", "severity", p.Severity, "reason", p.Reason, "pool", p.Pool, "message", p.Message)
		}
	}
	for k, v := range sev {
		s.metrics.Problems.WithLabelValues(k).Set(v)
	}
	dropped := map[string]bool{}
	peers := 0
	for _, p := range problems {
		if p.Dropped {
			dropped[p.Instance] = true
		}
		if p.Peer.IsValid() {
			peers++
		}
		key := fmt.Sprintf("config %+v", p)
		if seen[key] {
			continue
		}
		if seen[key] = true; s.reported[key] {
			continue
		}
		logger.Info("VRRP configuration problem", "instance", p.Instance, "dropped", p.Dropped, "kind", p.Kind, "name", p.Name, "field", p.Field, "message", p.Message)
		msg := p.Message
		if p.Field != "" {
			msg = p.Field + ": " + msg
		}
		if obj := objectOf(in, p.Kind, p.Name); obj != nil && s.recorder != nil {
			s.recorder.Event(obj, v1.EventTypeWarning, EventVRRPConfigProblem, msg)
		}
	}
	s.metrics.InstancesDropped.Set(float64(len(dropped)))
	s.metrics.PeersDropped.Set(float64(peers))
	s.reported = seen
}

// objectOf returns what an event about the object kind/name goes on, or
// nil if in does not hold it. An IPPool, read through a dynamic informer,
// is named by a reference.
func objectOf(in dataplane.Inputs, kind, name string) runtime.Object {
	switch kind {
	case KindService:
		if svc := serviceByKey(in, name); svc != nil {
			return svc
		}
	case KindNode:
		for _, n := range in.Nodes {
			if n.Name == name {
				return n
			}
		}
	case KindIPPool:
		for _, p := range in.Pools {
			if p.Name == name {
				return &v1.ObjectReference{Kind: v1alpha1.IPPoolKind, APIVersion: v1alpha1.SchemeGroupVersion.String(), Name: p.Name, UID: p.UID}
			}
		}
	}
	return nil
}

// health is what /healthz judges, besides keepalived's status.
type health struct {
	// synced is when the caches synced and the syncs began; zero before.
	synced time.Time
	// vrrpErr is why the last sync could not apply keepalived.conf at all.
	vrrpErr error
	// fifoDead is set once keepalived's notify FIFO can no longer be read.
	fifoDead bool
}

// unhealthy says why /healthz fails, or "" when it passes. It fails when
// the speaker cannot do its job and a restart may help: keepalived down
// (after it ran, or not started keepalivedStartGrace after the syncs began),
// the last sync unable to apply any configuration, or the notify FIFO
// unreadable. Instances left out for a bad object never fail it: they are
// the object's to fix, and a restart would only drop every VIP of the node.
func unhealthy(h health, st keepalived.Status, now time.Time) string {
	switch {
	case h.synced.IsZero():
		return "" // still starting
	case h.fifoDead:
		return "keepalived's notify FIFO can no longer be read, so VRRP state changes go unseen"
	case h.vrrpErr != nil:
		return fmt.Sprintf("the last sync could not apply keepalived's configuration: %v", h.vrrpErr)
	case !st.Running && st.Restarts > 0:
		return fmt.Sprintf("keepalived is down (restarts %d, last exit %v)", st.Restarts, st.LastExit)
	case !st.Running && now.Sub(h.synced) > keepalivedStartGrace:
		return fmt.Sprintf("keepalived has not started %s after the speaker's first sync (last error %v)", now.Sub(h.synced).Round(time.Second), st.LastExit)
	}
	return ""
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

func (s *Speaker) collect() dataplane.Inputs {
	in := dataplane.Inputs{Class: s.opts.LoadBalancerClass, DefaultClass: s.opts.DefaultClass}
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

// server returns the server of /metrics and /healthz, nil when disabled.
// kube reaches the API server for the metrics' authentication and
// authorization.
func (s *Speaker) server(ctx context.Context, kube *rest.Config) (*serve.Server, error) {
	if s.opts.MetricsBindAddress == "0" {
		return nil, nil
	}
	cfg := s.opts.serveConfig()
	if cfg.Wildcard() {
		klog.FromContext(ctx).Info("Warning: metrics and health are served on every address of this node, each VIP it holds included; the DaemonSet binds them to the node's address", "metricsBindAddress", cfg.BindAddress)
	}
	metricsHandler := s.metrics.Handler()
	return serve.New(cfg, kube, serve.Endpoints{
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s.refreshProcessMetrics()
			metricsHandler.ServeHTTP(w, r)
		}),
		Health: map[string]http.Handler{"/healthz": http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			s.healthyMu.Lock()
			h := s.health
			s.healthyMu.Unlock()
			if why := unhealthy(h, s.sup.Status(), time.Now()); why != "" {
				http.Error(w, why, http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ok"))
		})},
	})
}
