package cluster_test

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/testing/cluster"
)

// envDemo makes TestDemoCluster run (make demo-cluster sets it); with
// "hold", it keeps the cluster up until interrupted.
const envDemo = "KEEPLB_DEMO_CLUSTER"

// TestDemoCluster is make demo-cluster: keeplb installed from its image
// with kubectl apply -k on a three-node cluster, the docs' examples, and
// what a user looks at: the pods next to the Services, and an answer
// through every VIP. It runs only when make demo-cluster asks.
func TestDemoCluster(t *testing.T) {
	mode := os.Getenv(envDemo)
	if mode == "" {
		t.Skipf("make demo-cluster runs this (%s=1)", envDemo)
	}
	archives := strings.Fields(os.Getenv(envImages))
	if len(archives) == 0 {
		t.Skipf("needs %s: an archive of keeplb's image (make demo-cluster makes it)", envImages)
	}
	start := time.Now()
	c := cluster.Start(t, cluster.Options{ProxyMode: "nftables", Images: archives[:1]})
	ctx := t.Context()
	show := func(args ...string) {
		out, err := c.Kubectl(ctx, args...)
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		fmt.Printf("\n$ kubectl %s\n%s", strings.Join(args, " "), out)
	}
	if out, err := c.Kubectl(ctx, "apply", "--server-side", "-k", kustomizeOverlay(t, imageV1)); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	checkInstalled(t, c, waitKeeplb(t, c))
	services := applyExamples(t, c)
	for _, name := range services {
		ingress(t, c, "demo", name)
	}
	checkKeepalived(t, c)
	show("get", "nodes", "-o", "wide")
	show("get", "pods", "-A", "-o", "wide")
	show("get", "services", "-n", "demo")
	fmt.Println("\nOne request to each VIP, from outside the nodes:")
	for _, name := range services {
		ip, mode := ingress(t, c, "demo", name)
		url := fmt.Sprintf("http://%s:%d/", ip, servicePort(t, c, "demo", name))
		pod, remote := reach(t, url)
		fmt.Printf("  %-15s %-26s ipMode %-5s held by %s, served by %s, which saw %s\n", name, url, mode, holder(t, c, ip), pod, remote)
	}
	fmt.Printf("\nThe cluster came up and served in %s.\n", time.Since(start).Round(time.Second))
	if mode != "hold" {
		return
	}
	fmt.Printf("\nIt stays up until Ctrl-C. From another shell:\n  ip netns exec %s %s/kubectl --kubeconfig %s get pods -A\n",
		cluster.Namespace(), toolsDir(t), c.KubeconfigPath())
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	select {
	case <-stop:
	case <-ctx.Done():
	}
}
