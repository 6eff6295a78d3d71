package handoff

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func TestDecide(t *testing.T) {
	now := metav1.Now()
	yes := true
	ds := func() *appsv1.DaemonSet {
		return &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker", UID: types.UID("ds-1")},
			Spec: appsv1.DaemonSetSpec{Template: v1.PodTemplateSpec{Spec: v1.PodSpec{
				NodeSelector: map[string]string{"kubernetes.io/os": "linux"},
				Tolerations:  []v1.Toleration{{Key: "node.kubernetes.io/not-ready", Operator: v1.TolerationOpExists, Effect: v1.TaintEffectNoExecute}},
			}}}}
	}
	pod := func() *v1.Pod {
		return &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker-x", DeletionTimestamp: &now,
			OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: "keeplb-speaker", UID: "ds-1", Controller: &yes}}}}
	}
	node := func() *v1.Node {
		return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{"kubernetes.io/os": "linux"}},
			Spec: v1.NodeSpec{Taints: []v1.Taint{{Key: "node.kubernetes.io/not-ready", Effect: v1.TaintEffectNoExecute}}}}
	}
	namespace := func() *v1.Namespace {
		return &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "keeplb-system"}, Status: v1.NamespaceStatus{Phase: v1.NamespaceActive}}
	}
	for name, tc := range map[string]struct {
		ns     func(*v1.Namespace) *v1.Namespace
		change func(*v1.Pod, *appsv1.DaemonSet, *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node)
		want   bool
		why    string
	}{
		"rolling update": {want: true, why: "will start a replacement"},
		"namespace deleted": {ns: func(n *v1.Namespace) *v1.Namespace {
			n.DeletionTimestamp, n.Status.Phase = &now, v1.NamespaceTerminating
			return n
		}, why: "namespace keeplb-system is being deleted"},
		"namespace unknown": {ns: func(*v1.Namespace) *v1.Namespace { return nil }, why: "namespace is unknown"},
		"pod unknown": {change: func(_ *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			return nil, d, n
		}, why: "own Pod is unknown"},
		"kubelet stops it": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			p.DeletionTimestamp = nil
			return p, d, n
		}, why: "not being deleted"},
		"evicted": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			p.Status.Conditions = []v1.PodCondition{{Type: v1.DisruptionTarget, Status: v1.ConditionTrue, Reason: "EvictionByEvictionAPI"}}
			return p, d, n
		}, why: "disrupted (EvictionByEvictionAPI"},
		"no owner": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			p.OwnerReferences = nil
			return p, d, n
		}, why: "no DaemonSet controls"},
		"daemonset gone": {change: func(p *v1.Pod, _ *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			return p, nil, n
		}, why: "is gone"},
		"daemonset recreated": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			d.UID = "ds-2"
			return p, d, n
		}, why: "recreated"},
		"uninstall": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			d.DeletionTimestamp = &now
			return p, d, n
		}, why: "being deleted"},
		"node deleted": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			n.DeletionTimestamp = &now
			return p, d, n
		}, why: "Node node-a is being deleted"},
		"node unselected": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			n.Labels = nil
			return p, d, n
		}, why: "no longer selects"},
		"untolerated NoExecute taint": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			n.Spec.Taints = append(n.Spec.Taints, v1.Taint{Key: "maintenance", Effect: v1.TaintEffectNoExecute})
			return p, d, n
		}, why: "taint maintenance"},
		"cordoned": {change: func(p *v1.Pod, d *appsv1.DaemonSet, n *v1.Node) (*v1.Pod, *appsv1.DaemonSet, *v1.Node) {
			// A cordoned node: the DaemonSet controller gives its pods
			// the toleration, so a replacement starts there.
			n.Spec.Taints = append(n.Spec.Taints, v1.Taint{Key: "node.kubernetes.io/unschedulable", Effect: v1.TaintEffectNoSchedule})
			return p, d, n
		}, want: true, why: "will start a replacement"},
	} {
		t.Run(name, func(t *testing.T) {
			p, d, n, space := pod(), ds(), node(), namespace()
			if tc.change != nil {
				p, d, n = tc.change(p, d, n)
			}
			if tc.ns != nil {
				space = tc.ns(space)
			}
			got, why := Decide(p, space, d, n)
			if got != tc.want || !strings.Contains(why, tc.why) {
				t.Errorf("Decide = %v, %q; want %v, containing %q", got, why, tc.want, tc.why)
			}
		})
	}
}
