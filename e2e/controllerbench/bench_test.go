// Package controllerbench measures whether keeplb's controller keeps pace
// with the API server: a burst of 1,000 LoadBalancer Services created by 16
// parallel clients against a real kube-apiserver and etcd, with the
// controller running as its own ServiceAccount, against the same API server
// taking 1,000 status.loadBalancer.ingress patches from the same
// ServiceAccount (the raw rate no controller can beat), in the same run.
// It counts the controller's writes per Service and the events that reach
// the API server. It needs the control-plane binaries (hack/tools.sh), and
// skips without them; hack/bench-controller.sh runs it and prints the table.
package controllerbench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// services is the size of every burst.
const services = 1000

// BenchmarkController runs, on one control plane: the raw status-patch
// rate with 4 and 16 clients; then keeplb with its default flags for a
// burst of classless Services (the upstream service controller's, two
// writes each) and one of keeplb.io/vip Services (keeplb's class
// controller, one write each), then a backlog of each, 1,000 Services that
// exist before the controller starts. A burst can be no faster than the
// API server creates the Services: the raw runs report that time too
// (create-s). Each reports
// svc/s, the rate relative to the faster raw run (x-raw), the
// controller's writes to the Services per Service, the events written per
// Service, and the events missing at the end: IPAllocated for every
// Service, and EnsuringLoadBalancer and EnsuredLoadBalancer for every
// Service of the upstream controller. Run it
// with -benchtime=1x: one burst is the measurement.
func BenchmarkController(b *testing.B) {
	cp, err := controlplane.Start(b.Context(), controlplane.Options{Users: map[string][]string{keeplbtest.ControllerUser: keeplbtest.Groups}})
	if err != nil {
		if strings.Contains(err.Error(), "KEEPLB_TOOLS_DIR") {
			b.Skip(err.Error())
		}
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cp.Stop() })
	keeplbtest.Install(b, cp)
	admin := kubernetes.NewForConfigOrDie(withRate(cp.AdminConfig()))
	keeplbtest.CreatePool(b, dynamicFor(b, cp), "bench", `{addresses: ["198.18.0.0/18"]}`)
	sa := withRate(cp.UserConfig(keeplbtest.ControllerUser))
	h := &harness{cp: cp, admin: admin, sa: sa}

	readyNode(b, admin)

	// The reference is the faster of the two raw runs: on a busy machine
	// either may be.
	var raw time.Duration
	for _, clients := range []int{4, 16} {
		b.Run(fmt.Sprintf("raw/%d", clients), func(b *testing.B) {
			if d := h.raw(b, clients); raw == 0 || d < raw {
				raw = d
			}
		})
	}
	for _, s := range []scenario{
		{name: "keeplb/burst-classless"},
		{name: "keeplb/burst-vip", class: annotations.DefaultClass},
		{name: "keeplb/backlog-classless", backlog: true},
		{name: "keeplb/backlog-vip", class: annotations.DefaultClass, backlog: true},
	} {
		b.Run(s.name, func(b *testing.B) { h.keeplb(b, s, raw) })
	}
}

// readyNode creates one Ready node, as a cluster has: the upstream service
// controller warns on every Service without one.
func readyNode(b *testing.B, admin kubernetes.Interface) {
	node, err := admin.CoreV1().Nodes().Create(b.Context(), &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
	if _, err := admin.CoreV1().Nodes().UpdateStatus(b.Context(), node, metav1.UpdateOptions{}); err != nil {
		b.Fatal(err)
	}
}

// harness is the control plane and the clients the scenarios share.
type harness struct {
	cp    *controlplane.ControlPlane
	admin kubernetes.Interface
	// sa is the controller's ServiceAccount: the raw baseline writes as it
	// too, so that both go through the same authorization and fairness.
	sa *rest.Config
	n  int
}

// scenario is one keeplb measurement.
type scenario struct {
	name string
	// class is the Services' spec.loadBalancerClass; empty is classless.
	class string
	// backlog creates the Services before the controller starts.
	backlog bool
}

// namespace returns a fresh namespace for one measurement.
func (h *harness) namespace(b *testing.B) string {
	h.n++
	ns := fmt.Sprintf("bench-%d", h.n)
	if _, err := h.admin.CoreV1().Namespaces().Create(b.Context(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	return ns
}

// raw creates 1,000 Services, then times 1,000 status patches from the
// controller's ServiceAccount with clients parallel clients, and deletes
// the Services.
func (h *harness) raw(b *testing.B, clients int) time.Duration {
	ns := h.namespace(b)
	created := time.Now()
	h.create(b, ns, "", 16)
	b.ReportMetric(time.Since(created).Seconds(), "create-s")
	sa := kubernetes.NewForConfigOrDie(h.sa)
	start := time.Now()
	parallel(services, clients, func(i int) {
		patch := fmt.Sprintf(`{"status":{"loadBalancer":{"ingress":[{"ip":"198.19.%d.%d","ipMode":"Proxy"}]}}}`, i/256, i%256)
		if _, err := sa.CoreV1().Services(ns).Patch(b.Context(), name(i), types.MergePatchType, []byte(patch), metav1.PatchOptions{}, "status"); err != nil {
			b.Error(err)
		}
	})
	d := time.Since(start)
	b.ReportMetric(float64(d.Nanoseconds()), "ns/op")
	b.ReportMetric(services/d.Seconds(), "svc/s")
	b.ReportMetric(1, "writes/svc")
	parallel(services, 16, func(i int) {
		if err := h.admin.CoreV1().Services(ns).Delete(context.Background(), name(i), metav1.DeleteOptions{}); err != nil {
			b.Error(err)
		}
	})
	return d
}

// keeplb runs the controller with its default flags (but no metrics
// port) as its ServiceAccount and times 1,000 Services from the first
// create (or the controller's start, for a backlog) to the last one with an
// address.
func (h *harness) keeplb(b *testing.B, s scenario, raw time.Duration) {
	ns := h.namespace(b)
	var writes, events atomic.Int64
	cfg := rest.CopyConfig(h.sa)
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return counter{rt, ns, &writes, &events} })

	assigned := h.watchAssigned(b, ns)
	if s.backlog {
		h.create(b, ns, s.class, 16)
	}
	o := controller.NewOptions()
	// Default flags but for where it runs: plain HTTP for the metrics,
	// so that the harness can read them.
	o.MetricsBindAddress, o.MetricsSecure = freeAddr(b), false
	o.LeaderElectNamespace, o.Identity = "keeplb-system", ns
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- controller.RunWithConfig(ctx, o, cfg) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("controller: %v", err)
		}
	}()
	seeded := make(chan time.Duration, 1)
	if s.backlog {
		// How much of the time the start takes: the informers' lists
		// and seeding the allocator from every Service's status.
		go func() {
			if h.seeded(b.Context(), o, time.Minute) {
				seeded <- time.Since(start)
			}
		}()
	} else {
		// The controller waits, seeded, for the burst.
		h.waitSeeded(b, o)
		start = time.Now()
		h.create(b, ns, s.class, 16)
	}
	created := time.Since(start)
	var d time.Duration
	select {
	case last := <-assigned:
		d = last.Sub(start)
	case <-time.After(5 * time.Minute):
		b.Fatalf("%s: not every Service was assigned within 5 minutes", s.name)
	}
	b.ReportMetric(float64(d.Nanoseconds()), "ns/op")
	b.ReportMetric(services/d.Seconds(), "svc/s")
	b.ReportMetric(raw.Seconds()/d.Seconds(), "x-raw")
	if !s.backlog {
		// A burst ends no sooner than its last create: how long after it
		// the last Service had its address says whether the controller
		// kept pace.
		b.ReportMetric(created.Seconds(), "create-s")
		b.ReportMetric((d - created).Seconds(), "lag-s")
	}
	select {
	case t := <-seeded:
		// The start (lists, seeding) is paid once; the rate of the rest
		// is the controller's own.
		b.ReportMetric(t.Seconds(), "start-s")
		b.ReportMetric(raw.Seconds()/(d-t).Seconds(), "x-raw-after-start")
	default:
	}
	// Writes settle once every Service was assigned; events may trail.
	// Each Service is owed an IPAllocated event, and one of each upstream
	// sync event when the upstream controller reconciles it.
	want := []string{"IPAllocated"}
	if s.class == "" {
		want = append(want, "EnsuringLoadBalancer", "EnsuredLoadBalancer")
	}
	with := h.settleEvents(b, ns, o.MetricsBindAddress)
	lost := 0
	for _, reason := range want {
		lost += services - with[reason]
	}
	b.ReportMetric(float64(writes.Load())/services, "writes/svc")
	b.ReportMetric(float64(events.Load())/services, "events/svc")
	b.ReportMetric(float64(services-with["IPAllocated"]), "lost-IPAllocated")
	b.ReportMetric(float64(lost), "lost-events")
	if n, ok := scrapeCounter(o.MetricsBindAddress, "keeplb_controller_events_dropped_total"); ok {
		b.ReportMetric(n, "dropped-events")
	}
}

// scrapeCounter sums the samples of a metric on the controller's /metrics;
// false when it has none.
func scrapeCounter(addr, metric string) (float64, bool) {
	body, code, err := keeplbtest.Scrape("http://"+addr+"/metrics", "")
	if err != nil || code != http.StatusOK {
		return 0, false
	}
	var sum float64
	found := false
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, metric); ok && (strings.HasPrefix(rest, " ") || strings.HasPrefix(rest, "{")) {
			var v float64
			if _, err := fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v); err == nil {
				sum, found = sum+v, true
			}
		}
	}
	return sum, found
}

// waitSeeded waits until the controller leads and is seeded.
func (h *harness) waitSeeded(b *testing.B, o *controller.Options) {
	if !h.seeded(b.Context(), o, time.Minute) {
		b.Fatal("the controller did not lead and seed within a minute")
	}
}

// seeded polls until the controller leads (it holds the Lease) and its
// allocator is seeded (/readyz, which a leader answers only then); false
// if that takes longer than timeout.
func (h *harness) seeded(ctx context.Context, o *controller.Options, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		l, err := h.admin.CoordinationV1().Leases(o.LeaderElectNamespace).Get(ctx, o.LeaderElectName, metav1.GetOptions{})
		if err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == o.Identity {
			if _, code, err := keeplbtest.Scrape("http://"+o.MetricsBindAddress+"/readyz", ""); err == nil && code == http.StatusOK {
				return true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// watchAssigned returns a channel that receives the time at which the
// last of 1,000 Services in ns had an address, as an informer of the
// admin sees it.
func (h *harness) watchAssigned(b *testing.B, ns string) <-chan time.Time {
	f := informers.NewSharedInformerFactoryWithOptions(h.admin, 0, informers.WithNamespace(ns))
	inf := f.Core().V1().Services().Informer()
	out := make(chan time.Time, 1)
	var mu sync.Mutex
	seen := map[string]bool{}
	note := func(obj any) {
		svc, ok := obj.(*v1.Service)
		if !ok || len(svc.Status.LoadBalancer.Ingress) == 0 {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !seen[svc.Name] {
			seen[svc.Name] = true
			if len(seen) == services {
				out <- time.Now()
			}
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: note, UpdateFunc: func(_, cur any) { note(cur) }}); err != nil {
		b.Fatal(err)
	}
	stop := make(chan struct{})
	b.Cleanup(func() { close(stop) })
	f.Start(stop)
	if !cache.WaitForCacheSync(stop, inf.HasSynced) {
		b.Fatal("informer did not sync")
	}
	return out
}

// settleEvents waits until the controller has no event left to write
// (keeplb_controller_events_pending is 0; without that metric, until the
// events in ns stop changing for 2 s), at most 3 minutes, and returns, by
// reason, how many Services have an event of that reason.
func (h *harness) settleEvents(b *testing.B, ns, metricsAddr string) map[string]int {
	last, lastChange := -1, time.Now()
	metered, drained := false, false
	deadline := time.Now().Add(3 * time.Minute)
	for {
		list, err := h.admin.CoreV1().Events(ns).List(b.Context(), metav1.ListOptions{})
		if err != nil {
			b.Fatal(err)
		}
		var sum int
		with := map[string]map[string]bool{}
		for _, e := range list.Items {
			sum += int(e.Count)
			if with[e.Reason] == nil {
				with[e.Reason] = map[string]bool{}
			}
			with[e.Reason][e.InvolvedObject.Name] = true
		}
		if sum != last {
			last, lastChange = sum, time.Now()
		}
		// The list above was taken after the writer was seen with nothing
		// pending (and 250 ms for the writes then on the wire).
		if drained || (!metered && time.Since(lastChange) > 2*time.Second) || time.Now().After(deadline) {
			n := map[string]int{}
			for reason, svcs := range with {
				n[reason] = len(svcs)
			}
			return n
		}
		pending, ok := scrapeCounter(metricsAddr, "keeplb_controller_events_pending")
		metered, drained = ok, ok && pending == 0
		time.Sleep(250 * time.Millisecond)
	}
}

// create creates the 1,000 Services of ns with clients parallel clients.
func (h *harness) create(b *testing.B, ns, class string, clients int) {
	parallel(services, clients, func(i int) {
		svc := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name(i)},
			Spec: v1.ServiceSpec{
				Type:     v1.ServiceTypeLoadBalancer,
				Selector: map[string]string{"app": name(i)},
				Ports:    []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}},
				// 1,000 Services per namespace, several namespaces: more
				// than the node-port range holds, and nothing here needs one.
				AllocateLoadBalancerNodePorts: ptr.To(false),
			},
		}
		if class != "" {
			svc.Spec.LoadBalancerClass = &class
		}
		if _, err := h.admin.CoreV1().Services(ns).Create(b.Context(), svc, metav1.CreateOptions{}); err != nil {
			b.Error(err)
		}
	})
}

func name(i int) string { return fmt.Sprintf("svc-%04d", i) }

// parallel calls f(0..n-1) from clients goroutines.
func parallel(n, clients int, f func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				f(i)
			}
		})
	}
	wg.Wait()
}

// withRate lifts the client-side limit of a harness client: the harness
// must never be what throttles.
func withRate(cfg *rest.Config) *rest.Config {
	cfg.QPS, cfg.Burst = 5000, 10000
	return cfg
}

// counter counts the controller's writes to the Services of one namespace
// and its event writes there, as they leave the process.
type counter struct {
	next           http.RoundTripper
	ns             string
	writes, events *atomic.Int64
}

func (c counter) RoundTrip(req *http.Request) (*http.Response, error) {
	p := req.URL.Path
	if req.Method != http.MethodGet && strings.Contains(p, "/namespaces/"+c.ns+"/") {
		switch {
		case strings.Contains(p, "/services/"):
			c.writes.Add(1)
		case strings.Contains(p, "/events"):
			c.events.Add(1)
		}
	}
	return c.next.RoundTrip(req)
}

// dynamicFor returns an admin dynamic client.
func dynamicFor(b *testing.B, cp *controlplane.ControlPlane) dynamic.Interface {
	d, err := dynamic.NewForConfig(withRate(cp.AdminConfig()))
	if err != nil {
		b.Fatal(err)
	}
	return d
}

// freeAddr returns a loopback address with a port free now.
func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
