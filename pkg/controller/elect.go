package controller

import (
	"context"
	"errors"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// elect runs the controller, under leader election when enabled, and
// returns once nothing of its work can write any more.
//
// The order on the way out is what keeps two leaders from writing at once:
// the work stops, the fence closes and waits for the writes in flight,
// and only then is the Lease released (ReleaseOnCancel) for the next
// leader. When the lease is lost instead, the fence closes at once; the
// writes still in flight end within the fence's timeout, which is shorter
// than the time left before another replica may take the expired lease.
func (c *Controller) elect(ctx context.Context, work func(context.Context) error) error {
	o := c.opts
	if !o.LeaderElect {
		c.fence.Open()
		defer c.fence.Close()
		return work(ctx)
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: o.LeaderElectNamespace, Name: o.LeaderElectName},
		Client:     c.leases.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: o.Identity},
	}
	// The elector's context ends only once the work has stopped (or before
	// this replica ever led): its end is what releases the Lease.
	electCtx, endElection := context.WithCancel(context.WithoutCancel(ctx))
	defer endElection()
	t := &term{end: endElection, worked: make(chan struct{})}
	defer context.AfterFunc(ctx, t.stopWaiting)()
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   o.LeaseDuration,
		RenewDeadline:   o.RenewDeadline,
		RetryPeriod:     o.RetryPeriod,
		ReleaseOnCancel: true,
		Name:            Component,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(leading context.Context) { c.lead(ctx, leading, t, work) },
			OnStoppedLeading: func() {
				// Before anything else: no write may follow a lost lease.
				c.fence.Close()
				if ctx.Err() == nil {
					t.setLost()
				}
			},
		},
	})
	if err != nil {
		return err
	}
	le.Run(electCtx)
	return t.result()
}

// term is one election of this replica, as its callbacks tell elect.
type term struct {
	// end ends the election, which releases the Lease if it is held.
	end    context.CancelFunc
	worked chan struct{} // closed when the work has returned

	mu      sync.Mutex
	started bool  // the work started
	runErr  error // what the work returned
	lost    bool  // the lease was lost before ctx ended
}

// stopWaiting ends the election of a replica that never led, once elect's
// context is done; a leader's election ends when its work has returned.
func (t *term) stopWaiting() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.started {
		t.end()
	}
}

// lead is OnStartedLeading: it runs work behind the open fence until the
// lead or elect's context ends, closes the fence and ends the election.
func (c *Controller) lead(ctx, leading context.Context, t *term, work func(context.Context) error) {
	t.mu.Lock()
	if ctx.Err() != nil {
		t.mu.Unlock()
		t.end()
		return
	}
	t.started = true
	t.mu.Unlock()
	defer close(t.worked)
	workCtx, stop := context.WithCancel(leading)
	defer stop()
	defer context.AfterFunc(ctx, stop)()
	c.fence.Open()
	err := work(workCtx)
	c.fence.Close()
	t.mu.Lock()
	t.runErr = err
	t.mu.Unlock()
	// Nothing of ours writes any more: give the lease up, also after an
	// error, so that a healthy replica takes over instead of a leader that
	// renews and does nothing.
	t.end()
}

// setLost records that the lease was lost while elect still ran.
func (t *term) setLost() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lost = true
}

// result waits for the work, if it started, and returns how the term
// ended: the work's error, or an error for a lost lease.
func (t *term) result() error {
	t.mu.Lock()
	started := t.started
	t.mu.Unlock()
	if started {
		<-t.worked
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.runErr != nil:
		return t.runErr
	case t.lost:
		return errors.New("lost leader election")
	}
	return nil
}
