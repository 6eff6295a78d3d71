// Package ipvsbench measures keeplb's dataplane against a real IPVS kernel:
// programming 10,000 real servers through netlink against one ipvsadm
// process per real server, and request throughput through a VIP against
// straight to the backend, in the same run. They need root and IPVS; where
// the host kernel lacks it, `make bench` runs them in the VM of hack/vm.
// They skip elsewhere, so `go test ./...` passes by them.
package ipvsbench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

func requireIPVS(b *testing.B) {
	netnstest.Require(b, "apt-get install iproute2 ipvsadm", "ip", "ipvsadm")
	if err := ipvs.Available(); err != nil {
		b.Skipf("needs IPVS (make bench runs this in the VM): %v", err)
	}
}

// table is vss virtual servers of 10 real servers each, on a subnet the
// namespace routes (the kernel accepts NAT real servers it can route to).
func table(vss int) ipvs.Table {
	t := ipvs.Table{}
	for i := range vss {
		v := ipvs.VirtualServer{Address: netip.AddrFrom4([4]byte{192, 0, byte(2 + i>>8), byte(i)}), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
		e := ipvs.Entry{Virtual: v}
		for j := range 10 {
			e.Reals = append(e.Reals, ipvs.RealServer{Address: netip.AddrFrom4([4]byte{10, 0, byte(j), byte(i)}), Port: 30080, Weight: 1})
		}
		t[v.Key()] = e
	}
	return t
}

// podInputs is the cluster state whose desired IPVS table on node
// "bench" forwards each VIP's port 80 to its endpoints' port (pod
// forwarding): the way the speaker gets a table, through
// dataplane.Desired.
func podInputs(pool string, vips []netip.Addr, endpoints [][]netip.AddrPort) dataplane.Inputs {
	in := dataplane.Inputs{Class: annotations.DefaultClass, DefaultClass: true,
		Pools: []*v1alpha1.IPPool{{ObjectMeta: metav1.ObjectMeta{Name: "bench"}, Spec: v1alpha1.IPPoolSpec{Addresses: []string{pool}, Forwarding: v1alpha1.ForwardingPod}}}}
	for i, vip := range vips {
		name := fmt.Sprintf("svc-%d", i)
		in.Services = append(in.Services, &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name, CreationTimestamp: metav1.Unix(int64(i), 0)},
			Spec:       v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, Ports: []v1.ServicePort{{Protocol: v1.ProtocolTCP, Port: 80}}},
			Status:     v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: vip.String()}}}},
		})
		es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4}
		for _, ep := range endpoints[i] {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{ep.Addr().String()}})
			es.Ports = []discoveryv1.EndpointPort{{Name: ptrTo(""), Protocol: ptrTo(v1.ProtocolTCP), Port: ptrTo(int32(ep.Port()))}}
		}
		in.Slices = append(in.Slices, es)
	}
	return in
}

func ptrTo[T any](v T) *T { return &v }

// tableInputs is podInputs for table(vss): the same virtual and real
// servers.
func tableInputs(vss int) dataplane.Inputs {
	var vips []netip.Addr
	var eps [][]netip.AddrPort
	for _, e := range table(vss) {
		vips = append(vips, e.Virtual.Address)
		var reals []netip.AddrPort
		for _, r := range e.Reals {
			reals = append(reals, r.AddrPort())
		}
		eps = append(eps, reals)
	}
	return podInputs("192.0.2.0-192.0.5.255", vips, eps)
}

// namespace makes a namespace routing 10.0.0.0/16, removed at the end.
func namespace(b *testing.B) string {
	ns := "kl-bench-" + strconv.Itoa(os.Getpid())
	_ = exec.Command("ip", "netns", "del", ns).Run()
	for _, args := range [][]string{
		{"netns", "add", ns},
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"},
		{"-n", ns, "addr", "add", "10.0.255.254/16", "dev", "v0"},
		{"-n", ns, "link", "set", "v0", "up"},
		{"-n", ns, "link", "set", "v1", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			b.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	b.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	return ns
}

// BenchmarkApply10000 programs 1,000 virtual servers of 10 real servers
// each into an empty table, then clears it (untimed).
//
//   - netlink: the speaker's dataplane.Reconciler through keeplb's
//     ipvs.Netlink, one dump
//     and one netlink message per change.
//   - ipvsadm: one ipvsadm process per virtual and per real server, as a
//     script around ipvsadm (keepalived-vip's reload path) would.
func BenchmarkApply10000(b *testing.B) {
	requireIPVS(b)
	want := table(1000)
	st, problems := dataplane.Desired(tableInputs(1000), "bench")
	if len(problems) > 0 || !st.IPVS.Equal(want) {
		b.Fatalf("the desired state is not the benchmark's table (problems %v)", problems)
	}
	b.Run("netlink", func(b *testing.B) {
		ns := namespace(b)
		h, err := ipvs.NewAt("/run/netns/" + ns)
		if err != nil {
			b.Fatal(err)
		}
		defer h.Close()
		r := dataplane.NewReconciler("bench", dataplane.Kernel{IPVS: h})
		for b.Loop() {
			rep, err := r.Sync(context.Background(), st)
			if err != nil || rep.Result.RealAdded != 10000 {
				b.Fatalf("Sync: %s, %v", rep.Result, err)
			}
			b.StopTimer()
			if _, err := r.Exit(context.Background(), st.Owns); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
	b.Run("ipvsadm", func(b *testing.B) {
		ns := namespace(b)
		for b.Loop() {
			err := lab.Do(ns, func() error {
				for _, e := range want {
					vs := e.Virtual.Address.String() + ":80"
					if out, err := exec.Command("ipvsadm", "-A", "-t", vs, "-s", "rr").CombinedOutput(); err != nil {
						return fmt.Errorf("ipvsadm -A: %w %s", err, out)
					}
					for _, r := range e.Reals {
						if out, err := exec.Command("ipvsadm", "-a", "-t", vs, "-r", r.AddrPort().String(), "-m", "-w", "1").CombinedOutput(); err != nil {
							return fmt.Errorf("ipvsadm -a: %w %s", err, out)
						}
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if out, err := exec.Command("ip", "netns", "exec", ns, "ipvsadm", "-C").CombinedOutput(); err != nil {
				b.Fatalf("ipvsadm -C: %v %s", err, out)
			}
			b.StartTimer()
		}
	})
}

// BenchmarkRequest measures one HTTP request on a new connection from a
// client, through a node, to a pod on that node: through the node's IPVS
// virtual server for a VIP (vip), and routed straight to the pod (direct).
// The difference is what IPVS NAT costs per connection. The -parallel
// variants measure throughput (req/s) with many clients at once.
func BenchmarkRequest(b *testing.B) {
	requireIPVS(b)
	l, err := lab.New("klb", 1)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	node := l.Nodes[0]
	// One client per path: a client that reached the pod both through the
	// VIP and directly from the same port would hit the node's conntrack
	// entry of the other path (its reply tuple, pod → client:port, is the
	// same), and its SYN would be lost; real clients do not do that.
	client, _, err := l.AddClient("client")
	if err != nil {
		b.Fatal(err)
	}
	directClient, _, err := l.AddClient("direct")
	if err != nil {
		b.Fatal(err)
	}
	pod, err := l.AddPod(node, "pod")
	if err != nil {
		b.Fatal(err)
	}
	srv, err := lab.Serve(pod.Name, netip.AddrPortFrom(pod.IP, 8080), "pod")
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	vip := netip.MustParseAddr("10.70.0.200")
	for _, args := range [][]string{
		{"-n", node.Name, "addr", "add", vip.String() + "/32", "dev", "eth0"},
		{"-n", directClient, "route", "add", node.PodCIDR.String(), "via", node.IP.String()},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			b.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	h, err := ipvs.NewAt("/run/netns/" + node.Name)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	st, _ := dataplane.Desired(podInputs(vip.String()+"/32", []netip.Addr{vip}, [][]netip.AddrPort{{netip.AddrPortFrom(pod.IP, 8080)}}), "bench")
	if _, err := dataplane.NewReconciler("bench", dataplane.Kernel{IPVS: h}).Sync(context.Background(), st); err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		client string
		addr   netip.AddrPort
	}{
		{"vip", client, netip.AddrPortFrom(vip, 80)},
		{"direct", directClient, netip.AddrPortFrom(pod.IP, 8080)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := lab.Get(context.Background(), tc.client, tc.addr, "/", 5*time.Second); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
		// Throughput: 4 clients per CPU at once, each request on a new
		// connection, so that IPVS's per-connection work is what is
		// compared, not one client's round trips.
		b.Run(tc.name+"-parallel", func(b *testing.B) {
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := lab.Get(context.Background(), tc.client, tc.addr, "/", 5*time.Second); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}
