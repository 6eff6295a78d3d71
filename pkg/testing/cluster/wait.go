package cluster

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// WaitPods waits until namespace has at least n pods matching selector and
// every one of them is Ready, or until d passes. It gives up early when a
// container keeps failing (CrashLoopBackOff, or an image that cannot be
// had): the error then names the pod and carries Diagnose's report.
func (c *Cluster) WaitPods(ctx context.Context, namespace, selector string, n int, d time.Duration) ([]corev1.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var last string
	for {
		pods, err := c.Client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err == nil {
			ready := 0
			for i := range pods.Items {
				p := &pods.Items[i]
				if podReady(p) {
					ready++
				}
				if why := stuck(p); why != "" {
					return nil, fmt.Errorf("pod %s/%s: %s\n%s", p.Namespace, p.Name, why, c.Diagnose(ctx))
				}
			}
			if ready >= n && ready == len(pods.Items) {
				return pods.Items, nil
			}
			last = fmt.Sprintf("%d of %d pods Ready (want %d)", ready, len(pods.Items), n)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pods %q in %s after %s: %s\n%s", selector, namespace, d, last, c.Diagnose(ctx))
		case <-time.After(time.Second):
		}
	}
}

// stuck says why a pod will not become Ready without help, or "".
func stuck(p *corev1.Pod) string {
	for _, cs := range append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		if w := cs.State.Waiting; w != nil {
			switch w.Reason {
			case "CrashLoopBackOff":
				if cs.RestartCount >= 2 {
					return fmt.Sprintf("container %s: CrashLoopBackOff after %d restarts: %s", cs.Name, cs.RestartCount, w.Message)
				}
			case "ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError":
				return fmt.Sprintf("container %s: %s: %s", cs.Name, w.Reason, w.Message)
			}
		}
	}
	return ""
}
