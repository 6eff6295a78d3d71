package ipvs_e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/testing/lab"
	"github.com/keeplb/keeplb/pkg/testing/streams"
)

// cluster is the node side (a lab with one speaker per node) and the API
// objects that describe it.
type cluster struct {
	t        *testing.T
	lab      *lab.Lab
	cfg      *rest.Config
	client   kubernetes.Interface
	dyn      dynamic.Interface
	speakers *keeplbtest.Speakers
	// pods stand for the speakers' DaemonSet and Pods, and metrics are
	// the speakers' metrics and health addresses, by node, in the tests
	// that restart speakers as a rolling update does (TestStreams).
	pods    *keeplbtest.SpeakerPods
	metrics map[string]string
}

// at returns c for subtest t: failures end t, not its parent.
func (c *cluster) at(t *testing.T) *cluster {
	cc := *c
	cc.t = t
	return &cc
}

const ns = "e2e"

func newCluster(t *testing.T, cfg *rest.Config) *cluster {
	l, err := lab.New("klab", 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	c := &cluster{t: t, lab: l, cfg: cfg, client: kubernetes.NewForConfigOrDie(cfg), dyn: dynamic.NewForConfigOrDie(cfg), speakers: keeplbtest.NewSpeakers(t, cfg, func(o *speaker.Options) { o.IPVS = true })}
	if _, err := c.client.CoreV1().Namespaces().Create(t.Context(), &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes {
		node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}
		node, err := c.client.CoreV1().Nodes().Create(t.Context(), node, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		node.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
		node.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: n.IP.String()}}
		if _, err := c.client.CoreV1().Nodes().UpdateStatus(t.Context(), node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// serveStreams answers streams (package streams) on addr in the network
// namespace ns, naming itself name in every reply, until the lab closes.
func (c *cluster) serveStreams(ns string, addr netip.AddrPort, name string) {
	c.t.Helper()
	var l net.Listener
	if err := lab.Do(ns, func() (err error) { l, err = net.Listen("tcp", addr.String()); return err }); err != nil {
		c.t.Fatal(err)
	}
	go func() { _ = streams.Serve(l, name) }()
	c.lab.OnClose(func() { _ = l.Close() })
}

// serveGaps answers the UDP gap probes (streams.Gaps) on addr in the
// network namespace ns, naming itself name, until the lab closes.
func (c *cluster) serveGaps(ns string, addr netip.AddrPort, name string) {
	c.t.Helper()
	var pc net.PacketConn
	if err := lab.Do(ns, func() (err error) { pc, err = net.ListenPacket("udp", addr.String()); return err }); err != nil {
		c.t.Fatal(err)
	}
	go func() { _ = streams.ServeUDP(pc, name) }()
	c.lab.OnClose(func() { _ = pc.Close() })
}

// startSpeaker runs node's speaker, with IPVS, as its ServiceAccount.
func (c *cluster) startSpeaker(node string) { c.speakers.Start(node) }

// stopSpeaker stops node's speaker gracefully and waits for it.
func (c *cluster) stopSpeaker(node string) { c.speakers.Stop(node) }

// service creates a LoadBalancer Service with one port, 80 → 8080, and
// returns its VIP once the controller assigned it.
func (c *cluster) service(name string, proto v1.Protocol, mods ...func(*v1.Service)) netip.Addr {
	c.t.Helper()
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: map[string]string{}},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name},
			Ports: []v1.ServicePort{{Name: "p", Port: 80, TargetPort: intstr.FromString("serve"), Protocol: proto}}},
	}
	for _, m := range mods {
		m(s)
	}
	if _, err := c.client.CoreV1().Services(ns).Create(c.t.Context(), s, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	var vip netip.Addr
	c.eventually(30*time.Second, "an address for "+name, func() bool {
		s, err := c.client.CoreV1().Services(ns).Get(c.t.Context(), name, metav1.GetOptions{})
		if err == nil && len(s.Status.LoadBalancer.Ingress) > 0 {
			vip, _ = netip.ParseAddr(s.Status.LoadBalancer.Ingress[0].IP)
		}
		return vip.IsValid()
	})
	return vip
}

// endpoint is one endpoint of a slice: a pod and its conditions.
type endpoint struct {
	pod                         *lab.Pod
	ready, serving, terminating bool
}

func ready(p *lab.Pod) endpoint { return endpoint{pod: p, ready: true, serving: true} }

// slice writes the Service's EndpointSlice, as the EndpointSlice
// controller would: port "serve" is 8080 of proto.
func (c *cluster) slice(svc string, proto v1.Protocol, eps ...endpoint) {
	c.t.Helper()
	c.slicePort(svc, "p", proto, eps...)
}

// slicePort writes the EndpointSlice of the Service's port named port,
// 8080 of proto on every endpoint: the slice svc-1 for port "p", svc-port
// for another.
func (c *cluster) slicePort(svc, port string, proto v1.Protocol, eps ...endpoint) {
	c.t.Helper()
	name := svc + "-1"
	if port != "p" {
		name = svc + "-" + port
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(port), Port: ptr.To[int32](8080), Protocol: ptr.To(proto)}},
	}
	for _, e := range eps {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{e.pod.IP.String()},
			NodeName:  ptr.To(e.pod.Node),
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptr.To(e.ready), Serving: ptr.To(e.serving), Terminating: ptr.To(e.terminating),
			},
		})
	}
	api := c.client.DiscoveryV1().EndpointSlices(ns)
	old, err := api.Get(c.t.Context(), es.Name, metav1.GetOptions{})
	if err == nil {
		es.ResourceVersion = old.ResourceVersion
		_, err = api.Update(c.t.Context(), es, metav1.UpdateOptions{})
	} else {
		_, err = api.Create(c.t.Context(), es, metav1.CreateOptions{})
	}
	if err != nil {
		c.t.Fatal(err)
	}
}

// holders returns the nodes that have vip on eth0.
func (c *cluster) holders(vip netip.Addr) []string {
	var out []string
	for _, n := range c.lab.Nodes {
		o, err := exec.Command("ip", "-n", n.Name, "-br", "-4", "addr", "show", "dev", "eth0").CombinedOutput()
		if err == nil && strings.Contains(string(o), " "+vip.String()+"/32") {
			out = append(out, n.Name)
		}
	}
	return out
}

// holder waits until exactly one node holds vip and returns it.
func (c *cluster) holder(vip netip.Addr) string {
	c.t.Helper()
	var h []string
	c.eventually(30*time.Second, "exactly one holder of "+vip.String(), func() bool {
		h = c.holders(vip)
		return len(h) == 1
	})
	return h[0]
}

// servedBy waits until exactly one node holds vip and its IPVS table has
// reals real servers for vip's TCP port 80, and returns the node. The VIP
// can move in before the sync that brings a new EndpointSlice's real
// servers: a request sent in between would test the race, not the
// forwarding.
func (c *cluster) servedBy(vip netip.Addr, reals int) string {
	c.t.Helper()
	var holder, table string
	c.eventually(30*time.Second, fmt.Sprintf("one holder of %s with %d real servers for port 80", vip, reals), func() bool {
		h := c.holders(vip)
		if len(h) != 1 {
			return false
		}
		holder = h[0]
		out, err := exec.Command("ip", "netns", "exec", holder, "ipvsadm", "-Ln", "-t", netip.AddrPortFrom(vip, 80).String()).CombinedOutput()
		table = string(out)
		return err == nil && strings.Count(table, "->")-strings.Count(table, "-> RemoteAddress") == reals
	})
	return holder
}

// ipvsadm runs ipvsadm in node's namespace.
func (c *cluster) ipvsadm(node string, args ...string) string {
	c.t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", node, "ipvsadm"}, args...)...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("ipvsadm %s in %s: %v: %s", strings.Join(args, " "), node, err, out)
	}
	return string(out)
}

func (c *cluster) eventually(timeout time.Duration, what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			c.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// answers sends n HTTP requests to addr from the client namespace, one
// after the other, and returns who answered, failing the test on an error.
func (c *cluster) answers(client string, addr netip.AddrPort, n int) []lab.Answer {
	c.t.Helper()
	var out []lab.Answer
	for range n {
		a, err := lab.Get(c.t.Context(), client, addr, "/", 5*time.Second)
		if err != nil {
			c.t.Fatalf("GET %s from %s after %d answers %v: %v\n%s", addr, client, len(out), names(out), err, c.dump())
		}
		out = append(out, a)
	}
	return out
}

func names(as []lab.Answer) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.Name)
	}
	return out
}

func fmtGap(d time.Duration) string {
	return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
}

// dump returns every node's IPVS table and connections, for a failure.
func (c *cluster) dump() string {
	var b strings.Builder
	for _, n := range c.lab.Nodes {
		for _, args := range [][]string{{"-Ln"}, {"-Lnc"}} {
			out, _ := exec.Command("ip", append([]string{"netns", "exec", n.Name, "ipvsadm"}, args...)...).CombinedOutput()
			fmt.Fprintf(&b, "%s: ipvsadm %s\n%s", n.Name, args[0], out)
		}
	}
	return b.String()
}
