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
//   - netlink: dataplane.Sync through keeplb's ipvs.Netlink, one dump
//     and one netlink message per change.
//   - ipvsadm: one ipvsadm process per virtual and per real server, as a
//     script around ipvsadm (keepalived-vip's reload path) would.
func BenchmarkApply10000(b *testing.B) {
	requireIPVS(b)
	want := table(1000)
	ours := func(ipvs.Key) bool { return true }
	b.Run("netlink", func(b *testing.B) {
		ns := namespace(b)
		h, err := ipvs.NewAt("/run/netns/" + ns)
		if err != nil {
			b.Fatal(err)
		}
		defer h.Close()
		for b.Loop() {
			res, err := dataplane.Sync(h, want, ours)
			if err != nil || res.RealAdded != 10000 {
				b.Fatalf("Sync: %s, %v", res, err)
			}
			b.StopTimer()
			if _, err := dataplane.Sync(h, ipvs.Table{}, ours); err != nil {
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
						return fmt.Errorf("ipvsadm -A: %v %s", err, out)
					}
					for _, r := range e.Reals {
						if out, err := exec.Command("ipvsadm", "-a", "-t", vs, "-r", r.AddrPort().String(), "-m", "-w", "1").CombinedOutput(); err != nil {
							return fmt.Errorf("ipvsadm -a: %v %s", err, out)
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
	vs := ipvs.VirtualServer{Address: vip, Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	want := ipvs.Table{vs.Key(): {Virtual: vs, Reals: []ipvs.RealServer{{Address: pod.IP, Port: 8080, Weight: 1}}}}
	if _, err := dataplane.Sync(h, want, func(ipvs.Key) bool { return true }); err != nil {
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
