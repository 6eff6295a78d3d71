package speaker

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	conntracktesting "github.com/keeplb/keeplb/pkg/conntrack/testing"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	hostnettesting "github.com/keeplb/keeplb/pkg/hostnet/testing"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/keepalived"
	keepalivedtesting "github.com/keeplb/keeplb/pkg/keepalived/testing"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// syncSpeaker is the speaker of node n1, built as run builds it, on a
// Kernel of fakes, with in in its informers' stores.
func syncSpeaker(t testing.TB, in dataplane.Inputs, nf knftables.Interface) (*Speaker, Kernel, *keepalivedtesting.Fake) {
	t.Helper()
	o := NewOptions()
	o.NodeName, o.RunDir, o.SkipSysctls = "n1", t.TempDir(), true
	if err := os.MkdirAll(Layout{RunDir: o.RunDir}.TrackPath(""), 0o755); err != nil {
		t.Fatal(err)
	}
	links := []hostnet.Link{{Name: "eth0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24"), netip.MustParsePrefix("192.0.2.250/24")}, DefaultRoute4: true}}
	proc := keepalivedtesting.NewFake(Layout{RunDir: o.RunDir}.ConfigPath())
	k := Kernel{Net: hostnettesting.New(links, nil), IPVS: ipvstesting.New(), NFT: nf, Keepalived: proc, Conntrack: conntracktesting.New()}
	sup, err := keepalived.NewSupervisor(k.Keepalived, keepalived.SupervisorOptions{ConfigPath: Layout{RunDir: o.RunDir}.ConfigPath()})
	if err != nil {
		t.Fatal(err)
	}
	s := newSpeaker(o, fake.NewClientset(), dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()), k, sup, record.NewFakeRecorder(100))
	// As after a hand-off: the first syncs render every instance, without
	// the few seconds a speaker that starts afresh leaves others' to their
	// planned masters (TestStartDeferred covers that).
	s.adopted = true
	for _, svc := range in.Services {
		_ = s.services.GetStore().Add(svc)
	}
	for _, n := range in.Nodes {
		_ = s.nodes.GetStore().Add(n)
	}
	for _, es := range in.Slices {
		_ = s.slices.GetStore().Add(es)
	}
	for _, p := range in.Pools {
		u, err := v1alpha1.ToUnstructured(p)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.poolInf.GetStore().Add(u)
	}
	return s, k, proc
}

// trackFiles reads the track files of the instances in want.
func trackFiles(t *testing.T, s *Speaker, want map[string]int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for name := range want {
		b, err := os.ReadFile(s.layout.TrackPath(name))
		if err != nil {
			t.Fatalf("track file of %s: %v", name, err)
		}
		v, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		got[name] = v
	}
	return got
}

// TestSyncAppliesEverything runs whole syncs of one speaker on fakes and
// checks the state they leave: the IPVS table and keeplb's table of the
// desired state, keepalived.conf with this node's instance, and track
// files with the values of a node that can forward; then, with the table
// unwritable, the sync fails, IPVS keeps its table, VRRP is still applied,
// and the track files take the values of a node that cannot forward (the
// forwarding step runs first, and its result sets them).
func TestSyncAppliesEverything(t *testing.T) {
	in := nftCluster()
	nf := &failingNFT{Fake: knftables.NewFake(nft.Family, nft.Table)}
	s, k, proc := syncSpeaker(t, in, nf)
	in = s.collect()
	if len(in.Pools) != 1 || len(in.Services) != len(nftCluster().Services) {
		t.Fatalf("the stores hold %d pools, %d Services", len(in.Pools), len(in.Services))
	}
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	st, _ := dataplane.Desired(in, "n1")
	if got := k.IPVS.(*ipvstesting.Fake).Table(); !got.Equal(st.IPVS) {
		t.Errorf("IPVS after the sync:\n%s\nwant\n%s", got, st.IPVS)
	}
	wantElements(t, nf.Fake, "vips-v4", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
	conf, err := os.ReadFile(s.layout.ConfigPath())
	if err != nil || !strings.Contains(string(conf), "192.0.2.1") {
		t.Fatalf("keepalived.conf (%v) lacks the VIP 192.0.2.1:\n%s", err, conf)
	}
	if proc.Starts() != 0 {
		t.Error("the sync started keepalived: that is the supervisor's run, after the first sync")
	}
	pin, _ := PlanInput(in)
	plan := vrrp.Compute(pin)
	can, cannot := vrrp.TrackValues(plan, "n1", pin, true), vrrp.TrackValues(plan, "n1", pin, false)
	if len(can) == 0 {
		t.Fatal("no track files in the plan: the test proves nothing")
	}
	if got := trackFiles(t, s, can); !mapsEqual(got, can) {
		t.Errorf("track files %v, want a forwarding node's %v", got, can)
	}

	nf.fail = true
	in.Services = append(in.Services, fwdService("new", "192.0.2.33", 80, 30085)) // a change: the table is written again; 192.0.2.1's instance (32 buckets), not a new one, which n1 would defer
	_ = s.services.GetStore().Add(in.Services[len(in.Services)-1])
	s.pending.service(in.Services[len(in.Services)-1]) // as its informer's handler does
	err = s.sync(t.Context())
	if err == nil || !strings.Contains(err.Error(), "nftables") {
		t.Fatalf("a sync whose table write failed returned %v", err)
	}
	if got := trackFiles(t, s, cannot); !mapsEqual(got, cannot) {
		t.Errorf("track files %v after the table write failed, want a node that cannot forward's %v", got, cannot)
	}
	if mapsEqual(can, cannot) {
		t.Fatal("can and cannot forward give the same track values: the test proves nothing")
	}
	conf, _ = os.ReadFile(s.layout.ConfigPath())
	if !strings.Contains(string(conf), "192.0.2.33") {
		t.Errorf("keepalived.conf not applied after the forwarding step failed:\n%s", conf)
	}
	if s.health.vrrpErr != nil {
		t.Errorf("health says VRRP failed: %v", s.health.vrrpErr)
	}
}

// TestComputeIsPure: compute gives the same desired state from the same
// observed state, and writes nothing: the kernel's fakes and the run
// folder are as they were.
func TestComputeIsPure(t *testing.T) {
	nf := knftables.NewFake(nft.Family, nft.Table)
	s, k, _ := syncSpeaker(t, nftCluster(), nf)
	obs, err := s.observe(s.pending.take(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, b := s.compute(obs), s.compute(obs)
	if len(a.keepalivedConf) == 0 || len(a.forwarding.IPVS) == 0 {
		t.Fatal("compute gave nothing: the test proves nothing")
	}
	if string(a.keepalivedConf) != string(b.keepalivedConf) || !a.forwarding.IPVS.Equal(b.forwarding.IPVS) || !mapsEqual(a.track[true], b.track[true]) {
		t.Error("compute gave two results for one observed state")
	}
	if len(k.IPVS.(*ipvstesting.Fake).Table()) != 0 || nf.Table != nil {
		t.Error("compute wrote to the kernel")
	}
	if _, err := os.Stat(s.layout.ConfigPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("compute wrote keepalived.conf (%v)", err)
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestSyncRecomputesWhatChanged runs the speaker's syncs as its informers
// drive them: after the first (full) sync, one endpoint change of a
// Cluster Service costs the kernel exactly its real server (no dump) and
// reuses the VRRP step's share; one of a Local Service recomputes VRRP
// (its VIP may move); a failed sync and resyncPeriod each bring a full sync.
func TestSyncRecomputesWhatChanged(t *testing.T) {
	in := ipvsCluster()
	web := annotate(in.Services[0], annotations.Forwarding, string(v1alpha1.ForwardingPod))
	loc := fwdService("loc", "192.0.2.9", 80, 30090)
	loc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	in.Services = []*v1.Service{web, loc}
	in.Slices = []*discoveryv1.EndpointSlice{podSlice("web", "n2", "n3", "n3"), podSlice("loc", "n2")}
	s, k, _ := syncSpeaker(t, in, knftables.NewFake(nft.Family, nft.Table))
	fake := k.IPVS.(*ipvstesting.Fake)
	dumped := func() bool {
		return slices.ContainsFunc(fake.Calls(), func(c ipvstesting.Call) bool { return c.Method == "VirtualServers" })
	}
	if err := s.sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if !dumped() {
		t.Fatal("the first sync did not read the IPVS table")
	}
	// change replaces a slice in the store and tells the speaker, as the
	// informer does, then syncs.
	change := func(what string, es *discoveryv1.EndpointSlice) {
		t.Helper()
		old, _, _ := s.slices.GetStore().Get(es)
		if err := s.slices.GetStore().Update(es); err != nil {
			t.Fatal(err)
		}
		s.pending.slice(old)
		s.pending.slice(es)
		fake.ResetCalls()
		if err := s.sync(t.Context()); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		want, _ := dataplane.Desired(s.collect(), "n1")
		if got := fake.Table(); !got.Equal(want.IPVS) {
			t.Errorf("%s: IPVS\n%s\nwant\n%s", what, got, want.IPVS)
		}
	}

	vrrpBefore := s.lastVRRP
	es := podSlice("web", "n2", "n3", "n3")
	es.Endpoints[1].Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
	change("a web endpoint terminates", es)
	if got := fmt.Sprint(fake.Calls()); got != "[UpdateRealServer TCP/192.0.2.1:80 10.1.0.2:8080]" {
		t.Errorf("a web endpoint terminates: kernel calls %s; want exactly the one weight change", got)
	}
	if s.lastVRRP != vrrpBefore {
		t.Error("a Cluster Service's endpoint change recomputed the VRRP plan")
	}

	other := lbService("ns", "other", "192.0.2.77", false, ptr("example.com/other"))
	for _, c := range []struct {
		svc  *v1.Service
		plan bool
	}{{other, false}, {web, true}} {
		_ = s.services.GetStore().Add(c.svc)
		s.pending.service(c.svc)
		before := s.lastVRRP
		if err := s.sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		if recomputed := s.lastVRRP != before; recomputed != c.plan {
			t.Errorf("a change of Service %s recomputed the VRRP plan: %v; want %v", c.svc.Name, recomputed, c.plan)
		}
	}
	vrrpBefore = s.lastVRRP

	change("loc's endpoint moves to n3", podSlice("loc", "n3"))
	if dumped() {
		t.Errorf("loc's endpoint moves to n3: the sync read the whole table: %v", fake.Calls())
	}
	if s.lastVRRP == vrrpBefore {
		t.Error("a Local Service's endpoint change did not recompute the VRRP plan")
	}

	fake.FailWith(func(c ipvstesting.Call) error {
		if c.IsWrite() {
			return syscall.ENOMEM
		}
		return nil
	})
	es = podSlice("web", "n2", "n3")
	_ = s.slices.GetStore().Update(es)
	s.pending.slice(es)
	if err := s.sync(t.Context()); err == nil {
		t.Fatal("a sync whose IPVS writes failed succeeded")
	}
	fake.FailWith(nil)
	change("after a failed sync", es)
	if !dumped() {
		t.Errorf("the sync after a failed one did not read the whole table: %v", fake.Calls())
	}

	change("nothing, early", es)
	if dumped() || len(fake.Calls()) != 0 {
		t.Errorf("a sync with nothing changed called the kernel: %v", fake.Calls())
	}
	s.lastResync = s.lastResync.Add(-resyncPeriod)
	change("nothing, resyncPeriod after the last full sync", es)
	if !dumped() {
		t.Errorf("the periodic resync did not read the whole table: %v", fake.Calls())
	}
}

// podSlice is svc's EndpointSlice with one ready endpoint on each node
// named, 10.1.0.1 onwards, port p 8080.
func podSlice(svc string, nodes ...string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: svc + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("p"), Protocol: ptr(v1.ProtocolTCP), Port: ptr(int32(8080))}},
	}
	for i, n := range nodes {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.1.0.%d", i+1)}, NodeName: ptr(n),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}})
	}
	return es
}

func ptr[T any](v T) *T { return &v }
