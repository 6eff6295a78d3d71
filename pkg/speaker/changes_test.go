package speaker

import (
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestNodeHeartbeatsAreNoChange: a Node update that only a kubelet's
// heartbeat made neither triggers a sync nor asks for everything; one that
// changes the Node's view does both.
func TestNodeHeartbeatsAreNoChange(t *testing.T) {
	var p pending
	triggers := 0
	h := nodeHandlers(func(any) { p.everything() }, func() { triggers++ })
	old := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "1"},
		Status: v1.NodeStatus{
			Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Unix(1, 0)}},
			Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "10.0.0.1"}},
		},
	}
	beat := old.DeepCopy()
	beat.ResourceVersion = "2"
	beat.Status.Conditions[0].LastHeartbeatTime = metav1.Unix(2, 0)
	h.OnUpdate(old, beat)
	if ch := p.take(); triggers != 0 || ch.all {
		t.Fatalf("a heartbeat: %d triggers, everything %v; want none", triggers, ch.all)
	}
	down := beat.DeepCopy()
	down.Status.Conditions[0].Status = v1.ConditionFalse
	h.OnUpdate(beat, down)
	if ch := p.take(); triggers != 1 || !ch.all {
		t.Fatalf("NotReady: %d triggers, everything %v; want one sync of everything", triggers, ch.all)
	}
	h.OnAdd(old, false)
	h.OnDelete(old)
	if ch := p.take(); triggers != 3 || !ch.all {
		t.Fatalf("add and delete: %d triggers in all, everything %v; want 3 and everything", triggers, ch.all)
	}
}
