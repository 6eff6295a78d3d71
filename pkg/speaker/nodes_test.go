package speaker

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// badNodes are Nodes whose kubelets report InternalIPs no other node can
// send to, next to a good one.
func badNodes() []*v1.Node {
	n1 := node("n1", "10.0.0.1")
	n1.Status.Addresses = append(n1.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: "fe80::1%eth0"})
	return []*v1.Node{n1, node("n2", "2001:db8::1%eth0"), node("n3", "10.0.0.1 } ; flush ruleset"), node("n4", "10.0.0.4")}
}

// TestPlanInputIgnoresUnusableNodeAddresses checks that the plan never
// sees an InternalIP no other node can send to: it would become a unicast
// peer of every node.
func TestPlanInputIgnoresUnusableNodeAddresses(t *testing.T) {
	pin, _ := PlanInput(dataplane.Inputs{Nodes: badNodes()})
	got := map[string][]netip.Addr{}
	for _, n := range pin.Nodes {
		got[n.Name] = n.InternalIPs
	}
	if len(got["n1"]) != 1 || got["n1"][0] != netip.MustParseAddr("10.0.0.1") || len(got["n2"]) != 0 || len(got["n3"]) != 0 || len(got["n4"]) != 1 {
		t.Errorf("InternalIPs %v; want n1 10.0.0.1 only, none for n2 and n3, n4 10.0.0.4", got)
	}
}

// TestWarnNodes checks the InvalidNodeAddress events: from the node's own
// speaker only, one per ignored address naming its field and the fix,
// once, and again when the Node changes.
func TestWarnNodes(t *testing.T) {
	for _, self := range []string{"n1", "n2", "n4"} {
		t.Run(self, func(t *testing.T) {
			o := NewOptions()
			o.NodeName = self
			rec := record.NewFakeRecorder(100)
			s := &Speaker{opts: o, recorder: rec, metrics: metrics.NewSpeaker()}
			nodes := badNodes()
			for range 3 {
				s.warnNodes(t.Context(), nodes, ignoredAddrs(nodes))
			}
			got := drain(rec)
			want := map[string][]string{
				"n1": {`status.addresses[1] (InternalIP "fe80::1%eth0")`},
				"n2": {`status.addresses[0] (InternalIP "2001:db8::1%eth0")`},
			}[self]
			if len(got) != len(want) {
				t.Fatalf("events after 3 syncs: %q, want %d", got, len(want))
			}
			for i, w := range want {
				for _, part := range []string{"Warning", EventInvalidNodeAddress, w, "zone", "--node-ip"} {
					if !strings.Contains(got[i], part) {
						t.Errorf("event %q lacks %q", got[i], part)
					}
				}
			}
			if self != "n1" {
				return
			}
			// The kubelet reports another bad address: told again.
			nodes[0].Status.Addresses[1].Address = "127.0.0.1"
			s.warnNodes(t.Context(), nodes, ignoredAddrs(nodes))
			if got := drain(rec); len(got) != 1 || !strings.Contains(got[0], "loopback") {
				t.Errorf("after the Node changed: %q, want one event about the loopback address", got)
			}
		})
	}
}

// TestPlanInputForwarded checks which VIPs the plan counts as forwarded
// with IPVS, the ones a node that cannot forward must not hold: those of
// nodeport and pod forwarding, by annotation or by the pool's default,
// not kube-proxy's.
func TestPlanInputForwarded(t *testing.T) {
	kp := ippool("kp", []string{"192.0.2.128/25"}, nil)
	kp.Spec.Forwarding = v1alpha1.ForwardingKubeProxy
	in := dataplane.Inputs{
		Class: "keeplb.io/vip", DefaultClass: true,
		Nodes: []*v1.Node{node("n1", "10.0.0.1")},
		Pools: []*v1alpha1.IPPool{ippool("np", []string{"192.0.2.0/25"}, nil), kp},
		Services: []*v1.Service{
			lbService("ns", "default", "192.0.2.1", false, nil),
			annotate(lbService("ns", "pod", "192.0.2.2", false, nil), annotations.Forwarding, "pod"),
			annotate(lbService("ns", "kube-proxy", "192.0.2.3", false, nil), annotations.Forwarding, "kube-proxy"),
			lbService("ns", "pool-kube-proxy", "192.0.2.129", false, nil),
			annotate(lbService("ns", "pool-kube-proxy-nodeport", "192.0.2.130", false, nil), annotations.Forwarding, "nodeport"),
		},
	}
	pin, _ := PlanInput(in)
	want := map[string]bool{"ns/default": true, "ns/pod": true, "ns/kube-proxy": false, "ns/pool-kube-proxy": false, "ns/pool-kube-proxy-nodeport": true}
	for _, v := range pin.VIPs {
		if v.Forwarded != want[v.Service] {
			t.Errorf("%s: Forwarded %v, want %v", v.Service, v.Forwarded, want[v.Service])
		}
	}
	// Tracked: the instances with a forwarded VIP, and only those (each
	// of these VIPs has an instance of its own here).
	plan := vrrp.Compute(pin)
	forwarded := map[netip.Addr]bool{}
	for _, v := range pin.VIPs {
		forwarded[v.Addr] = v.Forwarded
	}
	for _, inst := range plan.Instances {
		if len(inst.VIPs) != 1 || inst.TrackFile != forwarded[inst.VIPs[0]] {
			t.Errorf("%s %v: TrackFile %v", inst.Name, inst.VIPs, inst.TrackFile)
		}
	}
}

// flakyNFT is an nftables table whose writes fail while fail is set.
type flakyNFT struct {
	knftables.Interface
	fail bool
}

func (f *flakyNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if f.fail {
		return errors.New("nft: Operation not permitted")
	}
	return f.Interface.Run(ctx, tx)
}

// TestCanForward checks what the IPVS step tells the VRRP step: a node
// forwards when it runs IPVS, the kernel has it, and keeplb's nftables
// table is open and was written; a failed write stops it until a write
// succeeds again.
func TestCanForward(t *testing.T) {
	var none *ipvsStep // --ipvs=false
	if none.canForward() {
		t.Error("without the IPVS step: can forward")
	}
	flaky := &flakyNFT{Interface: knftables.NewFake(nft.Family, nft.Table)}
	f := newIPVSFixture(t, func(_ *Options, k *Kernel) { k.NFT = flaky })
	in := ipvsCluster()
	f.sync(t, in)
	if !f.step.canForward() {
		t.Fatal("after a good sync: cannot forward")
	}
	flaky.fail = true
	in.Services = append(in.Services, fwdService("api", "192.0.2.2", 443, 30443)) // a change: the table is written again
	if err := f.step.syncAll(t.Context(), in); err == nil {
		t.Error("a failed nft write did not fail the sync")
	}
	if f.step.canForward() {
		t.Error("after a failed nft write: can forward")
	}
	// Nothing changed, but the table is not what it must be: written again.
	flaky.fail = false
	f.sync(t, in)
	if !f.step.canForward() {
		t.Error("after the table was written again: cannot forward")
	}

	noNFT := newIPVSFixture(t, func(_ *Options, k *Kernel) { k.NFT = nil })
	noNFT.sync(t, in)
	if noNFT.step.canForward() {
		t.Error("without nftables: can forward")
	}
	o := NewOptions()
	o.NodeName, o.IPVS = "n1", true
	noKernel := newIPVSStep(o, Kernel{NFT: fakeNFT()}, metrics.NewSpeaker(), nil)
	if noKernel.canForward() {
		t.Error("without IPVS in the kernel: can forward")
	}
}

// TestObserveMetrics checks the fail-static and can-forward metrics.
func TestObserveMetrics(t *testing.T) {
	o := NewOptions()
	o.NodeName = "n1"
	m := metrics.NewSpeaker()
	s := &Speaker{opts: o, metrics: m}
	nodes := []*v1.Node{node("n1", "10.0.0.1"), node("n2", "10.0.0.2"), node("n3", "10.0.0.3")}
	for _, n := range nodes[1:] {
		n.Status.Conditions[0].Status = v1.ConditionUnknown
	}
	in := dataplane.Inputs{Class: "keeplb.io/vip", DefaultClass: true, Nodes: nodes,
		Pools:    []*v1alpha1.IPPool{ippool("p", []string{"192.0.2.0/24"}, nil)},
		Services: []*v1.Service{lbService("ns", "web", "192.0.2.1", false, nil)}}
	pin, _ := PlanInput(in)
	s.reportObserved(t.Context(), in, desired{vrrpDesired: vrrpDesired{plan: vrrp.Compute(pin)}}, s.dp.canForward())
	if v := metric(t, m, `keeplb_vrrp_fail_static{pool="p"}`); v != 1 {
		t.Errorf("vrrp_fail_static{pool=p} = %v with 2 of 3 nodes NotReady, want 1", v)
	}
	if v := metric(t, m, "keeplb_speaker_can_forward"); v != 0 {
		t.Errorf("speaker_can_forward = %v without the IPVS step, want 0", v)
	}
	nodes[1].Status.Conditions[0].Status = v1.ConditionTrue
	pin, _ = PlanInput(in)
	s.reportObserved(t.Context(), in, desired{vrrpDesired: vrrpDesired{plan: vrrp.Compute(pin)}}, s.dp.canForward())
	if v := metric(t, m, `keeplb_vrrp_fail_static{pool="p"}`); v != -1 {
		t.Errorf("vrrp_fail_static{pool=p} = %v with 1 of 3 nodes NotReady, want no series", v)
	}
}
