package scale_e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// Metrics of the speaker the test reads.
const (
	mLastSync    = "keeplb_speaker_last_sync_success_timestamp_seconds"
	mIPVSSum     = "keeplb_ipvs_sync_duration_seconds_sum"
	mIPVSCount   = "keeplb_ipvs_sync_duration_seconds_count"
	mRenderSum   = "keeplb_speaker_render_duration_seconds_sum"
	mRenderCount = "keeplb_speaker_render_duration_seconds_count"
	mReloads     = "keeplb_keepalived_reloads"
	mVirtual     = "keeplb_ipvs_virtual_servers"
	mReal        = "keeplb_ipvs_real_servers"
	slowestSync  = 10 * time.Minute
	vipsDeadline = 5 * time.Minute
)

// nodeSide is the test in the VM: node 0's link, the speaker, and the
// measurements, left in dir/results.json for the host.
func nodeSide(t *testing.T, s spec, dir string) {
	ctx := t.Context()
	cfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(dir, "admin.kubeconfig"))
	if err != nil {
		t.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(bulkConfig(cfg))
	profiles := *flagProfiles
	if profiles == "" {
		profiles = dir
	}
	r := results{Spec: s, MemLimit: *flagMemLimit, GOGC: *flagGOGC}
	addLink(t)
	// What the DaemonSet's init container runs before the speaker.
	exe, _ := os.Executable()
	prep := exec.Command(exe, "prepare-node", "--ipvs")
	prep.Env = append(os.Environ(), envExec+"=1")
	if out, err := prep.CombinedOutput(); err != nil {
		t.Fatalf("keeplb prepare-node --ipvs: %v\n%s", err, out)
	}

	sp := startSpeaker(t, filepath.Join(dir, "speaker.kubeconfig"), profiles, filepath.Join(profiles, "speaker.log"))
	pid := sp.cmd.Process.Pid
	stats := func() procStats {
		st, err := statsOf(pid)
		if err != nil {
			t.Fatalf("speaker: %v (log: %s)", err, filepath.Join(profiles, "speaker.log"))
		}
		return st
	}
	alive := func() {
		if sp.exited() {
			t.Fatalf("the speaker exited; its log: %s", filepath.Join(profiles, "speaker.log"))
		}
	}
	// Scrapes of /metrics are few and never the signal that a sync has
	// ended: at this scale one costs the speaker seconds of CPU (see
	// ScrapeCPU). The signals are its log and its CPU going idle.
	var m map[string]float64
	scrape := func() {
		alive()
		var err error
		if m, err = metrics(ctx); err != nil {
			t.Fatalf("scrape the speaker's metrics: %v", err)
		}
	}
	idle := func() {
		alive()
		if !quiet(pid, slowestSync) {
			t.Fatalf("the speaker was not idle once in %s", slowestSync)
		}
	}

	// The first full sync: the informers' lists, then the whole state
	// computed and programmed into an empty IPVS table (after the
	// nftables table), then keepalived.conf written.
	waitFor(t, slowestSync, time.Second, "keepalived.conf written by the first sync", func() bool {
		alive()
		_, ok := sp.first("keepalived.conf changed", sp.start)
		return ok
	})
	r.Speaker.FirstSync = stats()
	if l, ok := sp.first("Caches are synced", sp.start); ok {
		r.CachesSynced = l.at.Sub(sp.start)
	}
	if l, ok := sp.first("IPVS table changed", sp.start); ok {
		r.FirstIPVS = l.at.Sub(sp.start) - r.CachesSynced
	}
	l, _ := sp.first("keepalived.conf changed", sp.start)
	r.FirstSync = l.at.Sub(sp.start)
	t.Logf("first sync: caches synced %s after start, IPVS table written %s and keepalived.conf %s after that; speaker RSS %s, CPU %s",
		r.CachesSynced, r.FirstIPVS, r.FirstSync-r.CachesSynced, mib(r.Speaker.FirstSync.RSS), r.Speaker.FirstSync.CPU)

	// keepalived takes every instance (its peers are API objects only):
	// every VIP ends up on the link.
	waitFor(t, vipsDeadline, 2*time.Second, "every VIP on "+link, func() bool { alive(); return countVIPs(t, s) >= s.Services })
	r.AllVIPs = time.Since(sp.start)
	t.Logf("%d VIPs on %s %s after start", s.Services, link, r.AllVIPs.Round(time.Millisecond))

	// The cold Services' holder annotations, which the speaker writes
	// after becoming MASTER, at its client's QPS.
	coldStart := time.Now()
	waitFor(t, slowestSync, 2*time.Second, "the holder annotation on every cold Service", func() bool {
		alive()
		return coldDone(ctx, t, client, s)
	})
	r.ColdHolders = time.Since(coldStart)
	t.Logf("holder annotations of %d cold Services written in %s", s.Cold, r.ColdHolders.Round(time.Millisecond))

	idle()
	r.Speaker.Settled = stats()
	r.KeepalivedParent, r.KeepalivedVRRP = keepalivedStats(t)
	sp.endPhase() // the startup profile
	if err := fetch(ctx, "/debug/pprof/heap?gc=1", filepath.Join(profiles, "heap.pprof")); err != nil {
		t.Errorf("heap profile: %v", err)
	}
	t.Logf("settled: speaker RSS %s (peak %s), CPU %s; keepalived RSS %s + VRRP child %s",
		mib(r.Speaker.Settled.RSS), mib(r.Speaker.Settled.HWM), r.Speaker.Settled.CPU, mib(r.KeepalivedParent.RSS), mib(r.KeepalivedVRRP.RSS))

	// What a scrape of /metrics costs the speaker: the first starts the
	// first read of the IPVS table's counters in the background (no
	// scrape waits for one), and there is a VRRP state gauge per VIP. Its
	// CPU counts until the speaker is idle again, that read included, so
	// that the read does not land in the first resync's.
	before, start := stats().CPU, time.Now()
	scrape()
	r.ScrapeWall = time.Since(start)
	idle()
	r.ScrapeCPU = stats().CPU - before
	t.Logf("the first scrape: %s, speaker CPU %s; peak RSS after it %s", r.ScrapeWall.Round(time.Millisecond), r.ScrapeCPU, mib(stats().HWM))
	r.HeapInuse, r.NextGC = int64(m["go_memstats_heap_inuse_bytes"]), int64(m["go_memstats_next_gc_bytes"])
	if m[mRenderCount] > 0 {
		r.Render = seconds(m[mRenderSum] / m[mRenderCount])
	}
	r.FailedSyncs, r.FailedSyncExample = sp.failures()
	checkKernel(t, s, &r, m)

	// Syncs that change nothing: a Service that is not keeplb's changes,
	// which wakes the speaker for a sync. Its end is the sync's own
	// timestamp, read after the speaker went idle again.
	for k := 1; k <= *flagResyncs; k++ {
		last, ipvsSum, renderSum, count := m[mLastSync], m[mIPVSSum], m[mRenderSum], m[mIPVSCount]
		cpu := stats().CPU
		t0 := time.Now()
		if err := touch(ctx, client, k); err != nil {
			t.Fatal(err)
		}
		idle()
		used := stats().CPU - cpu
		scrape()
		if m[mLastSync] <= last {
			t.Errorf("no sync after a change to Service %s/%s", ns, touchService)
			break
		}
		r.Resyncs = append(r.Resyncs, resync{
			Wall: unix(m[mLastSync]).Sub(t0), IPVS: seconds(m[mIPVSSum] - ipvsSum), Render: seconds(m[mRenderSum] - renderSum),
			CPU: used, Syncs: int(m[mIPVSCount] - count),
		})
		t.Logf("resync %d: %+v; peak RSS %s", k, r.Resyncs[len(r.Resyncs)-1], mib(stats().HWM))
		idle() // the scrape's own work
	}
	sp.endPhase() // the resyncs' profile

	// keepalived's reload: a new Service's VIP joins an instance this node
	// masters; the reload is from the speaker's SIGHUP (its log) to the
	// VIP on the link (netlink).
	for k := range s.Extra {
		r.Reloads = append(r.Reloads, addService(t, client, sp, s, s.Services+k))
		t.Logf("reload %d: %+v; peak RSS %s", k+1, r.Reloads[len(r.Reloads)-1], mib(stats().HWM))
		idle()
	}
	sp.endPhase() // the reloads' profile
	r.Speaker.End = stats()
	// What the scrapes, resyncs and reloads allocated: compare with the
	// settled profile (go tool pprof -base heap.pprof end-heap.pprof).
	if err := fetch(ctx, "/debug/pprof/heap", filepath.Join(profiles, "end-heap.pprof")); err != nil {
		t.Errorf("end heap profile: %v", err)
	}
	r.KeepalivedParentEnd, r.KeepalivedVRRPEnd = keepalivedStats(t)

	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, resultsFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// addLink makes node 0's interface: a dummy link with its InternalIP.
func addLink(t *testing.T) {
	l := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: link}}
	if err := netlink.LinkAdd(l); err != nil {
		t.Fatalf("add %s: %v", link, err)
	}
	a := nodeIP(0).As4()
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(a[:]), Mask: net.CIDRMask(nodeMask, 32)}}
	if err := netlink.AddrAdd(l, addr); err != nil {
		t.Fatal(err)
	}
	// keepalived sends its adverts to the VRRP multicast group, and
	// refuses a link without multicast; a dummy link drops them.
	if err := netlink.LinkSetMulticastOn(l); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

// inPools says whether a lies in one of the pools of s.
func (s spec) inPools(a netip.Addr) bool {
	b := a.As4()
	return a.Is4() && b[0] == 10 && int(b[1]) >= 100 && int(b[1]) < 100+s.Pools
}

// vipsOnLink returns the VIPs on link. A dump that the kernel reports
// interrupted (addresses changed meanwhile: keepalived adding its VIPs)
// is read again, a few times; then its error is returned.
func vipsOnLink(s spec) ([]netip.Addr, error) {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return nil, err
	}
	var addrs []netlink.Addr
	for range 10 {
		if addrs, err = netlink.AddrList(l, netlink.FAMILY_V4); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", link, err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && s.inPools(ip) {
			out = append(out, ip)
		}
	}
	return out, nil
}

// countVIPs returns how many VIPs are on link; -1 while keepalived keeps
// changing them faster than a dump can read them.
func countVIPs(t *testing.T, s spec) int {
	vips, err := vipsOnLink(s)
	if errors.Is(err, netlink.ErrDumpInterrupted) {
		return -1
	}
	if err != nil {
		t.Fatal(err)
	}
	return len(vips)
}

// coldDone says whether every cold Service names node 0 as its VIP's
// holder.
func coldDone(ctx context.Context, t *testing.T, client kubernetes.Interface, s spec) bool {
	if s.Cold == 0 {
		return true
	}
	list, err := client.CoreV1().Services(ns).List(ctx, metav1.ListOptions{LabelSelector: coldLabel + "=true"})
	if err != nil {
		t.Logf("list the cold Services: %v", err)
		return false
	}
	if len(list.Items) != s.Cold {
		t.Fatalf("%d cold Services, want %d", len(list.Items), s.Cold)
	}
	for _, svc := range list.Items {
		vips := ingressOf(&svc)
		h := annotations.ParseHolders(svc.Annotations[annotations.Holder], vips)
		if len(vips) != 1 || h[vips[0]] != node(0) {
			return false
		}
	}
	return true
}

// quiet waits until pid has used at most 2% of a CPU over 3 seconds, and
// says whether it did within timeout. It reads /proc, which costs the
// speaker nothing.
func quiet(pid int, timeout time.Duration) bool {
	const window, step = 3 * time.Second, 250 * time.Millisecond
	type sample struct {
		at  time.Time
		cpu time.Duration
	}
	var samples []sample
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		st, err := statsOf(pid)
		if err != nil {
			return false
		}
		now := sample{time.Now(), st.CPU}
		samples = append(samples, now)
		for len(samples) > 1 && now.at.Sub(samples[1].at) >= window {
			samples = samples[1:]
		}
		if first := samples[0]; now.at.Sub(first.at) >= window && now.cpu-first.cpu <= window/50 {
			return true
		}
		time.Sleep(step)
	}
	return false
}

// keepalivedStats returns the memory and CPU of keepalived and of its
// VRRP child.
func keepalivedStats(t *testing.T) (parent, vrrp procStats) {
	pp, vp := keepalivedPIDs()
	var err error
	if parent, err = statsOf(pp); err != nil {
		t.Errorf("keepalived: %v", err)
	}
	if vrrp, err = statsOf(vp); err != nil {
		t.Errorf("keepalived's VRRP child: %v", err)
	}
	return parent, vrrp
}

var (
	vipLine      = regexp.MustCompile(`(?m)^\s+\d+\.\d+\.\d+\.\d+(/\d+)? dev ` + link + `$`)
	instanceLine = regexp.MustCompile(`(?m)^vrrp_instance `)
)

// checkKernel compares the IPVS table and the VIPs with what the
// objects imply, and records keepalived.conf's size and contents.
func checkKernel(t *testing.T, s spec, r *results, m map[string]float64) {
	t.Helper()
	conf, err := os.ReadFile(filepath.Join(runDir, "keepalived.conf"))
	if err != nil {
		t.Fatal(err)
	}
	r.ConfBytes = len(conf)
	r.Instances = len(instanceLine.FindAll(conf, -1))
	r.ConfVIPs = len(vipLine.FindAll(conf, -1))
	waitFor(t, time.Minute, time.Second, "a whole dump of "+link+"'s addresses", func() bool {
		r.VIPsOnLink = countVIPs(t, s)
		return r.VIPsOnLink >= 0
	})
	if r.ConfVIPs != s.Services || r.VIPsOnLink != s.Services {
		t.Errorf("keepalived.conf has %d VIPs and %s %d; want %d each", r.ConfVIPs, link, r.VIPsOnLink, s.Services)
	}

	h, err := ipvs.New()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	start := time.Now()
	table, err := ipvs.Dump(h, func(k ipvs.Key) bool { return s.inPools(k.Address) })
	if err != nil {
		t.Fatal(err)
	}
	r.DumpTook = time.Since(start)
	r.VirtualServers = len(table)
	r.NodePortRealsMin = math.MaxInt
	var bad []string
	for i := range s.Services {
		k := ipvs.Key{Address: s.vip(i), Protocol: "TCP", Port: 80}
		e, ok := table[k]
		if !ok {
			bad = append(bad, "no virtual server "+k.String())
			continue
		}
		r.RealServers += len(e.Reals)
		if s.nodePort(i) {
			r.NodePortReals += len(e.Reals)
			r.NodePortRealsMin, r.NodePortRealsMax = min(r.NodePortRealsMin, len(e.Reals)), max(r.NodePortRealsMax, len(e.Reals))
			for _, rs := range e.Reals {
				if b := rs.Address.As4(); b[0] != 10 || b[1] != 80 || rs.Port < 30000 {
					bad = append(bad, fmt.Sprintf("%s: real server %s is no NodePort of a Node", k, rs.AddrPort()))
				}
			}
			continue
		}
		r.PodReals += len(e.Reals)
		var got, want []netip.AddrPort
		for _, rs := range e.Reals {
			got = append(got, rs.AddrPort())
		}
		for j := range s.Endpoints {
			want = append(want, netip.AddrPortFrom(s.podIP(i, j), 8080))
		}
		slices.SortFunc(got, netip.AddrPort.Compare)
		slices.SortFunc(want, netip.AddrPort.Compare)
		if !slices.Equal(got, want) {
			bad = append(bad, fmt.Sprintf("%s: real servers %v, want %v", k, got, want))
		}
	}
	if r.NodePortRealsMin == math.MaxInt {
		r.NodePortRealsMin = 0
	}
	if len(table) != s.Services {
		bad = append(bad, fmt.Sprintf("%d virtual servers in keeplb's pools, want %d", len(table), s.Services))
	}
	if int(m[mVirtual]) != len(table) || int(m[mReal]) != r.RealServers {
		bad = append(bad, fmt.Sprintf("the speaker's metrics say %v virtual and %v real servers; the kernel has %d and %d", m[mVirtual], m[mReal], len(table), r.RealServers))
	}
	if len(bad) > 0 {
		t.Errorf("IPVS table does not match the objects (%d problems), first: %v", len(bad), bad[:min(len(bad), 5)])
	}
	t.Logf("IPVS: %d virtual servers, %d real servers (%d to pods, %d to NodePorts, %d–%d per nodeport Service), dumped in %s; keepalived.conf: %d bytes, %d instances, %d VIPs",
		r.VirtualServers, r.RealServers, r.PodReals, r.NodePortReals, r.NodePortRealsMin, r.NodePortRealsMax, r.DumpTook.Round(time.Millisecond), r.ConfBytes, r.Instances, r.ConfVIPs)
}

// addService creates Service i (and its EndpointSlice) and measures the
// keepalived reload that puts its VIP on the link.
func addService(t *testing.T, client kubernetes.Interface, sp *speakerProc, s spec, i int) reload {
	ctx := t.Context()
	vip := s.vip(i)
	updates, done := make(chan netlink.AddrUpdate, 4096), make(chan struct{})
	defer close(done)
	if err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{ReceiveBufferSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	created := time.Now()
	if _, err := client.DiscoveryV1().EndpointSlices(ns).Create(ctx, s.slice(i), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc, err := client.CoreV1().Services(ns).Create(ctx, s.serviceObject(i), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Status.LoadBalancer = s.ingress(i)
	if _, err := client.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	statused := time.Now()
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case u := <-updates:
			ip, _ := netip.AddrFromSlice(u.LinkAddress.IP.To4())
			if !u.NewAddr || ip != vip {
				continue
			}
			seen := time.Now()
			rl := reload{Visible: seen.Sub(statused)}
			if l, ok := sp.first("Reloaded keepalived", created); ok {
				rl.SIGHUP = seen.Sub(l.at)
			} else {
				t.Errorf("%s is on the link, but the speaker logged no reload", vip)
			}
			return rl
		case <-deadline:
			t.Fatalf("%s of Service %s not on %s 2 minutes after its status was written", vip, service(i), link)
		}
	}
}

// ingressOf returns the addresses of svc's status.loadBalancer.ingress.
func ingressOf(svc *v1.Service) []netip.Addr {
	var out []netip.Addr
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(ing.IP); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// waitFor polls cond every interval until it holds, failing t after
// timeout.
func waitFor(t *testing.T, timeout, interval time.Duration, what string, cond func() bool) {
	t.Helper()
	if !poll(timeout, interval, cond) {
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// poll polls cond every interval until it holds or timeout passes, and
// says whether it held.
func poll(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return true
}

func unix(sec float64) time.Time { return time.Unix(0, int64(sec*1e9)) }

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
