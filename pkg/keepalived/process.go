package keepalived

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// Process is one keepalived daemon: the boundary the Supervisor drives.
type Process interface {
	// Start starts keepalived with the configuration file as it is now.
	// The returned channel receives keepalived's exit error (nil for a
	// clean exit) once it has exited, and is then closed. ctx carries the
	// logger; cancelling it does not stop keepalived (Stop does).
	Start(ctx context.Context) (exited <-chan error, err error)
	// Reload makes the running keepalived re-read its configuration file.
	Reload() error
	// Stop asks keepalived to exit cleanly (its VRRP instances send
	// priority-0 adverts so that peers take over at once) and waits; when
	// ctx is done first, it kills keepalived.
	Stop(ctx context.Context) error
	// Kill kills keepalived and its children at once and waits for them
	// to be gone: unlike Stop, its instances send no priority-0 advert
	// and leave their addresses in place (a hand-off; see package
	// handoff).
	Kill() error
	// Running reports whether keepalived is running.
	Running() bool
}

var _ Process = (*ExecProcess)(nil)

// ExecOptions configures an ExecProcess.
type ExecOptions struct {
	// Command runs keepalived, with anything that must wrap it, e.g.
	// {"ip", "netns", "exec", "ns1", "keepalived"}; the wrapper must exec
	// keepalived, not fork it. Default {"keepalived"}.
	Command []string
	// ConfigPath is keepalived.conf.
	ConfigPath string
	// RunDir holds the pid files (keepalived.pid, vrrp.pid, checkers.pid),
	// so that several keepalived can run on one host. It must exist.
	RunDir string
	// Output receives keepalived's log; nil discards it.
	Output io.Writer
	// DrainTimeout bounds how long keepalived's children may take to exit
	// after keepalived itself did, before they are killed. Default 5s.
	DrainTimeout time.Duration
}

// ExecProcess runs keepalived as a child process:
//
//	keepalived --dont-fork --log-console --no-syslog --vrrp --use-file CONF
//	  --pid RUNDIR/keepalived.pid --vrrp_pid RUNDIR/vrrp.pid
//	  --checkers_pid RUNDIR/checkers.pid
//
// in its own process group, with SIGTERM as parent-death signal: if the
// speaker dies, keepalived still exits cleanly. Reload is SIGHUP.
type ExecProcess struct {
	argv         []string
	pidFiles     []string
	output       io.Writer
	drainTimeout time.Duration

	mu   sync.Mutex
	pid  int           // of the last start
	done chan struct{} // closed when that keepalived and its children have exited
}

// NewExecProcess returns an ExecProcess for o.
func NewExecProcess(o ExecOptions) (*ExecProcess, error) {
	if o.ConfigPath == "" || o.RunDir == "" {
		return nil, errors.New("keepalived: ConfigPath and RunDir are required")
	}
	if fi, err := os.Stat(o.RunDir); err != nil {
		return nil, fmt.Errorf("keepalived: RunDir %s is not a directory: %w", o.RunDir, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("keepalived: RunDir %s is not a directory", o.RunDir)
	}
	if len(o.Command) == 0 {
		o.Command = []string{"keepalived"}
	}
	if o.Output == nil {
		o.Output = io.Discard
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 5 * time.Second
	}
	pidFiles := []string{
		filepath.Join(o.RunDir, "keepalived.pid"),
		filepath.Join(o.RunDir, "vrrp.pid"),
		filepath.Join(o.RunDir, "checkers.pid"),
	}
	argv := append([]string(nil), o.Command...)
	argv = append(argv,
		"--dont-fork", "--log-console", "--no-syslog", "--vrrp",
		"--use-file", o.ConfigPath,
		"--pid", pidFiles[0], "--vrrp_pid", pidFiles[1], "--checkers_pid", pidFiles[2])
	return &ExecProcess{argv: argv, pidFiles: pidFiles, output: o.Output, drainTimeout: o.DrainTimeout}, nil
}

// Args returns the command line Start runs.
func (p *ExecProcess) Args() []string { return append([]string(nil), p.argv...) }

// PID returns the process ID of the keepalived last started, or 0.
func (p *ExecProcess) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Start is part of Process.
func (p *ExecProcess) Start(ctx context.Context) (<-chan error, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runningLocked() {
		return nil, errors.New("keepalived is already running")
	}
	// Our keepalived and its children are gone (done is closed only after
	// the whole process group exited): a pid file left by a killed one
	// would make the new one think it is already running if the pid has
	// been reused meanwhile.
	for _, f := range p.pidFiles {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}

	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Stdout, cmd.Stderr = p.output, p.output
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	// keepalived's children inherit its output; do not wait for them
	// forever to close it.
	cmd.WaitDelay = p.drainTimeout

	started := make(chan error, 1)
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		// The parent-death signal is sent when the thread that forked
		// exits, not the process: keep this goroutine on its thread until
		// keepalived has exited.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		// keepalived's VRRP child, orphaned if keepalived was killed,
		// still removes its VIPs (it gets SIGTERM when its parent dies).
		// Let it finish before reporting the exit, so that a restart never
		// overlaps with it.
		drainGroup(cmd.Process.Pid, p.drainTimeout)
		close(done)
		exited <- err
		close(exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start keepalived: %w", err)
	}
	p.pid, p.done = cmd.Process.Pid, done
	klog.FromContext(ctx).V(2).Info("Started keepalived", "pid", p.pid, "args", p.argv)
	return exited, nil
}

// Reload is part of Process.
func (p *ExecProcess) Reload() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.runningLocked() {
		return errors.New("keepalived is not running")
	}
	return syscall.Kill(p.pid, syscall.SIGHUP)
}

// Stop is part of Process.
func (p *ExecProcess) Stop(ctx context.Context) error {
	p.mu.Lock()
	pid, done, running := p.pid, p.done, p.runningLocked()
	p.mu.Unlock()
	if !running {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop keepalived: %w", err)
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	<-done
	return fmt.Errorf("keepalived did not exit after SIGTERM, killed: %w", ctx.Err())
}

// Kill is part of Process: SIGKILL to keepalived's process group, so
// that its VRRP child dies with it instead of getting SIGTERM (its
// parent-death signal) and stopping cleanly.
func (p *ExecProcess) Kill() error {
	p.mu.Lock()
	pid, done, running := p.pid, p.done, p.runningLocked()
	p.mu.Unlock()
	if !running {
		return nil
	}
	if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill keepalived: %w", err)
	}
	<-done
	return nil
}

// Running is part of Process.
func (p *ExecProcess) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.runningLocked()
}

func (p *ExecProcess) runningLocked() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// drainGroup waits until process group pgid has no live process left;
// after timeout it kills what is left and waits a little more.
func drainGroup(pgid int, timeout time.Duration) {
	gone := func(d time.Duration) bool {
		for deadline := time.Now().Add(d); ; time.Sleep(10 * time.Millisecond) {
			if !groupAlive(pgid) {
				return true
			}
			if time.Now().After(deadline) {
				return false
			}
		}
	}
	if !gone(timeout) {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		gone(time.Second)
	}
}

// groupAlive reports whether process group pgid has a process that is not
// a zombie. Zombies do not count: they hold no socket and no address, and
// an orphan's zombie waits for whoever adopted it (init, or the speaker
// itself when it is PID 1) to reap it, which may be late or never.
func groupAlive(pgid int) bool {
	if err := syscall.Kill(-pgid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell; kill(2) says there is one
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		if state, pg, ok := parseStat(stat); ok && pg == pgid && state != "Z" {
			return true
		}
	}
	return false
}

// parseStat returns the state and process group from /proc/PID/stat:
// "PID (COMM) STATE PPID PGRP ...", where COMM may hold spaces and
// parentheses.
func parseStat(stat []byte) (state string, pgrp int, ok bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return "", 0, false
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 3 {
		return "", 0, false
	}
	pgrp, err := strconv.Atoi(f[2])
	return f[0], pgrp, err == nil
}
