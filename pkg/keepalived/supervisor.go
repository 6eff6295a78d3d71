package keepalived

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// SupervisorOptions configures a Supervisor.
type SupervisorOptions struct {
	// ConfigPath is the keepalived.conf that Apply writes and the Process
	// reads.
	ConfigPath string
	// ReloadWindow is the debounce window: the first change after a reload
	// waits this long for more before keepalived reloads. Default 100ms.
	ReloadWindow time.Duration
	// MinBackoff and MaxBackoff bound the delay before restarting
	// keepalived after it exited or failed to start; the delay doubles at
	// each consecutive failure. Defaults 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
	// StopTimeout is how long keepalived may take to exit cleanly when Run
	// ends, before it is killed. Default 5s.
	StopTimeout time.Duration
}

// Status is what a Supervisor knows about keepalived.
type Status struct {
	// Running is true while keepalived runs.
	Running bool
	// Restarts counts the starts after the first: after keepalived exited
	// on its own or failed to start.
	Restarts int
	// Reloads counts the reloads sent to a running keepalived.
	Reloads int
	// LastExit is how keepalived last exited or failed to start, if it
	// did; nil otherwise.
	LastExit error
}

// Supervisor keeps one keepalived running with the latest configuration:
// it starts it once a configuration has been applied, reloads it
// (debounced) when the configuration bytes change, restarts it with
// exponential backoff when it exits, and stops it cleanly when Run's
// context ends.
type Supervisor struct {
	proc Process
	opts SupervisorOptions

	applied chan struct{} // a new configuration was written
	handoff chan handoffRequest

	mu      sync.Mutex
	desired []byte // nil until the first Apply
	status  Status
}

// NewSupervisor returns a Supervisor of p.
func NewSupervisor(p Process, o SupervisorOptions) (*Supervisor, error) {
	if o.ConfigPath == "" {
		return nil, errors.New("keepalived: ConfigPath is required")
	}
	if o.ReloadWindow <= 0 {
		o.ReloadWindow = 100 * time.Millisecond
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = max(10*time.Second, o.MinBackoff)
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 5 * time.Second
	}
	return &Supervisor{proc: p, opts: o, applied: make(chan struct{}, 1), handoff: make(chan handoffRequest)}, nil
}

// Apply makes data keepalived's configuration: it writes the file if the
// bytes differ from it (see WriteAtomic) and, if keepalived runs with
// other bytes, schedules a reload. It returns whether the file changed.
func (s *Supervisor) Apply(data []byte) (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if changed, err = WriteAtomic(s.opts.ConfigPath, data); err != nil {
		return false, err
	}
	first := s.desired == nil
	s.desired = append([]byte{}, data...)
	if changed || first {
		select {
		case s.applied <- struct{}{}:
		default:
		}
	}
	return changed, nil
}

// handoffRequest asks Run to hand off (see HandOff).
type handoffRequest struct {
	wait time.Duration
	done chan error
}

// HandOff ends Run by a hand-off: it writes data as the configuration and
// has the running keepalived reload it at once (no debounce), waits wait
// (for keepalived to announce what data says), then kills keepalived
// (Process.Kill: no priority-0 advert, the addresses stay) and lets Run
// return. It fails, and leaves keepalived as it was, when keepalived is
// not running (Run is starting it, or waiting to restart it) or the
// reload fails; ctx bounds how long it waits for Run.
func (s *Supervisor) HandOff(ctx context.Context, data []byte, wait time.Duration) error {
	s.mu.Lock()
	_, err := WriteAtomic(s.opts.ConfigPath, data)
	if err == nil {
		s.desired = append([]byte{}, data...)
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	req := handoffRequest{wait: wait, done: make(chan error, 1)}
	select {
	case s.handoff <- req:
	case <-ctx.Done():
		return fmt.Errorf("keepalived is not running: %w", context.Cause(ctx))
	}
	return <-req.done
}

// Status returns the current status.
func (s *Supervisor) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Run supervises keepalived until ctx is done, then stops it, or until a
// HandOff kills it. It starts keepalived after the first Apply.
func (s *Supervisor) Run(ctx context.Context) {
	logger := klog.FromContext(ctx)
	select {
	case <-ctx.Done():
		return
	case <-s.applied:
	}
	deb := debouncer{window: s.opts.ReloadWindow}
	reload := time.NewTimer(0)
	reload.Stop()
	defer reload.Stop()
	backoff := s.opts.MinBackoff
	for first := true; ; first = false {
		if !first {
			s.update(func(st *Status) { st.Restarts++ })
		}
		data := s.current()
		exited, err := s.proc.Start(ctx)
		if err != nil {
			logger.Error(err, "Starting keepalived failed", "retryIn", backoff)
			s.update(func(st *Status) { st.LastExit = err })
			if !sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, s.opts.MaxBackoff)
			continue
		}
		started := time.Now()
		deb.Loaded(data)
		s.update(func(st *Status) { st.Running = true })

	running:
		for {
			select {
			case <-ctx.Done():
				s.stop(logger)
				return
			case err := <-exited:
				if err == nil {
					err = errors.New("keepalived exited with status 0")
				}
				s.update(func(st *Status) { st.Running, st.LastExit = false, err })
				// A keepalived that ran well for a while starts over with
				// the shortest backoff.
				if time.Since(started) > s.opts.MaxBackoff {
					backoff = s.opts.MinBackoff
				}
				logger.Error(err, "keepalived exited unexpectedly", "restartIn", backoff)
				break running
			case req := <-s.handoff:
				if err := s.proc.Reload(); err != nil {
					req.done <- fmt.Errorf("reload keepalived for the hand-off: %w", err)
					continue
				}
				s.update(func(st *Status) { st.Reloads++ })
				time.Sleep(req.wait)
				err := s.proc.Kill()
				s.update(func(st *Status) { st.Running = false })
				req.done <- err
				return
			case <-s.applied:
				if due, pending := deb.Changed(s.current(), time.Now()); pending {
					reload.Reset(time.Until(due))
				} else {
					reload.Stop()
				}
			case <-reload.C:
				if !deb.Due(time.Now()) {
					continue
				}
				data := s.current()
				if err := s.proc.Reload(); err != nil {
					// Most likely keepalived is exiting, and the restart
					// reads the file; if not, try again.
					logger.Error(err, "Reloading keepalived failed")
					reload.Reset(s.opts.ReloadWindow)
					continue
				}
				deb.Loaded(data)
				s.update(func(st *Status) { st.Reloads++ })
				logger.V(2).Info("Reloaded keepalived", "bytes", len(data))
			}
		}
		if !sleep(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, s.opts.MaxBackoff)
	}
}

func (s *Supervisor) stop(logger klog.Logger) {
	// ctx is done: give keepalived its own time to exit cleanly.
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.StopTimeout)
	defer cancel()
	if err := s.proc.Stop(ctx); err != nil {
		logger.Error(err, "Stopping keepalived")
	}
	s.update(func(st *Status) { st.Running = false })
}

func (s *Supervisor) current() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.desired
}

func (s *Supervisor) update(f func(*Status)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.status)
}

// sleep waits for d, or returns false as soon as ctx is done.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
