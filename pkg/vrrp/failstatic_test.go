package vrrp

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

func TestFailStaticRule(t *testing.T) {
	for _, tc := range []struct {
		members, unready int
		want             bool
	}{
		{0, 0, false}, {1, 0, false}, {1, 1, true}, {2, 1, false}, {2, 2, true},
		{3, 1, false}, {3, 2, true}, {4, 2, false}, {4, 3, true}, {5, 2, false}, {5, 3, true},
	} {
		if got := FailStatic(tc.members, tc.unready); got != tc.want {
			t.Errorf("FailStatic(%d, %d) = %v, want %v", tc.members, tc.unready, got, tc.want)
		}
	}
}

// TestFailStatic checks that when more than half of a pool's members go
// NotReady the plan is the all-Ready plan, with a FailStatic warning, and
// that up to half NotReady still takes them out.
func TestFailStatic(t *testing.T) {
	vips := append(shared("p", seq("192.0.2.1", 40)), shared("p", seq("2001:db8::1", 10))...)
	vips = append(vips, local("p", netip.MustParseAddr("198.51.100.1"), 0, "node-0"))
	withDown := func(down ...int) Input {
		nodes := readyNodes(5)
		for _, i := range down {
			nodes[i].Ready = false
		}
		return Input{Nodes: nodes, Pools: []Pool{{Name: "p", FirstVRID: 1, LastVRID: 255}}, VIPs: vips}
	}
	all := Compute(withDown())
	for _, down := range [][]int{{0, 1, 2}, {4, 2, 0, 1}, {0, 1, 2, 3, 4}} {
		p := Compute(withDown(down...))
		if !reflect.DeepEqual(p.Instances, all.Instances) {
			t.Errorf("%d of 5 NotReady: the plan differs from the all-Ready one", len(down))
		}
		fs := problemsWith(p, ReasonFailStatic)
		if len(fs) != 2 { // one per family
			t.Fatalf("%d of 5 NotReady: FailStatic problems %v, want one per family", len(down), fs)
		}
		for _, pr := range fs {
			if pr.Severity != Warning || pr.Pool != "p" || !strings.Contains(pr.Message, fmt.Sprintf("%d of the 5 nodes", len(down))) || !strings.Contains(pr.Message, "node-0") {
				t.Errorf("problem %v", pr)
			}
		}
		if len(problemsWith(p, ReasonNoEligibleNode)) != 0 {
			t.Errorf("%d of 5 NotReady: NoEligibleNode reported", len(down))
		}
	}
	for _, down := range [][]int{{0}, {0, 3}} {
		p := Compute(withDown(down...))
		if len(problemsWith(p, ReasonFailStatic)) != 0 {
			t.Errorf("%d of 5 NotReady: FailStatic reported", len(down))
		}
		for _, inst := range p.Instances {
			for _, i := range down {
				if _, ok := inst.Priorities[fmt.Sprintf("node-%d", i)]; ok {
					t.Errorf("%d of 5 NotReady: %s lists NotReady node-%d", len(down), inst.Name, i)
				}
			}
		}
	}
}

// TestFailStaticPerPool checks that the rule counts each pool's own
// members: excluded nodes and nodes outside the selector do not count.
func TestFailStaticPerPool(t *testing.T) {
	nodes := readyNodes(6)
	for i := range nodes {
		nodes[i].Labels = map[string]string{"edge": fmt.Sprint(i < 2)}
	}
	nodes[0].Ready, nodes[1].Ready = false, false // both edge nodes
	nodes[5].Ready, nodes[5].Labels[ExcludeLabel] = false, ""
	in := Input{
		Nodes: nodes,
		Pools: []Pool{
			{Name: "edge", FirstVRID: 1, LastVRID: 50, NodeSelector: labels.SelectorFromSet(labels.Set{"edge": "true"})},
			{Name: "core", FirstVRID: 51, LastVRID: 100, NodeSelector: labels.SelectorFromSet(labels.Set{"edge": "false"})},
		},
		VIPs: append(shared("edge", seq("192.0.2.1", 8)), shared("core", seq("192.0.2.101", 8))...),
	}
	p := Compute(in)
	var pools []string
	for _, pr := range problemsWith(p, ReasonFailStatic) {
		pools = append(pools, pr.Pool)
	}
	if !slices.Equal(pools, []string{"edge"}) {
		t.Fatalf("FailStatic for %v, want only edge (its two members NotReady)", pools)
	}
	for _, inst := range p.Instances {
		var got []string
		for n := range inst.Priorities {
			got = append(got, n)
		}
		slices.Sort(got)
		want := []string{"node-0", "node-1"}
		if inst.Pool == "core" {
			// node-5 is excluded: it counts neither way.
			want = []string{"node-2", "node-3", "node-4"}
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: nodes %v, want %v", inst.Name, got, want)
		}
	}
}
