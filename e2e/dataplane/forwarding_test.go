// Package dataplane_e2e checks that what pkg/dataplane and pkg/nft compute
// forwards real traffic in a real kernel: IPVS NAT from a VIP to a NodePort,
// masquerading so replies come back through the VIP holder, and
// loadBalancerSourceRanges enforced before IPVS schedules.
//
// Where the host kernel lacks IPVS, KEEPLB_VM=1 runs the test inside the VM
// of hack/vm (a stock Debian kernel with IPVS and nftables).
package dataplane_e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/testing/netns"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// helperEnv makes the test binary a helper instead of running tests:
// "serve:ADDR" answers HTTP on ADDR with the request's remote address,
// "get:URL" prints the body of one GET of URL (2 s timeout) or fails.
const helperEnv = "KEEPLB_DATAPLANE_E2E_HELPER"

func TestMain(m *testing.M) {
	switch mode, arg, _ := strings.Cut(os.Getenv(helperEnv), ":"); mode {
	case "serve":
		os.Exit(serve(arg))
	case "get":
		os.Exit(get(arg))
	}
	os.Exit(m.Run())
}

// serve answers every request with "remote=IP:PORT"; it prints "ready"
// once it listens.
func serve(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	srv := &http.Server{ReadHeaderTimeout: time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		_, _ = fmt.Fprintf(w, "remote=%s", r.RemoteAddr)
	})}
	if err := srv.Serve(ln); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func get(url string) int {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Print(string(b))
	return 0
}

const (
	clientIP  = "10.60.0.100"
	lbFront   = "10.60.0.10"
	vip       = "10.60.0.200"
	lbBack    = "10.61.0.1"
	backendIP = "10.61.0.2"
	nodePort  = 30080
)

// TestForwardingNodePort builds client — lb — backend namespaces, programs
// lb with the IPVS table and nftables rules keeplb computes for one
// nodeport Service, and sends HTTP through the VIP.
func TestForwardingNodePort(t *testing.T) {
	if ranInVM(t, "forwarding") {
		return
	}
	began := time.Now()

	client := netns.New(t, "client")
	lb := netns.New(t, "lb")
	backend := netns.New(t, "backend")
	ip := func(ns string, args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
		}
	}
	nsExec := func(ns string, args ...string) (string, error) {
		out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
		return string(out), err
	}

	// client c0 <-> lb l0; lb l1 <-> backend b0. Short names: they are
	// created in lb and moved, so they must not clash there.
	ip(lb, "link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", client)
	ip(lb, "link", "add", "l1", "type", "veth", "peer", "name", "b0", "netns", backend)
	ip(client, "addr", "add", clientIP+"/24", "dev", "c0")
	ip(client, "link", "set", "c0", "up")
	ip(client, "route", "add", vip+"/32", "via", lbFront)
	ip(lb, "addr", "add", lbFront+"/24", "dev", "l0")
	// The VIP as keepalived adds it: a /32 on the VRRP interface.
	ip(lb, "addr", "add", vip+"/32", "dev", "l0")
	ip(lb, "addr", "add", lbBack+"/24", "dev", "l1")
	ip(lb, "link", "set", "l0", "up")
	ip(lb, "link", "set", "l1", "up")
	ip(backend, "addr", "add", backendIP+"/24", "dev", "b0")
	ip(backend, "link", "set", "b0", "up")
	// No default route in backend: a reply to the client's address is
	// unroutable there, so it only gets back when lb masquerades.
	for _, kv := range []string{"net.ipv4.ip_forward=1", "net.ipv4.vs.conntrack=1"} {
		if out, err := nsExec(lb, "sysctl", "-w", kv); err != nil {
			t.Fatalf("sysctl -w %s in %s: %v: %s", kv, lb, err, out)
		}
	}

	startServer(t, backend, fmt.Sprintf("%s:%d", backendIP, nodePort))

	// The Service and cluster as the dataplane reads them.
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web", CreationTimestamp: metav1.NewTime(time.Unix(100, 0))},
		Spec: v1.ServiceSpec{
			Type:  v1.ServiceTypeLoadBalancer,
			Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: nodePort}},
		},
		Status: v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: vip}}}},
	}
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "backend"},
		Status: v1.NodeStatus{
			Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue}},
			Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: backendIP}},
		},
	}
	pool := &v1alpha1.IPPool{
		ObjectMeta: metav1.ObjectMeta{Name: "pool"},
		Spec:       v1alpha1.IPPoolSpec{Addresses: []string{"10.60.0.200-10.60.0.209"}, Forwarding: v1alpha1.ForwardingNodePort},
	}
	in := dataplane.Inputs{Services: []*v1.Service{svc}, Nodes: []*v1.Node{node}, Pools: []*v1alpha1.IPPool{pool}, DefaultClass: true}
	desired, problems := dataplane.Desired(in, "lb")
	if len(problems) > 0 {
		t.Fatalf("Desired reported problems: %v", problems)
	}
	t.Logf("desired IPVS:\n%sSNAT: %v", desired.IPVS, desired.SNAT)
	key := ipvs.Key{Address: netip.MustParseAddr(vip), Protocol: ipvs.TCP, Port: 80}
	if _, ok := desired.IPVS[key]; !ok || len(desired.SNAT) != 1 || len(desired.SNAT[0].Reals) != 1 {
		t.Fatalf("desired state lacks %s or its one SNAT entry", key)
	}

	h, err := ipvs.NewAt("/run/netns/" + lb)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// IPVS alone first: the speaker's Reconciler on a node without nft.
	bare := dataplane.NewReconciler("lb", dataplane.Kernel{IPVS: h})
	rep, err := bare.Sync(context.Background(), desired)
	if err != nil {
		t.Fatalf("Reconciler.Sync without nftables: %v (%s)", err, rep.Result)
	}
	t.Logf("Reconciler.Sync without nftables: %s", rep.Result)
	out, err := nsExec(lb, "ipvsadm", "-Ln")
	if err != nil {
		t.Fatalf("ipvsadm -Ln: %v: %s", err, out)
	}
	t.Logf("ipvsadm -Ln in lb:\n%s", out)
	for _, want := range []string{"TCP  " + vip + ":80 rr", "-> " + backendIP + ":30080", "Masq"} {
		if !strings.Contains(out, want) {
			t.Errorf("ipvsadm -Ln lacks %q", want)
		}
	}

	url := "http://" + vip + ":80/"
	// IPVS alone: the backend cannot answer the client's address.
	if body, err := request(client, url); err == nil {
		t.Errorf("without masquerading the request succeeded (%q); the backend must not route to the client, so the SNAT check below proves nothing", body)
	} else {
		t.Logf("without nftables rules, as expected the request fails: %v", err)
	}

	// Then the speaker's Reconciler with keeplb's table, opened in lb
	// through nft.NewAt as the speaker does with --netns: it adopts the
	// virtual servers above and writes the table.
	nf, err := nft.NewAt("/run/netns/" + lb)
	if err != nil {
		t.Fatalf("nft.NewAt %s: %v", lb, err)
	}
	r := dataplane.NewReconciler("lb", dataplane.Kernel{IPVS: h, NFT: nf})
	sync := func(st dataplane.State) dataplane.Report {
		t.Helper()
		rep, err := r.Sync(context.Background(), st)
		if err != nil {
			t.Fatalf("Reconciler.Sync in %s: %v (%s)", lb, err, rep.Result)
		}
		if out, err := nsExec(lb, "nft", "list", "table", "inet", "keeplb"); err != nil {
			t.Fatalf("nft list table: %v: %s", err, out)
		} else {
			t.Logf("nft list table inet keeplb in lb:\n%s", out)
		}
		return rep
	}
	if rep := sync(desired); rep.Result.Changes() != 0 {
		t.Errorf("adopting the virtual servers changed IPVS: %s", rep.Result)
	}

	body, err := request(client, url)
	if err != nil {
		t.Fatalf("GET %s from client through IPVS and masquerading: %v", url, err)
	}
	t.Logf("backend answered: %s", body)
	remote, ok := strings.CutPrefix(body, "remote=")
	if !ok {
		t.Fatalf("unexpected answer %q", body)
	}
	if ap, err := netip.ParseAddrPort(remote); err != nil || ap.Addr().String() != lbBack {
		t.Errorf("backend saw the connection from %s; want lb's address %s (masqueraded)", remote, lbBack)
	}

	// loadBalancerSourceRanges that exclude the client.
	before, err := ipvs.Dump(h, desired.Owns)
	if err != nil {
		t.Fatal(err)
	}
	svc.Spec.LoadBalancerSourceRanges = []string{"192.0.2.0/24", "10.60.0.0/30"}
	desired, problems = dataplane.Desired(in, "lb")
	if len(problems) > 0 {
		t.Fatalf("Desired reported problems: %v", problems)
	}
	if rep := sync(desired); rep.Result.Changes() != 0 {
		t.Errorf("Reconciler.Sync after adding source ranges: %s; want no IPVS changes", rep.Result)
	}
	t0 := time.Now()
	if body, err := request(client, url); err == nil {
		t.Errorf("client outside loadBalancerSourceRanges got an answer: %q", body)
	} else {
		t.Logf("client outside loadBalancerSourceRanges refused after %s: %v", time.Since(t0).Round(10*time.Millisecond), err)
	}
	after, err := ipvs.Dump(h, desired.Owns)
	if err != nil {
		t.Fatal(err)
	}
	if !after.Equal(before) {
		t.Errorf("IPVS changed with source ranges:\nbefore:\n%safter:\n%s", before, after)
	}
	if out, err := nsExec(lb, "nft", "list", "chain", "inet", "keeplb", nft.ChainSourceRanges); err != nil {
		t.Errorf("nft list chain: %v: %s", err, out)
	} else {
		counted := false
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "ip saddr") && strings.Contains(line, "counter packets") && !strings.Contains(line, "packets 0 ") {
				counted = true
			}
		}
		if !counted {
			t.Errorf("the IPv4 source-ranges rule counted no drop:\n%s", out)
		}
	}

	// And a range including the client opens it again.
	svc.Spec.LoadBalancerSourceRanges = []string{"192.0.2.0/24", clientIP + "/32"}
	desired, _ = dataplane.Desired(in, "lb")
	sync(desired)
	if body, err := request(client, url); err != nil {
		t.Errorf("client inside loadBalancerSourceRanges: %v", err)
	} else {
		t.Logf("client inside loadBalancerSourceRanges: %s", body)
	}
	t.Logf("in-kernel part took %s", time.Since(began).Round(10*time.Millisecond))
}

// startServer runs the HTTP responder in ns until the test ends.
func startServer(t *testing.T, ns, addr string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns, exe)
	cmd.Env = append(os.Environ(), helperEnv+"=serve:"+addr)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	ready := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- strings.TrimSpace(line) == "ready"
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("the backend responder did not start")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the backend responder did not start within 10s")
	}
}

// request GETs url from inside ns with a 2 s timeout and returns the body.
func request(ns, url string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, exe)
	cmd.Env = append(os.Environ(), helperEnv+"=get:"+url)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// ranInVM runs the calling test where the kernel has IPVS: in the VM of
// hack/vm when KEEPLB_VM=1 and the host kernel has none, and then reports
// true (the test is done here); else on this kernel, skipping the test
// (what names it in the message) where it lacks IPVS or the tools.
func ranInVM(t *testing.T, what string) bool {
	t.Helper()
	if ipvs.Available() != nil && !vm.InVM() && os.Getenv("KEEPLB_VM") == "1" {
		start := time.Now()
		vm.RunSelf(t)
		t.Logf("VM run (boot, test, shutdown) took %s", time.Since(start).Round(100*time.Millisecond))
		return true
	}
	if err := ipvs.Available(); err != nil {
		t.Skipf("skipping the real-kernel %s test (set KEEPLB_VM=1 to run it in the VM of hack/vm): %v", what, err)
	}
	netns.Require(t, "install iproute2, ipvsadm and nftables", "ip", "ipvsadm", "nft")
	return false
}
