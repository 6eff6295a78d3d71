package controlplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is one child process (etcd or kube-apiserver) whose output goes to
// a log file in WorkDir.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process has been reaped
	waitErr error         // valid after done is closed
}

// startProcess starts bin with args in its own process group, appending its
// stdout and stderr to logPath and, if logs is not nil, copying them there.
func startProcess(name, bin, logPath string, logs *logSink, args ...string) (*process, error) {
	// Append rather than truncate: a start retried after a port clash, or a
	// reused WorkDir, keeps the earlier output for post-mortems.
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	_, _ = fmt.Fprintf(logFile, "=== %s %s %s\n", time.Now().Format(time.RFC3339), bin, strings.Join(args, " "))

	var out io.Writer = logFile
	var prefixed *prefixWriter
	if logs != nil {
		prefixed = logs.writer(name)
		out = io.MultiWriter(logFile, prefixed)
	}
	// Not exec.CommandContext: the process must outlive the startup context.
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = sysProcAttr()
	// When output is copied through a pipe, do not let a stuck pipe block
	// Wait forever once the process is gone.
	cmd.WaitDelay = 2 * time.Second
	p := &process{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The kernel sends the parent-death signal (sysProcAttr) when the
		// thread that forked exits, not the process, and the Go runtime
		// ends a thread whose goroutine exits while locked to it, as
		// pkg/nsthread's do after entering another network namespace. So
		// the process is started and waited for on a thread of its own,
		// locked until it has exited: otherwise a speaker writing its
		// nftables table in a test namespace could kill this etcd.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.waitErr = cmd.Wait()
		if prefixed != nil {
			prefixed.flush()
		}
		_ = logFile.Close()
		close(p.done)
	}()
	if err := <-started; err != nil {
		_ = logFile.Close()
		return nil, err
	}
	return p, nil
}

// exited reports, without blocking, whether the process has been reaped.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitError describes an unexpected exit of the process.
func (p *process) exitError() error {
	e := &processExitError{name: p.name, err: p.waitErr}
	if e.err == nil {
		e.err = errors.New("exit status 0")
	}
	// Free ports are picked by binding and releasing them, so a concurrent
	// test may have taken one; Start retries in that case.
	e.addrInUse = strings.Contains(tailFile(p.logPath, 50), "address already in use")
	return e
}

// stop sends SIGTERM to the process group and SIGKILL if the process is
// still there after grace, then waits until it has been reaped.
func (p *process) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	pgid := p.cmd.Process.Pid // Setpgid makes the leader's PID the group ID
	_ = signalGroup(pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = signalGroup(pgid, syscall.SIGKILL)
		<-p.done
	}
}

// processExitError reports that a control plane process exited while it was
// expected to run.
type processExitError struct {
	name      string
	err       error
	addrInUse bool
}

func (e *processExitError) Error() string {
	return fmt.Sprintf("%s exited: %v", e.name, e.err)
}

func (e *processExitError) Unwrap() error { return e.err }

// pause sleeps for d, returning early with an error when ctx ends or when a
// started process exits, so that startup fails fast instead of timing out.
func (c *ControlPlane) pause(ctx context.Context, d time.Duration) error {
	var etcdDone, apiDone <-chan struct{}
	if c.etcd != nil {
		etcdDone = c.etcd.done
	}
	if c.apiserver != nil {
		apiDone = c.apiserver.done
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-etcdDone:
		return c.etcd.exitError()
	case <-apiDone:
		return c.apiserver.exitError()
	}
}

// logSink serializes the prefixed log lines of several processes onto one
// writer, so that lines never interleave mid-way.
type logSink struct {
	mu  sync.Mutex
	out io.Writer
}

func (s *logSink) writer(name string) *prefixWriter {
	return &prefixWriter{sink: s, prefix: []byte("[" + name + "] ")}
}

// prefixWriter prefixes every complete line with the process name. It is
// written to by the single goroutine os/exec uses to copy the output.
type prefixWriter struct {
	sink    *logSink
	prefix  []byte
	partial []byte
}

// Write never fails: a broken Out must not break the pipe of the process,
// which would kill it or stall it, and the log file is the real record.
func (w *prefixWriter) Write(b []byte) (int, error) {
	w.partial = append(w.partial, b...)
	i := bytes.LastIndexByte(w.partial, '\n')
	if i < 0 {
		return len(b), nil
	}
	w.emit(w.partial[:i+1])
	w.partial = append(w.partial[:0], w.partial[i+1:]...)
	return len(b), nil
}

// flush writes a trailing line without newline, once the process is gone.
func (w *prefixWriter) flush() {
	if len(w.partial) > 0 {
		w.emit(append(w.partial, '\n'))
		w.partial = nil
	}
}

func (w *prefixWriter) emit(lines []byte) {
	var buf bytes.Buffer
	for line := range bytes.Lines(lines) {
		buf.Write(w.prefix)
		buf.Write(line)
	}
	w.sink.mu.Lock()
	defer w.sink.mu.Unlock()
	_, _ = w.sink.out.Write(buf.Bytes())
}

// tailFile returns the last n lines of file, or a note why it cannot.
func tailFile(file string, n int) string {
	f, err := os.Open(file)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer func() { _ = f.Close() }()
	// Log lines of the apiserver can be long; 64 KiB holds plenty of them.
	const window = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > window {
		if _, err := f.Seek(-window, io.SeekEnd); err != nil {
			return fmt.Sprintf("(cannot read log: %v)", err)
		}
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
