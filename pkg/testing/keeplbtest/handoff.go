package keeplbtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/speaker"
)

// speakerNamespace is where manifests/ run the speakers.
const speakerNamespace = "keeplb-system"

// podFinalizer holds a deleted speaker Pod in the API until its speaker
// has read it at exit, as a kubelet's graceful termination does.
const podFinalizer = "keeplb.io/e2e-terminating"

// HandoffDir is the hand-off directory of node's speakers: outside its run
// folder, which StartSpeaker empties, so that a restarted speaker finds
// the record its predecessor wrote.
func HandoffDir(node string) string {
	return filepath.Join(os.TempDir(), "keeplb-e2e-handoff-"+node)
}

// SpeakerPods stands for the speakers' DaemonSet and its Pods in a test
// without kubelets or a controller manager: the objects a speaker reads
// at exit to decide whether to hand off (speaker.DecideHandoff). A
// rolling update is Roll: the node's Pod deleted, then its speaker
// stopped.
type SpeakerPods struct {
	tb     testing.TB
	client kubernetes.Interface
	ds     *appsv1.DaemonSet

	mu   sync.Mutex
	pods map[string]string // node → the name of its current Pod
	seq  int
}

// NewSpeakerPods creates the DaemonSet keeplb-speaker with client (an
// admin's) and empties the nodes' hand-off directories.
func NewSpeakerPods(tb testing.TB, client kubernetes.Interface, nodes ...string) *SpeakerPods {
	tb.Helper()
	labels := map[string]string{"app.kubernetes.io/component": "speaker"}
	ds, err := client.AppsV1().DaemonSets(speakerNamespace).Create(tb.Context(), &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "keeplb-speaker"},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: v1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: v1.PodSpec{Containers: []v1.Container{{Name: "speaker", Image: "keeplb"}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("create the speakers' DaemonSet: %v", err)
	}
	for _, n := range nodes {
		dir := HandoffDir(n)
		_ = os.RemoveAll(dir)
		tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	return &SpeakerPods{tb: tb, client: client, ds: ds, pods: map[string]string{}}
}

// Mods creates a new Pod of the DaemonSet on node and returns the options
// of a speaker running as it: --handoff=auto, its Pod's name and
// namespace, and node's hand-off directory.
func (p *SpeakerPods) Mods(node string) func(*speaker.Options) {
	p.tb.Helper()
	p.mu.Lock()
	p.seq++
	name := fmt.Sprintf("keeplb-speaker-%d", p.seq)
	p.pods[node] = name
	p.mu.Unlock()
	yes := true
	tmpl := p.ds.Spec.Template
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: tmpl.Labels, Finalizers: []string{podFinalizer},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: p.ds.Name, UID: p.ds.UID, Controller: &yes}}},
		Spec: tmpl.Spec,
	}
	pod.Spec.NodeName = node
	if _, err := p.client.CoreV1().Pods(speakerNamespace).Create(p.tb.Context(), pod, metav1.CreateOptions{}); err != nil {
		p.tb.Fatalf("create the speaker Pod of %s: %v", node, err)
	}
	p.tb.Cleanup(func() { p.release(name) })
	return func(o *speaker.Options) {
		o.Handoff, o.HandoffDir = speaker.HandoffAuto, HandoffDir(node)
		o.PodName, o.PodNamespace = name, speakerNamespace
	}
}

// Roll replaces node's speaker as a rolling update does: its Pod is
// deleted (the speaker then hands off), then stop stops the speaker.
func (p *SpeakerPods) Roll(node string, stop func()) {
	p.tb.Helper()
	p.mu.Lock()
	name := p.pods[node]
	p.mu.Unlock()
	if err := p.client.CoreV1().Pods(speakerNamespace).Delete(p.tb.Context(), name, metav1.DeleteOptions{}); err != nil {
		p.tb.Fatalf("delete the speaker Pod of %s: %v", node, err)
	}
	stop()
	p.release(name)
}

// release lets a deleted Pod go.
func (p *SpeakerPods) release(name string) {
	// Not tb.Context: this runs in cleanups too, after it is cancelled.
	_, _ = p.client.CoreV1().Pods(speakerNamespace).Patch(context.Background(), name, types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{})
}

// FreeAddr returns a loopback address with a port free right now, for a
// metrics and health server.
func FreeAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = l.Close() }() // it only found a free port
	return l.Addr().String()
}
