package integration

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/rest"
	servicehelper "k8s.io/cloud-provider/service/helpers"

	"github.com/keeplb/keeplb/pkg/controller"
)

// These tests are about who may write what, and when: an old leader after
// its lease, an operator behind the controller's back, a restart that
// forgets, another implementation's Services.

// setStatus writes addresses into a Service's status, as an operator, a
// restore from backup or another controller would.
func (e *env) setStatus(ns, name string, ips ...string) {
	e.t.Helper()
	s := e.get(ns, name)
	s.Status.LoadBalancer.Ingress = nil
	for _, ip := range ips {
		s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip})
	}
	if _, err := e.client.CoreV1().Services(ns).UpdateStatus(e.t.Context(), s, metav1.UpdateOptions{}); err != nil {
		e.t.Fatalf("write status of %s/%s: %v", ns, name, err)
	}
}

// eventsBy lists the events of one component on a Service.
func (e *env) eventsBy(ns, name, component string) []v1.Event {
	e.t.Helper()
	sel := fields.Set{"involvedObject.name": name, "involvedObject.kind": "Service", "source": component}.AsSelector().String()
	evs, err := e.client.CoreV1().Events(ns).List(e.t.Context(), metav1.ListOptions{FieldSelector: sel})
	if err != nil {
		e.t.Fatal(err)
	}
	return evs.Items
}

// holds checks cond at every poll for d: an absence of something (a write,
// a deletion) can only be observed over time. It fails at the first poll
// where cond does not hold.
func holds(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if ok, state := cond(); !ok {
			t.Fatalf("%s stopped holding: %s", what, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Issue 9 item 2: x had 192.0.2.0 in its status, written while it waited
// for a pool; on main y was then given 192.0.2.0 and x re-assigned
// 192.0.2.1. Now the address in x's status is never handed to y, and x
// keeps it when it can be served.
func TestStatusWrittenBehindTheController(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	e.startController()

	e.create(newService("ns", "x", ann("keeplb.io/pool", "later")))
	e.waitEvent("ns", "x", v1.EventTypeWarning, "AllocationFailed", "later")
	e.setStatus("ns", "x", "192.0.2.0")

	e.create(newService("ns", "y"))
	if got := ingress(e.waitIngress("ns", "y", 1)); got[0] == "192.0.2.0" {
		t.Fatalf("y was given %s, listed in x's status", got[0])
	}
	x := e.get("ns", "x")
	delete(x.Annotations, "keeplb.io/pool")
	if _, err := e.client.CoreV1().Services("ns").Update(t.Context(), x, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitEvent("ns", "x", v1.EventTypeNormal, "IPAllocated", "192.0.2.0")
	if got := ingress(e.get("ns", "x")); !slices.Equal(got, []string{"192.0.2.0"}) {
		t.Fatalf("x has %v, want its own 192.0.2.0", got)
	}
}

// Issue 9 item 2, the conflicting half: an address written into a
// Service's status while another Service holds it is quarantined: the
// holder keeps it, the writer gets an event and an address of its own.
func TestConflictingStatusIsQuarantined(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	e.startController()
	e.create(newService("ns", "holder"))
	held := ingress(e.waitIngress("ns", "holder", 1))[0]
	e.create(newService("ns", "writer"))
	mine := ingress(e.waitIngress("ns", "writer", 1))[0]

	e.setStatus("ns", "writer", held)
	eventually(t, 30*time.Second, "writer re-assigned an address of its own", func() (bool, string) {
		got := ingress(e.get("ns", "writer"))
		return len(got) == 1 && got[0] != held, fmt.Sprint(got)
	})
	if got := ingress(e.get("ns", "holder")); !slices.Equal(got, []string{held}) {
		t.Fatalf("holder has %v, want %s", got, held)
	}
	e.waitEvent("ns", "writer", v1.EventTypeWarning, "StatusOverwritten", held, "ns/holder")
	t.Logf("holder kept %s; writer had %s, wrote %s, now has %v", held, mine, held, ingress(e.get("ns", "writer")))
}

// Issue 9 item 3: a Service whose shared address was refused keeps it in
// its status. On main a restart forgot it (Restore refused it and nothing
// remembered the status), and once the other sharer was deleted the address
// went to a third Service while still in the refused one's status.
func TestRefusedSharerSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	stop := e.startController()
	// y first: at the restart the oldest keeps the address.
	e.create(newService("ns", "y", ann("keeplb.io/share-key", "k"), ports(80)))
	shared := ingress(e.waitIngress("ns", "y", 1))[0]
	time.Sleep(1100 * time.Millisecond) // creation timestamps have one-second resolution; x must be younger
	e.create(newService("ns", "x", ann("keeplb.io/share-key", "k"), ports(443)))
	if got := ingress(e.waitIngress("ns", "x", 1)); got[0] != shared {
		t.Fatalf("x got %v, want the shared %s", got, shared)
	}
	x := e.get("ns", "x")
	x.Spec.Ports[0].Port = 80 // now clashes with y
	if _, err := e.client.CoreV1().Services("ns").Update(t.Context(), x, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitEvent("ns", "x", v1.EventTypeWarning, "AllocationFailed", "SharingConflict")

	stop()
	e.startController()
	e.delete("ns", "y")
	eventually(t, 30*time.Second, "y gone", func() (bool, string) {
		_, err := e.client.CoreV1().Services("ns").Get(t.Context(), "y", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	e.create(newService("ns", "z"))
	if got := ingress(e.waitIngress("ns", "z", 1)); got[0] == shared {
		t.Fatalf("z was given %s while x's status still lists it", shared)
	}
	if got := ingress(e.get("ns", "x")); !slices.Equal(got, []string{shared}) {
		t.Fatalf("x has %v, want %s", got, shared)
	}
}

// Issue 9 item 14, decided: an address that a Service of another
// implementation publishes in its status is taken; keeplb never hands it
// out, and names the Service when asked for it explicitly.
func TestForeignStatusAddressIsTaken(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	e.create(newService("ns", "theirs", class("other.example.com/lb")))
	e.setStatus("ns", "theirs", "192.0.2.0")
	e.startController()

	e.create(newService("ns", "auto"))
	if got := ingress(e.waitIngress("ns", "auto", 1)); got[0] == "192.0.2.0" {
		t.Fatalf("auto was given %s, published by another implementation's Service", got[0])
	}
	e.create(newService("ns", "explicit", ann("keeplb.io/ips", "192.0.2.0")))
	e.waitEvent("ns", "explicit", v1.EventTypeWarning, "AllocationFailed", "ns/theirs")
	// When the other implementation lets go of it, it is keeplb's to give.
	e.setStatus("ns", "theirs")
	if got := ingress(e.waitIngress("ns", "explicit", 1)); got[0] != "192.0.2.0" {
		t.Fatalf("explicit got %v once the address was released", got)
	}
}

// Issue 9 item 12: with --default-class (the default), the upstream
// controller used to strip the standard cleanup finalizer of another
// implementation's Services, and record events on them, when they were
// deleted or stopped being LoadBalancers; the Service vanished before its
// owner had cleaned up. keeplb now never touches them.
func TestForeignFinalizerIsNeverRemoved(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/28"]}`)
	foreign := func(name string) *v1.Service {
		s := newService("ns", name, class("other.example.com/lb"))
		s.Finalizers = []string{servicehelper.LoadBalancerCleanupFinalizer}
		return e.create(s)
	}
	// What the API server itself does to a Service switched away from
	// LoadBalancer, before any controller runs: the test then expects
	// exactly that afterwards.
	foreign("before")
	e.setStatus("ns", "before", "198.51.100.6")
	switchType := func(name string) {
		s := e.get("ns", name)
		s.Spec.Type, s.Spec.LoadBalancerClass = v1.ServiceTypeClusterIP, nil
		if _, err := e.client.CoreV1().Services("ns").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	switchType("before")
	serverClears := len(ingress(e.get("ns", "before"))) == 0
	t.Logf("the API server clears status.loadBalancer when the type leaves LoadBalancer: %v", serverClears)

	e.startController()
	foreign("deleted")
	foreign("switched")
	e.setStatus("ns", "switched", "198.51.100.7")
	// A Service of ours, deleted at the same time, shows the controller is
	// at work all along.
	e.create(newService("ns", "ours"))
	e.waitIngress("ns", "ours", 1)

	if err := e.client.CoreV1().Services("ns").Delete(t.Context(), "deleted", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	switchType("switched")
	e.delete("ns", "ours")
	eventually(t, 30*time.Second, "our Service deleted", func() (bool, string) {
		_, err := e.client.CoreV1().Services("ns").Get(t.Context(), "ours", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	holds(t, 5*time.Second, "other implementation's Services untouched", func() (bool, string) {
		d, err := e.client.CoreV1().Services("ns").Get(t.Context(), "deleted", metav1.GetOptions{})
		if err != nil {
			return false, "deleted Service: " + err.Error()
		}
		if !servicehelper.HasLBFinalizer(d) {
			return false, "deleted Service lost its finalizer"
		}
		sw := e.get("ns", "switched")
		if !servicehelper.HasLBFinalizer(sw) {
			return false, "switched Service lost its finalizer"
		}
		if got := ingress(sw); !serverClears && !slices.Equal(got, []string{"198.51.100.7"}) {
			return false, fmt.Sprintf("switched Service's status is %v", got)
		}
		if !servicehelper.HasLBFinalizer(e.get("ns", "before")) {
			return false, "the Service switched before the controller ran lost its finalizer"
		}
		for _, name := range []string{"deleted", "switched", "before"} {
			for _, c := range []string{"service-controller", controller.Component} {
				if evs := e.eventsBy("ns", name, c); len(evs) > 0 {
					return false, fmt.Sprintf("%s recorded %s on %s", c, evs[0].Reason, name)
				}
			}
		}
		return true, ""
	})
}

// Issue 9 item 13: a keeplb.io/vip Service was reconciled by both the
// upstream and the class controller when deleted, and a refused one was
// tried twice at once (its own finalizer patch queued it again). Now one
// reconciler each, one attempt per retry.
func TestClassServiceHasOneReconciler(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	e.startController(func(o *controller.Options) { o.RetryInterval = time.Hour })
	// A new namespace may admit a waiting Service to a pool, so its
	// creation retries every pending Service: let that happen first.
	e.create(newService("ns", "vip", class("keeplb.io/vip")))
	e.waitIngress("ns", "vip", 1)
	e.create(newService("ns", "refused", class("keeplb.io/vip"), ann("keeplb.io/pool", "missing")))
	e.waitEvent("ns", "refused", v1.EventTypeWarning, "AllocationFailed", "missing")
	holds(t, 3*time.Second, "one failed attempt", func() (bool, string) {
		var n int32
		for _, ev := range e.eventsBy("ns", "refused", controller.Component) {
			if ev.Reason == "AllocationFailed" {
				n += max(ev.Count, 1)
			}
		}
		return n == 1, fmt.Sprintf("%d AllocationFailed events", n)
	})

	e.delete("ns", "vip")
	eventually(t, 30*time.Second, "vip deleted", func() (bool, string) {
		_, err := e.client.CoreV1().Services("ns").Get(t.Context(), "vip", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	if evs := e.eventsBy("ns", "vip", "service-controller"); len(evs) > 0 {
		t.Fatalf("the upstream controller handled a keeplb.io/vip Service: %s %s", evs[0].Reason, evs[0].Message)
	}
}

// slowWrites delays every write of one controller but its Lease renewals,
// as a loaded API server would: on main the old leader released its lease
// at once and its delayed status writes landed while the new leader
// allocated. (Delayed renewals would only test a lost lease, which the
// lease's own margins bound.)
type slowWrites struct {
	next  http.RoundTripper
	delay time.Duration
}

func (s slowWrites) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodGet && !strings.Contains(r.URL.Path, "/leases/") {
		select {
		case <-time.After(s.delay):
		case <-r.Context().Done():
			return nil, r.Context().Err()
		}
	}
	return s.next.RoundTrip(r)
}

// Issue 9 item 1: leaders handed over mid-burst, several times, with slow
// writes: at no moment may two Services list one address.
func TestLeaderHandoverMidBurst(t *testing.T) {
	const n = 120
	e := newEnv(t)
	e.pool("p", `{addresses: ["10.20.0.0/24"]}`)
	start := func() func() {
		return e.startControllerWith(func(cfg *rest.Config) {
			cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
				return slowWrites{next: rt, delay: 700 * time.Millisecond}
			})
		})
	}
	stops := []func(){start(), start()}

	// A watcher checks every state it can see.
	ctx, cancel := context.WithCancel(t.Context())
	var dupMu sync.Mutex
	var dup string
	var watching sync.WaitGroup
	watching.Go(func() {
		for ctx.Err() == nil {
			list, err := e.client.CoreV1().Services("burst").List(ctx, metav1.ListOptions{})
			if err == nil {
				owner := map[string]string{}
				for _, s := range list.Items {
					for _, ip := range ingress(&s) {
						if o, ok := owner[ip]; ok {
							dupMu.Lock()
							if dup == "" {
								dup = fmt.Sprintf("%s listed by %s and %s", ip, o, s.Name)
							}
							dupMu.Unlock()
						}
						owner[ip] = s.Name
					}
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	e.namespace("burst", nil)
	for i := range n {
		e.create(newService("burst", fmt.Sprintf("s%03d", i)))
		if i%40 == 20 {
			// Stop whichever replica leads (both, in turn, as new
			// replicas join): the survivor or the newcomer takes over.
			stops[0]()
			stops = append(stops[1:], start())
		}
	}
	got := e.waitAllAssigned("burst", n)
	cancel()
	watching.Wait()
	if dup != "" {
		t.Fatalf("duplicate address seen: %s", dup)
	}
	t.Logf("%d Services assigned across %d leader changes, no address listed twice", len(got), n/40)
	for _, s := range stops {
		s()
	}
}
