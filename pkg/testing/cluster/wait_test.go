package cluster

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestStuck: WaitPods gives up at once on a pod that will not become
// Ready without help, and only on such a pod.
func TestStuck(t *testing.T) {
	waiting := func(reason string, restarts int32) corev1.ContainerStatus {
		return corev1.ContainerStatus{Name: "speaker", RestartCount: restarts,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: "m"}}}
	}
	for _, tc := range []struct {
		name string
		init bool
		cs   corev1.ContainerStatus
		want string // a part of the reason, "" for not stuck
	}{
		{"starting", false, waiting("ContainerCreating", 0), ""},
		{"one crash may be a hiccup", false, waiting("CrashLoopBackOff", 1), ""},
		{"crash loop", false, waiting("CrashLoopBackOff", 2), "CrashLoopBackOff after 2 restarts"},
		{"init container in a crash loop", true, waiting("CrashLoopBackOff", 3), "CrashLoopBackOff after 3 restarts"},
		{"image never pulled", false, waiting("ErrImageNeverPull", 0), "ErrImageNeverPull"},
		{"bad config", false, waiting("CreateContainerConfigError", 0), "CreateContainerConfigError"},
		{"running", false, corev1.ContainerStatus{Name: "speaker", State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &corev1.Pod{}
			if tc.init {
				p.Status.InitContainerStatuses = []corev1.ContainerStatus{tc.cs}
			} else {
				p.Status.ContainerStatuses = []corev1.ContainerStatus{tc.cs}
			}
			got := stuck(p)
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("stuck = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestConfigRoundTrip: what the host writes is what the VM reads.
func TestConfigRoundTrip(t *testing.T) {
	file := t.TempDir() + "/config.json"
	in := &config{Nodes: 3, ProxyMode: "nftables", Images: []string{"/a.tar"}, Tokens: map[string]string{"node1": "t"}, Dir: "/d"}
	if err := in.write(file); err != nil {
		t.Fatal(err)
	}
	out, err := readConfig(file)
	if err != nil {
		t.Fatal(err)
	}
	if out.Nodes != 3 || out.ProxyMode != "nftables" || out.Images[0] != "/a.tar" || out.Tokens["node1"] != "t" || out.Dir != "/d" {
		t.Errorf("read back %+v, wrote %+v", out, in)
	}
	if NodeAddr(2).String() != "172.18.0.12" || NodeName(2) != "node2" {
		t.Errorf("node 2 is %s at %s", NodeName(2), NodeAddr(2))
	}
}
