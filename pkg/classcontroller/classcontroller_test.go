package classcontroller

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"
	servicehelper "k8s.io/cloud-provider/service/helpers"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/provider"
)

const (
	class   = "keeplb.io/vip"
	manager = "keeplb-controller"
)

// finalizerBy is managed fields saying manager added the cleanup finalizer,
// as the API server records them.
func finalizerBy(manager string) []metav1.ManagedFieldsEntry {
	return []metav1.ManagedFieldsEntry{{
		Manager: manager, Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", FieldsType: "FieldsV1",
		FieldsV1: metav1.NewFieldsV1(`{"f:metadata":{"f:finalizers":{".":{},"v:\"service.kubernetes.io/load-balancer-cleanup\"":{}}}}`),
	}}
}

func svc(name string, cls *string, typ v1.ServiceType, mods ...func(*v1.Service)) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec:       v1.ServiceSpec{Type: typ, LoadBalancerClass: cls, Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP}}},
	}
	for _, m := range mods {
		m(s)
	}
	return s
}

func withFinalizer(by string) func(*v1.Service) {
	return func(s *v1.Service) {
		s.Finalizers = []string{servicehelper.LoadBalancerCleanupFinalizer}
		s.ManagedFields = finalizerBy(by)
	}
}

func withStatus(ip string) func(*v1.Service) {
	return func(s *v1.Service) {
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: ip}}
	}
}

func ptr(s string) *string { return &s }

type fixture struct {
	client *fake.Clientset
	alloc  *allocator.Allocator
	c      *Controller
}

func newFixture(t *testing.T, defaultClass bool, objs ...*v1.Service) *fixture {
	t.Helper()
	client := fake.NewClientset()
	for _, o := range objs {
		if err := client.Tracker().Add(o); err != nil {
			t.Fatal(err)
		}
	}
	alloc := allocator.New()
	r, err := allocator.ParseRange("192.0.2.0/30")
	if err != nil {
		t.Fatal(err)
	}
	alloc.SetPools([]allocator.Pool{{Name: "p", Ranges: []allocator.Range{r}, AutoAssign: true}})
	prov := provider.New(provider.Config{Allocator: alloc, Recorder: record.NewFakeRecorder(100)})
	factory := informers.NewSharedInformerFactory(client, 0)
	c, err := New(Config{
		Class: class, DefaultClass: defaultClass, ClusterName: "test", Client: client, Balancer: prov,
		Known:   func(key string) bool { _, ok := alloc.Lookup(key); return ok || alloc.IsPending(key) },
		Manager: manager, Services: factory.Core().V1().Services(),
	})
	if err != nil {
		t.Fatal(err)
	}
	factory.Start(t.Context().Done())
	factory.WaitForCacheSync(t.Context().Done())
	client.ClearActions()
	return &fixture{client: client, alloc: alloc, c: c}
}

func (f *fixture) patches() []k8stesting.PatchAction {
	var out []k8stesting.PatchAction
	for _, a := range f.client.Actions() {
		if p, ok := a.(k8stesting.PatchAction); ok {
			out = append(out, p)
		}
	}
	return out
}

func (f *fixture) get(t *testing.T, name string) *v1.Service {
	t.Helper()
	s, err := f.client.CoreV1().Services("ns").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// One write per Service: the finalizer and the status go in one patch.
func TestEnsureWritesOnce(t *testing.T) {
	f := newFixture(t, true, svc("a", ptr(class), v1.ServiceTypeLoadBalancer))
	if err := f.c.sync(t.Context(), "ns/a"); err != nil {
		t.Fatal(err)
	}
	if n := len(f.patches()); n != 1 {
		t.Fatalf("%d patches, want 1", n)
	}
	s := f.get(t, "a")
	if !servicehelper.HasLBFinalizer(s) || len(s.Status.LoadBalancer.Ingress) != 1 {
		t.Fatalf("after one patch: finalizers %v, status %v", s.Finalizers, s.Status.LoadBalancer)
	}
	// The address in status is the one the allocator holds for it.
	if al, ok := f.alloc.Lookup("ns/a"); !ok || len(al.Addrs) != 1 || al.Addrs[0].String() != s.Status.LoadBalancer.Ingress[0].IP || al.Pool != "p" {
		t.Fatalf("allocator holds %v (%v) for the Service, status lists %v", al, ok, s.Status.LoadBalancer.Ingress)
	}
}

// A Service that cannot get an address is not written at all: on main its
// finalizer patch queued it again, for a second failing attempt at once.
func TestRefusedServiceIsNotWritten(t *testing.T) {
	f := newFixture(t, true, svc("a", ptr(class), v1.ServiceTypeLoadBalancer, func(s *v1.Service) {
		s.Annotations = map[string]string{"keeplb.io/pool": "missing"}
	}))
	if err := f.c.sync(t.Context(), "ns/a"); err == nil {
		t.Fatal("want a retry error")
	}
	if p := f.patches(); len(p) != 0 {
		t.Fatalf("refused Service written %d times", len(p))
	}
}

// Another implementation's Services are never queued, whatever their type,
// finalizer or deletion state.
func TestForeignServicesAreIrrelevant(t *testing.T) {
	other := ptr("other.example.com/lb")
	now := metav1.Now()
	for _, s := range []*v1.Service{
		svc("lb", other, v1.ServiceTypeLoadBalancer, withFinalizer("other-controller")),
		svc("deleting", other, v1.ServiceTypeLoadBalancer, withFinalizer("other-controller"), func(s *v1.Service) { s.DeletionTimestamp = &now }),
		// After a switch to ClusterIP the API server cleared the class.
		svc("switched", nil, v1.ServiceTypeClusterIP, withFinalizer("other-controller"), withStatus("198.51.100.1")),
		svc("plain", nil, v1.ServiceTypeClusterIP),
	} {
		f := newFixture(t, true, s)
		if f.c.relevant(s) {
			t.Errorf("%s: relevant", s.Name)
		}
		if err := f.c.sync(t.Context(), "ns/"+s.Name); err != nil {
			t.Errorf("%s: %v", s.Name, err)
		}
		if p := f.patches(); len(p) != 0 {
			t.Errorf("%s: %d patches", s.Name, len(p))
		}
	}
}

// A classless Service that stopped being a LoadBalancer is cleaned up when
// keeplb owns its finalizer; a finalizer another manager added stays, and
// only keeplb's addresses are cleared.
func TestCleanupAfterTypeChange(t *testing.T) {
	ours := svc("ours", nil, v1.ServiceTypeClusterIP, withFinalizer(manager), withStatus("192.0.2.1"))
	f := newFixture(t, true, ours)
	if !f.c.relevant(ours) {
		t.Fatal("a Service with keeplb's finalizer is not relevant")
	}
	if err := f.c.sync(t.Context(), "ns/ours"); err != nil {
		t.Fatal(err)
	}
	if s := f.get(t, "ours"); servicehelper.HasLBFinalizer(s) || len(s.Status.LoadBalancer.Ingress) != 0 {
		t.Fatalf("keeplb's finalizer %v or status %v left", s.Finalizers, s.Status.LoadBalancer)
	}

	// keeplb gave it an address, and another controller's finalizer came.
	theirs := svc("mixed", nil, v1.ServiceTypeClusterIP, withFinalizer("other-controller"), withStatus("192.0.2.2"))
	f = newFixture(t, true, theirs)
	if err := f.alloc.Restore(allocator.Request{Key: "ns/mixed", Namespace: "ns"}, []netip.Addr{netip.MustParseAddr("192.0.2.2")}); err != nil {
		t.Fatal(err)
	}
	if err := f.c.sync(t.Context(), "ns/mixed"); err != nil {
		t.Fatal(err)
	}
	s := f.get(t, "mixed")
	if !servicehelper.HasLBFinalizer(s) {
		t.Fatal("another manager's finalizer removed")
	}
	if len(s.Status.LoadBalancer.Ingress) != 0 {
		t.Fatalf("keeplb's address left in status: %v", s.Status.LoadBalancer)
	}
	if _, ok := f.alloc.Lookup("ns/mixed"); ok {
		t.Fatal("address not released")
	}
}

func TestOwnsFinalizer(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    *v1.Service
		want bool
	}{
		{"ours", svc("a", nil, v1.ServiceTypeClusterIP, withFinalizer(manager)), true},
		{"theirs", svc("a", nil, v1.ServiceTypeClusterIP, withFinalizer("other")), false},
		{"no finalizer", svc("a", nil, v1.ServiceTypeClusterIP, func(s *v1.Service) { s.ManagedFields = finalizerBy(manager) }), false},
		{"no managed fields", svc("a", nil, v1.ServiceTypeClusterIP, withFinalizer(manager), func(s *v1.Service) { s.ManagedFields = nil }), false},
		{"garbage fields", svc("a", nil, v1.ServiceTypeClusterIP, withFinalizer(manager), func(s *v1.Service) {
			s.ManagedFields[0].FieldsV1.SetRawBytes([]byte(`{"f:metadata":`))
		}), false},
		{"other finalizer only", svc("a", nil, v1.ServiceTypeClusterIP, withFinalizer(manager), func(s *v1.Service) {
			s.ManagedFields[0].FieldsV1.SetRawBytes([]byte(`{"f:metadata":{"f:finalizers":{"v:\"example.com/x\"":{}}}}`))
		}), false},
	} {
		if got := OwnsFinalizer(tc.s, manager); got != tc.want {
			t.Errorf("%s: OwnsFinalizer = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// hold has the allocator hold addr for the Service key, as seeding from its
// status would.
func (f *fixture) hold(t *testing.T, key, addr string) {
	t.Helper()
	ns, _, _ := strings.Cut(key, "/")
	if err := f.alloc.Restore(allocator.Request{Key: key, Namespace: ns}, []netip.Addr{netip.MustParseAddr(addr)}); err != nil {
		t.Fatal(err)
	}
}

// Whatever way a Service stops being keeplb's LoadBalancer, its address
// goes back to the pool, and keeplb's finalizer and addresses leave the
// Service that is still there.
func TestCleanupReleases(t *testing.T) {
	now := metav1.Now()
	for _, tc := range []struct {
		name       string
		s          *v1.Service // nil: gone from the API
		notDefault bool        // keeplb without --default-class
	}{
		{"own class, being deleted", svc("a", ptr(class), v1.ServiceTypeLoadBalancer, withFinalizer(manager), withStatus("192.0.2.1"),
			func(s *v1.Service) { s.DeletionTimestamp = &now }), false},
		{"classless, no longer a LoadBalancer", svc("a", nil, v1.ServiceTypeNodePort, withFinalizer(manager), withStatus("192.0.2.1")), false},
		{"classless while keeplb is not the default class", svc("a", nil, v1.ServiceTypeLoadBalancer, withFinalizer(manager), withStatus("192.0.2.1")), true},
		{"gone without keeplb's finalizer", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var objs []*v1.Service
			if tc.s != nil {
				objs = append(objs, tc.s)
			}
			f := newFixture(t, !tc.notDefault, objs...)
			f.hold(t, "ns/a", "192.0.2.1")
			if err := f.c.sync(t.Context(), "ns/a"); err != nil {
				t.Fatal(err)
			}
			if al, ok := f.alloc.Lookup("ns/a"); ok {
				t.Errorf("the allocator still holds %v", al)
			}
			if tc.s == nil {
				return
			}
			if s := f.get(t, "a"); servicehelper.HasLBFinalizer(s) || len(s.Status.LoadBalancer.Ingress) != 0 {
				t.Errorf("finalizers %v, status %v left", s.Finalizers, s.Status.LoadBalancer)
			}
			if n := len(f.patches()); n != 1 {
				t.Errorf("%d patches, want 1", n)
			}
		})
	}
}

// Through the informer and the workers: a Service of keeplb's class gets
// its address in one patch, one of another class is not written at all.
func TestRunReconcilesOwnClassOnly(t *testing.T) {
	other := ptr("other.example.com/lb")
	f := newFixture(t, true,
		svc("theirs", other, v1.ServiceTypeLoadBalancer),
		svc("ours", ptr(class), v1.ServiceTypeLoadBalancer))
	go f.c.Run(t.Context(), 2)
	deadline := time.Now().Add(10 * time.Second)
	for len(f.get(t, "ours").Status.LoadBalancer.Ingress) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the Service of keeplb's class got no address")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, p := range f.patches() {
		if p.GetName() != "ours" {
			t.Errorf("Service %s patched", p.GetName())
		}
	}
	if n := len(f.patches()); n != 1 {
		t.Errorf("%d patches, want 1", n)
	}
	if s := f.get(t, "theirs"); len(s.Finalizers) != 0 || len(s.Status.LoadBalancer.Ingress) != 0 {
		t.Errorf("the other class's Service was written: finalizers %v, status %v", s.Finalizers, s.Status.LoadBalancer)
	}
	if _, ok := f.alloc.Lookup("ns/theirs"); ok {
		t.Error("the other class's Service holds an address")
	}
}
