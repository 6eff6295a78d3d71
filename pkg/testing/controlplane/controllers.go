package controlplane

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Names of the binaries expected in Options.ControllersDir.
const (
	controllerManagerBin = "kube-controller-manager"
	schedulerBin         = "kube-scheduler"
)

// ClusterCIDR is the pod network the controller manager's node IPAM
// divides into the Nodes' podCIDRs, one /24 each.
const ClusterCIDR = "10.244.0.0/16"

// controllersReadyTimeout bounds the wait for the controller manager's
// first work (the default ServiceAccount), which takes seconds cold.
const controllersReadyTimeout = 90 * time.Second

// startControllers starts kube-controller-manager and kube-scheduler with
// the admin kubeconfig, on free loopback ports, without leader election
// (there is one of each), and waits until the ServiceAccount controller
// made the default ServiceAccount: the controllers then work.
func (c *ControlPlane) startControllers(ctx context.Context, logs *logSink) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	bin := func(name string) string { return filepath.Join(c.controllersDir, name) }
	c.kcm, err = startProcess(controllerManagerBin, bin(controllerManagerBin), c.path(controllerManagerBin+".log"), logs,
		"--kubeconfig="+c.kubeconfig,
		"--authentication-kubeconfig="+c.kubeconfig,
		"--authorization-kubeconfig="+c.kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[0]),
		"--leader-elect=false",
		// Each controller acts as its own ServiceAccount, under the RBAC
		// roles the apiserver bootstraps, as in a real cluster.
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+c.path("sa.key"),
		// The ca.crt of every ServiceAccount token: the apiserver's own
		// self-signed certificate, which pods then verify it by.
		"--root-ca-file="+filepath.Join(c.path("certs"), "apiserver.crt"),
		"--allocate-node-cidrs=true",
		"--cluster-cidr="+ClusterCIDR,
		"--node-cidr-mask-size-ipv4=24",
		"--controllers=*",
	)
	if err != nil {
		return fmt.Errorf("start %s: %w", controllerManagerBin, err)
	}
	c.scheduler, err = startProcess(schedulerBin, bin(schedulerBin), c.path(schedulerBin+".log"), logs,
		"--kubeconfig="+c.kubeconfig,
		"--authentication-kubeconfig="+c.kubeconfig,
		"--authorization-kubeconfig="+c.kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[1]),
		"--leader-elect=false",
	)
	if err != nil {
		return fmt.Errorf("start %s: %w", schedulerBin, err)
	}
	client, err := kubernetes.NewForConfig(c.AdminConfig())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, controllersReadyTimeout)
	defer cancel()
	for {
		_, err := client.CoreV1().ServiceAccounts(metav1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsNotFound(err) && ctx.Err() == nil {
			return fmt.Errorf("waiting for the default ServiceAccount: %w", err)
		}
		for _, p := range []*process{c.kcm, c.scheduler} {
			if p.exited() {
				return fmt.Errorf("%s exited: %w\n%s", p.name, p.exitError(), c.logTails(controllerManagerBin, schedulerBin))
			}
		}
		if err := c.pause(ctx, 200*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for the controller manager to create the default ServiceAccount: %w\n%s", err, c.logTails(controllerManagerBin))
		}
	}
}
