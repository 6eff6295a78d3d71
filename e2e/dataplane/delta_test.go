package dataplane_e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/testing/netns"
)

// counting passes every call through to the kernel's IPVS and records its
// name, so that a test can tell what one sync asked of the kernel.
type counting struct {
	ipvs.Interface
	mu    sync.Mutex
	calls []string
}

func (c *counting) note(format string, args ...any) {
	c.mu.Lock()
	c.calls = append(c.calls, fmt.Sprintf(format, args...))
	c.mu.Unlock()
}

// take returns the calls since the last take.
func (c *counting) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.calls
	c.calls = nil
	return out
}

func (c *counting) VirtualServers() ([]ipvs.VirtualServer, error) {
	c.note("VirtualServers")
	return c.Interface.VirtualServers()
}

func (c *counting) RealServers(vs ipvs.Key) ([]ipvs.RealServer, error) {
	c.note("RealServers %s", vs)
	return c.Interface.RealServers(vs)
}

func (c *counting) AddVirtualServer(vs ipvs.VirtualServer) error {
	c.note("AddVirtualServer %s", vs.Key())
	return c.Interface.AddVirtualServer(vs)
}

func (c *counting) UpdateVirtualServer(vs ipvs.VirtualServer) error {
	c.note("UpdateVirtualServer %s", vs.Key())
	return c.Interface.UpdateVirtualServer(vs)
}

func (c *counting) DeleteVirtualServer(vs ipvs.Key) error {
	c.note("DeleteVirtualServer %s", vs)
	return c.Interface.DeleteVirtualServer(vs)
}

func (c *counting) AddRealServer(vs ipvs.Key, rs ipvs.RealServer) error {
	c.note("AddRealServer %s %s w%d", vs, rs.AddrPort(), rs.Weight)
	return c.Interface.AddRealServer(vs, rs)
}

func (c *counting) UpdateRealServer(vs ipvs.Key, rs ipvs.RealServer) error {
	c.note("UpdateRealServer %s %s w%d", vs, rs.AddrPort(), rs.Weight)
	return c.Interface.UpdateRealServer(vs, rs)
}

func (c *counting) DeleteRealServer(vs ipvs.Key, rs netip.AddrPort) error {
	c.note("DeleteRealServer %s %s", vs, rs)
	return c.Interface.DeleteRealServer(vs, rs)
}

// TestSyncDeltaKernelOps: on a real kernel, with 100 Services of 10
// endpoints each programmed, one endpoint change synced as the speaker
// syncs it (Cache.Update of that Service, Reconciler.SyncDelta) asks the
// kernel for exactly the real server that changed: one weight update, one
// add, one delete, and no read. After each, the kernel's table, read back
// whole, is what a full computation wants.
func TestSyncDeltaKernelOps(t *testing.T) {
	if ranInVM(t, "delta") {
		return
	}
	h, nf := kernelIn(t, netns.New(t, "delta"))
	c := &counting{Interface: h}
	r := dataplane.NewReconciler("n0", dataplane.Kernel{IPVS: c, NFT: nf})

	const services = 100
	in := dataplane.Inputs{DefaultClass: true, Pools: []*v1alpha1.IPPool{{
		ObjectMeta: metav1.ObjectMeta{Name: "p", ResourceVersion: "1"},
		Spec:       v1alpha1.IPPoolSpec{Addresses: []string{"10.70.0.0/24"}, Forwarding: v1alpha1.ForwardingPod},
	}}}
	for i := range 10 {
		in.Nodes = append(in.Nodes, &v1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("n%d", i), ResourceVersion: "1"},
			Status: v1.NodeStatus{
				Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}},
				Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: fmt.Sprintf("10.0.0.%d", i+1)}},
			},
		})
	}
	ready := discoveryv1.EndpointConditions{Ready: ptrTo(true), Serving: ptrTo(true), Terminating: ptrTo(false)}
	for i := range services {
		name := fmt.Sprintf("s%03d", i)
		in.Services = append(in.Services, &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID("svc-" + name), ResourceVersion: "1", CreationTimestamp: metav1.NewTime(time.Unix(100, 0))},
			Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer,
				Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: 30080}}},
			Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: fmt.Sprintf("10.70.0.%d", i)}}}},
		})
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name + "-1", UID: types.UID("es-" + name), ResourceVersion: "1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptrTo("http"), Protocol: ptrTo(v1.ProtocolTCP), Port: ptrTo(int32(8080))}},
		}
		for j := range 10 {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.0.%d", j+1, i)}, NodeName: ptrTo(fmt.Sprintf("n%d", j)), Conditions: ready})
		}
		in.Slices = append(in.Slices, es)
	}

	ca := &dataplane.Cache{}
	st, problems, d := ca.Compute(in, "n0")
	if len(problems) > 0 {
		t.Fatalf("problems: %v", problems)
	}
	start := time.Now()
	if rep, err := r.SyncDelta(t.Context(), st, d); err != nil || rep.Result.RealAdded != services*10 {
		t.Fatalf("first sync: %v (%s); want %d real servers added", err, rep.Result, services*10)
	}
	t.Logf("first sync, %d virtual servers of 10 real servers, read and written whole: %s", services, time.Since(start).Round(time.Millisecond))

	rv := 1
	const i = 42
	svc, es := in.Services[i], in.Slices[i]
	tests := []struct {
		name string
		edit func()
		want string
	}{
		{"an endpoint terminates", func() {
			es.Endpoints[3].Conditions = discoveryv1.EndpointConditions{Ready: ptrTo(false), Serving: ptrTo(true), Terminating: ptrTo(true)}
		}, "UpdateRealServer TCP/10.70.0.42:80 10.4.0.42:8080 w0"},
		{"an endpoint joins", func() {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.99.0.1"}, NodeName: ptrTo("n9"), Conditions: ready})
		}, "AddRealServer TCP/10.70.0.42:80 10.99.0.1:8080 w1"},
		{"an endpoint leaves", func() { es.Endpoints = slices.Delete(es.Endpoints, 0, 1) }, "DeleteRealServer TCP/10.70.0.42:80 10.1.0.42:8080"},
	}
	for _, tt := range tests {
		tt.edit()
		rv++
		es.ResourceVersion = strconv.Itoa(rv)
		c.take()
		start := time.Now()
		st, _, d, ok := ca.Update(map[string]dataplane.ServiceInputs{"ns/" + svc.Name: {Service: svc, Slices: []*discoveryv1.EndpointSlice{es}}}, nil)
		if !ok {
			t.Fatal("Update refused after a Compute")
		}
		rep, err := r.SyncDelta(t.Context(), st, d)
		took := time.Since(start)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		calls := c.take()
		t.Logf("%s: %s, kernel calls %v, %s from the changed objects to the kernel changed", tt.name, rep.Result, calls, took.Round(time.Microsecond))
		if !slices.Equal(calls, []string{tt.want}) {
			t.Errorf("%s: kernel calls %v; want exactly [%s]", tt.name, calls, tt.want)
		}
		want, _ := dataplane.Desired(in, "n0")
		got, err := ipvs.Dump(h, func(k ipvs.Key) bool { _, ok := want.IPVS[k]; return ok })
		if err != nil {
			t.Fatal(err)
		}
		if !got.Equal(want.IPVS) {
			t.Errorf("%s: the kernel's table differs from a full computation's:\n%s\nwant\n%s", tt.name, got, want.IPVS)
		}
	}
}

// kernelIn opens IPVS and keeplb's nftables table in the network namespace
// ns, as the speaker does with --netns. IPVS is closed when the test ends.
func kernelIn(t *testing.T, ns string) (*ipvs.Netlink, knftables.Interface) {
	t.Helper()
	h, err := ipvs.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	nf, err := nft.NewAt("/run/netns/" + ns)
	if err != nil {
		t.Fatalf("nft.NewAt %s: %v", ns, err)
	}
	return h, nf
}
