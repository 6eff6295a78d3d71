// Package speaker runs keeplb's speaker on one node. Each sync observes
// the informers' Services, EndpointSlices, Nodes and IPPools, the node's
// links and keepalived's reported states; computes, in one pure step,
// everything this node should have (the dataplane state for IPVS and
// keeplb's nftables table, the cluster's VRRP plan, the same on every node,
// and this node's keepalived.conf, track files and holder claims); then
// applies it in a documented order (see Speaker.apply): forwarding first,
// then keepalived, then the holder annotations. The informers' handlers
// record which Services changed, so that a sync reads and recomputes only
// those, and reuses the VRRP step's share when its inputs did not change
// (see Speaker.observe); every few minutes a resync reads everything.
//
// The node is reached through one Kernel struct (network, IPVS, nftables,
// conntrack, keepalived), opened once from the options by OpenKernel, or
// filled with fakes by tests. Run is the entry point of the flags; RunWith
// that of tests.
//
// With --ipvs (on by default) the forwarding step runs the whole
// dataplane (package dataplane); with --ipvs=false, or on a kernel without
// IPVS, it writes keeplb's nftables table with the VIP port guard alone.
package speaker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
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
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/kubeconfig"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/runner"
	"github.com/keeplb/keeplb/pkg/serve"
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

// resyncPeriod is the longest time between two syncs, and between two
// syncs that compute everything and read the whole IPVS table: the safety
// net under the syncs that recompute only what the informers saw change.
const resyncPeriod = 5 * time.Minute

// keepalivedStartGrace is how long keepalived may take to start after the
// caches synced (the first sync, then the start) before /healthz fails.
const keepalivedStartGrace = 30 * time.Second

// Run runs the speaker with the flags' options until ctx is done: it
// reaches the API server as --kubeconfig, $KUBECONFIG or the in-cluster
// service account say (package kubeconfig) and opens the node's kernel
// (OpenKernel). Tests use RunWith.
func Run(ctx context.Context, o *Options) error {
	if err := o.Validate(); err != nil {
		return err
	}
	cfg, err := kubeconfig.Load(o.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = o.KubeAPIQPS, o.KubeAPIBurst
	k, err := OpenKernel(ctx, o)
	if err != nil {
		return err
	}
	defer k.Close()
	return run(ctx, o, cfg, k)
}

// RunWith runs the speaker with a ready REST config and kernel until ctx is
// done: the same speaker as Run, on the fakes of the …/testing packages or
// on a kernel opened with OpenKernel.
func RunWith(ctx context.Context, o *Options, cfg *rest.Config, k Kernel) error {
	if err := o.Validate(); err != nil {
		return err
	}
	return run(ctx, o, cfg, k)
}

// run builds the speaker, whole, and runs it next to its metrics and
// health server.
func run(ctx context.Context, o *Options, cfg *rest.Config, k Kernel) error {
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
	if err := ensureSysctls(o, k); err != nil {
		return err
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
	sup, err := keepalived.NewSupervisor(k.Keepalived, keepalived.SupervisorOptions{ConfigPath: layout.ConfigPath(), ReloadWindow: o.ReloadWindow})
	if err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: Component, Host: o.NodeName})
	s := newSpeaker(o, client, dyn, k, sup, recorder)
	srv, err := s.server(ctx, cfg)
	if err != nil {
		return err
	}
	return serve.Alongside(ctx, srv, s.run)
}

// Speaker is one running speaker.
type Speaker struct {
	opts     *Options
	client   kubernetes.Interface
	net      hostnet.Interface
	sup      *keepalived.Supervisor
	layout   Layout
	metrics  *metrics.Speaker
	recorder record.EventRecorder
	// dp is the forwarding step: IPVS and keeplb's nftables table, or the
	// table's VIP port guard alone.
	dp *ipvsStep
	// cs is the connection sync step: the kernel's IPVS sync daemons,
	// behind their guard in the table dp writes.
	cs *syncStep

	factory    informers.SharedInformerFactory
	dynFactory dynamicinformer.DynamicSharedInformerFactory
	services   cache.SharedIndexInformer
	slices     cache.SharedIndexInformer
	nodes      cache.SharedIndexInformer
	poolInf    cache.SharedIndexInformer
	runner     *runner.Runner

	healthyMu sync.Mutex
	health    health

	// reported holds the problems of the last sync (the plan's and this
	// node's ConfigProblems), so that each is logged, and recorded as an
	// event, once while it lasts.
	reported lasting
	// nodeReports does the same for the Nodes' ignored InternalIPs.
	nodeReports lasting
	// holders writes the holder annotations the syncs decide, off the
	// sync path (holderwriter.go).
	holders *holderWriter
	// vipStates are the keeplb_vrrp_state values the last sync set, so
	// that the next one changes only what differs (applyHolders).
	vipStates map[netip.Addr]float64

	// statesMu guards states, keepalived's last reported state of each
	// instance on this node, which the FIFO watcher writes and each sync
	// observes.
	statesMu sync.Mutex
	states   map[string]keepalived.State

	// pending are the informers' changes not synced yet; lastResync is
	// when the last sync ran that computed everything and read the whole
	// IPVS table.
	pending    pending
	lastResync time.Time
	// lastLinks and lastStates are what the last sync observed of the
	// node's links and keepalived's states, and lastVRRP what it computed
	// of VRRP: a sync whose changes cannot change the VRRP step's inputs
	// reuses it (see observe).
	lastLinks  []hostnet.Link
	lastStates map[string]keepalived.State
	lastVRRP   *vrrpDesired
	// adoption is the hand-off this speaker adopts, if any.
	adoption adoption
	// since is when this speaker started serving, or the speaker whose
	// hand-off it adopted (adopted): its failback holds count from it, and
	// only a speaker that started afresh defers the instances of other
	// planned masters at its start (vrrp.Hold).
	since   time.Time
	adopted bool
	// lastReload is when a sync last changed keepalived.conf (the sync's
	// observed time; only syncs, one at a time, read and write it).
	lastReload time.Time
	// holdMu guards holdTimer, the sync at holdAt, the end of the first
	// failback hold.
	holdMu    sync.Mutex
	holdTimer *time.Timer
	holdAt    time.Time
}

// newSpeaker assembles a speaker, whole: its informers, its forwarding
// step on k, and its runner, which syncs at most every --min-sync-interval.
func newSpeaker(o *Options, client kubernetes.Interface, dyn dynamic.Interface, k Kernel, sup *keepalived.Supervisor, recorder record.EventRecorder) *Speaker {
	m := metrics.NewSpeaker()
	m.IPVSStats = metrics.IPVSStats{Off: !o.IPVSStats, MaxAge: o.IPVSStatsMaxAge}
	s := &Speaker{opts: o, client: client, net: k.Net, sup: sup, layout: Layout{RunDir: o.RunDir}, metrics: m, recorder: recorder,
		dp: newIPVSStep(o, k, m, recorder), cs: newSyncStep(o, k, m, recorder), states: map[string]keepalived.State{}}
	s.factory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(newTrimmer().trim))
	s.dynFactory = dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	s.services = s.factory.Core().V1().Services().Informer()
	s.slices = s.factory.Discovery().V1().EndpointSlices().Informer()
	s.nodes = s.factory.Core().V1().Nodes().Informer()
	s.poolInf = s.dynFactory.ForResource(v1alpha1.IPPoolResource).Informer()
	// Indexers must be in place before the informers start.
	if err := s.slices.AddIndexers(cache.Indexers{serviceIndex: indexByService}); err != nil {
		panic(err) // only when the informer runs, or the index exists: neither can happen here
	}
	s.runner = runner.New(s.sync, o.MinSyncInterval, time.Second, resyncPeriod)
	s.holders = newHolderWriter(o.NodeName, client, s.lookupService, m, clock.RealClock{})
	return s
}

func (s *Speaker) run(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	// A Node or IPPool change reaches every Service's state: the sync
	// after it computes everything.
	everything := func(any) { s.pending.everything() }
	for inf, h := range map[cache.SharedIndexInformer]cache.ResourceEventHandlerFuncs{
		s.services: handlers(s.pending.service, s.runner.Trigger),
		s.slices:   handlers(s.pending.slice, s.runner.Trigger),
		s.nodes:    nodeHandlers(everything, s.runner.Trigger),
		s.poolInf:  handlers(everything, s.runner.Trigger),
	} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return err
		}
	}
	s.factory.Start(ctx.Done())
	s.dynFactory.Start(ctx.Done())
	defer s.factory.Shutdown()
	defer s.dynFactory.Shutdown()
	if !cache.WaitForNamedCacheSyncWithContext(ctx, s.services.HasSynced, s.slices.HasSynced, s.nodes.HasSynced, s.poolInf.HasSynced) {
		return ctx.Err()
	}

	// VIPs of our pools left on this node by a crash would answer next to
	// the real holder: remove them before keepalived starts, except those
	// of a hand-off this speaker adopts.
	s.since = time.Now()
	if err := s.removeVIPs(ctx, s.adoptHandoff(ctx)...); err != nil {
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
	holdersDone := make(chan struct{})
	go func() { defer close(holdersDone); s.holders.run(ctx) }()
	s.runner.Run(ctx)
	<-holdersDone

	// Shutting down. A hand-off leaves everything in place for the
	// replacement (package handoff).
	if s.handOff(context.WithoutCancel(ctx)) {
		<-supDone
		stopSup()
		return nil
	}
	// Otherwise keepalived's clean stop sends priority-0 adverts so peers
	// take over at once; then no VIP of ours may stay behind.
	stopSup()
	<-supDone
	logger.Info("keepalived stopped; removing VIPs")
	err = s.removeVIPs(context.WithoutCancel(ctx))
	if !s.opts.KeepIPVSOnExit {
		// The backup daemon stops before its guard goes with the table.
		err = errors.Join(err, s.cs.exit(context.WithoutCancel(ctx)))
	}
	return errors.Join(err, s.dp.exit(context.WithoutCancel(ctx), s.collect()))
}

// health is what /healthz judges, besides keepalived's status.
type health struct {
	// synced is when the caches synced and the syncs began; zero before.
	synced time.Time
	// vrrpErr is why the last sync could not apply keepalived.conf at all.
	vrrpErr error
	// fifoDead is set once keepalived's notify FIFO can no longer be read.
	fifoDead bool
	// applied is set once a sync applied keepalived.conf; notReady says
	// why the speaker is not ready since the last one, "" when it is (see
	// setReadiness).
	applied  bool
	notReady string
}

// unready says why /readyz fails, or "" when it passes: the speaker is
// healthy, a sync applied keepalived.conf, keepalived runs and has
// reported every instance's state, and no hand-off is being adopted. A
// rolling update of the DaemonSet waits for it before it replaces the
// next node's speaker, so that no node leaves while the one before it
// cannot take its VIPs yet.
func unready(h health, st keepalived.Status, now time.Time) string {
	switch {
	case h.synced.IsZero() || !h.applied:
		return "starting"
	case !st.Running:
		return "keepalived is not running"
	case h.notReady != "":
		return h.notReady
	}
	return unhealthy(h, st, now)
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

// probe serves a health endpoint: 200 ok when why says "", else 503
// with the reason.
func (s *Speaker) probe(why func(health, keepalived.Status, time.Time) string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.healthyMu.Lock()
		h := s.health
		s.healthyMu.Unlock()
		if reason := why(h, s.sup.Status(), time.Now()); reason != "" {
			http.Error(w, reason, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
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

// collect lists every object of the informers' caches.
func (s *Speaker) collect() dataplane.Inputs {
	in := s.collectGlobal()
	for _, o := range s.services.GetStore().List() {
		in.Services = append(in.Services, o.(*v1.Service))
	}
	for _, o := range s.slices.GetStore().List() {
		in.Slices = append(in.Slices, o.(*discoveryv1.EndpointSlice))
	}
	return in
}

// collectGlobal lists the Nodes and IPPools alone, with the class rule:
// what every Service's state depends on.
func (s *Speaker) collectGlobal() dataplane.Inputs {
	in := dataplane.Inputs{Class: s.opts.LoadBalancerClass, DefaultClass: s.opts.DefaultClass}
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

// changedInputs reads from the informers' caches the objects of the
// Services named, with their EndpointSlices: a gone Service has none.
func (s *Speaker) changedInputs(keys map[string]bool) map[string]dataplane.ServiceInputs {
	out := make(map[string]dataplane.ServiceInputs, len(keys))
	for key := range keys {
		var si dataplane.ServiceInputs
		if o, ok, err := s.services.GetStore().GetByKey(key); err == nil && ok {
			si.Service = o.(*v1.Service)
		}
		objs, _ := s.slices.GetIndexer().ByIndex(serviceIndex, key)
		for _, o := range objs {
			si.Slices = append(si.Slices, o.(*discoveryv1.EndpointSlice))
		}
		out[key] = si
	}
	return out
}

// lookupService returns the Service "namespace/name" from the informer's
// cache, or nil: what an event goes on.
func (s *Speaker) lookupService(key string) *v1.Service {
	if o, ok, err := s.services.GetStore().GetByKey(key); err == nil && ok {
		return o.(*v1.Service)
	}
	return nil
}

// removeVIPs removes from this node every host address that lies in one of
// our pools and is not one of the node's own addresses, nor one of except.
func (s *Speaker) removeVIPs(ctx context.Context, except ...netip.Prefix) error {
	in := s.collect()
	parsed := pools.Parse(in.Pools)
	keep := map[netip.Addr]bool{}
	for _, p := range except {
		keep[p.Addr()] = true
	}
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
		Health: map[string]http.Handler{"/healthz": s.probe(unhealthy), "/readyz": s.probe(unready)},
	})
}
