package lab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// TestLab builds a two-node lab on the host's kernel (namespaces, veth
// and bridges need no IPVS) and checks its wiring: a pod answers HTTP and
// UDP with its name, across nodes through the flat pod network, and sees
// the real source; a node cut off the LAN is unreachable; Close leaves no
// namespace behind.
func TestLab(t *testing.T) {
	netnstest.Require(t, "apt-get install iproute2", "ip")
	prefix := fmt.Sprintf("kllab%d", os.Getpid()%100000)
	l, err := New(prefix, 2)
	if err != nil {
		t.Skipf("cannot build a lab here: %v", err)
	}
	defer func() {
		l.Close()
		out, _ := exec.Command("ip", "netns", "list").CombinedOutput()
		if strings.Contains(string(out), prefix+"-") {
			t.Errorf("namespaces left after Close:\n%s", out)
		}
	}()
	n1, n2 := l.Nodes[0], l.Nodes[1]
	if n1.IP != netip.MustParseAddr("10.70.0.11") || n2.PodCIDR != netip.MustParsePrefix("10.244.2.0/24") {
		t.Fatalf("addresses: node1 %s, node2 pods %s", n1.IP, n2.PodCIDR)
	}
	client, clientIP, err := l.AddClient("client")
	if err != nil {
		t.Fatal(err)
	}
	pod, err := l.AddPod(n2, "pod")
	if err != nil {
		t.Fatal(err)
	}
	if pod.IP != netip.MustParseAddr("10.244.2.10") || pod.Node != n2.Name {
		t.Fatalf("pod %s on %s; want 10.244.2.10 on %s", pod.IP, pod.Node, n2.Name)
	}
	srv, err := Serve(pod.Name, netip.AddrPortFrom(pod.IP, 8080), "the-pod")
	if err != nil {
		t.Fatal(err)
	}
	l.OnClose(srv.Close)
	nodeSrv, err := Serve(n1.Name, netip.AddrPortFrom(n1.IP, 30080), "node-one")
	if err != nil {
		t.Fatal(err)
	}
	l.OnClose(nodeSrv.Close)

	// node1 → pod on node2: routed over the LAN, unmasqueraded.
	a, err := Get(t.Context(), n1.Name, netip.AddrPortFrom(pod.IP, 8080), "/", 3*time.Second)
	if err != nil {
		t.Fatalf("GET the pod from node1: %v", err)
	}
	if a.Name != "the-pod" || a.From.Addr() != n1.IP {
		t.Errorf("answer %+v; want the-pod seeing %s", a, n1.IP)
	}
	u, err := NewUDPClient(n1.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if a, err := u.Query(netip.AddrPortFrom(pod.IP, 8080), 3*time.Second); err != nil || a.Name != "the-pod" {
		t.Errorf("UDP query: %+v, %v; want the-pod", a, err)
	}
	// The client on the LAN reaches a node, and the node sees it.
	a, err = Get(t.Context(), client, netip.AddrPortFrom(n1.IP, 30080), "/slow?ms=10", 3*time.Second)
	if err != nil || a.Name != "node-one" || a.From.Addr() != clientIP {
		t.Errorf("GET node1 from the client: %+v, %v; want node-one seeing %s", a, err, clientIP)
	}
	// node2's NodePort stand-in: the pod answers on node2's address,
	// seeing node2 (masqueraded), over TCP and UDP; nothing listens on
	// the port itself.
	if err := l.NodePort(n2, 30081, pod, 8080); err != nil {
		t.Fatal(err)
	}
	gw := n2.PodCIDR.Addr().Next()
	a, err = Get(t.Context(), client, netip.AddrPortFrom(n2.IP, 30081), "/", 3*time.Second)
	if err != nil || a.Name != "the-pod" || a.From.Addr() != gw {
		t.Errorf("GET node2's NodePort from the client: %+v, %v; want the-pod seeing %s", a, err, gw)
	}
	cu, err := NewUDPClient(client)
	if err != nil {
		t.Fatal(err)
	}
	defer cu.Close()
	if a, err := cu.Query(netip.AddrPortFrom(n2.IP, 30081), 3*time.Second); err != nil || a.Name != "the-pod" {
		t.Errorf("UDP query to node2's NodePort: %+v, %v; want the-pod", a, err)
	}
	// Cut off, node1 answers nobody.
	if err := SetLink(n1.Name, false); err != nil {
		t.Fatal(err)
	}
	if a, err := Get(t.Context(), client, netip.AddrPortFrom(n1.IP, 30080), "/", 500*time.Millisecond); err == nil {
		t.Errorf("node1 answered with its link down: %+v", a)
	}
	if l.Node(n2.Name) != n2 || l.Node("nope") != nil {
		t.Error("Node lookup")
	}
}
