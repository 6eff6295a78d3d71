package controlplane

import (
	"encoding/json"
	"os"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// clusterToolsEnv names the folder hack/cluster-tools.sh prints.
const clusterToolsEnv = "KEEPLB_CLUSTER_TOOLS_DIR"

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, timeout time.Duration, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s (last error %v)", what, timeout, last)
}

// TestControllers starts the control plane with the real controller
// manager and scheduler, and checks each does its job: a Deployment
// becomes a ReplicaSet and Pods, a Service gets an EndpointSlice, a Node
// gets a podCIDR from the cluster CIDR, and the scheduler binds the Pods
// to it.
func TestControllers(t *testing.T) {
	dir := os.Getenv(clusterToolsEnv)
	if dir == "" {
		t.Skip(clusterToolsEnv + " is not set (hack/cluster-tools.sh builds the controller manager and scheduler)")
	}
	if os.Getenv(toolsDirEnv) == "" {
		t.Skip(toolsDirEnv + " is not set")
	}
	cp, err := Start(t.Context(), Options{ControllersDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cp.Stop() }()
	client, err := kubernetes.NewForConfig(cp.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	labels := map[string]string{"app": "echo"}
	replicas := int32(2)
	if _, err := client.AppsV1().Deployments("default").Create(ctx, &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: appsv1.DeploymentSpec{Replicas: &replicas, Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: v1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: v1.PodSpec{Containers: []v1.Container{{Name: "echo", Image: "keeplb.local/echo:1"}}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec:       v1.ServiceSpec{Selector: labels, Ports: []v1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}, Status: v1.NodeStatus{
		Conditions:  []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, LastHeartbeatTime: metav1.Now()}},
		Allocatable: v1.ResourceList{v1.ResourceCPU: resource.MustParse("2"), v1.ResourceMemory: resource.MustParse("2Gi"), v1.ResourcePods: resource.MustParse("10")},
		Capacity:    v1.ResourceList{v1.ResourceCPU: resource.MustParse("2"), v1.ResourceMemory: resource.MustParse("2Gi"), v1.ResourcePods: resource.MustParse("10")},
	}}
	if _, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The status as a kubelet would report it; a merge patch, as node IPAM
	// may have updated the Node meanwhile.
	status, err := json.Marshal(map[string]any{"status": node.Status})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Nodes().PatchStatus(ctx, "node1", status); err != nil {
		t.Fatal(err)
	}

	eventually(t, "the node's podCIDR (node IPAM)", time.Minute, func() (bool, error) {
		n, err := client.CoreV1().Nodes().Get(ctx, "node1", metav1.GetOptions{})
		return err == nil && n.Spec.PodCIDR != "", err
	})
	eventually(t, "two Pods bound to node1 (Deployment, ReplicaSet, scheduler)", time.Minute, func() (bool, error) {
		pods, err := client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil || len(pods.Items) != 2 {
			return false, err
		}
		for _, p := range pods.Items {
			if p.Spec.NodeName != "node1" || p.Spec.ServiceAccountName != "default" {
				return false, nil
			}
		}
		return true, nil
	})
	eventually(t, "the Service's EndpointSlice", time.Minute, func() (bool, error) {
		ss, err := client.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo"})
		return err == nil && len(ss.Items) == 1, err
	})
}
