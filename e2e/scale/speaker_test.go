package scale_e2e

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Where the VM's speaker listens and keeps its files.
const (
	metricsAddr = "127.0.0.1:10261"
	pprofAddr   = "127.0.0.1:10262"
	runDir      = "/run/keeplb-scale"
)

// phases name the CPU profiles the speaker writes, one after
// another: each SIGUSR1 ends one (see profileUntilSIGUSR1).
var phases = []string{"startup", "resyncs", "reloads"}

// speakerProc is the speaker under test, a process of its own: its
// memory and CPU are its alone.
type speakerProc struct {
	cmd   *exec.Cmd
	start time.Time
	done  chan struct{}

	mu sync.Mutex
	// lines are the log lines that mark what the test waits for, with
	// when each arrived.
	lines []logLine
}

// logLine is a line of the speaker's log (keepalived's included) and when
// the test read it; at is klog's own timestamp when the line has one.
type logLine struct {
	read, at time.Time
	text     string
}

// markers are the log lines the test keeps.
var markers = []string{"Caches are synced", "IPVS table changed", "keepalived.conf changed", "Reloaded keepalived", "Started keepalived", "Sync failed", "Reloading"}

// startSpeaker runs `keeplb speaker` for node 0 as the DaemonSet would,
// with plain-HTTP metrics on loopback, -v=2 (its reloads are logged), and
// its log copied to logPath.
func startSpeaker(t *testing.T, kubeconfig, profileDir, logPath string) *speakerProc {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "speaker", "--node-name="+node(0), "--kubeconfig="+kubeconfig, "--run-dir="+runDir,
		"--metrics-bind-address="+metricsAddr, "--metrics-secure=false", "-v=2")
	cmd.Env = append(os.Environ(), envExec+"=1", envPprof+"="+pprofAddr)
	if *flagCPUProfiles {
		cmd.Env = append(cmd.Env, envProfileDir+"="+profileDir, envProfilePhases+"="+strings.Join(phases, ","))
	}
	// The host side gives them, the DaemonSet's by default.
	for _, e := range goEnv {
		if v := flag.Lookup(e.flag).Value.String(); v != "" && v != "none" {
			cmd.Env = append(cmd.Env, e.name+"="+v)
		}
	}
	r, w := io.Pipe()
	cmd.Stdout, cmd.Stderr = w, w
	p := &speakerProc{cmd: cmd, done: make(chan struct{})}
	p.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = cmd.Wait()
		_ = w.Close()
		close(p.done)
	}()
	go p.read(r, logFile)
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				<-p.done
			}
		}
		_ = logFile.Close()
	})
	return p
}

// endPhase ends the current CPU profile and starts the next, if the
// speaker profiles (-scale.cpuprofiles): without a profiler SIGUSR1 would
// end the speaker.
func (p *speakerProc) endPhase() {
	if *flagCPUProfiles {
		_ = p.cmd.Process.Signal(syscall.SIGUSR1)
	}
}

func (p *speakerProc) read(r io.Reader, copyTo io.Writer) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		now := time.Now()
		text := sc.Text()
		_, _ = fmt.Fprintln(copyTo, text)
		for _, m := range markers {
			if strings.Contains(text, m) {
				p.mu.Lock()
				p.lines = append(p.lines, logLine{read: now, at: klogTime(text, now), text: text})
				p.mu.Unlock()
				break
			}
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

// klogTime returns the time in a klog header ("I1206 07:20:09.123456 …"),
// or def.
func klogTime(line string, def time.Time) time.Time {
	if len(line) < 21 || !strings.ContainsRune("IWEF", rune(line[0])) {
		return def
	}
	t, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
	if err != nil {
		return def
	}
	return time.Date(def.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.Local)
}

// first returns the first kept line containing s that arrived after
// after.
func (p *speakerProc) first(s string, after time.Time) (logLine, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if l.read.After(after) && strings.Contains(l.text, s) {
			return l, true
		}
	}
	return logLine{}, false
}

// failures returns how many syncs failed, and the last such log line.
func (p *speakerProc) failures() (int, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n, last := 0, ""
	for _, l := range p.lines {
		if strings.Contains(l.text, "Sync failed") {
			n, last = n+1, l.text
		}
	}
	return n, last
}

// exited says whether the speaker has exited.
func (p *speakerProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// get GETs url and returns the body of a 200 answer. Uncompressed: gzip
// would be most of what a scrape of /metrics costs the speaker, whose CPU
// the test measures.
func get(ctx context.Context, url string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return resp.Body, nil
}

// metrics scrapes the speaker's /metrics: each sample by its name and
// labels as written, e.g. keeplb_ipvs_virtual_servers.
func metrics(ctx context.Context) (map[string]float64, error) {
	body, err := get(ctx, "http://"+metricsAddr+"/metrics")
	if err != nil {
		return nil, err
	}
	defer func() { _ = body.Close() }()
	out := map[string]float64{}
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out, sc.Err()
}

// fetch GETs the speaker's pprof path into file.
func fetch(ctx context.Context, path, file string) error {
	body, err := get(ctx, "http://"+pprofAddr+path)
	if err != nil {
		return err
	}
	defer func() { _ = body.Close() }()
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, body)
	return errors.Join(err, f.Close())
}

// procStats is one process's memory and CPU, from /proc.
type procStats struct {
	// RSS and HWM are VmRSS and VmHWM (the peak RSS), in bytes.
	RSS, HWM int64
	// Anon and File are RssAnon and RssFile, the parts of RSS that are
	// the process's own memory and pages of files it maps (above all its
	// binary's code and read-only data, which GOMEMLIMIT does not count).
	Anon, File int64
	// CPU is user and system time.
	CPU time.Duration
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// Linux architecture that matters here.
const clockTicks = 100

// statsOf reads pid's memory and CPU.
func statsOf(pid int) (procStats, error) {
	var s procStats
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			s.RSS = kb << 10
		case "VmHWM:":
			s.HWM = kb << 10
		case "RssAnon:":
			s.Anon = kb << 10
		case "RssFile:":
			s.File = kb << 10
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name, in parentheses, may hold spaces: count fields
	// after its closing parenthesis. utime and stime are fields 14 and 15.
	rest := string(stat)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	if len(f) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: %q", pid, stat)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	s.CPU = time.Duration(ut+st) * time.Second / clockTicks
	return s, nil
}

// keepalivedPIDs returns the pids of keepalived's parent and its VRRP
// child, from their pid files.
func keepalivedPIDs() (parent, vrrp int) {
	read := func(name string) int {
		b, err := os.ReadFile(filepath.Join(runDir, name))
		if err != nil {
			return 0
		}
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	return read("keepalived.pid"), read("vrrp.pid")
}
