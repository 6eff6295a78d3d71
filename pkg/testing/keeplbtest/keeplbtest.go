// Package keeplbtest puts keeplb on a test control plane (package
// controlplane): its CRD, namespace and RBAC from manifests/, its
// controller running in the test process as its ServiceAccount, and
// IPPools from YAML, speakers in network namespaces. The end-to-end tests of the speaker and the dataplane
// share it.
package keeplbtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
)

// The identities of manifests/: the tests run keeplb as them, so they
// prove the ClusterRoles are enough.
const (
	ControllerUser = "system:serviceaccount:keeplb-system:keeplb-controller"
	SpeakerUser    = "system:serviceaccount:keeplb-system:keeplb-speaker"
)

// Groups are a ServiceAccount's groups in keeplb-system.
var Groups = []string{"system:serviceaccounts", "system:serviceaccounts:keeplb-system", "system:authenticated"}

// Manifest returns the absolute path of manifests/rel, looking for the
// repository from the working directory upwards (go test runs a package's
// tests in its folder).
func Manifest(tb testing.TB, rel string) string {
	tb.Helper()
	dir, err := os.Getwd()
	if err != nil {
		tb.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "manifests", "kustomization.yaml")); err == nil {
			return filepath.Join(d, "manifests", rel)
		}
		if filepath.Dir(d) == d {
			tb.Fatalf("no manifests/ in %s or above", dir)
		}
	}
}

// Install applies the IPPool CRD, the namespace and the RBAC of the
// controller and the speaker.
func Install(tb testing.TB, cp *controlplane.ControlPlane) {
	tb.Helper()
	files := []string{"crd/ippools.keeplb.io.yaml", "namespace.yaml", "controller/rbac.yaml", "speaker/rbac.yaml"}
	for i, f := range files {
		files[i] = Manifest(tb, f)
	}
	if err := cp.Apply(tb.Context(), files...); err != nil {
		tb.Fatalf("install keeplb's manifests: %v", err)
	}
}

// StartController runs keeplb's controller as its ServiceAccount, without
// leader election or metrics unless mods say otherwise, until the test
// ends; a controller that stops on its own fails the test.
func StartController(tb testing.TB, cp *controlplane.ControlPlane, mods ...func(*controller.Options)) {
	tb.Helper()
	o := controller.NewOptions()
	o.MetricsBindAddress, o.LeaderElect = "0", false
	for _, m := range mods {
		m(o)
	}
	cfg := cp.ImpersonatedConfig(ControllerUser, Groups...)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := controller.RunWithConfig(ctx, o, cfg); err != nil && ctx.Err() == nil {
			tb.Errorf("controller: %v", err)
		}
	}()
	tb.Cleanup(func() { cancel(); <-done })
}

// RunDir is the run folder StartSpeaker gives node's speaker (unless its
// mods set another): its keepalived.conf, track files and notify FIFO.
func RunDir(node string) string { return filepath.Join(os.TempDir(), "keeplb-e2e-"+node) }

// StartSpeaker runs the speaker of node, whose node side is the network
// namespace of the same name (--netns), as the speaker's ServiceAccount
// through admin (an admin config), with a fresh run folder, no metrics and
// syncs at most every 50 ms unless mods say otherwise. stop stops it
// gracefully (keepalived gets SIGTERM) and waits; the test's end calls it
// too. A speaker that stops on its own fails the test.
func StartSpeaker(tb testing.TB, admin *rest.Config, node string, mods ...func(*speaker.Options)) (stop func()) {
	tb.Helper()
	o := speaker.NewOptions()
	o.NodeName, o.NetNS, o.MetricsBindAddress = node, node, "0"
	o.RunDir = RunDir(node)
	o.MinSyncInterval = 50 * time.Millisecond
	for _, m := range mods {
		m(o)
	}
	_ = os.RemoveAll(o.RunDir)
	if err := os.MkdirAll(o.RunDir, 0o755); err != nil {
		tb.Fatal(err)
	}
	cfg := rest.CopyConfig(admin)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: SpeakerUser, Groups: Groups}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		k, err := speaker.OpenKernel(ctx, o)
		if err == nil {
			defer k.Close()
			err = speaker.RunWith(ctx, o, cfg, k)
		}
		if err != nil && ctx.Err() == nil {
			tb.Errorf("speaker %s: %v", node, err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	tb.Cleanup(stop)
	return stop
}

// Speakers are the running speakers of a test, by node, so that the test
// can stop one (gracefully) and start it again. Safe for concurrent use.
type Speakers struct {
	tb    testing.TB
	admin *rest.Config
	mods  []func(*speaker.Options)
	mu    sync.Mutex
	stops map[string]func()
}

// NewSpeakers returns an empty set whose speakers StartSpeaker runs with
// admin and mods.
func NewSpeakers(tb testing.TB, admin *rest.Config, mods ...func(*speaker.Options)) *Speakers {
	return &Speakers{tb: tb, admin: admin, mods: mods, stops: map[string]func(){}}
}

// Start runs node's speaker (see StartSpeaker), with more mods if given.
func (s *Speakers) Start(node string, mods ...func(*speaker.Options)) {
	stop := StartSpeaker(s.tb, s.admin, node, append(slices.Clone(s.mods), mods...)...)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stops[node] = stop
}

// Stop stops node's speaker gracefully and waits for it; a node without a
// running speaker is left alone.
func (s *Speakers) Stop(node string) {
	s.mu.Lock()
	stop := s.stops[node]
	delete(s.stops, node)
	s.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// CreatePool creates the IPPool name with the spec given in YAML.
func CreatePool(tb testing.TB, dyn dynamic.Interface, name, specYAML string) {
	tb.Helper()
	var spec map[string]any
	if err := yaml.Unmarshal([]byte(specYAML), &spec); err != nil {
		tb.Fatalf("IPPool %s: %v", name, err)
	}
	u := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
	u.SetAPIVersion(v1alpha1.SchemeGroupVersion.String())
	u.SetKind(v1alpha1.IPPoolKind)
	u.SetName(name)
	if _, err := dyn.Resource(v1alpha1.IPPoolResource).Create(tb.Context(), u, metav1.CreateOptions{}); err != nil {
		tb.Fatal(fmt.Errorf("create IPPool %s: %w", name, err))
	}
}
