package keepalived_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"k8s.io/klog/v2/ktesting"

	"github.com/keeplb/keeplb/pkg/keepalived"
	keepalivedtesting "github.com/keeplb/keeplb/pkg/keepalived/testing"
)

// eventually polls cond every 5ms until it holds or 5s passed.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// stays checks that cond holds throughout d.
func stays(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if !cond() {
			t.Fatalf("%s no longer holds", what)
		}
	}
}

type supervised struct {
	fake *keepalivedtesting.Fake
	sup  *keepalived.Supervisor
	stop func() // cancels Run and waits for it to return
}

// apply applies config, failing the test if writing it fails.
func (s supervised) apply(t *testing.T, config string) {
	t.Helper()
	if _, err := s.sup.Apply([]byte(config)); err != nil {
		t.Fatal(err)
	}
}

func startSupervisor(t *testing.T, o keepalived.SupervisorOptions) supervised {
	t.Helper()
	if o.ConfigPath == "" {
		o.ConfigPath = filepath.Join(t.TempDir(), "keepalived.conf")
	}
	fake := keepalivedtesting.NewFake(o.ConfigPath)
	sup, err := keepalived.NewSupervisor(fake, o)
	if err != nil {
		t.Fatal(err)
	}
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { sup.Run(ctx) })
	stop := sync.OnceFunc(func() { cancel(); wg.Wait() })
	t.Cleanup(stop)
	return supervised{fake: fake, sup: sup, stop: stop}
}

func TestSupervisorStartsAfterFirstApply(t *testing.T) {
	s := startSupervisor(t, keepalived.SupervisorOptions{})
	stays(t, "not started before any Apply", 50*time.Millisecond, func() bool { return !s.fake.Running() })
	if _, err := s.sup.Apply([]byte("A")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "started with A", func() bool { return s.fake.Running() && string(s.fake.Config()) == "A" })
	if st := s.sup.Status(); !st.Running || st.Restarts != 0 || st.Reloads != 0 {
		t.Errorf("status %+v", st)
	}
	s.stop()
	if s.fake.Running() || s.sup.Status().Running {
		t.Error("still running after Run returned")
	}
}

func TestSupervisorStartsWithExistingFile(t *testing.T) {
	// The file already holds these bytes (say, from a previous run):
	// Apply changes nothing but still starts keepalived.
	path := filepath.Join(t.TempDir(), "keepalived.conf")
	if _, err := keepalived.WriteAtomic(path, []byte("A")); err != nil {
		t.Fatal(err)
	}
	s := startSupervisor(t, keepalived.SupervisorOptions{ConfigPath: path})
	if changed, err := s.sup.Apply([]byte("A")); err != nil || changed {
		t.Fatalf("Apply = %v, %v; want unchanged", changed, err)
	}
	eventually(t, "started", s.fake.Running)
}

func TestSupervisorReloadsOncePerBurst(t *testing.T) {
	const window = 200 * time.Millisecond
	s := startSupervisor(t, keepalived.SupervisorOptions{ReloadWindow: window})
	s.apply(t, "v0")
	eventually(t, "started", s.fake.Running)

	start := time.Now()
	for i := 1; i <= 10; i++ {
		changed, err := s.sup.Apply(fmt.Appendf(nil, "v%d", i))
		if err != nil || !changed {
			t.Fatalf("Apply v%d = %v, %v", i, changed, err)
		}
	}
	// The burst is one reload when it fits in the window; on a machine so
	// loaded that ten writes took longer, each window it spans may reload.
	want := 1 + int(time.Since(start)/window)
	if want > 1 {
		t.Logf("the burst took %s, longer than the %s window: up to %d reloads", time.Since(start), window, want)
	}
	eventually(t, "the last bytes loaded", func() bool { return string(s.fake.Config()) == "v10" })
	stays(t, "reloads within the burst's windows", 2*window, func() bool { return s.fake.Reloads() >= 1 && s.fake.Reloads() <= want })
	if st := s.sup.Status(); st.Reloads != s.fake.Reloads() {
		t.Errorf("Status().Reloads = %d, keepalived saw %d", st.Reloads, s.fake.Reloads())
	}
}

func TestSupervisorNeverReloadsIdenticalBytes(t *testing.T) {
	const window = 50 * time.Millisecond
	s := startSupervisor(t, keepalived.SupervisorOptions{ReloadWindow: window})
	s.apply(t, "A")
	eventually(t, "started", s.fake.Running)

	// The same bytes: nothing written, nothing reloaded.
	if changed, _ := s.sup.Apply([]byte("A")); changed {
		t.Error("Apply of identical bytes reported a change")
	}
	// A change and back within the window: the file changed twice, but
	// keepalived already runs these bytes.
	s.apply(t, "B")
	s.apply(t, "A")
	stays(t, "no reload", 4*window, func() bool { return s.fake.Reloads() == 0 })
	if s.fake.Starts() != 1 {
		t.Errorf("%d starts, want 1", s.fake.Starts())
	}
}

func TestSupervisorRestartsWithBackoff(t *testing.T) {
	s := startSupervisor(t, keepalived.SupervisorOptions{MinBackoff: 20 * time.Millisecond, MaxBackoff: 80 * time.Millisecond})
	s.apply(t, "A")
	eventually(t, "started", s.fake.Running)

	// While it is down, the configuration changes: the restart loads it.
	s.fake.FailStarts(3)
	crash := errors.New("segfault")
	s.fake.Crash(crash)
	s.apply(t, "B")
	eventually(t, "restarted", s.fake.Running)
	st := s.sup.Status()
	if st.Restarts != 4 { // three failed starts, then one that worked
		t.Errorf("Restarts = %d, want 4", st.Restarts)
	}
	if !st.Running || st.LastExit == nil {
		t.Errorf("status %+v", st)
	}
	if got := string(s.fake.Config()); got != "B" {
		t.Errorf("restarted with %q, want B", got)
	}
	if s.fake.Reloads() != 0 {
		t.Errorf("%d reloads; the restart should have loaded B", s.fake.Reloads())
	}
}

func TestSupervisorBackoffIsCapped(t *testing.T) {
	// Starts keep failing. With a 5ms minimum doubling up to a 20ms cap,
	// one second fits about 50 attempts; without the cap, 7.
	s := startSupervisor(t, keepalived.SupervisorOptions{MinBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	s.fake.FailStarts(1_000_000)
	s.apply(t, "A")
	time.Sleep(time.Second) // the time to count attempts in
	s.stop()
	if r := s.sup.Status().Restarts; r < 20 {
		t.Errorf("%d restarts in 1s; backoff not capped at 20ms?", r)
	}
}

func TestSupervisorStopsOnCancel(t *testing.T) {
	s := startSupervisor(t, keepalived.SupervisorOptions{})
	s.apply(t, "A")
	eventually(t, "started", s.fake.Running)
	s.stop()
	if s.fake.Running() {
		t.Error("keepalived still running after Run returned")
	}
	if st := s.sup.Status(); st.Running || st.Restarts != 0 {
		t.Errorf("status %+v after stop", st)
	}
}

func TestNewSupervisorValidates(t *testing.T) {
	if _, err := keepalived.NewSupervisor(keepalivedtesting.NewFake("x"), keepalived.SupervisorOptions{}); err == nil {
		t.Error("NewSupervisor accepted an empty ConfigPath")
	}
}
