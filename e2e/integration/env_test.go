package integration

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// controllerUser is the identity the controller runs as in these tests: the
// ServiceAccount of manifests/controller/rbac.yaml, so the tests prove the
// ClusterRole is enough.
const controllerUser = "system:serviceaccount:keeplb-system:keeplb-controller"

// env is a real control plane with keeplb's CRD and RBAC installed.
type env struct {
	t      *testing.T
	cp     *controlplane.ControlPlane
	client kubernetes.Interface
	dyn    dynamic.Interface
}

func newEnv(t *testing.T) *env {
	t.Helper()
	cp := controlplane.StartForTest(t)
	if err := cp.Apply(t.Context(), manifestPath(t, "crd/ippools.keeplb.io.yaml"), manifestPath(t, "namespace.yaml"), manifestPath(t, "controller/rbac.yaml")); err != nil {
		t.Fatalf("install keeplb manifests: %v", err)
	}
	cfg := cp.AdminConfig()
	cfg.QPS, cfg.Burst = 500, 1000
	e := &env{t: t, cp: cp, client: kubernetes.NewForConfigOrDie(cfg), dyn: dynamic.NewForConfigOrDie(cfg)}
	// One Ready node, as a real cluster has; the service controller warns
	// about LoadBalancers without nodes.
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}
	node, err := e.client.CoreV1().Nodes().Create(t.Context(), node, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
	if _, err := e.client.CoreV1().Nodes().UpdateStatus(t.Context(), node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return e
}

// startController runs keeplb's controller as its ServiceAccount, with
// leader election, until the returned stop function is called.
func (e *env) startController(mods ...func(*controller.Options)) (stop func()) {
	e.t.Helper()
	return e.startControllerWith(nil, mods...)
}

// startControllerWith is startController with a change to its REST config
// (a transport wrapper, say).
func (e *env) startControllerWith(cfgMod func(*rest.Config), mods ...func(*controller.Options)) (stop func()) {
	e.t.Helper()
	o := controller.NewOptions()
	o.MetricsBindAddress = "127.0.0.1:0"
	o.LeaderElectNamespace = "keeplb-system"
	o.Identity = fmt.Sprintf("test-%d", time.Now().UnixNano())
	// Short, but with the margin a lost lease needs (LeaseDuration -
	// RenewDeadline - RetryPeriod bounds each write; see controller.Options).
	o.LeaseDuration, o.RenewDeadline, o.RetryPeriod = 6*time.Second, 3*time.Second, 500*time.Millisecond
	o.Workers = 4
	o.KubeAPIQPS, o.KubeAPIBurst = 500, 1000
	for _, m := range mods {
		m(o)
	}
	cfg := e.cp.ImpersonatedConfig(controllerUser, "system:serviceaccounts", "system:serviceaccounts:keeplb-system", "system:authenticated")
	cfg.QPS, cfg.Burst = o.KubeAPIQPS, o.KubeAPIBurst
	if cfgMod != nil {
		cfgMod(cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := controller.RunWithConfig(ctx, o, cfg); err != nil && ctx.Err() == nil {
			e.t.Errorf("controller stopped: %v", err)
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			wg.Wait()
		})
	}
	e.t.Cleanup(stop)
	return stop
}

// pool creates an IPPool from YAML.
func (e *env) pool(name, specYAML string) {
	e.t.Helper()
	var spec map[string]any
	if err := yaml.Unmarshal([]byte(specYAML), &spec); err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.dyn.Resource(v1alpha1.IPPoolResource).Create(e.t.Context(), newPool(name, spec), metav1.CreateOptions{}); err != nil {
		e.t.Fatalf("create IPPool %s: %v", name, err)
	}
}

// getPool reads an IPPool.
func (e *env) getPool(name string) *v1alpha1.IPPool {
	e.t.Helper()
	u, err := e.dyn.Resource(v1alpha1.IPPoolResource).Get(e.t.Context(), name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	p, err := v1alpha1.FromUnstructured(u)
	if err != nil {
		e.t.Fatal(err)
	}
	return p
}

// svcOpt changes a Service before it is created.
type svcOpt func(*v1.Service)

func ann(kv ...string) svcOpt {
	return func(s *v1.Service) {
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			s.Annotations[kv[i]] = kv[i+1]
		}
	}
}

func ports(ps ...int32) svcOpt {
	return func(s *v1.Service) {
		s.Spec.Ports = nil
		for _, p := range ps {
			s.Spec.Ports = append(s.Spec.Ports, v1.ServicePort{Name: fmt.Sprintf("p%d", p), Port: p, TargetPort: intstr.FromInt32(p), Protocol: v1.ProtocolTCP})
		}
	}
}

func class(c string) svcOpt { return func(s *v1.Service) { s.Spec.LoadBalancerClass = &c } }

func families(p v1.IPFamilyPolicy, fs ...v1.IPFamily) svcOpt {
	return func(s *v1.Service) { s.Spec.IPFamilyPolicy, s.Spec.IPFamilies = &p, fs }
}

func newService(ns, name string, opts ...svcOpt) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{
			Type:     v1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": name},
			Ports:    []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolTCP}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func (e *env) namespace(name string, labels map[string]string) {
	e.t.Helper()
	_, err := e.client.CoreV1().Namespaces().Create(e.t.Context(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		e.t.Fatal(err)
	}
}

func (e *env) create(s *v1.Service) *v1.Service {
	e.t.Helper()
	e.namespace(s.Namespace, nil)
	out, err := e.client.CoreV1().Services(s.Namespace).Create(e.t.Context(), s, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatalf("create Service %s/%s: %v", s.Namespace, s.Name, err)
	}
	return out
}

func (e *env) get(ns, name string) *v1.Service {
	e.t.Helper()
	s, err := e.client.CoreV1().Services(ns).Get(e.t.Context(), name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

func (e *env) delete(ns, name string) {
	e.t.Helper()
	if err := e.client.CoreV1().Services(ns).Delete(e.t.Context(), name, metav1.DeleteOptions{}); err != nil {
		e.t.Fatal(err)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last seen: %s", timeout, what, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ingress returns the addresses in a Service's status.
func ingress(s *v1.Service) []string {
	var out []string
	for _, i := range s.Status.LoadBalancer.Ingress {
		out = append(out, i.IP)
	}
	return out
}

// waitIngress waits until the Service has n ingress addresses and returns it.
func (e *env) waitIngress(ns, name string, n int) *v1.Service {
	e.t.Helper()
	return e.waitIngressWithin(ns, name, n, 30*time.Second)
}

// waitIngressWithin is waitIngress with a deadline of its own.
func (e *env) waitIngressWithin(ns, name string, n int, timeout time.Duration) *v1.Service {
	e.t.Helper()
	var s *v1.Service
	eventually(e.t, timeout, fmt.Sprintf("%s/%s to get %d address(es)", ns, name, n), func() (bool, string) {
		s = e.get(ns, name)
		return len(s.Status.LoadBalancer.Ingress) == n, fmt.Sprint(ingress(s))
	})
	return s
}

// waitEvent waits for an event of reason on the Service whose message
// contains every part, and returns its message.
func (e *env) waitEvent(ns, name, eventType, reason string, parts ...string) string {
	e.t.Helper()
	var msg string
	eventually(e.t, 30*time.Second, fmt.Sprintf("%s event %s on %s/%s containing %q", eventType, reason, ns, name, parts), func() (bool, string) {
		sel := fields.Set{"involvedObject.name": name, "involvedObject.kind": "Service", "reason": reason, "type": eventType}.AsSelector().String()
		evs, err := e.client.CoreV1().Events(ns).List(e.t.Context(), metav1.ListOptions{FieldSelector: sel})
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, ev := range evs.Items {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(ev.Message, p)
			}
			if ok {
				msg = ev.Message
				return true, ""
			}
			seen = append(seen, ev.Message)
		}
		return false, strings.Join(seen, " | ")
	})
	return msg
}

// scrape GETs url with token (none if empty), over HTTPS as a Prometheus
// with insecure_skip_verify does, and returns the body and status code; 0
// when unreachable.
func scrape(t *testing.T, url, token string) (string, int) {
	t.Helper()
	body, code, err := keeplbtest.Scrape(url, token)
	if err != nil {
		return err.Error(), 0
	}
	return body, code
}

func inPrefix(t *testing.T, ip, prefix string) bool {
	t.Helper()
	return netip.MustParsePrefix(prefix).Contains(netip.MustParseAddr(ip))
}
