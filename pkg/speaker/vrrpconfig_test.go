package speaker

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/component-base/metrics/testutil"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// vrrpCase is the API state of a regression case: a healthy pool "good"
// with one VIP is always added, and must stay in keepalived.conf whatever
// the rest holds.
type vrrpCase struct {
	in   dataplane.Inputs
	node string
	// nodes edits the plan's node view, to give a Node addresses the API
	// would not hold (or a future node view would refuse).
	nodes func([]vrrp.Node)
}

var testLinks = []hostnet.Link{
	{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24"), netip.MustParsePrefix("2001:db8::1/64")}, DefaultRoute4: true, DefaultRoute6: true},
	{Name: "eth1", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.1.0.1/24")}},
}

// render runs a sync's pure VRRP step on c and checks what must always
// hold: it renders, the good pool's VIP is in, every name fits keepalived.
func (c vrrpCase) render(t *testing.T) (string, vrrp.Plan, []ConfigProblem) {
	t.Helper()
	in := c.in
	in.Class, in.DefaultClass = "keeplb.io/vip", true
	in.Pools = append(slices.Clone(in.Pools), ippool("good", []string{"10.0.0.128/25"}, &v1alpha1.VRRP{VirtualRouterIDs: "200-220"}))
	in.Services = append(slices.Clone(in.Services), lbService("ns", "good", "10.0.0.130", false, nil))
	pin, _ := PlanInput(in)
	if c.nodes != nil {
		c.nodes(pin.Nodes)
	}
	plan := vrrp.Compute(pin)
	cfg, problems := KeepalivedConfig(plan, c.node, pin, testLinks, Layout{RunDir: "/run/keeplb"})
	data, problems, err := renderVRRP(plan, c.node, pin, cfg, problems)
	if err != nil {
		t.Fatalf("rendering failed as a whole: %v", err)
	}
	conf := string(data)
	if !strings.Contains(conf, "10.0.0.130/32 dev eth0") {
		t.Errorf("the good pool's VIP is not in keepalived.conf:\n%s", conf)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s*(?:vrrp_instance|track_file|router_id) (\S+)`).FindAllStringSubmatch(conf, -1) {
		if len(m[1]) > keepalived.MaxNameLen {
			t.Errorf("name %s: %d characters, above %d", m[1], len(m[1]), keepalived.MaxNameLen)
		}
	}
	return conf, plan, problems
}

// instanceBlock returns the vrrp_instance block whose comment names what.
func instanceBlock(t *testing.T, conf, what string) string {
	t.Helper()
	for _, b := range strings.Split(conf, "\nvrrp_instance ")[1:] {
		if strings.Contains(b, "# "+what+"\n") {
			return b
		}
	}
	t.Fatalf("no instance commented %q in\n%s", what, conf)
	return ""
}

// The regression tests of issue 9 item 4: each of these values used to make
// keepalived.Render refuse this node's whole configuration, so the sync
// stopped before the track files, keepalived and the holders, and a
// restarted speaker ran no keepalived at all.

// Trigger a: an IPPool name over 54 characters (up to 253 are allowed).
func TestVRRPLongPoolName(t *testing.T) {
	long := strings.Repeat("pool-with-a-long-name.", 11) + "example" // 249 characters
	conf, _, problems := vrrpCase{
		in: dataplane.Inputs{
			Nodes:    []*v1.Node{node("n1", "10.0.0.1")},
			Pools:    []*v1alpha1.IPPool{ippool(long, []string{"10.0.0.16/28"}, &v1alpha1.VRRP{VirtualRouterIDs: "1-10"})},
			Services: []*v1.Service{lbService("ns", "a", "10.0.0.17", false, nil), lbService("ns", "l", "10.0.0.18", true, nil)},
		},
		node: "n1",
	}.render(t)
	if b := instanceBlock(t, conf, "IPPool "+long); !strings.Contains(b, "10.0.0.17/32 dev eth0") {
		t.Errorf("the long-named pool's VIP is not held:\n%s", b)
	}
	if b := instanceBlock(t, conf, "IPPool "+long+", Service ns/l"); !strings.Contains(b, "10.0.0.18/32 dev eth0") || !strings.Contains(b, "track_file {") {
		t.Errorf("the long-named pool's Local VIP is not held with its track file:\n%s", b)
	}
	if len(problems) > 0 {
		t.Errorf("problems: %+v", problems)
	}
}

// Trigger b: a Node name over 64 characters becomes router_id.
func TestVRRPLongNodeName(t *testing.T) {
	long := "node-1.rack-42.datacenter-west.example-corporation.internal.cluster.local"
	conf, _, problems := vrrpCase{in: dataplane.Inputs{Nodes: []*v1.Node{node(long, "10.0.0.1")}}, node: long}.render(t)
	if want := "router_id " + keepalived.FitName(long, 0) + "\n"; !strings.Contains(conf, want) {
		t.Errorf("keepalived.conf lacks %q:\n%s", want, conf)
	}
	if len(problems) > 0 {
		t.Errorf("problems: %+v", problems)
	}
}

// Trigger c: an IPv6 Local Service in a pool with a 20-character name: its
// instance name embeds the address.
func TestVRRPIPv6LocalInstanceName(t *testing.T) {
	pool := "edge-pool-ipv6-local"
	conf, _, problems := vrrpCase{
		in: dataplane.Inputs{
			Nodes:    []*v1.Node{node("n1", "10.0.0.1")},
			Pools:    []*v1alpha1.IPPool{ippool(pool, []string{"2001:db8:1234:5678::/64"}, &v1alpha1.VRRP{VirtualRouterIDs: "1-10"})},
			Services: []*v1.Service{lbService("ns", "web", "2001:db8:1234:5678:1319:8a2e:370:7348", true, nil), lbService("ns", "web2", "2001:db8:1234:5678:1319:8a2e:370:7349", true, nil)},
		},
		node: "n1",
	}.render(t)
	for svc, vip := range map[string]string{"ns/web": "2001:db8:1234:5678:1319:8a2e:370:7348", "ns/web2": "2001:db8:1234:5678:1319:8a2e:370:7349"} {
		if b := instanceBlock(t, conf, "IPPool "+pool+", Service "+svc); !strings.Contains(b, vip+"/128 dev eth0") {
			t.Errorf("the Local IPv6 VIP of %s is not held:\n%s", svc, b)
		}
	}
	if len(problems) > 0 {
		t.Errorf("problems: %+v", problems)
	}
}

// Trigger d: two pools on different interfaces with overlapping VRIDs,
// which the plan allows, used to share one advert address on lo.
func TestVRRPSameVRIDOnTwoInterfaces(t *testing.T) {
	p0 := ippool("p0", []string{"10.0.0.16/28"}, &v1alpha1.VRRP{VirtualRouterIDs: "10", Interface: "eth0"})
	p1 := ippool("p1", []string{"10.1.0.16/28"}, &v1alpha1.VRRP{VirtualRouterIDs: "10", Interface: "eth1"})
	p1.CreationTimestamp = p0.CreationTimestamp
	p1.CreationTimestamp.Time = p1.CreationTimestamp.Add(time.Hour) // p1 is younger
	c := vrrpCase{
		in: dataplane.Inputs{
			Nodes:    []*v1.Node{node("n1", "10.0.0.1")},
			Pools:    []*v1alpha1.IPPool{p1, p0},
			Services: []*v1.Service{lbService("ns", "a", "10.0.0.17", false, nil), lbService("ns", "b", "10.1.0.17", false, nil)},
		},
		node: "n1",
	}
	conf, _, problems := c.render(t)
	b0, b1 := instanceBlock(t, conf, "IPPool p0"), instanceBlock(t, conf, "IPPool p1")
	// The older pool keeps the default anchor: adding p1 changed nothing
	// for p0's adverts.
	if !strings.Contains(b0, "169.254.0.10/32 dev lo") || !strings.Contains(b0, "10.0.0.17/32 dev eth0") {
		t.Errorf("p0's instance:\n%s", b0)
	}
	anchor := regexp.MustCompile(`(169\.254\.\d+\.10)/32 dev lo`).FindStringSubmatch(b1)
	if len(anchor) < 2 || anchor[1] == "169.254.0.10" || !strings.Contains(b1, "10.1.0.17/32 dev eth1") {
		t.Errorf("p1's instance, want another anchor than p0's:\n%s", b1)
	}
	if len(problems) > 0 {
		t.Errorf("problems: %+v", problems)
	}
	// Every node computes the same anchor: it depends on the plan alone.
	c.in.Nodes = append(c.in.Nodes, node("n2", "10.0.0.2"))
	c.node = "n2"
	conf2, _, _ := c.render(t)
	if !strings.Contains(instanceBlock(t, conf2, "IPPool p1"), anchor[0]) {
		t.Errorf("node n2 uses another anchor for p1 than n1's %s", anchor[1])
	}
}

// Trigger e: a Node whose InternalIP carries a zone, in unicast. A peer's
// bad address drops only that peer; this node's drops only its instance.
func TestVRRPZonedNodeAddress(t *testing.T) {
	c := vrrpCase{
		in: dataplane.Inputs{
			Nodes:    []*v1.Node{node("n1", "2001:db8::1"), node("n2", "2001:db8::2"), node("n3", "2001:db8::3")},
			Pools:    []*v1alpha1.IPPool{ippool("u6", []string{"2001:db8::100/120"}, &v1alpha1.VRRP{VirtualRouterIDs: "1-10", Unicast: true})},
			Services: []*v1.Service{lbService("ns", "e", "2001:db8::101", false, nil)},
		},
		node: "n1",
		nodes: func(ns []vrrp.Node) {
			for i := range ns {
				if ns[i].Name == "n2" {
					ns[i].InternalIPs = []netip.Addr{netip.MustParseAddr("2001:db8::2%eth0")}
				}
			}
		},
	}
	conf, _, problems := c.render(t)
	b := instanceBlock(t, conf, "IPPool u6")
	if !strings.Contains(b, "unicast_src_ip 2001:db8::1") || !strings.Contains(b, "2001:db8::3\n") || strings.Contains(b, "%eth0") {
		t.Errorf("want n1's instance with peer n3 and without n2's zoned address:\n%s", b)
	}
	if len(problems) != 1 || problems[0].Kind != KindNode || problems[0].Name != "n2" || problems[0].Dropped ||
		problems[0].Peer != netip.MustParseAddr("2001:db8::2%eth0") || problems[0].Field != "status.addresses" {
		t.Errorf("problems %+v, want one naming Node n2's status.addresses and its peer address", problems)
	}

	// On n2 itself the instance is left out, nothing else.
	c.node = "n2"
	conf, _, problems = c.render(t)
	if strings.Contains(conf, "# IPPool u6\n") {
		t.Errorf("n2 configures the instance from a zoned source:\n%s", conf)
	}
	if len(problems) != 1 || problems[0].Kind != KindNode || problems[0].Name != "n2" || !problems[0].Dropped {
		t.Errorf("problems %+v, want one dropping the instance, naming Node n2", problems)
	}
}

// A value no rule foresaw still costs only its instance: a pool of
// link-local addresses whose VIP is another instance's advert address.
func TestVRRPRefusedInstanceIsLeftOut(t *testing.T) {
	conf, plan, problems := vrrpCase{
		in: dataplane.Inputs{
			Nodes:    []*v1.Node{node("n1", "10.0.0.1")},
			Pools:    []*v1alpha1.IPPool{ippool("linklocal", []string{"169.254.0.200/29"}, &v1alpha1.VRRP{VirtualRouterIDs: "1-10"})},
			Services: []*v1.Service{lbService("ns", "ll", "169.254.0.204", false, nil), lbService("ns", "ll2", "169.254.0.205", false, nil)},
		},
		node: "n1",
	}.render(t)
	// The good pool's VIP is on VRID 204, so its anchor is 169.254.0.204;
	// the linklocal instance holding that VIP is left out, not the other.
	good := instanceOfPool(plan, "good")
	if !strings.Contains(conf, "169.254.0.204/32 dev lo") {
		t.Fatalf("the good pool's anchor is not 169.254.0.204; the case needs new addresses:\n%s", conf)
	}
	var dropped []ConfigProblem
	for _, p := range problems {
		if p.Dropped {
			dropped = append(dropped, p)
		}
	}
	if len(dropped) != 1 || dropped[0].Kind != KindIPPool || dropped[0].Name != "linklocal" || !strings.Contains(dropped[0].Message, "is the advert address of \""+good+"\"") {
		t.Fatalf("problems %+v, want one instance left out, naming its IPPool and the clash with %s", problems, good)
	}
	if b := instanceBlock(t, conf, "IPPool linklocal"); !strings.Contains(b, "169.254.0.205/32 dev eth0") || strings.Contains(b, "169.254.0.204/32 dev eth0") {
		t.Errorf("want the other linklocal instance kept:\n%s", b)
	}
}

func instanceOfPool(p vrrp.Plan, pool string) string {
	for _, inst := range p.Instances {
		if inst.Pool == pool {
			return inst.Name
		}
	}
	return ""
}

// event is one event a recorder got.
type event struct {
	kind, name, uid, reason, message string
}

// eventLog is a record.EventRecorder that keeps what it is given.
type eventLog struct{ events []event }

func (r *eventLog) Event(obj runtime.Object, eventtype, reason, message string) {
	e := event{reason: eventtype + " " + reason, message: message}
	switch o := obj.(type) {
	case *v1.ObjectReference:
		e.kind, e.name, e.uid = o.Kind+" "+o.APIVersion, o.Name, string(o.UID)
	case *v1.Node:
		e.kind, e.name = "Node", o.Name
	case *v1.Service:
		e.kind, e.name = "Service", o.Namespace+"/"+o.Name
	}
	r.events = append(r.events, e)
}

func (r *eventLog) Eventf(obj runtime.Object, eventtype, reason, format string, args ...any) {
	r.Event(obj, eventtype, reason, fmt.Sprintf(format, args...))
}

func (r *eventLog) AnnotatedEventf(obj runtime.Object, _ map[string]string, eventtype, reason, format string, args ...any) {
	r.Eventf(obj, eventtype, reason, format, args...)
}

// TestReportRecordsEachProblemOnce: a ConfigProblem becomes one Warning on
// the object to fix (an IPPool by reference), the gauges count what is left
// out, and a problem that lasts is not recorded again.
func TestReportRecordsEachProblemOnce(t *testing.T) {
	pool := ippool("p", nil, nil)
	pool.UID = types.UID("uid-p")
	in := dataplane.Inputs{
		Pools:    []*v1alpha1.IPPool{pool},
		Nodes:    []*v1.Node{node("n2", "10.0.0.2")},
		Services: []*v1.Service{lbService("ns", "web", "10.0.0.5", true, nil)},
	}
	rec := &eventLog{}
	s := &Speaker{opts: &Options{NodeName: "n1"}, metrics: metrics.NewSpeaker(), recorder: rec}
	problems := []ConfigProblem{
		{Instance: "kl_p_v4_b00", Dropped: true, Kind: KindIPPool, Name: "p", Field: "spec.vrrp.interface", Message: "no interface"},
		{Instance: "kl_p_v4_10-0-0-5", Dropped: true, Kind: KindService, Name: "ns/web", Message: "refused"},
		{Instance: "kl_p_v4_b00", Kind: KindNode, Name: "n2", Field: "status.addresses", Peer: netip.MustParseAddr("fe80::2%eth0"), Message: "zone"},
		{Instance: "kl_p_v4_b01", Kind: KindIPPool, Name: "gone", Message: "pool deleted meanwhile"}, // no object: logged only
	}
	s.report(t.Context(), in, vrrp.Plan{}, problems)
	want := []event{
		{kind: "IPPool keeplb.io/v1alpha1", name: "p", uid: "uid-p", reason: "Warning VRRPConfigProblem", message: "spec.vrrp.interface: no interface"},
		{kind: "Service", name: "ns/web", reason: "Warning VRRPConfigProblem", message: "refused"},
		{kind: "Node", name: "n2", reason: "Warning VRRPConfigProblem", message: "status.addresses: zone"},
	}
	if !slices.Equal(rec.events, want) {
		t.Fatalf("events\n%+v\nwant\n%+v", rec.events, want)
	}
	for name, want := range map[string]float64{"keeplb_speaker_vrrp_instances_dropped": 2, "keeplb_speaker_vrrp_peers_dropped": 1} {
		g := s.metrics.InstancesDropped
		if name == "keeplb_speaker_vrrp_peers_dropped" {
			g = s.metrics.PeersDropped
		}
		if got, err := testutil.GetGaugeMetricValue(g); err != nil || got != want {
			t.Errorf("%s = %v (%v), want %v", name, got, err, want)
		}
	}

	// The same problems again: nothing new. One gone and back: recorded.
	s.report(t.Context(), in, vrrp.Plan{}, problems)
	if len(rec.events) != 3 {
		t.Fatalf("a lasting problem was recorded again: %+v", rec.events[3:])
	}
	s.report(t.Context(), in, vrrp.Plan{}, problems[1:])
	s.report(t.Context(), in, vrrp.Plan{}, problems)
	if len(rec.events) != 4 || rec.events[3] != want[0] {
		t.Fatalf("a problem that came back: events %+v", rec.events[3:])
	}
	s.report(t.Context(), in, vrrp.Plan{}, nil)
	if got, _ := testutil.GetGaugeMetricValue(s.metrics.InstancesDropped); got != 0 {
		t.Errorf("instances dropped = %v once all is well, want 0", got)
	}
}

func TestUnhealthy(t *testing.T) {
	t0 := time.Unix(1000, 0)
	up := keepalived.Status{Running: true}
	for _, tc := range []struct {
		name string
		h    health
		st   keepalived.Status
		now  time.Time
		want string // a substring of the reason, or empty when healthy
	}{
		{"starting: caches not synced", health{}, keepalived.Status{}, t0.Add(time.Hour), ""},
		{"running", health{synced: t0}, up, t0.Add(time.Hour), ""},
		{"keepalived starting", health{synced: t0}, keepalived.Status{}, t0.Add(keepalivedStartGrace), ""},
		{"keepalived never started", health{synced: t0}, keepalived.Status{LastExit: errors.New("exec: not found")}, t0.Add(keepalivedStartGrace + time.Second), "has not started 31s after"},
		{"keepalived down after a restart", health{synced: t0}, keepalived.Status{Restarts: 1, LastExit: errors.New("signal: segmentation fault")}, t0.Add(time.Second), "keepalived is down (restarts 1, last exit signal: segmentation fault)"},
		{"last sync applied nothing", health{synced: t0, vrrpErr: errors.New("read-only file system")}, up, t0.Add(time.Second), "the last sync could not apply keepalived's configuration: read-only file system"},
		{"notify FIFO lost", health{synced: t0, fifoDead: true}, up, t0.Add(time.Second), "notify FIFO can no longer be read"},
	} {
		got := unhealthy(tc.h, tc.st, tc.now)
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: unhealthy = %q, want %q", tc.name, got, tc.want)
		}
	}
}
