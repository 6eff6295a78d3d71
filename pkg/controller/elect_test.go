package controller

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func electOptions() *Options {
	o := NewOptions()
	o.Identity = "me"
	o.LeaderElectNamespace = "ns"
	o.LeaseDuration, o.RenewDeadline, o.RetryPeriod = 3*time.Second, 2*time.Second, 200*time.Millisecond
	return o
}

// holder returns the Lease's holder, "" when released or absent.
func holder(t *testing.T, client *fake.Clientset, o *Options) string {
	t.Helper()
	l, err := client.CoordinationV1().Leases(o.LeaderElectNamespace).Get(context.Background(), o.LeaderElectName, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// The Lease is released only after the work has returned. On main
// ReleaseOnCancel released it as soon as the context ended, while the
// workers could still write.
func TestLeaseOutlivesTheWork(t *testing.T) {
	o := electOptions()
	client := fake.NewClientset()
	c := &Controller{opts: o, leases: client, fence: newFence(time.Second)}
	ctx, cancel := context.WithCancel(t.Context())
	var heldWhileStopping atomic.Value
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- c.elect(ctx, func(ctx context.Context) error {
			close(started)
			<-ctx.Done()
			// Still finishing: nobody else may lead yet.
			time.Sleep(300 * time.Millisecond)
			heldWhileStopping.Store(holder(t, client, o))
			return nil
		})
	}()
	<-started
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("elect: %v", err)
	}
	if got := heldWhileStopping.Load(); got != "me" {
		t.Fatalf("while the work was stopping the Lease was held by %q, want me", got)
	}
	if got := holder(t, client, o); got != "" {
		t.Fatalf("after the work stopped the Lease is held by %q, want released", got)
	}
}

// A leader whose work fails gives up the Lease and returns the error, so
// that its pod restarts; on main it renewed the Lease and did nothing.
func TestFailedWorkEndsTheLead(t *testing.T) {
	o := electOptions()
	client := fake.NewClientset()
	c := &Controller{opts: o, leases: client, fence: newFence(time.Second)}
	boom := errors.New("boom")
	done := make(chan error, 1)
	go func() { done <- c.elect(t.Context(), func(context.Context) error { return boom }) }()
	select {
	case err := <-done:
		if !errors.Is(err, boom) {
			t.Fatalf("elect returned %v, want %v", err, boom)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a leader whose work failed kept leading")
	}
	if got := holder(t, client, o); got != "" {
		t.Fatalf("Lease still held by %q", got)
	}
}

// A replica stopped before it ever leads returns at once, holding nothing.
func TestStopWhileWaiting(t *testing.T) {
	o := electOptions()
	client := fake.NewClientset()
	other := &Controller{opts: electOptions(), leases: client, fence: newFence(time.Second)}
	other.opts.Identity = "other"
	otherCtx, stopOther := context.WithCancel(t.Context())
	defer stopOther()
	leading := make(chan struct{})
	go func() {
		_ = other.elect(otherCtx, func(ctx context.Context) error { close(leading); <-ctx.Done(); return nil })
	}()
	<-leading
	c := &Controller{opts: o, leases: client, fence: newFence(time.Second)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- c.elect(ctx, func(context.Context) error { t.Error("a standby ran the work"); return nil })
	}()
	time.Sleep(500 * time.Millisecond) // a few retry periods as a standby
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("elect: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a standby did not stop")
	}
	if got := holder(t, client, o); got != "other" {
		t.Fatalf("Lease held by %q, want other", got)
	}
}
