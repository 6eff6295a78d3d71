// Package vm runs test binaries inside a small qemu VM that boots a stock
// Debian kernel, for tests that need kernel features the host may lack,
// such as IPVS. The VM is hack/vm: build.sh builds it once into a cache
// outside git, run.sh boots it, runs one command and returns its exit code.
//
// A test that must run in the VM re-runs itself there:
//
//	func TestIPVS(t *testing.T) {
//		if !vm.InVM() {
//			vm.RunSelf(t) // boots the VM, runs this test in it, fails t if it fails
//			return
//		}
//		// here: root in the VM, ip_vs loaded, the host's ipvsadm in PATH
//	}
//
// The VM shares the repository and the folder of the test binary at the same
// paths and runs the binary in the test's working directory, so testdata and
// paths work as on the host. Static (CGO_ENABLED=0) binaries run there, and
// so do go test's default and -race binaries: the VM carries the host's
// glibc. A binary linked against other shared libraries may not.
//
// When qemu-system-x86_64 is not installed the helpers skip the test;
// hack/vm/build.sh installs it (as root, with apt-get) on first use.
package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/tools/clientcmd"
)

// EnvInVM is set to "1" by the VM's init for every command it runs.
const EnvInVM = "KEEPLB_IN_VM"

// Exit codes of hack/vm/run.sh that are not the command's own.
const (
	ExitTimeout  = 124 // the VM ran past its timeout and was killed
	ExitVMFailed = 125 // the VM gave no exit code: bad usage, no boot, panic
)

// InVM reports whether this process runs inside the test VM.
func InVM() bool { return os.Getenv(EnvInVM) == "1" }

// ErrNoQEMU is returned by Exec, and makes Run skip, when qemu-system-x86_64
// is not in PATH.
var ErrNoQEMU = errors.New("qemu-system-x86_64 not found: install it (apt-get install qemu-system-x86, or run hack/vm/build.sh as root) to run the tests that need the VM")

// RunSelf runs the calling test again inside the VM, from the running test
// binary, with -test.run matching exactly tb.Name() (so a subtest re-runs
// only itself), -test.v and -test.count=1, followed by args. See Run.
func RunSelf(tb testing.TB, args ...string) {
	tb.Helper()
	RunSelfWith(tb, Options{}, args...)
}

// Options tune a VM run; the zero value is run.sh's defaults.
type Options struct {
	// Net gives the VM a NIC on qemu's user-mode network: the host's
	// loopback is 10.0.2.2 from inside (KEEPLB_VM_NET=user of run.sh).
	Net bool
	// Memory is the VM's memory, e.g. "1G" (default 512M).
	Memory string
	// Shares are more host folders to share at the same paths.
	Shares []string
	// SkipModules are modules of the VM's list (hack/vm/build.sh) to leave
	// unloaded at boot, by their names (e.g. "ip_vs"), for tests of what
	// loads them on demand (keeplb.skipmods= on the kernel command line).
	SkipModules []string
	// Timeout ends the VM this long after it starts, if sooner than the
	// test's deadline; 0 means the test's deadline only. For a test whose
	// hang (a guest kernel stuck in a loop) must not take the rest of the
	// package's time with it.
	Timeout time.Duration
}

func (o Options) env() []string {
	var env []string
	if o.Net {
		env = append(env, "KEEPLB_VM_NET=user")
	}
	if o.Memory != "" {
		env = append(env, "KEEPLB_VM_MEM="+o.Memory)
	}
	if len(o.SkipModules) > 0 {
		env = append(env, "KEEPLB_VM_APPEND=keeplb.skipmods="+strings.Join(o.SkipModules, ","))
	}
	return env
}

// RunSelfWith is RunSelf with options.
func RunSelfWith(tb testing.TB, opts Options, args ...string) {
	tb.Helper()
	if InVM() {
		tb.Fatal("vm.RunSelf called inside the VM: guard it with vm.InVM()")
	}
	exe, err := os.Executable()
	if err != nil {
		tb.Fatalf("vm: find the test binary: %v", err)
	}
	parts := strings.Split(tb.Name(), "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	RunWith(tb, opts, exe, append([]string{"-test.run=" + strings.Join(parts, "/"), "-test.v", "-test.count=1"}, args...)...)
}

// Run boots the VM and runs testBinary with args inside it as root, in the
// current working directory. It shares the repository root, the working
// directory and the binary's folder, logs the VM's console through tb.Log,
// and fails tb when the binary exits non-zero or the VM fails. It skips tb
// when qemu is not installed. The VM is killed when tb's context ends, or
// shortly before the test deadline.
func Run(tb testing.TB, testBinary string, args ...string) {
	tb.Helper()
	RunWith(tb, Options{}, testBinary, args...)
}

// RunWith is Run with options.
func RunWith(tb testing.TB, opts Options, testBinary string, args ...string) {
	tb.Helper()
	bin, err := filepath.Abs(testBinary)
	if err != nil {
		tb.Fatalf("vm: %v", err)
	}
	cwd, err := os.Getwd()
	if err != nil {
		tb.Fatalf("vm: %v", err)
	}
	shares := append([]string{cwd, filepath.Dir(bin)}, opts.Shares...)
	if root, err := repoRoot(); err == nil {
		shares = append([]string{root}, shares...)
	}
	ctx := tb.Context()
	if d, ok := tb.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			// End the VM in time to report, not to be killed with the test.
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, dl.Add(-10*time.Second))
			defer cancel()
		}
	}
	if opts.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.Timeout)
		defer cancel()
	}
	start := time.Now()
	w := &logWriter{tb: tb}
	rc, err := ExecWith(ctx, w, opts.env(), shares, append([]string{bin}, args...)...)
	w.flush()
	switch {
	case errors.Is(err, ErrNoQEMU):
		tb.Skip(err.Error())
	case err != nil:
		tb.Fatalf("vm: %v", err)
	case rc == ExitTimeout:
		tb.Fatalf("vm: %s timed out in the VM after %s", filepath.Base(bin), time.Since(start).Round(time.Second))
	case rc == ExitVMFailed:
		tb.Fatalf("vm: the VM did not boot or crashed (exit %d); its console is logged above", rc)
	case rc != 0:
		tb.Fatalf("vm: %s exited %d in the VM", filepath.Base(bin), rc)
	}
}

// Exec runs argv inside the VM with each folder in shares mounted at its own
// path, copying the VM's console to out, and returns the exit code of
// hack/vm/run.sh: argv's own, or ExitTimeout or ExitVMFailed. It builds the
// VM first if needed. The VM's timeout is ctx's deadline, if it has one
// (else run.sh's default); cancelling ctx kills the VM.
func Exec(ctx context.Context, out io.Writer, shares []string, argv ...string) (int, error) {
	return ExecWith(ctx, out, nil, shares, argv...)
}

// ExecWith is Exec with more environment for hack/vm/run.sh (its
// KEEPLB_VM_* variables).
func ExecWith(ctx context.Context, out io.Writer, env []string, shares []string, argv ...string) (int, error) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return 0, ErrNoQEMU
	}
	root, err := repoRoot()
	if err != nil {
		return 0, err
	}
	cmdArgs := dedupe(shares)
	cmdArgs = append(append(cmdArgs, "--"), argv...)
	cmd := exec.CommandContext(ctx, filepath.Join(root, "hack/vm/run.sh"), cmdArgs...)
	cmd.Stdout = out
	cmd.Stderr = out
	setProcessGroup(cmd) // so that cancelling kills qemu too, not only the script
	cmd.Env = append(os.Environ(), env...)
	if dl, ok := ctx.Deadline(); ok {
		secs := max(int(time.Until(dl).Seconds()), 1)
		cmd.Env = append(cmd.Env, "KEEPLB_VM_TIMEOUT="+strconv.Itoa(secs))
	}
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Run()
	switch ctx.Err() {
	case context.DeadlineExceeded:
		return ExitTimeout, nil
	case context.Canceled:
		return 0, fmt.Errorf("vm: %w", ctx.Err())
	}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) && exitErr.Exited() {
		return exitErr.ExitCode(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("run hack/vm/run.sh: %w", err)
	}
	return 0, nil
}

// repoRoot finds the repository from the working directory upwards, by its
// hack/vm/run.sh: go test runs a package's tests in the package's folder.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "hack/vm/run.sh")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("vm: no hack/vm/run.sh in %s or above", dir)
		}
	}
}

// dedupe drops the folders that are another's or inside another: they are
// shared already.
func dedupe(dirs []string) []string {
	var out []string
	for _, d := range dirs {
		d = filepath.Clean(d)
		if real, err := filepath.EvalSymlinks(d); err == nil {
			d = real
		}
		covered := false
		for _, o := range dirs {
			o = filepath.Clean(o)
			if real, err := filepath.EvalSymlinks(o); err == nil {
				o = real
			}
			if o != d && strings.HasPrefix(d, o+string(filepath.Separator)) {
				covered = true
			}
		}
		for _, o := range out {
			covered = covered || o == d
		}
		if !covered {
			out = append(out, d)
		}
	}
	return out
}

// logWriter passes the console to tb.Log line by line, prefixed with "vm| "
// so that the inner test's "--- PASS" lines do not read as the outer test's.
type logWriter struct {
	tb  testing.TB
	buf []byte
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.line(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}

func (w *logWriter) flush() {
	if len(w.buf) > 0 {
		w.line(string(w.buf))
		w.buf = nil
	}
}

func (w *logWriter) line(s string) {
	w.tb.Log("vm| " + strings.TrimRight(s, "\r"))
}

// HostLoopback is the host's 127.0.0.1 as the VM sees it on qemu's
// user-mode network (Options.Net).
const HostLoopback = "10.0.2.2"

// WriteKubeconfig rewrites the kubeconfig at from, of an API server
// listening on the host's 127.0.0.1, for use inside the VM, to to: the
// server becomes HostLoopback, and TLS checks the name serverName (one of
// the names in the server's certificate) instead of the address.
func WriteKubeconfig(from, to, serverName string) error {
	cfg, err := clientcmd.LoadFromFile(from)
	if err != nil {
		return err
	}
	for _, c := range cfg.Clusters {
		c.Server = strings.Replace(c.Server, "127.0.0.1", HostLoopback, 1)
		c.TLSServerName = serverName
	}
	return clientcmd.WriteToFile(*cfg, to)
}
