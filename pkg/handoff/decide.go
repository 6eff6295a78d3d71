package handoff

import (
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1helpers "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
)

// Decide says whether a speaker told to stop should hand off: only when a
// replacement will start on the same node soon, which is when its own
// Pod is being deleted (a DaemonSet rolling update, `kubectl rollout
// restart`, `kubectl delete pod`), not for a disruption (eviction, the
// node shutting down: the DisruptionTarget condition), in a namespace
// that is not being deleted (`kubectl delete -k` deletes the namespace
// first, and its pods may go before their DaemonSet does), by a
// DaemonSet that owns it, is not being deleted (keeplb removed), and
// still selects this node (its template's node selector, required node
// affinity and tolerations of the node's NoExecute taints). Any of them
// missing (nil, or unknown because the API server did not answer) means
// no: the speaker then stops as before, its VIPs move at once, and it
// leaves no forwarding behind. why says which rule decided, for the log.
func Decide(pod *v1.Pod, ns *v1.Namespace, ds *appsv1.DaemonSet, node *v1.Node) (handoff bool, why string) {
	switch {
	case pod == nil:
		return false, "the speaker's own Pod is unknown (set POD_NAME and POD_NAMESPACE, and let the speaker get pods)"
	case pod.DeletionTimestamp == nil:
		return false, "the Pod is not being deleted: the kubelet stops it (node shutdown, eviction, or a failed liveness probe)"
	}
	for _, c := range pod.Status.Conditions {
		if c.Type == v1.DisruptionTarget && c.Status == v1.ConditionTrue {
			return false, fmt.Sprintf("the Pod is disrupted (%s: %s)", c.Reason, c.Message)
		}
	}
	switch {
	case ns == nil:
		return false, "the Pod's namespace is unknown"
	case ns.DeletionTimestamp != nil || ns.Status.Phase == v1.NamespaceTerminating:
		return false, fmt.Sprintf("namespace %s is being deleted", ns.Name)
	}
	ref := metav1.GetControllerOfNoCopy(pod)
	switch {
	case ref == nil || ref.Kind != "DaemonSet":
		return false, "no DaemonSet controls the Pod"
	case ds == nil:
		return false, fmt.Sprintf("DaemonSet %s is gone", ref.Name)
	case ds.UID != ref.UID:
		return false, fmt.Sprintf("DaemonSet %s was recreated: it does not control this Pod", ref.Name)
	case ds.DeletionTimestamp != nil:
		return false, fmt.Sprintf("DaemonSet %s is being deleted", ds.Name)
	case node == nil:
		return false, "the Node is unknown"
	case node.DeletionTimestamp != nil:
		return false, fmt.Sprintf("Node %s is being deleted", node.Name)
	}
	tmpl := &v1.Pod{Spec: ds.Spec.Template.Spec}
	if ok, err := nodeaffinity.GetRequiredNodeAffinity(tmpl).Match(node); err != nil || !ok {
		return false, fmt.Sprintf("DaemonSet %s no longer selects Node %s (node selector or required node affinity)", ds.Name, node.Name)
	}
	if t, found := corev1helpers.FindMatchingUntoleratedTaint(klog.Background(), node.Spec.Taints, tmpl.Spec.Tolerations, func(t *v1.Taint) bool {
		return t.Effect == v1.TaintEffectNoExecute
	}, false); found {
		return false, fmt.Sprintf("DaemonSet %s does not tolerate Node %s's taint %s", ds.Name, node.Name, t.ToString())
	}
	return true, fmt.Sprintf("DaemonSet %s will start a replacement on Node %s", ds.Name, node.Name)
}
