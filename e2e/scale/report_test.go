package scale_e2e

import (
	"flag"
	"fmt"
	"slices"
	"strings"
	"time"
)

var (
	flagProfiles = flag.String("scale.profiles", "", "keep the speaker's log and profiles (startup, resyncs, reloads CPU; heap) in this folder (default: the test's temporary folder)")
	// The DaemonSet's speaker runs no CPU profiler, whose buffers and
	// tables (about 6 MB at this scale) would count in the measured RSS.
	flagCPUProfiles = flag.Bool("scale.cpuprofiles", false, "also write CPU profiles of the speaker's phases (startup, resyncs, reloads); its RSS then includes the profiler's own memory")
)

// Issue 13's target 6.
const (
	targetRSS    = 200 << 20
	targetResync = 2 * time.Second
	targetReload = 100 * time.Millisecond
)

// results are what the VM measured, for the host to report.
type results struct {
	Spec      spec
	Populated populated
	// MemLimit and GOGC are the speaker's GOMEMLIMIT and GOGC, or none.
	MemLimit, GOGC string

	// Speaker is the speaker process at its first sync, settled after
	// its start, and at the end.
	Speaker struct{ FirstSync, Settled, End procStats }
	// Keepalived… are keepalived and its VRRP child, settled and at the
	// end.
	KeepalivedParent, KeepalivedVRRP, KeepalivedParentEnd, KeepalivedVRRPEnd procStats

	// CachesSynced and FirstSync are from the speaker's start to its
	// informers' caches synced and to keepalived.conf written by its
	// first sync; FirstIPVS from the caches synced to the IPVS table
	// written (its log); Render the VRRP plan and render of a sync (its
	// metrics' mean until settled).
	CachesSynced, FirstSync, FirstIPVS, Render time.Duration
	// AllVIPs is from the start to every VIP on the link; ColdHolders
	// from then to every cold Service's holder annotation written.
	AllVIPs, ColdHolders time.Duration

	Resyncs []resync
	Reloads []reload
	// ScrapeWall and ScrapeCPU are one scrape of the speaker's /metrics,
	// settled: its time, and the speaker's CPU until it is idle again (the
	// read of the IPVS counters the first scrape starts included).
	ScrapeWall, ScrapeCPU time.Duration
	// HeapInuse and NextGC are the Go runtime's, settled.
	HeapInuse, NextGC int64
	// FailedSyncs counts the syncs that failed until settled;
	// FailedSyncExample is the last one's log line.
	FailedSyncs       int
	FailedSyncExample string

	// The kernel's IPVS table in keeplb's pools, dumped in DumpTook.
	VirtualServers, RealServers, PodReals, NodePortReals int
	NodePortRealsMin, NodePortRealsMax                   int
	DumpTook                                             time.Duration
	// keepalived.conf and the link.
	ConfBytes, Instances, ConfVIPs, VIPsOnLink int

	// Failures are the targets missed; the host fills them in.
	Failures []string
}

// resync is one sync that changed nothing: Wall from the change of the
// touch Service to the sync's end (the watch's delivery included), IPVS
// and Render its parts, CPU the speaker's until it was idle again, Syncs
// how many ran.
type resync struct {
	Wall, IPVS, Render, CPU time.Duration
	Syncs                   int
}

// reload is one Service added: SIGHUP from the speaker's reload of
// keepalived to the VIP on the link, Visible from the Service's status
// written to the same.
type reload struct {
	SIGHUP, Visible time.Duration
}

// markdown renders r as the table of docs/benchmarks.md, and fills in
// r.Failures.
func (r *results) markdown(s spec) string {
	var b strings.Builder
	row := func(what, measured, target string) { fmt.Fprintf(&b, "| %s | %s | %s |\n", what, measured, target) }
	verdict := func(ok bool, target string) string {
		if ok {
			return target + " ✓"
		}
		return target + " ✗"
	}
	peak := r.Speaker.End.HWM
	fmt.Fprintf(&b, "%s Nodes, %s LoadBalancer Services (%s by nodeport), %s endpoints in %s EndpointSlices, %d IPPools whose VRRP nodeSelector picks %d Nodes; one speaker, for node-0000",
		thousands(s.Nodes), thousands(s.Services), thousands(s.NodePort), thousands(s.Services*s.Endpoints), thousands(s.Services), s.Pools, s.VRRPNodes)
	for _, e := range []struct{ name, v string }{{"GOGC", r.GOGC}, {"GOMEMLIMIT", r.MemLimit}} {
		switch e.v {
		case "", "none":
			fmt.Fprintf(&b, ", without %s", e.name)
		default:
			fmt.Fprintf(&b, ", with %s=%s", e.name, e.v)
		}
	}
	b.WriteString(".\n\n")
	b.WriteString("| what | measured | target |\n| --- | --- | --- |\n")
	row("objects created (32 clients)", fmt.Sprintf("Nodes %s, Services with status %s, EndpointSlices %s",
		r.Populated.Nodes.Round(time.Second), r.Populated.Services.Round(time.Second), r.Populated.Slices.Round(time.Second)), "")
	row("speaker RSS: first sync, settled, after the reloads", fmt.Sprintf("%s, %s, %s", mib(r.Speaker.FirstSync.RSS), mib(r.Speaker.Settled.RSS), mib(r.Speaker.End.RSS)), "")
	row("… of which anonymous, file-backed (the binary's pages): settled, after the reloads", fmt.Sprintf("%s + %s, %s + %s",
		mib(r.Speaker.Settled.Anon), mib(r.Speaker.Settled.File), mib(r.Speaker.End.Anon), mib(r.Speaker.End.File)), "")
	row("speaker peak RSS (VmHWM): until settled; in all", fmt.Sprintf("%s; %s", mib(r.Speaker.Settled.HWM), mib(peak)), verdict(peak <= targetRSS, "≤ 200 MiB"))
	if peak > targetRSS {
		r.Failures = append(r.Failures, fmt.Sprintf("speaker peak RSS %s > 200 MiB", mib(peak)))
	}
	row("speaker Go heap in use, settled; next GC at", fmt.Sprintf("%s; %s", mib(r.HeapInuse), mib(r.NextGC)), "")
	row("keepalived RSS (parent + VRRP child), settled", fmt.Sprintf("%s + %s", mib(r.KeepalivedParent.RSS), mib(r.KeepalivedVRRP.RSS)), "")
	row("speaker start to its informers' caches synced", sec(r.CachesSynced), "")
	row("first full sync, from the caches synced: IPVS table written (empty to full; nftables first), keepalived.conf written", fmt.Sprintf("%s, %s", sec(r.FirstIPVS), sec(r.FirstSync-r.CachesSynced)), "")
	row("VRRP plan and render of a sync (mean until settled)", ms(r.Render), "")
	row("start to every VIP on the link (keepalived MASTER of all)", sec(r.AllVIPs), "")
	row(fmt.Sprintf("holder annotations of %d Services written after that", s.Cold), sec(r.ColdHolders), "")
	row("speaker CPU: to settled, in all", fmt.Sprintf("%s, %s", sec(r.Speaker.Settled.CPU), sec(r.Speaker.End.CPU)), "")
	row("syncs failed until settled", fmt.Sprintf("%d%s", r.FailedSyncs, lastError(r.FailedSyncExample)), "")
	row("one scrape of the speaker's /metrics: time; speaker CPU, with the counters' read it starts", fmt.Sprintf("%s, %s", sec(r.ScrapeWall), sec(r.ScrapeCPU)), "")
	if len(r.Resyncs) > 0 {
		var wall, ipvs, render, cpu []time.Duration
		for _, x := range r.Resyncs {
			wall, ipvs, render, cpu = append(wall, x.Wall), append(ipvs, x.IPVS), append(render, x.Render), append(cpu, x.CPU)
		}
		worst := slices.Max(wall)
		row(fmt.Sprintf("resync, nothing changed: change to sync done (%d runs)", len(wall)), spread(wall), verdict(worst <= targetResync, "≤ 2 s"))
		if worst > targetResync {
			r.Failures = append(r.Failures, fmt.Sprintf("resync took up to %s > 2 s", sec(worst)))
		}
		row("… of which IPVS (dump and diff), VRRP plan and render", fmt.Sprintf("%s; %s", spread(ipvs), spread(render)), "")
		row("… speaker CPU per resync", spread(cpu), "")
	} else {
		row("resync, nothing changed", "not measured", "≤ 2 s ✗")
		r.Failures = append(r.Failures, "no resync measured")
	}
	if len(r.Reloads) > 0 {
		var hup, vis []time.Duration
		for _, x := range r.Reloads {
			hup, vis = append(hup, x.SIGHUP), append(vis, x.Visible)
		}
		worst := slices.Max(hup)
		row(fmt.Sprintf("keepalived reload, SIGHUP to the new VIP on the link (%d runs)", len(hup)), spread(hup), verdict(worst <= targetReload, "≤ 100 ms"))
		if worst > targetReload {
			r.Failures = append(r.Failures, fmt.Sprintf("keepalived reload took up to %s > 100 ms", ms(worst)))
		}
		row("new Service: status written to its VIP on the link", spread(vis), "")
	}
	row("IPVS virtual servers; real servers (to pods; to NodePorts)", fmt.Sprintf("%s; %s (%s; %s, %d–%d per Service)",
		thousands(r.VirtualServers), thousands(r.RealServers), thousands(r.PodReals), thousands(r.NodePortReals), r.NodePortRealsMin, r.NodePortRealsMax), "as the objects imply ✓")
	row("keepalived.conf", fmt.Sprintf("%s bytes, %d instances, %s VIPs (%s on the link)", thousands(r.ConfBytes), r.Instances, thousands(r.ConfVIPs), thousands(r.VIPsOnLink)), "")
	return b.String()
}

// lastError is `: "err"` from a klog line's err="…", or "".
func lastError(line string) string {
	_, after, ok := strings.Cut(line, `err="`)
	if !ok {
		return ""
	}
	msg, _, _ := strings.Cut(after, `"`)
	return fmt.Sprintf(" (last: %q)", msg)
}

// spread is "median (min–max)".
func spread(d []time.Duration) string {
	d = slices.Sorted(slices.Values(d))
	f := sec
	if d[len(d)-1] < time.Second {
		f = ms
	}
	if len(d) == 1 {
		return f(d[0])
	}
	return fmt.Sprintf("%s (%s–%s)", f(d[len(d)/2]), f(d[0]), f(d[len(d)-1]))
}

func sec(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// thousands writes n with commas: 10,000.
func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
