package scale_e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

// The names and addresses of the scale's objects. The speaker under test
// runs for node 0 (node-0000, InternalIP 10.80.0.1 on the VM's link
// scale0); the other Nodes exist only as API objects.
const (
	ns = "scale"
	// link is the VM's dummy interface that carries node 0's InternalIP
	// and, named in every pool's spec.vrrp.interface, the VIPs.
	link = "scale0"
	// vrrpLabel marks the Nodes the pools' spec.vrrp.nodeSelector picks.
	vrrpLabel = "scale.keeplb.io/vrrp"
	// coldLabel marks the Services created without a holder annotation,
	// which the speaker has to write when it becomes their VIPs' MASTER.
	coldLabel = "scale.keeplb.io/cold"
	// touchService is a ClusterIP Service, not keeplb's: bumping one of
	// its annotations wakes the speaker for a sync that changes nothing.
	touchService = "touch"
	// nodeMask is the prefix length of node 0's InternalIP on link: the
	// subnet holds every Node's InternalIP.
	nodeMask = 16
)

// spec is the size of the cluster to build; the host, which creates the
// objects, and the VM, which checks what the speaker made of them, derive
// every object from it alone.
type spec struct {
	Nodes, Services, Endpoints, NodePort, Pools, VRRPNodes, Cold int
	// Extra is how many Services the VM adds, one at a time, to time the
	// keepalived reload each causes; their VIPs follow the others'.
	Extra int
}

// node returns the name of Node i.
func node(i int) string { return fmt.Sprintf("node-%04d", i) }

// nodeIP returns Node i's InternalIP, in 10.80.0.0/16.
func nodeIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 80, byte(i / 250), byte(i%250 + 1)})
}

// pool returns the name of pool p.
func pool(p int) string { return fmt.Sprintf("pool-%d", p) }

// vip returns the VIP of Service i: Services go round the pools, pool p
// owning 10.(100+p).0.0/16, and each pool's take the next address.
func (s spec) vip(i int) netip.Addr {
	p, k := i%s.Pools, i/s.Pools
	return netip.AddrFrom4([4]byte{10, byte(100 + p), byte(k / 250), byte(k%250 + 1)})
}

// service returns the name of Service i.
func service(i int) string { return fmt.Sprintf("svc-%05d", i) }

// nodePort says whether Service i is forwarded by nodeport: every
// Services/NodePort-th one, as many as spec.NodePort; the rest by pod.
func (s spec) nodePort(i int) bool {
	if s.NodePort <= 0 {
		return false
	}
	step := max(s.Services/s.NodePort, 1)
	return i%step == 0 && i/step < s.NodePort
}

// cold says whether Service i is created without a holder annotation:
// every Services/Cold-th one.
func (s spec) cold(i int) bool {
	if s.Cold <= 0 {
		return false
	}
	step := max(s.Services/s.Cold, 1)
	return i%step == step-1 && i/step < s.Cold
}

// podIP returns the address of endpoint j of Service i, in 10.128.0.0/9:
// every endpoint of the cluster has its own.
func (s spec) podIP(i, j int) netip.Addr {
	e := i*s.Endpoints + j
	return netip.AddrFrom4([4]byte{10, byte(128 + e>>16), byte(e >> 8), byte(e)})
}

// endpointNode returns the Node of endpoint j of Service i, spread over
// all Nodes. Node 0 holds no endpoint of a nodeport Service, so that
// those virtual servers have only NodePorts as real servers.
func (s spec) endpointNode(i, j int) int {
	n := (i*7 + j*131) % s.Nodes
	if n == 0 && s.nodePort(i) && s.Nodes > 1 {
		n = 1
	}
	return n
}

// poolSpec returns pool p's spec: its /16, forwarding to pods, VRRP on
// link among the labelled Nodes, in a VRID range of its own.
func (s spec) poolSpec(p int) map[string]any {
	width := 255 / s.Pools
	first := p*width + 1
	return map[string]any{
		"addresses":  []any{fmt.Sprintf("10.%d.0.0/16", 100+p)},
		"forwarding": string(v1alpha1.ForwardingPod),
		"vrrp": map[string]any{
			"interface":        link,
			"virtualRouterIDs": fmt.Sprintf("%d-%d", first, first+width-1),
			"nodeSelector":     map[string]any{"matchLabels": map[string]any{vrrpLabel: "true"}},
		},
	}
}

// serviceObject returns Service i as created: a LoadBalancer of keeplb's
// default class with one TCP port, 80 → 8080, and, unless it is cold,
// the holder annotation naming node 0, as a speaker that ran before would
// have left it. Pod-forwarded Services allocate no NodePort: the 2,768
// NodePorts of the default range would not go round.
func (s spec) serviceObject(i int) *v1.Service {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: service(i), Labels: map[string]string{}, Annotations: map[string]string{}},
		Spec: v1.ServiceSpec{
			Type:     v1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": service(i)},
			Ports:    []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolTCP}},
		},
	}
	if s.nodePort(i) {
		svc.Annotations[annotations.Forwarding] = string(v1alpha1.ForwardingNodePort)
	} else {
		svc.Spec.AllocateLoadBalancerNodePorts = ptr.To(false)
	}
	vip := s.vip(i)
	if s.cold(i) {
		svc.Labels[coldLabel] = "true"
	} else {
		svc.Annotations[annotations.Holder] = annotations.Holders{vip: node(0)}.Format([]netip.Addr{vip})
	}
	return svc
}

// ingress is the status keeplb's controller writes for Service i.
func (s spec) ingress(i int) v1.LoadBalancerStatus {
	return v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: s.vip(i).String(), IPMode: ptr.To(v1.LoadBalancerIPModeProxy)}}}
}

// slice returns Service i's EndpointSlice: spec.Endpoints ready
// endpoints serving port http on 8080.
func (s spec) slice(i int) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: service(i) + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: service(i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
	for j := range s.Endpoints {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{s.podIP(i, j).String()},
			NodeName:   ptr.To(node(s.endpointNode(i, j))),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		})
	}
	return es
}

// bulkConfig is cfg for creating objects as fast as the API server
// takes them: protobuf, and no client-side rate limit.
func bulkConfig(cfg *rest.Config) *rest.Config {
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.QPS, cfg.Burst = 1e6, 1e6
	return cfg
}

// workers is how many requests populate keeps in flight.
const workers = 32

// parallel calls f(i) for i in [0, n) from workers goroutines and returns
// the first error.
func parallel(ctx context.Context, n int, f func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(ctx, i); err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return context.Cause(ctx)
}

// populated says how long each kind of object took to create.
type populated struct {
	Nodes, Pools, Services, Slices time.Duration
}

// populate creates the cluster of s: the namespace, the Nodes (Ready, with
// their InternalIP), the IPPools, the Services with their status and one
// EndpointSlice each, and the touch Service.
func populate(ctx context.Context, cfg *rest.Config, s spec) (populated, error) {
	var took populated
	cfg = bulkConfig(cfg)
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return took, err
	}
	dyn, err := dynamic.NewForConfig(rest.CopyConfig(cfg))
	if err != nil {
		return took, err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return took, err
	}
	start := time.Now()
	err = parallel(ctx, s.Nodes, func(ctx context.Context, i int) error {
		n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: node(i), Labels: map[string]string{v1.LabelHostname: node(i)}}}
		if i < s.VRRPNodes {
			n.Labels[vrrpLabel] = "true"
		}
		n, err := client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		n.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
		n.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: nodeIP(i).String()}, {Type: v1.NodeHostName, Address: node(i)}}
		_, err = client.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return took, fmt.Errorf("create Nodes: %w", err)
	}
	took.Nodes = time.Since(start)

	start = time.Now()
	for p := range s.Pools {
		u := &unstructured.Unstructured{Object: map[string]any{"spec": s.poolSpec(p)}}
		u.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
		u.SetKind(v1alpha1.IPPoolKind)
		u.SetName(pool(p))
		if _, err := dyn.Resource(v1alpha1.IPPoolResource).Create(ctx, u, metav1.CreateOptions{}); err != nil {
			return took, fmt.Errorf("create IPPool %s: %w", pool(p), err)
		}
	}
	took.Pools = time.Since(start)

	start = time.Now()
	err = parallel(ctx, s.Services, func(ctx context.Context, i int) error {
		svc, err := client.CoreV1().Services(ns).Create(ctx, s.serviceObject(i), metav1.CreateOptions{})
		if err != nil {
			return err
		}
		svc.Status.LoadBalancer = s.ingress(i)
		_, err = client.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return took, fmt.Errorf("create Services: %w", err)
	}
	took.Services = time.Since(start)

	start = time.Now()
	err = parallel(ctx, s.Services, func(ctx context.Context, i int) error {
		_, err := client.DiscoveryV1().EndpointSlices(ns).Create(ctx, s.slice(i), metav1.CreateOptions{})
		return err
	})
	if err != nil {
		return took, fmt.Errorf("create EndpointSlices: %w", err)
	}
	took.Slices = time.Since(start)

	touch := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: touchService, Annotations: map[string]string{touchAnnotation: "0"}},
		Spec:       v1.ServiceSpec{Ports: []v1.ServicePort{{Port: 80}}},
	}
	if _, err := client.CoreV1().Services(ns).Create(ctx, touch, metav1.CreateOptions{}); err != nil {
		return took, err
	}
	return took, nil
}

// touchAnnotation is the touch Service's annotation that the VM bumps.
const touchAnnotation = "scale.keeplb.io/touch"

// touch bumps the touch Service's annotation to n.
func touch(ctx context.Context, client kubernetes.Interface, n int) error {
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, touchAnnotation, strconv.Itoa(n))
	_, err := client.CoreV1().Services(ns).Patch(ctx, touchService, "application/merge-patch+json", []byte(patch), metav1.PatchOptions{})
	return err
}
