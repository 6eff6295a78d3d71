package speaker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/spf13/pflag"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/record"
	"k8s.io/component-base/metrics/testutil"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/conntrack"
	conntracktesting "github.com/keeplb/keeplb/pkg/conntrack/testing"
	"github.com/keeplb/keeplb/pkg/dataplane"
	hostnettesting "github.com/keeplb/keeplb/pkg/hostnet/testing"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/nft"
)

// ipvsCluster is two Ready nodes and one pool, 192.0.2.0/24 and
// 2001:db8::/64, forwarding to NodePorts; web has VIP 192.0.2.1.
func ipvsCluster() dataplane.Inputs {
	// n1 is this node: nodeport forwarding sends to the others' NodePorts
	// (and to n1's own pods, of which these Services have none).
	n1, n2, n3 := node("n1", "10.0.0.1"), node("n2", "10.0.0.2"), node("n3", "10.0.0.3")
	n1.Status.Addresses = append(n1.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "fd00::1"})
	n2.Status.Addresses = append(n2.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "fd00::2"})
	n3.Status.Addresses = append(n3.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "fd00::3"})
	p := ippool("p", []string{"192.0.2.0/24", "2001:db8::/64"}, nil)
	p.Spec.Forwarding = v1alpha1.ForwardingNodePort
	return dataplane.Inputs{
		Class: "keeplb.io/vip", DefaultClass: true,
		Nodes:    []*v1.Node{n1, n2, n3},
		Pools:    []*v1alpha1.IPPool{p},
		Services: []*v1.Service{fwdService("web", "192.0.2.1", 80, 30080)},
	}
}

func fwdService(name, ip string, port, nodePort int32) *v1.Service {
	s := lbService("ns", name, ip, false, nil)
	s.Spec.Ports = []v1.ServicePort{{Name: "p", Protocol: v1.ProtocolTCP, Port: port, TargetPort: intstr.FromInt32(8080), NodePort: nodePort}}
	return s
}

func annotate(s *v1.Service, k, v string) *v1.Service {
	s = s.DeepCopy()
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[k] = v
	return s
}

func rs(ip string, port uint16) ipvs.RealServer {
	return ipvs.RealServer{Address: netip.MustParseAddr(ip), Port: port, Weight: 1}
}

// webEntry is what ipvsCluster asks of every node for web.
func webEntry() ipvs.Entry {
	return ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("10.0.0.2", 30080), rs("10.0.0.3", 30080)},
	}
}

func tableOf(es ...ipvs.Entry) ipvs.Table {
	t := ipvs.Table{}
	for _, e := range es {
		t[e.Virtual.Key()] = e
	}
	return t
}

// kubeProxyEntry is a virtual server of kube-proxy's, outside every pool.
func kubeProxyEntry() ipvs.Entry {
	return ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("10.96.0.1"), Protocol: ipvs.TCP, Port: 443, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("10.0.0.1", 6443)},
	}
}

// fakeNFT returns a fake nftables table for keeplb's, so that no test
// writes the host's.
func fakeNFT() *knftables.Fake {
	return knftables.NewFake(nft.Family, nft.Table)
}

// newTestStep builds the forwarding step on k as the speaker does, with
// the check of the IPVS sysctls it runs at start (ensureSysctls).
func newTestStep(o *Options, k Kernel, m *metrics.Speaker, r record.EventRecorder) (*ipvsStep, error) {
	if !o.skipSysctls() {
		if err := ensureIPVSSysctls(k); err != nil {
			return nil, err
		}
	}
	return newIPVSStep(o, k, m, r), nil
}

type ipvsFixture struct {
	fake     *ipvstesting.Fake
	nft      *knftables.Fake
	ct       *conntracktesting.Fake
	net      *hostnettesting.Fake
	metrics  *metrics.Speaker
	recorder *record.FakeRecorder
	step     *ipvsStep
}

// newIPVSFixture is the forwarding step of node n1 with --ipvs, on fakes
// of IPVS, nftables, conntrack and the host's sysctls; mutate may change
// the options and the kernel first.
func newIPVSFixture(t *testing.T, mutate func(*Options, *Kernel)) *ipvsFixture {
	t.Helper()
	f := &ipvsFixture{
		fake:     ipvstesting.New(),
		net:      hostnettesting.New(nil, map[string]string{"net.ipv4.vs.conntrack": "0", "net.ipv4.ip_forward": "0", "net.ipv4.vs.expire_nodest_conn": "0", "net.ipv6.conf.all.forwarding": "0"}),
		ct:       conntracktesting.New(),
		nft:      fakeNFT(),
		metrics:  metrics.NewSpeaker(),
		recorder: record.NewFakeRecorder(100),
	}
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", true
	k := Kernel{Net: f.net, IPVS: f.fake, NFT: f.nft, Conntrack: f.ct}
	if mutate != nil {
		mutate(o, &k)
	}
	step, err := newTestStep(o, k, f.metrics, f.recorder)
	if err != nil {
		t.Fatal(err)
	}
	f.step = step
	return f
}

func (f *ipvsFixture) sync(t *testing.T, in dataplane.Inputs) {
	t.Helper()
	if err := f.step.syncAll(t.Context(), in); err != nil {
		t.Fatal(err)
	}
}

func (f *ipvsFixture) wantTable(t *testing.T, what string, want ipvs.Table) {
	t.Helper()
	if got := f.fake.Table(); !got.Equal(want) {
		t.Fatalf("%s: IPVS table\n%s\nwant\n%s", what, got, want)
	}
}

func (f *ipvsFixture) sysctl(t *testing.T, name string) string {
	t.Helper()
	v, err := f.net.Sysctl(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// metric returns the value of the sample named name (with its labels, if
// any) that m serves, or -1 if it serves none.
func metric(t *testing.T, m *metrics.Speaker, name string) float64 {
	t.Helper()
	for line := range strings.Lines(scrape(t, m)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	return -1
}

func TestIPVSStepProgramsDesired(t *testing.T) {
	f := newIPVSFixture(t, nil)
	for _, name := range []string{"net.ipv4.vs.conntrack", "net.ipv4.ip_forward", "net.ipv4.vs.expire_nodest_conn"} {
		if v := f.sysctl(t, name); v != "1" {
			t.Errorf("sysctl %s = %s after start, want 1", name, v)
		}
	}
	in := ipvsCluster()
	f.sync(t, in)
	f.wantTable(t, "after the first sync", tableOf(webEntry()))
	if v := f.sysctl(t, "net.ipv6.conf.all.forwarding"); v != "0" {
		t.Errorf("IPv6 forwarding set to %s without an IPv6 VIP", v)
	}
	if got := metric(t, f.metrics, "keeplb_ipvs_available"); got != 1 {
		t.Errorf("ipvs_available = %v, want 1", got)
	}
	if vs, reals := metric(t, f.metrics, "keeplb_ipvs_virtual_servers"), metric(t, f.metrics, "keeplb_ipvs_real_servers"); vs != 1 || reals != 2 {
		t.Errorf("virtual servers %v, real servers %v; want 1 and 2", vs, reals)
	}
	if n := metric(t, f.metrics, "keeplb_ipvs_sync_duration_seconds_count"); n != 1 {
		t.Errorf("sync duration observed %v times, want 1", n)
	}

	// Unchanged inputs: nothing to write.
	f.fake.ResetCalls()
	f.sync(t, in)
	if w := f.fake.Writes(); len(w) != 0 {
		t.Errorf("a sync with unchanged inputs wrote %v", w)
	}

	// An IPv6 VIP: its virtual server, and IPv6 forwarding on.
	in.Services = append(in.Services, fwdService("web6", "2001:db8::1", 53, 30053))
	f.sync(t, in)
	want := tableOf(webEntry(), ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("2001:db8::1"), Protocol: ipvs.TCP, Port: 53, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("fd00::2", 30053), rs("fd00::3", 30053)},
	})
	f.wantTable(t, "with an IPv6 VIP", want)
	if v := f.sysctl(t, "net.ipv6.conf.all.forwarding"); v != "1" {
		t.Errorf("IPv6 forwarding = %s with an IPv6 VIP, want 1", v)
	}
	if n := metric(t, f.metrics, "keeplb_ipvs_sync_errors_total"); n != 0 {
		t.Errorf("sync errors = %v, want 0", n)
	}
}

// TestIPVSStepLeavesForeignVirtualServersAlone: keeplb changes and deletes
// only the virtual servers it programmed or that a Service of its own
// wants; any other stays, even inside a pool's range (the old speaker
// deleted those), and is reported.
func TestIPVSStepLeavesForeignVirtualServersAlone(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	// kube-proxy forwards api's VIP; its virtual server is kube-proxy's.
	in.Services = append(in.Services, annotate(fwdService("api", "192.0.2.9", 443, 30443), annotations.Forwarding, string(v1alpha1.ForwardingKubeProxy)))
	kubeAPI := ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.9"), Protocol: ipvs.TCP, Port: 443, Scheduler: "wrr"},
		Reals:   []ipvs.RealServer{rs("10.244.0.5", 8443)},
	}
	// In the pool, but no Service of keeplb's wants them: kube-proxy's
	// for an externalIP (on web's VIP, another port), and a leftover.
	externalIP := ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 8080, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("10.244.0.7", 8080)},
	}
	stale := ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.200"), Protocol: ipvs.UDP, Port: 53, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("10.0.0.7", 30053)},
	}
	foreign := tableOf(kubeProxyEntry(), kubeAPI, externalIP, stale)
	f.fake.SeedTable(foreign)
	f.sync(t, in)
	f.sync(t, in)
	f.wantTable(t, "after two syncs", tableOf(webEntry(), kubeProxyEntry(), kubeAPI, externalIP, stale))
	// Not even read: Sync dumps only what is in scope.
	for _, c := range f.fake.Calls() {
		if c.Method == "RealServers" && foreign[c.Virtual].Virtual.Key() == c.Virtual {
			t.Errorf("read the real servers of a foreign virtual server: %s", c)
		}
	}
	// Those in the pool are reported, once per change: logged, and a
	// Warning on the Node naming them.
	if want := []ipvs.Key{externalIP.Virtual.Key(), stale.Virtual.Key()}; !slices.Equal(f.step.foreign, want) {
		t.Errorf("reported as foreign: %v, want %v", f.step.foreign, want)
	}
	var foreignEvents []string
	for _, ev := range drain(f.recorder) {
		if strings.Contains(ev, EventForeignVirtualServer) {
			foreignEvents = append(foreignEvents, ev)
		}
	}
	if len(foreignEvents) != 1 || !strings.Contains(foreignEvents[0], "192.0.2.1:8080") || !strings.Contains(foreignEvents[0], "192.0.2.200:53") {
		t.Errorf("events = %q, want one %s naming both", foreignEvents, EventForeignVirtualServer)
	}
	// Exit deletes only ours.
	if err := f.step.exit(t.Context(), in); err != nil {
		t.Fatal(err)
	}
	f.wantTable(t, "after exit", foreign)
}

// TestIPVSStepAdoptsWhatItWants: at start, a virtual server that a
// Service of keeplb's wants (left by the previous speaker) is adopted and
// brought to the desired state; once adopted, it is deleted when no longer
// wanted, like one this speaker created.
func TestIPVSStepAdoptsWhatItWants(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	old := webEntry()
	old.Virtual.Scheduler = "wrr"
	old.Reals = []ipvs.RealServer{rs("10.0.0.9", 30080)}
	f.fake.SeedTable(tableOf(old))
	f.sync(t, in)
	f.wantTable(t, "after the first sync", tableOf(webEntry()))
	in.Services = nil
	f.sync(t, in)
	f.wantTable(t, "after web was deleted", ipvs.Table{})
}

func TestIPVSStepDeletesWhatLeftItsScope(t *testing.T) {
	t.Run("pool deleted", func(t *testing.T) {
		f := newIPVSFixture(t, nil)
		in := ipvsCluster()
		f.fake.Seed(kubeProxyEntry().Virtual, kubeProxyEntry().Reals...)
		f.sync(t, in)
		f.wantTable(t, "before", tableOf(webEntry(), kubeProxyEntry()))
		in.Pools = nil
		f.sync(t, in)
		f.wantTable(t, "after the pool was deleted", tableOf(kubeProxyEntry()))
	})
	t.Run("switched to kube-proxy", func(t *testing.T) {
		f := newIPVSFixture(t, nil)
		in := ipvsCluster()
		f.sync(t, in)
		in.Services = []*v1.Service{annotate(in.Services[0], annotations.Forwarding, string(v1alpha1.ForwardingKubeProxy))}
		f.sync(t, in)
		f.wantTable(t, "after web switched to kube-proxy forwarding", ipvs.Table{})
		// Now kube-proxy (IPVS mode) programs it: it stays, sync after sync.
		kp := webEntry()
		kp.Reals = []ipvs.RealServer{rs("10.244.1.3", 8080)}
		f.fake.Seed(kp.Virtual, kp.Reals...)
		f.sync(t, in)
		f.sync(t, in)
		f.wantTable(t, "kube-proxy's virtual server", tableOf(kp))
	})
	t.Run("taken over by kube-proxy first", func(t *testing.T) {
		f := newIPVSFixture(t, nil)
		in := ipvsCluster()
		f.sync(t, in)
		// kube-proxy updates the virtual server before our next sync.
		kp := webEntry()
		kp.Reals = []ipvs.RealServer{rs("10.244.1.3", 8080)}
		f.fake.Seed(kp.Virtual, kp.Reals...)
		in.Services = []*v1.Service{annotate(in.Services[0], annotations.Forwarding, string(v1alpha1.ForwardingKubeProxy))}
		f.sync(t, in)
		f.wantTable(t, "kube-proxy's version", tableOf(kp))
		if err := f.step.exit(t.Context(), in); err != nil {
			t.Fatal(err)
		}
		f.wantTable(t, "after exit", tableOf(kp))
	})
	t.Run("delete failed, retried", func(t *testing.T) {
		f := newIPVSFixture(t, nil)
		in := ipvsCluster()
		f.sync(t, in)
		in.Pools = nil
		f.fake.FailWith(func(c ipvstesting.Call) error {
			if c.Method == "DeleteVirtualServer" {
				return fmt.Errorf("injected: %w", syscall.EBUSY)
			}
			return nil
		})
		if err := f.step.syncAll(t.Context(), in); err == nil {
			t.Fatal("a failed delete was not reported")
		}
		if n := metric(t, f.metrics, "keeplb_ipvs_sync_errors_total"); n != 1 {
			t.Errorf("sync errors = %v, want 1", n)
		}
		f.wantTable(t, "after the failed delete", tableOf(webEntry()))
		f.fake.FailWith(nil)
		f.sync(t, in)
		f.wantTable(t, "after the retry", ipvs.Table{})
	})
	t.Run("half programmed, then left", func(t *testing.T) {
		f := newIPVSFixture(t, nil)
		in := ipvsCluster()
		f.fake.FailWith(func(c ipvstesting.Call) error {
			if c.Method == "AddRealServer" && c.Real == rs("10.0.0.2", 30080).AddrPort() {
				return fmt.Errorf("injected: %w", syscall.EINVAL)
			}
			return nil
		})
		if err := f.step.syncAll(t.Context(), in); err == nil {
			t.Fatal("a failed AddRealServer was not reported")
		}
		half := webEntry()
		half.Reals = half.Reals[1:] // 10.0.0.3 only
		f.wantTable(t, "after the failed add", tableOf(half))
		// What the kernel has, not what was asked, is remembered: it is
		// not mistaken for another program's.
		f.fake.FailWith(nil)
		in.Pools = nil
		f.sync(t, in)
		f.wantTable(t, "after the pool was deleted", ipvs.Table{})
	})
}

func TestIPVSStepExit(t *testing.T) {
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep=%v", keep), func(t *testing.T) {
			f := newIPVSFixture(t, func(o *Options, _ *Kernel) { o.KeepIPVSOnExit = keep })
			in := ipvsCluster()
			f.fake.Seed(kubeProxyEntry().Virtual, kubeProxyEntry().Reals...)
			f.sync(t, in)
			// In our pool, but neither programmed by this speaker nor
			// wanted: somebody else's, which stays.
			other := ipvs.Entry{Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.150"), Protocol: ipvs.TCP, Port: 8080, Scheduler: "rr"}}
			f.fake.Seed(other.Virtual)
			// web's address left the pool since the last sync: programmed, so
			// still ours.
			in.Pools[0].Spec.Addresses = []string{"192.0.2.128/25"}
			if err := f.step.exit(t.Context(), in); err != nil {
				t.Fatal(err)
			}
			want := tableOf(kubeProxyEntry(), other)
			if keep {
				want = tableOf(kubeProxyEntry(), webEntry(), other)
			}
			f.wantTable(t, "after exit", want)
		})
	}
}

// With --ipvs=false kube-proxy forwards, but the VIPs this node holds are
// still its addresses: on main the speaker wrote no table then, and every
// host-network listener answered on them.
func TestGuardStepWithIPVSOff(t *testing.T) {
	m := metrics.NewSpeaker()
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", false
	nftFake := fakeNFT()
	step := newIPVSStep(o, Kernel{IPVS: ipvstesting.New(), NFT: nftFake}, m, nil)
	in := nftCluster()
	if err := step.syncAll(t.Context(), in); err != nil {
		t.Fatalf("sync: %v", err)
	}
	if nftFake.Table == nil {
		t.Fatal("no nftables table with --ipvs=false: the VIPs this node holds are unguarded")
	}
	wantElements(t, nftFake, "vips-v4", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
	for _, set := range []string{"snat-v4", "filtered-v4", "allowed-v4"} {
		wantElements(t, nftFake, set)
	}
	if step.canForward() {
		t.Error("a node that does not forward with IPVS says it can")
	}
	if n := metric(t, m, "keeplb_ipvs_sync_duration_seconds_count"); n > 0 {
		t.Errorf("IPVS sync duration observed %v times with --ipvs=false", n)
	}
	if err := step.exit(t.Context(), in); err != nil {
		t.Errorf("exit: %v", err)
	}
	if nftFake.Table != nil {
		t.Errorf("nftables table left after exit:\n%s", nftFake.Dump())
	}
}

func TestIPVSStepWithoutIPVS(t *testing.T) {
	net := hostnettesting.New(nil, map[string]string{"net.ipv4.ip_forward": "0"})
	m := metrics.NewSpeaker()
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", true
	nftFake := fakeNFT()
	h, err := ipvsOrNone(t.Context(), nil, fmt.Errorf("%w: family not found", ipvs.ErrNoIPVS))
	if err != nil || h != nil {
		t.Fatalf("a kernel without IPVS stopped the speaker: %v, %v", h, err)
	}
	step, err := newTestStep(o, Kernel{Net: net, NFT: nftFake}, m, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := metric(t, m, "keeplb_ipvs_available"); got != 0 {
		t.Errorf("ipvs_available = %v, want 0", got)
	}
	if v, _ := net.Sysctl("net.ipv4.ip_forward"); v != "0" {
		t.Errorf("ip_forward set to %s without IPVS", v)
	}
	in := nftCluster()
	if err := step.syncAll(t.Context(), in); err != nil {
		t.Errorf("sync without IPVS: %v", err)
	}
	// The node still holds VIPs: the guard alone, nothing to masquerade
	// or filter since nothing is forwarded here.
	if nftFake.Table == nil {
		t.Fatal("no nftables table without IPVS: the VIPs this node holds are unguarded")
	}
	wantElements(t, nftFake, "vips-v4", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
	for _, set := range []string{"snat-v4", "filtered-v4", "allowed-v4"} {
		wantElements(t, nftFake, set)
	}
	if err := step.exit(t.Context(), in); err != nil {
		t.Errorf("exit without IPVS: %v", err)
	}
	if n := metric(t, m, "keeplb_ipvs_sync_duration_seconds_count"); n != 0 {
		t.Errorf("sync duration observed %v times without IPVS", n)
	}
	if nftFake.Table != nil {
		t.Errorf("nftables table left after exit without IPVS:\n%s", nftFake.Dump())
	}

	// Any other failure to open IPVS stops the speaker.
	if _, err := ipvsOrNone(t.Context(), nil, errors.New("socket: permission denied")); err == nil {
		t.Error("a failure to open IPVS other than ErrNoIPVS was ignored")
	}
}

func TestIPVSStepSysctls(t *testing.T) {
	kernel := func(net *hostnettesting.Fake) Kernel {
		return Kernel{Net: net, IPVS: ipvstesting.New(), NFT: fakeNFT()}
	}
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", true
	net := hostnettesting.New(nil, map[string]string{"net.ipv4.vs.conntrack": "0", "net.ipv4.ip_forward": "1"})
	net.MakeReadOnly("net.ipv4.vs.conntrack")
	_, err := newTestStep(o, kernel(net), metrics.NewSpeaker(), nil)
	if err == nil || !strings.Contains(err.Error(), "net.ipv4.vs.conntrack") {
		t.Fatalf("error = %v, want one naming net.ipv4.vs.conntrack", err)
	}

	// --skip-sysctls leaves them alone, also the IPv6 one.
	o.SkipSysctls = true
	net = hostnettesting.New(nil, map[string]string{"net.ipv4.vs.conntrack": "0", "net.ipv6.conf.all.forwarding": "0"})
	step, err := newTestStep(o, kernel(net), metrics.NewSpeaker(), nil)
	if err != nil {
		t.Fatal(err)
	}
	in := ipvsCluster()
	in.Services = append(in.Services, fwdService("web6", "2001:db8::1", 53, 30053))
	if err := step.syncAll(t.Context(), in); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"net.ipv4.vs.conntrack", "net.ipv6.conf.all.forwarding"} {
		if v, _ := net.Sysctl(name); v != "0" {
			t.Errorf("--skip-sysctls: %s set to %s", name, v)
		}
	}

	// A read-only IPv6 sysctl fails the sync, naming it, but IPv4 is
	// programmed all the same.
	o.SkipSysctls = false
	net = hostnettesting.New(nil, map[string]string{"net.ipv4.vs.conntrack": "1", "net.ipv4.ip_forward": "1", "net.ipv4.vs.expire_nodest_conn": "1", "net.ipv6.conf.all.forwarding": "0"})
	net.MakeReadOnly("net.ipv6.conf.all.forwarding")
	fake := ipvstesting.New()
	step, err = newTestStep(o, Kernel{Net: net, IPVS: fake, NFT: fakeNFT()}, metrics.NewSpeaker(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := step.syncAll(t.Context(), in); err == nil || !strings.Contains(err.Error(), "net.ipv6.conf.all.forwarding") {
		t.Fatalf("sync error = %v, want one naming net.ipv6.conf.all.forwarding", err)
	}
	if _, ok := fake.Table()[webEntry().Virtual.Key()]; !ok {
		t.Error("the IPv4 virtual server was not programmed after the IPv6 sysctl failed")
	}
}

func TestIPVSStepReportsProblemsOnce(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	in.Services = []*v1.Service{annotate(in.Services[0], annotations.Scheduler, "fastest")}
	for range 3 {
		f.sync(t, in)
	}
	events := drain(f.recorder)
	if len(events) != 1 || !strings.HasPrefix(events[0], "Warning "+EventForwardingProblem+" "+annotations.Scheduler+": ") || !strings.Contains(events[0], "fastest") {
		t.Fatalf("events after three syncs with one problem: %q, want one Warning naming the annotation", events)
	}
	// Fixed, then broken again: reported again.
	good := in.Services[0].DeepCopy()
	delete(good.Annotations, annotations.Scheduler)
	f.sync(t, dataplane.Inputs{Class: in.Class, DefaultClass: true, Nodes: in.Nodes, Pools: in.Pools, Services: []*v1.Service{good}})
	if events := drain(f.recorder); len(events) != 0 {
		t.Fatalf("events once fixed: %q", events)
	}
	f.sync(t, in)
	if events := drain(f.recorder); len(events) != 1 {
		t.Fatalf("events when broken again: %q, want one", events)
	}
}

// A scheduler the node's kernel lacks (its module missing): that Service's
// virtual server fails, with one Warning naming the annotation, the node
// and the module, however many syncs fail; the other Service is forwarded.
// Once the module is there, the next sync programs it.
func TestIPVSStepReportsKernelRefusalOnce(t *testing.T) {
	f := newIPVSFixture(t, nil)
	f.fake.SetSchedulers("rr", "wrr")
	in := ipvsCluster()
	in.Services = []*v1.Service{annotate(in.Services[0], annotations.Scheduler, "mh"), fwdService("other", "192.0.2.2", 80, 30081)}
	for range 3 {
		if err := f.step.syncAll(t.Context(), in); err == nil {
			t.Fatal("sync succeeded with a scheduler the kernel lacks")
		}
	}
	events := drain(f.recorder)
	if len(events) != 1 || !strings.HasPrefix(events[0], "Warning "+EventForwardingProblem+" "+annotations.Scheduler+": node n1's kernel") || !strings.Contains(events[0], "modprobe ip_vs_mh") {
		t.Fatalf("events after three failed syncs: %q, want one Warning naming the annotation, the node and the module", events)
	}
	if got := f.fake.Table(); len(got) != 1 {
		t.Fatalf("kernel table:\n%s\nwant the other Service's virtual server alone", got)
	}
	f.fake.SetSchedulers(ipvstesting.Schedulers...)
	f.sync(t, in)
	if got := f.fake.Table(); len(got) != 2 {
		t.Fatalf("kernel table once the module is there:\n%s\nwant both virtual servers", got)
	}
	if events := drain(f.recorder); len(events) != 0 {
		t.Fatalf("events once fixed: %q", events)
	}
}

func drain(r *record.FakeRecorder) []string {
	var out []string
	for {
		select {
		case e := <-r.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

// --ipvs is on by default and can be turned off; without it the IPVS
// metrics are not served.
func TestIPVSOnByDefault(t *testing.T) {
	o := NewOptions()
	fs := pflag.NewFlagSet("speaker", pflag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if !o.IPVS || o.KeepIPVSOnExit {
		t.Fatalf("defaults: --ipvs=%v --keep-ipvs-on-exit=%v, want on and off", o.IPVS, o.KeepIPVSOnExit)
	}
	if fl := fs.Lookup("ipvs"); fl == nil || strings.Contains(fl.Usage, "xperimental") || fl.DefValue != "true" {
		t.Errorf("--ipvs: want default true and no \"experimental\" in its help: %+v", fl)
	}
	if err := fs.Parse([]string{"--ipvs=false", "--keep-ipvs-on-exit"}); err != nil || o.IPVS || !o.KeepIPVSOnExit {
		t.Fatalf("--ipvs=false --keep-ipvs-on-exit parsed to %v %v (%v)", o.IPVS, o.KeepIPVSOnExit, err)
	}

	m := metrics.NewSpeaker()
	if body := scrape(t, m); strings.Contains(body, "keeplb_ipvs_") || strings.Contains(body, "keeplb_nft_") {
		t.Errorf("IPVS metrics served without --ipvs:\n%s", body)
	}
	on := &Options{NodeName: "n1", SkipSysctls: true, IPVS: true}
	newIPVSStep(on, Kernel{Net: hostnettesting.New(nil, nil), IPVS: ipvstesting.New(), NFT: fakeNFT()}, m, nil)
	if body := scrape(t, m); !strings.Contains(body, "keeplb_ipvs_available 1") {
		t.Errorf("keeplb_ipvs_available not served with --ipvs:\n%s", body)
	}
}

func scrape(t *testing.T, m *metrics.Speaker) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	b, err := io.ReadAll(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The step computes exactly what the dataplane package computes.
func TestIPVSStepMatchesDataplane(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	in.Services = append(in.Services, fwdService("dns", "192.0.2.2", 53, 30053), fwdService("outside-pools", "198.51.100.1", 80, 30081))
	f.sync(t, in)
	st, _ := dataplane.Desired(in, "n1")
	if len(st.IPVS) != 2 {
		t.Fatalf("fixture: desired has %d virtual servers, want 2", len(st.IPVS))
	}
	f.wantTable(t, "after a sync", st.IPVS)
}

// nftElements returns the elements of a set of the fake's table, each as
// "a . b . c"; nil if the table or set does not exist.
func nftElements(t *testing.T, fake *knftables.Fake, set string) []string {
	t.Helper()
	if fake.Table == nil || fake.Table.Sets[set] == nil {
		return nil
	}
	var out []string
	for _, e := range fake.Table.Sets[set].Elements {
		out = append(out, strings.Join(e.Key, " . "))
	}
	slices.Sort(out)
	return out
}

func wantElements(t *testing.T, fake *knftables.Fake, set string, want ...string) {
	t.Helper()
	if got := nftElements(t, fake, set); !slices.Equal(got, want) {
		t.Errorf("set %s = %q, want %q", set, got, want)
	}
}

// nftCluster is ipvsCluster with source ranges on web (the field), on api
// (the legacy annotation), and on kp, which kube-proxy forwards.
func nftCluster() dataplane.Inputs {
	in := ipvsCluster()
	web := in.Services[0]
	web.Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/24", "203.0.113.7/32"}
	api := annotate(fwdService("api", "192.0.2.3", 443, 30443), v1.AnnotationLoadBalancerSourceRangesKey, "10.1.0.0/16")
	open := fwdService("open", "192.0.2.4", 8080, 30808) // no ranges: open to all
	kp := annotate(fwdService("kp", "192.0.2.2", 80, 30081), annotations.Forwarding, string(v1alpha1.ForwardingKubeProxy))
	kp.Spec.LoadBalancerSourceRanges = []string{"192.0.2.128/25"}
	in.Services = append(in.Services, api, open, kp)
	return in
}

func TestIPVSStepWritesNFTables(t *testing.T) {
	f := newIPVSFixture(t, nil)
	f.sync(t, nftCluster())
	wantElements(t, f.nft, "filtered-v4",
		"192.0.2.1 . tcp . 80",
		"192.0.2.3 . tcp . 443",
	)
	wantElements(t, f.nft, "allowed-v4",
		"192.0.2.1 . tcp . 80 . 198.51.100.0/24",
		"192.0.2.1 . tcp . 80 . 203.0.113.7/32",
		"192.0.2.3 . tcp . 443 . 10.1.0.0/16",
	)
	// Every NodePort real server is masqueraded; kp (192.0.2.2) is
	// kube-proxy's and appears nowhere.
	wantElements(t, f.nft, "snat-v4",
		"192.0.2.1 . tcp . 80 . 10.0.0.2 . 30080",
		"192.0.2.1 . tcp . 80 . 10.0.0.3 . 30080",
		"192.0.2.3 . tcp . 443 . 10.0.0.2 . 30443",
		"192.0.2.3 . tcp . 443 . 10.0.0.3 . 30443",
		"192.0.2.4 . tcp . 8080 . 10.0.0.2 . 30808",
		"192.0.2.4 . tcp . 8080 . 10.0.0.3 . 30808",
	)
	// kp is in the guard alone: its port is accepted, kube-proxy forwards
	// and filters it.
	for _, set := range []string{"snat-v4", "filtered-v4", "allowed-v4"} {
		for _, e := range nftElements(t, f.nft, set) {
			if strings.HasPrefix(e, "192.0.2.2 ") {
				t.Errorf("the kube-proxy-forwarded Service is in %s: %s", set, e)
			}
		}
	}
	wantElements(t, f.nft, "vips-v4", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
	wantElements(t, f.nft, "ports-v4", "192.0.2.1 . tcp . 80", "192.0.2.2 . tcp . 80", "192.0.2.3 . tcp . 443", "192.0.2.4 . tcp . 8080")
	wantElements(t, f.nft, "echo-v4", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
	for _, set := range []string{"filtered-v6", "allowed-v6", "snat-v6", "vips-v6", "ports-v6", "echo-v6"} {
		wantElements(t, f.nft, set)
	}
	if got := metric(t, f.metrics, "keeplb_nft_sync_errors_total"); got != 0 {
		t.Errorf("nft_sync_errors_total = %v, want 0", got)
	}
}

func TestIPVSStepSkipsUnchangedNFTables(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := nftCluster()
	f.sync(t, in)
	// Something only a rewrite of the table would remove.
	tx := f.nft.NewTransaction()
	tx.Add(&knftables.Element{Family: nft.Family, Table: nft.Table, Set: "allowed-v4", Key: []string{"192.0.2.1", "tcp", "80", "192.0.2.99/32"}})
	if err := f.nft.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	before := f.nft.Dump()
	if !strings.Contains(before, "192.0.2.99/32") {
		t.Fatalf("marker not in the table:\n%s", before)
	}
	f.sync(t, in)
	if after := f.nft.Dump(); after != before {
		t.Fatalf("an unchanged sync rewrote the table:\n%s\nwas\n%s", after, before)
	}

	// A change rewrites it.
	in.Services[0] = in.Services[0].DeepCopy()
	in.Services[0].Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/25"}
	f.sync(t, in)
	wantElements(t, f.nft, "allowed-v4",
		"192.0.2.1 . tcp . 80 . 198.51.100.0/25",
		"192.0.2.3 . tcp . 443 . 10.1.0.0/16",
	)
}

// TestIPVSStepClosesInvalidSourceRanges: a legacy source-ranges
// annotation that does not parse closes the Service's VIP ports and is a
// Warning event naming the annotation, once; not a sync error (retrying
// cannot fix it), and other Services are unaffected.
func TestIPVSStepClosesInvalidSourceRanges(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	in.Services[0] = annotate(in.Services[0], v1.AnnotationLoadBalancerSourceRangesKey, "10.0.0.0/8,not-a-cidr")
	in.Services = append(in.Services, fwdService("open", "192.0.2.4", 8080, 30808))
	f.sync(t, in)
	f.sync(t, in)
	wantElements(t, f.nft, "filtered-v4", "192.0.2.1 . tcp . 80")
	wantElements(t, f.nft, "allowed-v4")
	for _, name := range []string{"keeplb_nft_sync_errors_total", "keeplb_ipvs_sync_errors_total"} {
		if got := metric(t, f.metrics, name); got != 0 {
			t.Errorf("%s = %v, want 0: the table and IPVS did their part", name, got)
		}
	}
	events := drain(f.recorder)
	if len(events) != 1 || !strings.Contains(events[0], "Warning ForwardingProblem "+v1.AnnotationLoadBalancerSourceRangesKey+":") ||
		!strings.Contains(events[0], `"10.0.0.0/8,not-a-cidr"`) || !strings.Contains(events[0], "closed to every client") {
		t.Errorf("events = %q; want one Warning naming the annotation, the bad value and that the VIP is closed", events)
	}
	f.wantTable(t, "with invalid source ranges", tableOf(webEntry(), ipvs.Entry{
		Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.4"), Protocol: ipvs.TCP, Port: 8080, Scheduler: "rr"},
		Reals:   []ipvs.RealServer{rs("10.0.0.2", 30808), rs("10.0.0.3", 30808)},
	}))
}

func TestIPVSStepNFTablesExit(t *testing.T) {
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep=%v", keep), func(t *testing.T) {
			f := newIPVSFixture(t, func(o *Options, _ *Kernel) { o.KeepIPVSOnExit = keep })
			in := nftCluster()
			f.sync(t, in)
			if f.nft.Table == nil {
				t.Fatal("no table after sync")
			}
			if err := f.step.exit(t.Context(), in); err != nil {
				t.Fatal(err)
			}
			if present := f.nft.Table != nil; present != keep {
				t.Fatalf("table present after exit = %v, want %v:\n%s", present, keep, f.nft.Dump())
			}
		})
	}
}

// TestIPVSStepWithoutNFTables: without a usable nft, the Services with
// source ranges are not forwarded at all (the old speaker forwarded them
// unfiltered), each gets a Warning, and the others are forwarded.
func TestIPVSStepWithoutNFTables(t *testing.T) {
	// OpenKernel leaves NFT nil when nft cannot be opened (no binary).
	f := newIPVSFixture(t, func(_ *Options, k *Kernel) { k.NFT = nil })
	f.sync(t, nftCluster())
	f.wantTable(t, "without nft", tableOf(
		ipvs.Entry{Virtual: ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.4"), Protocol: ipvs.TCP, Port: 8080, Scheduler: "rr"}, Reals: []ipvs.RealServer{rs("10.0.0.2", 30808), rs("10.0.0.3", 30808)}},
	))
	events := drain(f.recorder)
	if len(events) != 2 {
		t.Errorf("events = %q; want one Warning for each of web and api", events)
	}
	for _, e := range events {
		if !strings.Contains(e, "Warning ForwardingProblem spec.loadBalancerSourceRanges: node n1 cannot write the nftables filter") {
			t.Errorf("event %q does not say that n1 cannot filter", e)
		}
	}
	if f.step.canForward() {
		t.Error("a node without nft says it can forward")
	}
	if err := f.step.exit(t.Context(), nftCluster()); err != nil {
		t.Fatal(err)
	}
}

// failingNFT is a knftables.Fake whose Run fails while fail is set, as
// nft fails on a kernel without a feature the table needs or when
// another program owns the table.
type failingNFT struct {
	*knftables.Fake
	fail bool
}

func (n *failingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if n.fail {
		return errors.New("injected: Error: Could not process rule: Operation not supported")
	}
	return n.Fake.Run(ctx, tx)
}

// TestIPVSStepFailsClosed: when a write of the table fails, a filtered
// virtual server is neither created nor changed: one whose filter is
// unchanged keeps its state, one whose filter changed is removed, a new one
// is withheld; their Services get a Warning. Unfiltered Services go on.
// The old speaker programmed them all, unfiltered.
func TestIPVSStepFailsClosed(t *testing.T) {
	nf := &failingNFT{Fake: knftables.NewFake(nft.Family, nft.Table)}
	f := newIPVSFixture(t, func(_ *Options, k *Kernel) { k.NFT = nf })
	in := nftCluster() // web, api filtered; open not; kp kube-proxy's
	f.sync(t, in)
	before := f.fake.Table()
	if len(before) != 3 {
		t.Fatalf("fixture: %d virtual servers, want 3:\n%s", len(before), before)
	}
	drain(f.recorder)

	nf.fail = true
	in.Services[0] = in.Services[0].DeepCopy() // web: ranges change
	in.Services[0].Spec.LoadBalancerSourceRanges = []string{"198.51.100.0/25"}
	api := in.Services[1].DeepCopy() // api: same ranges, another NodePort
	api.Spec.Ports[0].NodePort = 30444
	in.Services[1] = api
	newFiltered := fwdService("new", "192.0.2.5", 80, 30085)
	newFiltered.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24"}
	newOpen := fwdService("plain", "192.0.2.6", 80, 30086)
	in.Services = append(in.Services, newFiltered, newOpen)
	if err := f.step.syncAll(t.Context(), in); err == nil {
		t.Fatal("a failed nftables write was not reported")
	}
	key := func(ip string, port uint16) ipvs.Key {
		return ipvs.Key{Address: netip.MustParseAddr(ip), Protocol: ipvs.TCP, Port: port}
	}
	got := f.fake.Table()
	if _, ok := got[key("192.0.2.1", 80)]; ok {
		t.Error("web's virtual server stayed although its filter changed and could not be written")
	}
	if _, ok := got[key("192.0.2.5", 80)]; ok {
		t.Error("new's virtual server was created although its filter could not be written")
	}
	if !got[key("192.0.2.3", 443)].Equal(before[key("192.0.2.3", 443)]) {
		t.Errorf("api's virtual server changed although its filter could not be written again:\n%s", got)
	}
	for _, k := range []ipvs.Key{key("192.0.2.4", 8080), key("192.0.2.6", 80)} {
		if _, ok := got[k]; !ok {
			t.Errorf("the unfiltered %s is not forwarded", k)
		}
	}
	events := drain(f.recorder)
	var who []string
	for _, e := range events {
		if strings.Contains(e, "cannot write the nftables filter") {
			who = append(who, strings.Fields(e)[0])
		}
	}
	if len(who) != 2 {
		t.Errorf("events %q; want one for web and one for new", events)
	}
	if f.step.canForward() {
		t.Error("the node says it can forward after a failed write")
	}

	// The write succeeds again: everything as asked.
	nf.fail = false
	f.sync(t, in)
	st, _ := dataplane.Desired(in, "n1")
	f.wantTable(t, "after a good write", st.IPVS)
	wantElements(t, nf.Fake, "allowed-v4",
		"192.0.2.1 . tcp . 80 . 198.51.100.0/25",
		"192.0.2.3 . tcp . 443 . 10.1.0.0/16",
		"192.0.2.5 . tcp . 80 . 203.0.113.0/24",
	)
	if !f.step.canForward() {
		t.Error("the node says it cannot forward after a good write")
	}
}

// TestIPVSStepCountsGuardDrops: keeplb_vip_guard_dropped_packets_total is
// read from the table's counter at scrape time and keeps counting across
// rewrites of the table, which recreate the counter.
func TestIPVSStepCountsGuardDrops(t *testing.T) {
	f := newIPVSFixture(t, nil)
	const name = "keeplb_vip_guard_dropped_packets_total"
	if got := metric(t, f.metrics, name); got != -1 {
		t.Errorf("%s = %v before any table, want no series", name, got)
	}
	in := nftCluster()
	f.sync(t, in)
	setDrops := func(n uint64) {
		c := f.nft.Table.Counters[nft.CounterGuard]
		if c == nil {
			t.Fatalf("no counter %s:\n%s", nft.CounterGuard, f.nft.Dump())
		}
		c.Packets = &n
	}
	setDrops(5)
	if got := metric(t, f.metrics, name); got != 5 {
		t.Errorf("%s = %v, want 5", name, got)
	}
	in.Services = append(in.Services, fwdService("more", "192.0.2.7", 80, 30087))
	f.sync(t, in) // rewrites the table: a new counter
	setDrops(2)
	if got := metric(t, f.metrics, name); got != 7 {
		t.Errorf("%s = %v after a rewrite, want 5 + 2", name, got)
	}
}

// TestIPVSStepWarnsWithoutIPVS checks the IPVSUnavailable events: one per
// Service this node would forward, once per process, none for Services it
// would not forward.
func TestIPVSStepWarnsWithoutIPVS(t *testing.T) {
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", true
	rec := record.NewFakeRecorder(100)
	step := newIPVSStep(o, Kernel{Net: hostnettesting.New(nil, nil), NFT: fakeNFT()}, metrics.NewSpeaker(), rec)
	in := ipvsCluster()
	// Outside every pool: not keeplb's to forward.
	in.Services = append(in.Services, fwdService("elsewhere", "198.51.100.1", 80, 30081))
	for range 3 {
		if err := step.syncAll(t.Context(), in); err != nil {
			t.Fatal(err)
		}
	}
	got := drain(rec)
	if len(got) != 1 {
		t.Fatalf("after 3 syncs got %d events, want 1 (web, once):\n%s", len(got), strings.Join(got, "\n"))
	}
	for _, want := range []string{"Warning", EventIPVSUnavailable, "Node n1", "modprobe ip_vs", "delete the keeplb speaker's pod"} {
		if !strings.Contains(got[0], want) {
			t.Errorf("event %q lacks %q", got[0], want)
		}
	}
	in.Services = append(in.Services, fwdService("api", "192.0.2.2", 443, 30443))
	for range 2 {
		if err := step.syncAll(t.Context(), in); err != nil {
			t.Fatal(err)
		}
	}
	if got := drain(rec); len(got) != 1 || !strings.Contains(got[0], EventIPVSUnavailable) {
		t.Errorf("a new Service got events %q, want one IPVSUnavailable", got)
	}
}

// TestIPVSStepClearsUDPConntrack checks that a UDP real server leaving a
// virtual server (its node gone, then its Service gone) loses its
// conntrack flows through that VIP:port, and nothing else does.
func TestIPVSStepClearsUDPConntrack(t *testing.T) {
	f := newIPVSFixture(t, nil)
	in := ipvsCluster()
	dns := fwdService("dns", "192.0.2.5", 53, 30053)
	dns.Spec.Ports[0].Protocol = v1.ProtocolUDP
	in.Services = append(in.Services, dns)
	f.sync(t, in)
	flow := func(proto uint8, vip, real string) conntrack.Flow {
		c := netip.MustParseAddrPort("198.51.100.7:40000")
		return conntrack.Flow{Protocol: proto,
			Original: conntrack.Tuple{Src: c, Dst: netip.MustParseAddrPort(vip)},
			Reply:    conntrack.Tuple{Src: netip.MustParseAddrPort(real), Dst: netip.MustParseAddrPort("10.0.0.1:61000")}}
	}
	toN3 := flow(conntrack.UDP, "192.0.2.5:53", "10.0.0.3:30053")
	toN2 := flow(conntrack.UDP, "192.0.2.5:53", "10.0.0.2:30053")
	tcpToN2 := flow(conntrack.TCP, "192.0.2.1:80", "10.0.0.2:30080")
	f.ct.Add(toN3, toN2, tcpToN2)
	holds := func(want ...conntrack.Flow) bool {
		got := f.ct.Flows()
		return len(got) == len(want) && !slices.ContainsFunc(want, func(w conntrack.Flow) bool { return !slices.Contains(got, w) })
	}

	// n2 leaves: its real servers go, and only its UDP flow with them.
	in.Nodes = []*v1.Node{in.Nodes[0], in.Nodes[2]}
	f.sync(t, in)
	if !holds(toN3, tcpToN2) {
		t.Fatalf("after n2 left, conntrack holds %+v, want n3's UDP flow and the TCP flow", f.ct.Flows())
	}
	// The Service goes: its virtual server is deleted with n3's real
	// server, whose flow goes too.
	in.Services = in.Services[:1]
	f.sync(t, in)
	if !holds(tcpToN2) {
		t.Fatalf("after dns was deleted, conntrack holds %+v, want only the TCP flow", f.ct.Flows())
	}
	// A failure to clear is logged, not a failed sync.
	f.ct.FailWith(errors.New("netlink: operation not permitted"))
	in.Services = append(in.Services, dns)
	f.sync(t, in)
	in.Services = in.Services[:1]
	f.sync(t, in)
}

// TestIPVSStepExportsStats checks the per-virtual-server counters: read
// from the kernel at scrape time, for keeplb's virtual servers only,
// labelled with their Service; gone once the speaker removed them.
func TestIPVSStepExportsStats(t *testing.T) {
	f := newIPVSFixture(t, nil)
	kp := kubeProxyEntry()
	f.fake.Seed(kp.Virtual, kp.Reals...)
	f.fake.SetStats(kp.Virtual.Key(), ipvs.Stats{Connections: 99, PacketsIn: 99, BytesIn: 99})
	in := ipvsCluster()
	f.sync(t, in)
	srv := httptest.NewServer(f.metrics.Handler())
	defer srv.Close()
	names := []string{"keeplb_ipvs_connections_total", "keeplb_ipvs_packets_total", "keeplb_ipvs_bytes_total"}
	header := `
# HELP keeplb_ipvs_connections_total [ALPHA] Connections IPVS scheduled to one of keeplb's virtual servers on this node, since the virtual server was created (64-bit where the kernel has 64-bit counters, Linux 4.1 and later; 32-bit before, where it wraps).
# TYPE keeplb_ipvs_connections_total counter
`
	want := func(conns int) string {
		return header + `keeplb_ipvs_connections_total{port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} ` + strconv.Itoa(conns) + "\n"
	}
	if err := testutil.ScrapeAndCompare(srv.URL, strings.NewReader(want(0)), names[0]); err != nil {
		t.Errorf("after the first sync: %v", err)
	}
	// Traffic between syncs shows at the next scrape, without a sync.
	if !f.fake.SetStats(webEntry().Virtual.Key(), ipvs.Stats{Connections: 7, PacketsIn: 70, PacketsOut: 60, BytesIn: 7000, BytesOut: 60000}) {
		t.Fatal("web's virtual server missing")
	}
	if err := testutil.ScrapeAndCompare(srv.URL, strings.NewReader(want(7)), names[0]); err != nil {
		t.Errorf("after traffic: %v", err)
	}
	body := scrape(t, f.metrics)
	for _, line := range []string{
		`keeplb_ipvs_packets_total{direction="out",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 60`,
		`keeplb_ipvs_bytes_total{direction="in",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 7000`,
	} {
		if !strings.Contains(body, line) {
			t.Errorf("scrape lacks %s", line)
		}
	}
	if strings.Contains(body, "10.96.0.1") {
		t.Errorf("kube-proxy's virtual server exported:\n%s", body)
	}
	if err := f.step.exit(t.Context(), in); err != nil {
		t.Fatal(err)
	}
	if body := scrape(t, f.metrics); strings.Contains(body, "keeplb_ipvs_connections_total{") {
		t.Errorf("counters exported after exit removed the virtual servers:\n%s", body)
	}
}

// syncAll is the forwarding step's share of one full sync: compute from
// every object, then apply, reading the whole table.
func (d *ipvsStep) syncAll(ctx context.Context, in dataplane.Inputs) error {
	st, problems, delta := d.compute(in)
	delta.Full = true
	return d.apply(ctx, func(key string) *v1.Service { return serviceByKey(in, key) }, st, problems, delta)
}
