// Package keepalivedtesting provides a fake keepalived.Process.
package keepalivedtesting

import (
	"context"
	"errors"
	"os"
	"sync"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

var _ keepalived.Process = (*Fake)(nil)

// Fake models a keepalived process: whether it runs, the configuration
// bytes it loaded (read from the file at start and at each reload, as
// keepalived does), and how many times it started and reloaded. It models
// state; it does not record calls.
type Fake struct {
	configPath string

	mu         sync.Mutex
	running    bool
	exited     chan error
	config     []byte
	starts     int
	reloads    int
	failStarts int
	// killed says the last exit was Kill: no priority-0 adverts, the
	// addresses left in place.
	killed bool
}

// NewFake returns a stopped Fake that reads configPath.
func NewFake(configPath string) *Fake {
	return &Fake{configPath: configPath}
}

// Start is part of keepalived.Process. Like keepalived, it fails if the
// configuration file cannot be read.
func (f *Fake) Start(context.Context) (<-chan error, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running {
		return nil, errors.New("fake keepalived: already running")
	}
	if f.failStarts > 0 {
		f.failStarts--
		return nil, errors.New("fake keepalived: start failed")
	}
	data, err := os.ReadFile(f.configPath)
	if err != nil {
		return nil, err
	}
	f.running, f.config, f.exited, f.killed = true, data, make(chan error, 1), false
	f.starts++
	return f.exited, nil
}

// Reload is part of keepalived.Process.
func (f *Fake) Reload() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.running {
		return errors.New("fake keepalived: not running")
	}
	data, err := os.ReadFile(f.configPath)
	if err != nil {
		return err
	}
	f.config = data
	f.reloads++
	return nil
}

// Stop is part of keepalived.Process.
func (f *Fake) Stop(context.Context) error {
	f.exit(nil)
	return nil
}

// Kill is part of keepalived.Process.
func (f *Fake) Kill() error {
	f.mu.Lock()
	running := f.running
	f.mu.Unlock()
	if running {
		f.exit(errors.New("fake keepalived: killed"))
		f.mu.Lock()
		f.killed = true
		f.mu.Unlock()
	}
	return nil
}

// Killed reports whether the last exit was a Kill, not a Stop or a
// Crash.
func (f *Fake) Killed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.killed
}

// Running is part of keepalived.Process.
func (f *Fake) Running() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.running
}

// Crash makes the running fake exit on its own with err.
func (f *Fake) Crash(err error) { f.exit(err) }

func (f *Fake) exit(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.running {
		return
	}
	f.running = false
	f.exited <- err
	close(f.exited)
}

// FailStarts makes the next n starts fail.
func (f *Fake) FailStarts(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failStarts = n
}

// Config returns the configuration bytes loaded at the last start or
// reload, or nil if it never started.
func (f *Fake) Config() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.config
}

// Starts returns how many times it started.
func (f *Fake) Starts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.starts
}

// Reloads returns how many times it reloaded.
func (f *Fake) Reloads() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reloads
}
