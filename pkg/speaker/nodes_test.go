package speaker

import (
	"net/netip"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/keeplb/keeplb/pkg/metrics"
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
	pin, _ := PlanInput(Inputs{Nodes: badNodes()})
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
				s.warnNodes(t.Context(), nodes)
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
			s.warnNodes(t.Context(), nodes)
			if got := drain(rec); len(got) != 1 || !strings.Contains(got[0], "loopback") {
				t.Errorf("after the Node changed: %q, want one event about the loopback address", got)
			}
		})
	}
}
