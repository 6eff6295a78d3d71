package keepalived_test

// Tests against a real keepalived: two network namespaces joined by a veth
// pair, one keepalived under a Supervisor in each. They need root, ip and
// keepalived, and skip otherwise.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"k8s.io/klog/v2/ktesting"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

const (
	e2eIface  = "kl0"
	e2eAdvert = 100 * time.Millisecond
)

// node is one side of the pair: a namespace running keepalived.
type node struct {
	ns     string
	dir    string
	proc   *keepalived.ExecProcess
	timed  *timedProcess
	sup    *keepalived.Supervisor
	events *eventLog
	addrs  *addrWatch
	output *syncBuffer

	cancel context.CancelFunc
	done   chan struct{} // closed when Run returned
}

// newPair creates namespaces a and b joined by veth kl0 (10.250.0.1/24 in
// a, 10.250.0.2/24 in b) and prepares a node in each; start runs them.
func newPair(t *testing.T) (a, b *node) {
	t.Helper()
	requireKeepalived(t)
	nsA, nsB := newNetns(t, "a"), newNetns(t, "b")
	ip(t, "link", "add", e2eIface, "netns", nsA, "type", "veth", "peer", "name", e2eIface, "netns", nsB)
	for i, ns := range []string{nsA, nsB} {
		ip(t, "-n", ns, "addr", "add", fmt.Sprintf("10.250.0.%d/24", i+1), "dev", e2eIface)
		ip(t, "-n", ns, "link", "set", e2eIface, "up")
	}
	return newNode(t, nsA), newNode(t, nsB)
}

func newNode(t *testing.T, ns string) *node {
	t.Helper()
	n := &node{ns: ns, dir: t.TempDir(), output: &syncBuffer{}, done: make(chan struct{})}
	var err error
	n.proc, err = keepalived.NewExecProcess(keepalived.ExecOptions{
		Command:    []string{"ip", "netns", "exec", ns, "keepalived"},
		ConfigPath: filepath.Join(n.dir, "keepalived.conf"),
		RunDir:     n.dir,
		Output:     n.output,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.timed = &timedProcess{Process: n.proc}
	n.sup, err = keepalived.NewSupervisor(n.timed, keepalived.SupervisorOptions{
		ConfigPath: filepath.Join(n.dir, "keepalived.conf"),
		MinBackoff: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	_, ctx := ktesting.NewTestContext(t)
	// The FIFO outlives keepalived, to see the STOP it reports when Run
	// ends.
	fifoCtx, fifoCancel := context.WithCancel(ctx)
	t.Cleanup(fifoCancel)
	ch, err := keepalived.WatchFIFO(fifoCtx, filepath.Join(n.dir, "notify.fifo"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, n.cancel = context.WithCancel(ctx)
	n.events = newEventLog(ch)
	n.addrs = watchAddrs(t, ns)
	go func() {
		defer close(n.done)
		n.sup.Run(ctx)
	}()
	t.Cleanup(func() {
		n.stop()
		if t.Failed() {
			t.Logf("keepalived in %s:\n%s", ns, n.output.String())
		}
	})
	return n
}

// config is the node's configuration: one instance per VIP list, VRIDs
// from 1, named vi_VRID.
func (n *node) config(priority int, vips ...[]netip.Prefix) keepalived.Config {
	c := keepalived.Config{RouterID: n.ns, NotifyFIFO: filepath.Join(n.dir, "notify.fifo")}
	for i, v := range vips {
		c.Instances = append(c.Instances, keepalived.Instance{
			Name: fmt.Sprintf("vi_%d", i+1), Interface: e2eIface, VRID: i + 1, Priority: priority,
			AdvertInterval: e2eAdvert, Version: 3, VIPs: v,
		})
	}
	return c
}

func (n *node) apply(t *testing.T, c keepalived.Config) {
	t.Helper()
	data, err := keepalived.Render(c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.sup.Apply(data); err != nil {
		t.Fatal(err)
	}
}

// stop ends Run, which stops keepalived with SIGTERM, and waits.
func (n *node) stop() {
	n.cancel()
	<-n.done
}

// hasAddrs reports whether the namespace holds every one of vips (per ip
// addr show, not the monitor).
func (n *node) hasAddrs(t *testing.T, vips ...netip.Prefix) bool {
	t.Helper()
	out := ip(t, "-n", n.ns, "-br", "addr", "show", "dev", e2eIface)
	have := map[string]bool{}
	for _, f := range strings.Fields(out) {
		have[f] = true
	}
	for _, v := range vips {
		if !have[v.String()] {
			return false
		}
	}
	return true
}

func (n *node) hasNone(t *testing.T, vips ...netip.Prefix) bool {
	t.Helper()
	for _, v := range vips {
		if n.hasAddrs(t, v) {
			return false
		}
	}
	return true
}

func TestE2EFailover(t *testing.T) {
	a, b := newPair(t)
	vip := netip.MustParsePrefix("10.250.0.100/32")
	vip2 := netip.MustParsePrefix("10.250.0.101/32")
	one := []netip.Prefix{vip}
	two := []netip.Prefix{vip, vip2}

	a.apply(t, a.config(150, one))
	b.apply(t, b.config(100, one))
	eventually(t, "a MASTER, b BACKUP, VIP on a only", func() bool {
		return a.events.state("vi_1") == keepalived.StateMaster &&
			b.events.state("vi_1") == keepalived.StateBackup &&
			a.hasAddrs(t, vip) && b.hasNone(t, vip)
	})

	// Add a VIP on a (the master) only, as a speaker that got the news
	// first would: it appears, and b, whose configuration lags, sees
	// nothing wrong in a's adverts. Then b catches up.
	eventsA, eventsB := a.events.len(), b.events.len()
	a.apply(t, a.config(150, two))
	added := a.addrs.waitAdded(t, vip2.Addr())
	t.Logf("reload with one more VIP: visible %v after SIGHUP", added.Sub(a.timed.lastReload()))
	b.apply(t, b.config(100, two))
	eventually(t, "b reloaded", func() bool { return b.sup.Status().Reloads == 1 })
	stays(t, "no state change on either side", 10*e2eAdvert, func() bool {
		return a.events.len() == eventsA && b.events.len() == eventsB && b.hasNone(t, vip, vip2)
	})
	if !a.hasAddrs(t, vip, vip2) {
		t.Fatal("a lost a VIP")
	}

	// SIGKILL keepalived on a: its VRRP child, orphaned, still removes the
	// VIPs, b takes over, the Supervisor restarts keepalived on a, and a
	// takes the VIPs back.
	killed := time.Now()
	if err := syscall.Kill(a.proc.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	tookOver := b.addrs.waitAdded(t, vip.Addr())
	eventually(t, "a restarted once and MASTER again, VIPs back on a", func() bool {
		st := a.sup.Status()
		return st.Running && st.Restarts == 1 && a.events.state("vi_1") == keepalived.StateMaster &&
			a.hasAddrs(t, vip, vip2) && b.hasNone(t, vip, vip2)
	})
	t.Logf("SIGKILL on the master: b took over after %v, a took back after %v; status %+v",
		tookOver.Sub(killed), a.addrs.added(vip.Addr()).Sub(killed), a.sup.Status())

	// Graceful stop of the master: priority-0 adverts, b takes over at
	// once instead of after the master-down interval.
	stopped := time.Now()
	go a.stop()
	took := b.addrs.waitAdded(t, vip.Addr()).Sub(stopped)
	t.Logf("graceful takeover after SIGTERM on the master: %v (advert %v)", took, e2eAdvert)
	if took >= time.Second {
		t.Errorf("takeover took %v, want well under 1s", took)
	}
	<-a.done
	t.Logf("keepalived on a exited %v after SIGTERM", time.Since(stopped))
	eventually(t, "b MASTER with both VIPs; a reported STOP", func() bool {
		return b.events.state("vi_1") == keepalived.StateMaster && b.hasAddrs(t, vip, vip2) &&
			a.events.state("vi_1") == keepalived.StateStop && a.hasNone(t, vip, vip2)
	})
}

func TestE2EReload1000VIPs(t *testing.T) {
	a, b := newPair(t)
	const instances, perInstance = 4, 250
	small := make([][]netip.Prefix, instances)
	big := make([][]netip.Prefix, instances)
	next := netip.MustParseAddr("10.251.0.0")
	for i := range instances {
		for j := range perInstance {
			next = next.Next()
			p := netip.PrefixFrom(next, 32)
			if j == 0 {
				small[i] = append(small[i], p)
			}
			big[i] = append(big[i], p)
		}
	}
	last := next

	a.apply(t, a.config(150, small...))
	b.apply(t, b.config(100, small...))
	eventually(t, "a MASTER of every instance", func() bool {
		for i := range instances {
			name := fmt.Sprintf("vi_%d", i+1)
			if a.events.state(name) != keepalived.StateMaster || b.events.state(name) != keepalived.StateBackup {
				return false
			}
		}
		return true
	})

	eventsB := b.events.len()
	a.apply(t, a.config(150, big...))
	lastSeen := a.addrs.waitAdded(t, last)
	sighup := a.timed.lastReload()
	firstSeen := a.addrs.firstAddedAfter(sighup)
	t.Logf("reload to %d VIPs in %d instances: first new VIP visible %v after SIGHUP, last (%s) %v",
		instances*perInstance, instances, firstSeen.Sub(sighup), last, lastSeen.Sub(sighup))
	eventually(t, "all VIPs on a", func() bool {
		return strings.Count(ip(t, "-n", a.ns, "addr", "show", "dev", e2eIface), "inet 10.251.") == instances*perInstance
	})
	stays(t, "b stays BACKUP", 5*e2eAdvert, func() bool { return b.events.len() == eventsB })

	// b catches up, then a stops: how long until b holds them all?
	b.apply(t, b.config(100, big...))
	eventually(t, "b reloaded", func() bool { return b.sup.Status().Reloads == 1 })
	stopped := time.Now()
	go a.stop()
	firstB := b.addrs.waitAdded(t, big[0][0].Addr())
	lastB := b.addrs.waitAdded(t, last)
	t.Logf("graceful takeover of %d VIPs: first on b after %v, last after %v", instances*perInstance, firstB.Sub(stopped), lastB.Sub(stopped))
	if lastB.Sub(stopped) >= time.Second {
		t.Errorf("takeover of all VIPs took %v, want under 1s", lastB.Sub(stopped))
	}
	<-a.done
}

// TestE2EReloadAtScale: keepalived's reload in the shape of the speaker at
// scale (e2e/scale: 128 instances holding 10,000 VIPs, all MASTER), here
// natively, in network namespaces on the host, where e2e/scale runs under
// the VM's emulated CPU: one VIP is added, as a new Service adds it, and
// the time from the SIGHUP to the VIP on the link is logged for make
// bench. It checks that the reload moves nothing: the peer stays BACKUP
// of every instance and the master keeps every VIP.
func TestE2EReloadAtScale(t *testing.T) {
	a, b := newPair(t)
	const instances, vips = 128, 10000
	sets := make([][]netip.Prefix, instances)
	next := netip.MustParseAddr("10.240.0.0")
	for i := range vips {
		next = next.Next()
		sets[i%instances] = append(sets[i%instances], netip.PrefixFrom(next, 32))
	}
	a.apply(t, a.config(150, sets...))
	b.apply(t, b.config(100, sets...))
	onA := func() int { return strings.Count(ip(t, "-n", a.ns, "addr", "show", "dev", e2eIface), "inet 10.240.") }
	// keepalived adds 10,000 addresses over seconds: the last one first,
	// then the states.
	if _, ok := a.addrs.wait(next, time.Minute); !ok {
		t.Fatalf("%s not on a within a minute", next)
	}
	// MASTER_RX_LOWER_PRI: a, MASTER, heard b's adverts from before b
	// heard a's and went BACKUP.
	eventually(t, "a MASTER of every instance, b BACKUP", func() bool {
		for i := range instances {
			name := fmt.Sprintf("vi_%d", i+1)
			if st := a.events.state(name); st != keepalived.StateMaster && st != keepalived.StateMasterRxLowerPri || b.events.state(name) != keepalived.StateBackup {
				return false
			}
		}
		return true
	})
	if got := onA(); got != vips {
		t.Fatalf("a has %d VIPs, want %d", got, vips)
	}
	eventsB := b.events.len()
	const runs = 5
	var took []time.Duration
	for range runs {
		next = next.Next()
		sets[0] = append(sets[0], netip.PrefixFrom(next, 32))
		a.apply(t, a.config(150, sets...))
		seen := a.addrs.waitAdded(t, next)
		took = append(took, seen.Sub(a.timed.lastReload()))
	}
	slices.Sort(took)
	t.Logf("reload at scale, %d instances and %d VIPs, one VIP added: SIGHUP to the new VIP on the link, %d runs: median %v (%v–%v)",
		instances, vips, runs, took[runs/2].Round(100*time.Microsecond), took[0].Round(100*time.Microsecond), took[runs-1].Round(100*time.Microsecond))
	stays(t, "b stays BACKUP", 5*e2eAdvert, func() bool { return b.events.len() == eventsB })
	if got := onA(); got != vips+runs {
		t.Errorf("a has %d VIPs after the reloads, want %d", got, vips+runs)
	}
}

// TestE2ETrackFile: writing the track file moves the VIP without a reload.
func TestE2ETrackFile(t *testing.T) {
	a, b := newPair(t)
	vip := netip.MustParsePrefix("10.250.0.100/32")
	track := filepath.Join(a.dir, "local-endpoints")
	ca := a.config(150, []netip.Prefix{vip})
	ca.TrackFiles = []keepalived.TrackFile{{Name: "local", Path: track}}
	ca.Instances[0].TrackFile, ca.Instances[0].TrackWeight = "local", -100
	a.apply(t, ca)
	b.apply(t, b.config(100, []netip.Prefix{vip}))
	eventually(t, "a MASTER with the VIP", func() bool {
		return a.events.state("vi_1") == keepalived.StateMaster && a.hasAddrs(t, vip) && b.hasNone(t, vip)
	})

	// 1 × -100: a's priority drops to 50, below b's 100.
	if _, err := keepalived.WriteAtomic(track, []byte("1\n")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b MASTER with the VIP", func() bool {
		return b.events.state("vi_1") == keepalived.StateMaster && b.hasAddrs(t, vip) && a.hasNone(t, vip)
	})
	if _, err := keepalived.WriteAtomic(track, []byte("0\n")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a MASTER again", func() bool {
		return a.events.state("vi_1") == keepalived.StateMaster && a.hasAddrs(t, vip) && b.hasNone(t, vip)
	})
	if r := a.sup.Status().Reloads; r != 0 {
		t.Errorf("%d reloads; the track file needs none", r)
	}
	t.Logf("events on a: %+v", a.events.all())
}

// timedProcess records when the Supervisor last asked for a reload.
type timedProcess struct {
	keepalived.Process
	reloaded atomic.Int64 // UnixNano
}

func (p *timedProcess) Reload() error {
	p.reloaded.Store(time.Now().UnixNano())
	return p.Process.Reload()
}

func (p *timedProcess) lastReload() time.Time { return time.Unix(0, p.reloaded.Load()) }

// eventLog collects Events from a notify FIFO.
type eventLog struct {
	mu     sync.Mutex
	events []keepalived.Event
}

func newEventLog(ch <-chan keepalived.Event) *eventLog {
	l := &eventLog{}
	go func() {
		for ev := range ch {
			l.mu.Lock()
			l.events = append(l.events, ev)
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *eventLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.events)
}

func (l *eventLog) all() []keepalived.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]keepalived.Event(nil), l.events...)
}

// state returns the last state reported for instance, or "".
func (l *eventLog) state(instance string) keepalived.State {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.events) - 1; i >= 0; i-- {
		if l.events[i].Instance == instance {
			return l.events[i].State
		}
	}
	return ""
}

// addrWatch follows `ip monitor address` in a namespace and records when
// each address was last added.
type addrWatch struct {
	mu   sync.Mutex
	at   map[netip.Addr]time.Time
	cond chan struct{} // closed and replaced at every change
}

func watchAddrs(t *testing.T, ns string) *addrWatch {
	t.Helper()
	w := &addrWatch{at: map[netip.Addr]time.Time{}, cond: make(chan struct{})}
	cmd := exec.Command("ip", "-n", ns, "monitor", "address")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			now := time.Now()
			// "3: kl0    inet 10.250.0.100/32 scope global kl0", or the
			// same after "Deleted ".
			f := strings.Fields(sc.Text())
			for i := 0; i+1 < len(f); i++ {
				if f[i] != "inet" && f[i] != "inet6" {
					continue
				}
				p, err := netip.ParsePrefix(f[i+1])
				if err != nil {
					break
				}
				w.mu.Lock()
				if f[0] == "Deleted" {
					delete(w.at, p.Addr())
				} else {
					w.at[p.Addr()] = now
				}
				close(w.cond)
				w.cond = make(chan struct{})
				w.mu.Unlock()
				break
			}
		}
	}()
	// Make sure the monitor listens before the test changes addresses:
	// add a probe address until it reports one.
	probe := netip.MustParseAddr("192.0.2.254")
	for deadline := time.Now().Add(10 * time.Second); ; {
		ip(t, "-n", ns, "addr", "add", "192.0.2.254/32", "dev", "lo")
		_, seen := w.wait(probe, 100*time.Millisecond)
		ip(t, "-n", ns, "addr", "del", "192.0.2.254/32", "dev", "lo")
		if seen {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ip monitor in %s reports nothing", ns)
		}
	}
	return w
}

// waitAdded waits until a is present and returns when it was added.
func (w *addrWatch) waitAdded(t *testing.T, a netip.Addr) time.Time {
	t.Helper()
	at, ok := w.wait(a, 10*time.Second)
	if !ok {
		t.Fatalf("%s not added within 10s", a)
	}
	return at
}

// wait waits up to d until a is present and returns when it was added.
func (w *addrWatch) wait(a netip.Addr, d time.Duration) (time.Time, bool) {
	timeout := time.After(d)
	for {
		w.mu.Lock()
		at, ok := w.at[a]
		cond := w.cond
		w.mu.Unlock()
		if ok {
			return at, true
		}
		select {
		case <-cond:
		case <-timeout:
			return time.Time{}, false
		}
	}
}

// added returns when a was last added, or the zero time.
func (w *addrWatch) added(a netip.Addr) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.at[a]
}

// firstAddedAfter returns the earliest time after t0 an address present
// now was added.
func (w *addrWatch) firstAddedAfter(t0 time.Time) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first time.Time
	for _, at := range w.at {
		if at.After(t0) && (first.IsZero() || at.Before(first)) {
			first = at
		}
	}
	return first
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
