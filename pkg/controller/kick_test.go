package controller

import (
	"runtime/debug"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	servicecontroller "k8s.io/cloud-provider/controllers/service"
	"k8s.io/component-base/featuregate"

	"github.com/keeplb/keeplb/pkg/provider"
)

// strictInformer records handler registrations through the three methods
// client-go has today. Anything else upstream calls on it reaches the nil
// embedded informer and panics: if a future k8s.io/cloud-provider registers
// its handlers another way, the wrappers below would no longer see them,
// and this test says so instead of the wrappers failing silently.
type strictInformer struct {
	cache.SharedIndexInformer // nil
	handlers                  []cache.ResourceEventHandler
}

func (s *strictInformer) AddEventHandler(h cache.ResourceEventHandler) (cache.ResourceEventHandlerRegistration, error) {
	s.handlers = append(s.handlers, h)
	return nil, nil
}

func (s *strictInformer) AddEventHandlerWithResyncPeriod(h cache.ResourceEventHandler, _ time.Duration) (cache.ResourceEventHandlerRegistration, error) {
	s.handlers = append(s.handlers, h)
	return nil, nil
}

func (s *strictInformer) AddEventHandlerWithOptions(h cache.ResourceEventHandler, _ cache.HandlerOptions) (cache.ResourceEventHandlerRegistration, error) {
	s.handlers = append(s.handlers, h)
	return nil, nil
}

func (s *strictInformer) HasSynced() bool { return true }

type strictServices struct{ inf *strictInformer }

func (s strictServices) Informer() cache.SharedIndexInformer { return s.inf }
func (s strictServices) Lister() corelisters.ServiceLister {
	return corelisters.NewServiceLister(cache.NewIndexer(cache.MetaNamespaceKeyFunc, nil))
}

type strictNodes struct{ inf *strictInformer }

func (s strictNodes) Informer() cache.SharedIndexInformer { return s.inf }
func (s strictNodes) Lister() corelisters.NodeLister {
	return corelisters.NewNodeLister(cache.NewIndexer(cache.MetaNamespaceKeyFunc, nil))
}

var (
	_ coreinformers.ServiceInformer = strictServices{}
	_ coreinformers.NodeInformer    = strictNodes{}
)

// newUpstream builds the real upstream service controller over services
// and nodes. A call that reaches a strictInformer's nil informer fails the
// test with a message rather than a bare nil dereference.
func newUpstream(t *testing.T, services coreinformers.ServiceInformer, nodes coreinformers.NodeInformer) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("the upstream service controller called an informer method the strict informers do not model, maybe a new way to register handlers that keeplb's wrappers do not intercept: %v\n%s", r, debug.Stack())
		}
	}()
	if _, err := servicecontroller.New(provider.New(provider.Config{}), fake.NewClientset(), services, nodes, "test", featuregate.NewFeatureGate()); err != nil {
		t.Fatal(err)
	}
}

// TestUpstreamRegistersThroughWrappers builds the real upstream service
// controller over keeplb's wrappers: every Service handler it registers
// must arrive filtered, and no Node handler may arrive at all.
func TestUpstreamRegistersThroughWrappers(t *testing.T) {
	svcInf, nodeInf := &strictInformer{}, &strictInformer{}
	services := newKickableServices(strictServices{svcInf}, forUpstream)
	newUpstream(t, services, quietNodes{strictNodes{nodeInf}})
	if len(svcInf.handlers) == 0 {
		t.Fatal("the upstream controller registered no Service handler through the wrapper")
	}
	for _, h := range svcInf.handlers {
		if _, ok := h.(filtered); !ok {
			t.Errorf("Service handler %T registered without the filter", h)
		}
	}
	if len(nodeInf.handlers) != 0 {
		t.Errorf("%d Node handlers reached the informer; quietNodes must swallow them", len(nodeInf.handlers))
	}
	// That none arrived means something only if the upstream controller
	// registers Node handlers in New at all: unwrapped, it must.
	bare := &strictInformer{}
	newUpstream(t, strictServices{&strictInformer{}}, strictNodes{bare})
	if len(bare.handlers) == 0 {
		t.Error("unwrapped, the upstream controller registered no Node handler in New: it registers them elsewhere now (in Run?), where this test cannot see whether quietNodes swallows them")
	}
}

// recorder is a handler that remembers what it was told; informers call it
// from their own goroutine.
type recorder struct {
	mu                     sync.Mutex
	adds, updates, deletes []string
}

func (r *recorder) OnAdd(obj any, _ bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.adds = append(r.adds, obj.(*v1.Service).Name)
}

func (r *recorder) OnUpdate(_, cur any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates = append(r.updates, cur.(*v1.Service).Name)
}

func (r *recorder) OnDelete(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deletes = append(r.deletes, obj.(*v1.Service).Name)
}

// takeAdds returns the adds so far and forgets them.
func (r *recorder) takeAdds() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.adds
	r.adds = nil
	return out
}

func lbService(name string, class *string, typ v1.ServiceType) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec:       v1.ServiceSpec{Type: typ, LoadBalancerClass: class},
	}
}

// TestFilterNeverTurnsUpdatesIntoDeletes: a Service that stops being a
// classless LoadBalancer is not deleted; telling the upstream controller it
// was would have it tear down what the class controller cleans up.
func TestFilterNeverTurnsUpdatesIntoDeletes(t *testing.T) {
	foreign := "other.example.com/lb"
	r := &recorder{}
	f := filtered{h: r, pass: forUpstream}
	ours := lbService("ours", nil, v1.ServiceTypeLoadBalancer)
	theirs := lbService("theirs", &foreign, v1.ServiceTypeLoadBalancer)
	nowClusterIP := lbService("ours", nil, v1.ServiceTypeClusterIP)

	f.OnAdd(ours, true)
	f.OnAdd(theirs, true)
	f.OnUpdate(theirs, theirs)
	f.OnUpdate(ours, nowClusterIP)
	f.OnDelete(theirs)
	f.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/theirs", Obj: theirs})
	f.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/ours", Obj: ours})

	if want := []string{"ours"}; !equal(r.adds, want) || len(r.updates) != 0 || !equal(r.deletes, want) {
		t.Errorf("adds %v updates %v deletes %v; want only ours added and deleted", r.adds, r.updates, r.deletes)
	}
}

// TestKickReplaysOnlyFiltered: a kick reaches the upstream controller only
// for Services it is responsible for.
func TestKickReplaysOnlyFiltered(t *testing.T) {
	foreign := "other.example.com/lb"
	client := fake.NewClientset(lbService("ours", nil, v1.ServiceTypeLoadBalancer), lbService("theirs", &foreign, v1.ServiceTypeLoadBalancer))
	factory := informers.NewSharedInformerFactory(client, 0)
	services := newKickableServices(factory.Core().V1().Services(), forUpstream)
	r := &recorder{}
	if _, err := services.Informer().AddEventHandler(r); err != nil {
		t.Fatal(err)
	}
	factory.Start(t.Context().Done())
	factory.WaitForCacheSync(t.Context().Done())
	// The informer delivers its initial list from its own goroutine.
	deadline := time.Now().Add(10 * time.Second)
	var initial []string
	for len(initial) == 0 && time.Now().Before(deadline) {
		initial = append(initial, r.takeAdds()...)
		time.Sleep(10 * time.Millisecond)
	}
	if want := []string{"ours"}; !equal(initial, want) {
		t.Fatalf("initial list delivered %v, want %v", initial, want)
	}
	services.Kick([]string{"ns/ours", "ns/theirs", "ns/missing"})
	if got, want := r.takeAdds(), []string{"ours"}; !equal(got, want) {
		t.Errorf("kick replayed %v, want %v", got, want)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
