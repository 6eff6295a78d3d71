package integration

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	servicehelper "k8s.io/cloud-provider/service/helpers"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/status"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// Scenario 1: an address from the right pool with the right ipMode, the
// finalizer, the event and pool status; deleting the Service frees it.
func TestServiceLifecycle(t *testing.T) {
	e := newEnv(t)
	e.pool("default", `{addresses: ["192.0.2.0/28"]}`)
	e.pool("kp", `{addresses: ["198.51.100.0/28"], autoAssign: false, forwarding: kube-proxy}`)
	e.startController()

	e.create(newService("app", "web"))
	s := e.waitIngress("app", "web", 1)
	ip := s.Status.LoadBalancer.Ingress[0]
	if !inPrefix(t, ip.IP, "192.0.2.0/28") || ip.IPMode == nil || *ip.IPMode != v1.LoadBalancerIPModeProxy {
		t.Fatalf("ingress = %+v, want an address of 192.0.2.0/28 with ipMode Proxy", ip)
	}
	if !servicehelper.HasLBFinalizer(s) {
		t.Fatalf("finalizers = %v, want the load balancer cleanup finalizer", s.Finalizers)
	}
	e.waitEvent("app", "web", v1.EventTypeNormal, "IPAllocated", ip.IP, "IPPool default")

	e.create(newService("app", "vip", ann("keeplb.io/pool", "kp")))
	kp := e.waitIngress("app", "vip", 1).Status.LoadBalancer.Ingress[0]
	if !inPrefix(t, kp.IP, "198.51.100.0/28") || *kp.IPMode != v1.LoadBalancerIPModeVIP {
		t.Fatalf("kube-proxy pool ingress = %+v, want ipMode VIP from 198.51.100.0/28", kp)
	}

	eventually(t, 30*time.Second, "pool status", func() (bool, string) {
		p := e.getPool("default")
		ready := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.ConditionReady)
		return p.Status.Total == "16" && p.Status.Used == 1 && p.Status.Free == "15" && ready != nil && ready.Status == metav1.ConditionTrue,
			fmt.Sprintf("%+v", p.Status)
	})
	out, err := e.cp.Kubectl(t.Context(), "get", "ippools")
	if err != nil || !strings.Contains(out, "192.0.2.0/28") {
		t.Fatalf("kubectl get ippools: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "default" && !(slices.Contains(f, "16") && slices.Contains(f, "1") && slices.Contains(f, "15")) {
			t.Fatalf("kubectl get ippools does not show total/used/free 16/1/15:\n%s", out)
		}
	}

	// Changing the pool's forwarding changes its Services' ipMode.
	u, err := e.dyn.Resource(v1alpha1.IPPoolResource).Get(t.Context(), "kp", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	u.Object["spec"].(map[string]any)["forwarding"] = "nodeport"
	if _, err := e.dyn.Resource(v1alpha1.IPPoolResource).Update(t.Context(), u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "ipMode Proxy after the pool's forwarding changed to nodeport", func() (bool, string) {
		s := e.get("app", "vip")
		ing := s.Status.LoadBalancer.Ingress
		return len(ing) == 1 && ing[0].IP == kp.IP && *ing[0].IPMode == v1.LoadBalancerIPModeProxy, fmt.Sprintf("%+v", ing)
	})

	e.delete("app", "web")
	eventually(t, 30*time.Second, "the Service to be gone", func() (bool, string) {
		_, err := e.client.CoreV1().Services("app").Get(t.Context(), "web", metav1.GetOptions{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	// The freed address can be had again.
	e.create(newService("app", "again", ann("keeplb.io/ips", ip.IP)))
	if got := ingress(e.waitIngress("app", "again", 1)); got[0] != ip.IP {
		t.Fatalf("the freed address %s went to %v", ip.IP, got)
	}
}

// Scenario 2: every annotation works, every bad value gets its Warning
// event naming the annotation, and other Services proceed.
func TestAnnotations(t *testing.T) {
	e := newEnv(t)
	e.pool("a", `{addresses: ["192.0.2.0/28"]}`)
	e.pool("b", `{addresses: ["192.0.2.16/28"], autoAssign: false, serviceAllocation: {namespaces: [team]}}`)
	e.pool("pods", `{addresses: ["192.0.2.32/28"], autoAssign: false, forwarding: pod}`)
	e.pool("edge", `{addresses: ["192.0.2.48/28"], autoAssign: false, serviceAllocation: {serviceSelector: {matchLabels: {tier: edge}}}}`)
	e.startController()

	good := []struct {
		name  string
		opts  []svcOpt
		check func(t *testing.T, s *v1.Service)
	}{
		{"pool", []svcOpt{ann("keeplb.io/pool", "pods")}, func(t *testing.T, s *v1.Service) {
			if !inPrefix(t, ingress(s)[0], "192.0.2.32/28") {
				t.Fatalf("got %v, want pool pods", ingress(s))
			}
		}},
		{"ips", []svcOpt{ann("keeplb.io/ips", "192.0.2.9")}, func(t *testing.T, s *v1.Service) {
			if ingress(s)[0] != "192.0.2.9" {
				t.Fatalf("got %v", ingress(s))
			}
		}},
		{"loadbalancerip", []svcOpt{func(s *v1.Service) { s.Spec.LoadBalancerIP = "192.0.2.10" }}, func(t *testing.T, s *v1.Service) {
			if ingress(s)[0] != "192.0.2.10" {
				t.Fatalf("got %v", ingress(s))
			}
		}},
		{"forwarding", []svcOpt{ann("keeplb.io/forwarding", "kube-proxy")}, func(t *testing.T, s *v1.Service) {
			if *s.Status.LoadBalancer.Ingress[0].IPMode != v1.LoadBalancerIPModeVIP {
				t.Fatalf("forwarding kube-proxy must publish ipMode VIP: %+v", s.Status.LoadBalancer.Ingress[0])
			}
		}},
		{"pod-forwarding-pool", []svcOpt{ann("keeplb.io/pool", "pods", "keeplb.io/forwarding", "pod")}, func(t *testing.T, s *v1.Service) {
			if *s.Status.LoadBalancer.Ingress[0].IPMode != v1.LoadBalancerIPModeProxy {
				t.Fatalf("pod forwarding must publish ipMode Proxy")
			}
		}},
		{"share-1", []svcOpt{ann("keeplb.io/share-key", "k"), ports(80, 443)}, nil},
	}
	bad := []struct {
		name, field, text, reason string
		opts                      []svcOpt
	}{
		{"unknown-pool", "keeplb.io/pool", `IPPool "nope" does not exist`, "PoolNotFound", []svcOpt{ann("keeplb.io/pool", "nope")}},
		{"not-admitted", "keeplb.io/pool", "admits only namespaces team", "NotAdmitted", []svcOpt{ann("keeplb.io/pool", "b")}},
		{"taken", "keeplb.io/ips", "192.0.2.9 is already used by Service ns/ips", "AddressInUse", []svcOpt{ann("keeplb.io/ips", "192.0.2.9")}},
		{"outside", "keeplb.io/ips", "100.64.0.1 is in no IPPool", "AddressOutsidePools", []svcOpt{ann("keeplb.io/ips", "100.64.0.1")}},
		{"malformed-ips", "keeplb.io/ips", `"192.0.2.300" is not an IP address`, "InvalidAnnotation", []svcOpt{ann("keeplb.io/ips", "192.0.2.300")}},
		{"malformed-forwarding", "keeplb.io/forwarding", "use nodeport, pod or kube-proxy", "InvalidAnnotation", []svcOpt{ann("keeplb.io/forwarding", "dsr")}},
		{"malformed-share", "keeplb.io/share-key", "not a valid key", "InvalidAnnotation", []svcOpt{ann("keeplb.io/share-key", "-x-")}},
		{"share-clash", "keeplb.io/share-key", "both use port TCP/443", "SharingConflict", []svcOpt{ann("keeplb.io/share-key", "k"), ports(443)}},
		{"malformed-lbip", "spec.loadBalancerIP", "", "", nil}, // placeholder replaced below
	}
	bad = bad[:len(bad)-1] // the API server itself rejects a malformed spec.loadBalancerIP

	for _, g := range good {
		e.create(newService("ns", g.name, g.opts...))
	}
	e.waitIngress("ns", "ips", 1)
	for _, b := range bad {
		e.create(newService("ns", b.name, b.opts...))
	}
	e.create(newService("ns", "share-2", ann("keeplb.io/share-key", "k"), ports(53)))
	e.create(newService("ns", "after-bad")) // created after the bad ones: still served
	for _, g := range good {
		s := e.waitIngress("ns", g.name, 1)
		if g.check != nil {
			t.Run(g.name, func(t *testing.T) { g.check(t, s) })
		}
	}
	if a, b := ingress(e.waitIngress("ns", "share-1", 1)), ingress(e.waitIngress("ns", "share-2", 1)); a[0] != b[0] {
		t.Fatalf("share-key Services got %v and %v, want one address", a, b)
	}
	e.waitIngress("ns", "after-bad", 1)
	for _, b := range bad {
		t.Run(b.name, func(t *testing.T) {
			e.waitEvent("ns", b.name, v1.EventTypeWarning, "AllocationFailed", b.reason, b.field, b.text)
			if got := ingress(e.get("ns", b.name)); len(got) != 0 {
				t.Fatalf("a refused Service got %v", got)
			}
		})
	}

	// A refused Service is retried when the situation changes, at once.
	start := time.Now()
	e.pool("nope", `{addresses: ["203.0.113.0/30"], autoAssign: false}`)
	if got := ingress(e.waitIngress("ns", "unknown-pool", 1)); !inPrefix(t, got[0], "203.0.113.0/30") {
		t.Fatalf("got %v", got)
	}
	t.Logf("pending Service assigned %s after its pool was created", time.Since(start).Round(time.Millisecond))
	// Labels decide serviceSelector admission; the upstream controller does
	// not watch them, keeplb retries a pending Service when they change.
	e.create(newService("ns", "unlabelled", ann("keeplb.io/pool", "edge")))
	e.waitEvent("ns", "unlabelled", v1.EventTypeWarning, "AllocationFailed", "NotAdmitted", "Services with labels tier=edge")
	s := e.get("ns", "unlabelled")
	s.Labels = map[string]string{"tier": "edge"}
	if _, err := e.client.CoreV1().Services("ns").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if got := ingress(e.waitIngressWithin("ns", "unlabelled", 1, 15*time.Second)); !inPrefix(t, got[0], "192.0.2.48/28") {
		t.Fatalf("got %v", got)
	}
	t.Logf("pending Service assigned %s after its labels were fixed", time.Since(start).Round(time.Millisecond))
	// Fixing an annotation is picked up too.
	s = e.get("ns", "malformed-forwarding")
	s.Annotations["keeplb.io/forwarding"] = "pod"
	if _, err := e.client.CoreV1().Services("ns").Update(t.Context(), s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitIngress("ns", "malformed-forwarding", 1)
}

// Scenario 3: exhaustion, and a pending Service served as soon as an
// address is freed, without a restart.
func TestExhaustion(t *testing.T) {
	e := newEnv(t)
	e.pool("small", `{addresses: ["192.0.2.0/30"]}`)
	metricsAddr := keeplbtest.FreeAddr(t)
	e.startController(func(o *controller.Options) { o.MetricsBindAddress = metricsAddr })
	token := keeplbtest.MetricsToken(t, e.client, "prometheus", true)
	for i := range 6 {
		e.create(newService("ns", fmt.Sprintf("s%d", i)))
	}
	var assigned, pending []string
	eventually(t, 30*time.Second, "4 assigned and 2 refused", func() (bool, string) {
		assigned, pending = nil, nil
		for i := range 6 {
			name := fmt.Sprintf("s%d", i)
			if len(e.get("ns", name).Status.LoadBalancer.Ingress) == 1 {
				assigned = append(assigned, name)
			} else {
				pending = append(pending, name)
			}
		}
		return len(assigned) == 4, fmt.Sprintf("assigned %v", assigned)
	})
	for _, p := range pending {
		e.waitEvent("ns", p, v1.EventTypeWarning, "AllocationFailed", "PoolExhausted", "IPPool small has no free IPv4 address")
	}
	eventually(t, 30*time.Second, "pool status used=4 free=0", func() (bool, string) {
		p := e.getPool("small")
		return p.Status.Used == 4 && p.Status.Free == "0", fmt.Sprintf("%+v", p.Status)
	})
	eventually(t, 30*time.Second, "metrics to show the full pool and the failures", func() (bool, string) {
		body, code := scrape(t, "https://"+metricsAddr+"/metrics", token)
		want := []string{
			`keeplb_pool_addresses{family="IPv4",pool="small"} 4`,
			`keeplb_pool_addresses_used{family="IPv4",pool="small"} 4`,
			`keeplb_pool_addresses_free{family="IPv4",pool="small"} 0`,
			`keeplb_services_pending 2`,
			`keeplb_allocations_total 4`,
			`keeplb_allocation_failures_total{reason="PoolExhausted"}`,
		}
		for _, w := range want {
			if !strings.Contains(body, w) {
				return false, fmt.Sprintf("HTTP %d, missing %q", code, w)
			}
		}
		return true, ""
	})
	if body, code := scrape(t, "https://"+metricsAddr+"/readyz", ""); code != 200 {
		t.Fatalf("/readyz = %d %s on the seeded leader", code, body)
	}
	// keeplb status, against the real API server (its field selectors
	// included): the pending Services show why.
	rep, err := status.Collect(t.Context(), e.client, e.dyn, status.Options{LoadBalancerClass: "keeplb.io/vip", DefaultClass: true})
	if err != nil {
		t.Fatal(err)
	}
	problems := map[string]string{}
	for _, s := range rep.Services {
		problems[s.Name] = s.Problem
	}
	for _, p := range pending {
		if !strings.Contains(problems[p], "PoolExhausted") {
			t.Fatalf("keeplb status shows %q for pending %s, want its PoolExhausted warning", problems[p], p)
		}
	}
	if len(rep.Pools) != 1 || rep.Pools[0].Name != "small" {
		t.Fatalf("keeplb status pools = %+v", rep.Pools)
	}
	freedIP := ingress(e.get("ns", assigned[0]))[0]
	start := time.Now()
	e.delete("ns", assigned[0])
	eventually(t, 15*time.Second, "a pending Service to get the freed address", func() (bool, string) {
		for _, p := range pending {
			if got := ingress(e.get("ns", p)); len(got) == 1 && got[0] == freedIP {
				return true, ""
			}
		}
		return false, "none yet"
	})
	t.Logf("freed address reassigned after %s", time.Since(start).Round(time.Millisecond))
}

// Scenario 4: dual-stack policies.
func TestDualStack(t *testing.T) {
	e := newEnv(t)
	e.pool("dual", `{addresses: ["192.0.2.0/28", "2001:db8::/124"]}`)
	e.pool("v4only", `{addresses: ["198.51.100.0/28"], autoAssign: false}`)
	e.startController()

	e.create(newService("ns", "require", families(v1.IPFamilyPolicyRequireDualStack, v1.IPv4Protocol, v1.IPv6Protocol)))
	e.create(newService("ns", "prefer", families(v1.IPFamilyPolicyPreferDualStack, v1.IPv6Protocol, v1.IPv4Protocol)))
	e.create(newService("ns", "single6", families(v1.IPFamilyPolicySingleStack, v1.IPv6Protocol)))
	e.create(newService("ns", "require-v4pool", ann("keeplb.io/pool", "v4only"), families(v1.IPFamilyPolicyRequireDualStack, v1.IPv4Protocol, v1.IPv6Protocol)))
	e.create(newService("ns", "prefer-v4pool", ann("keeplb.io/pool", "v4only"), families(v1.IPFamilyPolicyPreferDualStack, v1.IPv4Protocol, v1.IPv6Protocol)))

	if got := ingress(e.waitIngress("ns", "require", 2)); !inPrefix(t, got[0], "192.0.2.0/28") || !inPrefix(t, got[1], "2001:db8::/124") {
		t.Fatalf("RequireDualStack got %v, want IPv4 then IPv6", got)
	}
	if got := ingress(e.waitIngress("ns", "prefer", 2)); !inPrefix(t, got[0], "2001:db8::/124") || !inPrefix(t, got[1], "192.0.2.0/28") {
		t.Fatalf("PreferDualStack (IPv6 primary) got %v, want IPv6 then IPv4", got)
	}
	if got := ingress(e.waitIngress("ns", "single6", 1)); !inPrefix(t, got[0], "2001:db8::/124") {
		t.Fatalf("SingleStack IPv6 got %v", got)
	}
	if got := ingress(e.waitIngress("ns", "prefer-v4pool", 1)); !inPrefix(t, got[0], "198.51.100.0/28") {
		t.Fatalf("PreferDualStack must fall back to one family: %v", got)
	}
	e.waitEvent("ns", "require-v4pool", v1.EventTypeWarning, "AllocationFailed", "FamilyUnavailable", "keeplb.io/pool", "no admissible IPPool has both IPv4 and IPv6")
	if got := ingress(e.get("ns", "require-v4pool")); len(got) != 0 {
		t.Fatalf("RequireDualStack without a dual pool got %v", got)
	}
}

// Scenarios 5 and 6: 500 Services created at once by many clients against
// 8 workers get 500 distinct addresses, and a restart changes none.
func TestScaleConcurrencyAndRestart(t *testing.T) {
	const n = 500
	e := newEnv(t)
	e.pool("big", `{addresses: ["10.10.0.0/22"]}`)
	stop := e.startController(func(o *controller.Options) { o.Workers = 8 })

	e.namespace("scale", nil)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 20 {
				s := newService("scale", fmt.Sprintf("s%03d", i))
				if _, err := e.client.CoreV1().Services("scale").Create(t.Context(), s, metav1.CreateOptions{}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	created := time.Since(start)
	before := e.waitAllAssigned("scale", n)
	t.Logf("%d Services created in %s and all assigned %s after the first create", n, created.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))

	stop()
	// While the controller is down, one more Service arrives.
	e.create(newService("scale", "late"))
	e.startController(func(o *controller.Options) { o.Workers = 8 })
	after := e.waitAllAssigned("scale", n+1)
	for name, ip := range before {
		if after[name] != ip {
			t.Fatalf("restart moved %s from %s to %s", name, ip, after[name])
		}
	}
	t.Logf("after restart: %d addresses unchanged, late Service got %s", len(before), after["late"])
}

// waitAllAssigned waits until n Services in ns have one address each, checks
// no address is used twice, and returns name → address.
func (e *env) waitAllAssigned(ns string, n int) map[string]string {
	e.t.Helper()
	out := map[string]string{}
	eventually(e.t, 3*time.Minute, fmt.Sprintf("%d Services in %s to be assigned", n, ns), func() (bool, string) {
		list, err := e.client.CoreV1().Services(ns).List(e.t.Context(), metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		clear(out)
		owner := map[string]string{}
		for _, s := range list.Items {
			ips := ingress(&s)
			if len(ips) != 1 {
				continue
			}
			if o, dup := owner[ips[0]]; dup {
				e.t.Fatalf("%s given to both %s and %s", ips[0], o, s.Name)
			}
			owner[ips[0]] = s.Name
			out[s.Name] = ips[0]
		}
		return len(out) == n, fmt.Sprintf("%d assigned", len(out))
	})
	return out
}

// Scenario 7 (the controller's half; admission is TestIPPoolAdmission):
// overlapping pools, invalid IPv6 ranges, and pools shrinking under
// allocated addresses.
func TestPoolStatusAndEdits(t *testing.T) {
	e := newEnv(t)
	e.pool("older", `{addresses: ["192.0.2.0/29"]}`)
	time.Sleep(1100 * time.Millisecond) // creation timestamps have one-second resolution; "newer" must be later
	e.pool("newer", `{addresses: ["192.0.2.4-192.0.2.11"], serviceAllocation: {priority: 10}}`)
	e.pool("bad6", `{addresses: ["2001:db8::10-2001:db8::1", "198.51.100.0/30"]}`)
	e.startController()

	eventually(t, 30*time.Second, "conditions", func() (bool, string) {
		newer, older, bad := e.getPool("newer"), e.getPool("older"), e.getPool("bad6")
		c := meta.FindStatusCondition(newer.Status.Conditions, v1alpha1.ConditionConflicting)
		oc := meta.FindStatusCondition(older.Status.Conditions, v1alpha1.ConditionConflicting)
		r := meta.FindStatusCondition(bad.Status.Conditions, v1alpha1.ConditionReady)
		ok := c != nil && c.Status == metav1.ConditionTrue && strings.Contains(c.Message, "older") &&
			oc != nil && oc.Status == metav1.ConditionFalse && newer.Status.Total == "4" &&
			r != nil && r.Status == metav1.ConditionFalse && r.Reason == "InvalidAddresses" && strings.Contains(r.Message, "starts after it ends") &&
			bad.Status.Total == "4"
		return ok, fmt.Sprintf("newer=%+v older=%+v bad6=%+v", newer.Status, older.Status, bad.Status)
	})
	// The overlap is served by the older pool only.
	for i := range 4 {
		e.create(newService("ns", fmt.Sprintf("n%d", i), ann("keeplb.io/pool", "newer")))
	}
	for i := range 4 {
		if got := ingress(e.waitIngress("ns", fmt.Sprintf("n%d", i), 1)); !inPrefix(t, got[0], "192.0.2.8/30") {
			t.Fatalf("pool newer handed out %v, inside the overlap with older", got)
		}
	}

	// Shrinking a pool under an allocated address keeps it, warns, counts it.
	e.create(newService("ns", "kept", ann("keeplb.io/ips", "192.0.2.3")))
	e.waitIngress("ns", "kept", 1)
	// The controller writes the pool's status meanwhile: read again on a
	// conflict, as any client of a controller-owned object must.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		u, err := e.dyn.Resource(v1alpha1.IPPoolResource).Get(t.Context(), "older", metav1.GetOptions{})
		if err != nil {
			return err
		}
		u.Object["spec"].(map[string]any)["addresses"] = []any{"192.0.2.0/31"}
		_, err = e.dyn.Resource(v1alpha1.IPPoolResource).Update(t.Context(), u, metav1.UpdateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	e.waitEvent("ns", "kept", v1.EventTypeWarning, "AddressOutsidePool", "192.0.2.3", "keeps it")
	eventually(t, 30*time.Second, "older to count the kept address", func() (bool, string) {
		p := e.getPool("older")
		return p.Status.OutOfRange == 1 && p.Status.Used == 1 && p.Status.Total == "2", fmt.Sprintf("%+v", p.Status)
	})
	if got := ingress(e.get("ns", "kept")); len(got) != 1 || got[0] != "192.0.2.3" {
		t.Fatalf("shrinking the pool moved the Service to %v", got)
	}
}

// Scenario 8: loadBalancerClass.
func TestLoadBalancerClass(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/28"]}`)
	stop := e.startController()

	e.create(newService("ns", "foreign", class("example.com/other")))
	e.create(newService("ns", "ours", class("keeplb.io/vip")))
	e.create(newService("ns", "none"))
	e.waitIngress("ns", "ours", 1)
	e.waitIngress("ns", "none", 1)
	if s := e.get("ns", "ours"); !servicehelper.HasLBFinalizer(s) {
		t.Fatal("class Service has no finalizer")
	}
	e.waitEvent("ns", "ours", v1.EventTypeNormal, "IPAllocated", "IPPool p")
	// Both were served after the foreign one was created; it stays untouched.
	if s := e.get("ns", "foreign"); len(s.Status.LoadBalancer.Ingress) != 0 || len(s.Finalizers) != 0 {
		t.Fatalf("a Service of another class was touched: %+v %v", s.Status, s.Finalizers)
	}

	// Changing type away from LoadBalancer releases the address.
	ourIP := ingress(e.get("ns", "ours"))[0]
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s := e.get("ns", "ours")
		s.Spec.Type = v1.ServiceTypeClusterIP
		s.Spec.LoadBalancerClass = nil
		_, err := e.client.CoreV1().Services("ns").Update(t.Context(), s, metav1.UpdateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "status and finalizer cleared", func() (bool, string) {
		s := e.get("ns", "ours")
		return len(s.Status.LoadBalancer.Ingress) == 0 && !servicehelper.HasLBFinalizer(s), fmt.Sprintf("%v %v", ingress(s), s.Finalizers)
	})
	e.create(newService("ns", "reuse", class("keeplb.io/vip"), ann("keeplb.io/ips", ourIP)))
	e.waitIngress("ns", "reuse", 1)

	// With --default-class=false, classless Services are not ours.
	stop()
	e.startController(func(o *controller.Options) {
		o.DefaultClass, o.AllowUnmanagedIPs = false, []string{"100.64.0.0/28"}
	})
	e.create(newService("ns", "none2"))
	e.create(newService("ns", "ours2", class("keeplb.io/vip")))
	e.create(newService("ns", "unmanaged", class("keeplb.io/vip"), ann("keeplb.io/ips", "100.64.0.9")))
	e.waitIngress("ns", "ours2", 1)
	if got := ingress(e.waitIngress("ns", "unmanaged", 1)); got[0] != "100.64.0.9" {
		t.Fatalf("--allow-unmanaged-ips: got %v", got)
	}
	if s := e.get("ns", "none2"); len(s.Status.LoadBalancer.Ingress) != 0 || len(s.Finalizers) != 0 {
		t.Fatalf("a classless Service was handled with --default-class=false: %+v", s.Status)
	}
	if s := e.get("ns", "foreign"); len(s.Status.LoadBalancer.Ingress) != 0 || len(s.Finalizers) != 0 {
		t.Fatalf("a Service of another class was touched: %+v", s.Status)
	}
}
