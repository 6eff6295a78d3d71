package metrics

import (
	"cmp"
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/testutil"

	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

// serveStats serves the IPVS counters read returns, as a speaker does.
func serveStats(t testing.TB, read func() []VirtualServerStats, maxAge time.Duration) *httptest.Server {
	m := NewSpeaker()
	m.IPVSStats.MaxAge = maxAge
	m.RegisterIPVSStats(read)
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(srv.Close)
	return srv
}

func TestIPVSStatsServed(t *testing.T) {
	read := func() []VirtualServerStats {
		return []VirtualServerStats{
			{Service: "ns/web", Key: ipvs.Key{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80},
				Stats: ipvs.Stats{Connections: 3, PacketsIn: 40, PacketsOut: 30, BytesIn: 4000, BytesOut: 90000}},
			{Service: "ns/dns", Key: ipvs.Key{Address: netip.MustParseAddr("2001:db8::5"), Protocol: ipvs.UDP, Port: 53},
				Stats: ipvs.Stats{Connections: 1, PacketsIn: 2, PacketsOut: 2, BytesIn: 120, BytesOut: 300}},
			// The largest values the kernel's 64-bit counters reach.
			{Service: "ns/big", Key: ipvs.Key{Address: netip.MustParseAddr("192.0.2.9"), Protocol: ipvs.SCTP, Port: 65535},
				Stats: ipvs.Stats{Connections: 1<<32 - 1, PacketsIn: 1<<64 - 1, BytesOut: 1<<64 - 1}},
		}
	}
	want := `
# HELP keeplb_ipvs_connections_total [ALPHA] Connections IPVS scheduled to one of keeplb's virtual servers on this node, since the virtual server was created (64-bit where the kernel has 64-bit counters, Linux 4.1 and later; 32-bit before, where it wraps).
# TYPE keeplb_ipvs_connections_total counter
keeplb_ipvs_connections_total{port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 1
keeplb_ipvs_connections_total{port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 3
keeplb_ipvs_connections_total{port="65535",protocol="SCTP",service="ns/big",vip="192.0.2.9"} 4.294967295e+09
# HELP keeplb_ipvs_packets_total [ALPHA] Packets through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created (64-bit from Linux 4.1; 32-bit before, where it wraps).
# TYPE keeplb_ipvs_packets_total counter
keeplb_ipvs_packets_total{direction="in",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 2
keeplb_ipvs_packets_total{direction="out",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 2
keeplb_ipvs_packets_total{direction="in",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 40
keeplb_ipvs_packets_total{direction="out",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 30
keeplb_ipvs_packets_total{direction="in",port="65535",protocol="SCTP",service="ns/big",vip="192.0.2.9"} 1.8446744073709552e+19
keeplb_ipvs_packets_total{direction="out",port="65535",protocol="SCTP",service="ns/big",vip="192.0.2.9"} 0
# HELP keeplb_ipvs_bytes_total [ALPHA] Bytes through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created.
# TYPE keeplb_ipvs_bytes_total counter
keeplb_ipvs_bytes_total{direction="in",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 120
keeplb_ipvs_bytes_total{direction="out",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 300
keeplb_ipvs_bytes_total{direction="in",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 4000
keeplb_ipvs_bytes_total{direction="out",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 90000
keeplb_ipvs_bytes_total{direction="in",port="65535",protocol="SCTP",service="ns/big",vip="192.0.2.9"} 0
keeplb_ipvs_bytes_total{direction="out",port="65535",protocol="SCTP",service="ns/big",vip="192.0.2.9"} 1.8446744073709552e+19
`
	srv := serveStats(t, read, 0)
	if err := testutil.ScrapeAndCompare(srv.URL, strings.NewReader(want),
		"keeplb_ipvs_connections_total", "keeplb_ipvs_packets_total", "keeplb_ipvs_bytes_total"); err != nil {
		t.Error(err)
	}
	// The rest of /metrics is served with them, each family once.
	families := parse(t, get(t, srv.URL, ""))
	if _, ok := families["keeplb_keepalived_reloads"]; !ok {
		t.Error("the registry's families are missing beside the IPVS counters")
	}
	if got := len(families["keeplb_ipvs_bytes_total"].GetMetric()); got != 6 {
		t.Errorf("keeplb_ipvs_bytes_total has %d series, want 6", got)
	}
	// Gzipped when the client asks, as Prometheus does; the same families.
	gz := get(t, srv.URL, "gzip")
	if len(parse(t, gz)) != len(families) {
		t.Errorf("gzipped: %d families, plain: %d", len(parse(t, gz)), len(families))
	}
}

// TestIPVSStatsEscaped checks that label values are escaped as the text
// format requires and come back whole; a Service's name cannot hold these
// characters, but what reaches a parser must not depend on that.
func TestIPVSStatsEscaped(t *testing.T) {
	odd := "ns/a\\\"b\nc"
	srv := serveStats(t, func() []VirtualServerStats {
		return []VirtualServerStats{{Service: odd, Key: ipvs.Key{Address: netip.MustParseAddr("::ffff:192.0.2.1"), Protocol: ipvs.TCP, Port: 1}}}
	}, 0)
	mf := parse(t, get(t, srv.URL, ""))["keeplb_ipvs_connections_total"]
	if len(mf.GetMetric()) != 1 {
		t.Fatalf("%d series, want 1", len(mf.GetMetric()))
	}
	got := map[string]string{}
	for _, l := range mf.GetMetric()[0].GetLabel() {
		got[l.GetName()] = l.GetValue()
	}
	if got["service"] != odd || got["vip"] != "::ffff:192.0.2.1" {
		t.Errorf("labels %q, want service %q and the mapped address as IPVS holds it", got, odd)
	}
}

func TestIPVSStatsNoneServed(t *testing.T) {
	srv := serveStats(t, func() []VirtualServerStats { return nil }, 0)
	body := get(t, srv.URL, "")
	if strings.Contains(body, "keeplb_ipvs_connections_total") {
		t.Errorf("counters of no virtual server served:\n%s", body)
	}
	parse(t, body)
}

// get scrapes url with the given Accept-Encoding, decompressing what the
// server compressed.
func get(t testing.TB, url, encoding string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Without an Accept-Encoding of ours, the transport would ask for
	// gzip and decompress silently.
	req.Header.Set("Accept-Encoding", cmp.Or(encoding, "identity"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body io.Reader = resp.Body
	if got := resp.Header.Get("Content-Encoding"); got != encoding && !(encoding == "identity" && got == "") && !(encoding == "" && got == "") {
		t.Fatalf("Content-Encoding %q, asked for %q", got, encoding)
	}
	if encoding == "gzip" {
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// parse parses a text scrape, failing on what a Prometheus would reject
// (a family twice among them).
func parse(t testing.TB, body string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("the scrape does not parse: %v", err)
	}
	return mfs
}

// TestIPVSStatsCached checks that a scrape serves the last read's counters,
// reads again only when they are maxAge old, in the background, and never
// waits for that read.
func TestIPVSStatsCached(t *testing.T) {
	key := ipvs.Key{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80}
	var (
		reads    atomic.Int32
		conns    atomic.Uint64
		unblock  = make(chan struct{})
		blocking atomic.Bool
	)
	read := func() []VirtualServerStats {
		reads.Add(1)
		if blocking.Load() {
			<-unblock // the kernel's dump takes its time
		}
		return []VirtualServerStats{{Service: "ns/web", Key: key, Stats: ipvs.Stats{Connections: conns.Load()}}}
	}
	clk := time.Unix(1000, 0)
	c := newIPVSStatsText(read, 30*time.Second)
	var mu sync.Mutex
	c.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clk }
	advance := func(d time.Duration) { mu.Lock(); clk = clk.Add(d); mu.Unlock() }
	readDone := make(chan struct{}, 1)
	c.done = func() { readDone <- struct{}{} }
	scrape := func() float64 {
		t.Helper()
		mf, ok := parse(t, string(c.current()))["keeplb_ipvs_connections_total"]
		if !ok || len(mf.GetMetric()) != 1 {
			t.Fatalf("no keeplb_ipvs_connections_total series")
		}
		return mf.GetMetric()[0].GetCounter().GetValue()
	}

	// The first scrape serves no counters and starts the first read,
	// rather than wait for it (the kernel's dump can outlast a scrape's
	// timeout); the next serves them.
	conns.Store(1)
	if _, ok := parse(t, string(c.current()))["keeplb_ipvs_connections_total"]; ok {
		t.Fatal("the first scrape served counters before any read")
	}
	select {
	case <-readDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the first read did not end")
	}
	if got := scrape(); got != 1 || reads.Load() != 1 {
		t.Fatalf("after the first read: %v connections, %d reads; want 1, 1", got, reads.Load())
	}
	conns.Store(2)
	advance(29 * time.Second)
	if got := scrape(); got != 1 || reads.Load() != 1 {
		t.Fatalf("29 s later: %v connections, %d reads; want the first read's 1, 1 read", got, reads.Load())
	}
	// 30 s old: the scrape is served the old counters at once while a read
	// runs, blocked in the kernel; scrapes meanwhile start no other.
	blocking.Store(true)
	advance(time.Second)
	for range 3 {
		if got := scrape(); got != 1 {
			t.Fatalf("while reading: %v connections, want the last read's 1", got)
		}
	}
	close(unblock)
	select {
	case <-readDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the background read did not end")
	}
	if reads.Load() != 2 {
		t.Errorf("%d reads, want 2: one at a time", reads.Load())
	}
	if got := scrape(); got != 2 {
		t.Errorf("after the read: %v connections, want 2", got)
	}
}

// collectorBaseline serves the IPVS counters as the speaker did before it
// served them as text, the benchmark's baseline: a collector whose series
// are built from a read (at every scrape, or once and kept) and then
// gathered and encoded by the registry at every scrape.
type collectorBaseline struct {
	metrics.BaseStableCollector
	read                        func() []VirtualServerStats
	keep                        bool
	kept                        []metrics.Metric
	connections, packets, bytes *metrics.Desc
}

func newCollectorBaseline(read func() []VirtualServerStats, keep bool) *collectorBaseline {
	labels := []string{"service", "vip", "port", "protocol"}
	withDirection := append(slices.Clone(labels), "direction")
	return &collectorBaseline{
		read: read, keep: keep,
		connections: metrics.NewDesc(ipvsFamilies[0].name, "connections", labels, nil, metrics.ALPHA, ""),
		packets:     metrics.NewDesc(ipvsFamilies[1].name, "packets", withDirection, nil, metrics.ALPHA, ""),
		bytes:       metrics.NewDesc(ipvsFamilies[2].name, "bytes", withDirection, nil, metrics.ALPHA, ""),
	}
}

func (c *collectorBaseline) DescribeWithStability(ch chan<- *metrics.Desc) {
	ch <- c.connections
	ch <- c.packets
	ch <- c.bytes
}

func (c *collectorBaseline) CollectWithStability(ch chan<- metrics.Metric) {
	if !c.keep || c.kept == nil {
		c.kept = nil
		for _, s := range c.read() {
			l := []string{s.Service, s.Key.Address.String(), strconv.Itoa(int(s.Key.Port)), s.Key.Protocol}
			c.kept = append(c.kept,
				metrics.NewLazyConstMetric(c.connections, metrics.CounterValue, float64(s.Stats.Connections), l...),
				metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsIn), append(l, "in")...),
				metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsOut), append(l, "out")...),
				metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesIn), append(l, "in")...),
				metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesOut), append(l, "out")...))
		}
	}
	for _, m := range c.kept {
		ch <- m
	}
}

// discard is a ResponseWriter that counts what it is written and keeps
// none of it.
type discard struct {
	h http.Header
	n int
}

func (d *discard) Header() http.Header         { return d.h }
func (d *discard) WriteHeader(int)             {}
func (d *discard) Write(b []byte) (int, error) { d.n += len(b); return len(b), nil }

// BenchmarkIPVSStatsScrape measures one scrape of /metrics with the IPVS
// counters of 10,000 virtual servers (50,000 series), read from the
// state-modelling fake as Reconciler.Stats reads the kernel, uncompressed.
// The baselines are the collector the speaker had before: "collector-read"
// reads and builds at every scrape (--ipvs-stats-max-age=0), and
// "collector-kept" is its default, which kept the built series between
// reads and gathered them at every scrape. "text-read" and "text-kept"
// are the same two with the counters rendered as text. The fake's dump is
// far cheaper than the kernel's, so the "-read" rows are a floor.
func BenchmarkIPVSStatsScrape(b *testing.B) {
	const n = 10000
	f := ipvstesting.New()
	owners := map[ipvs.Key]string{}
	for i := range n {
		vs := ipvs.VirtualServer{Address: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
		f.Seed(vs)
		f.SetStats(vs.Key(), ipvs.Stats{Connections: uint64(i), PacketsIn: 10, PacketsOut: 10, BytesIn: 1000, BytesOut: 9000})
		owners[vs.Key()] = fmt.Sprintf("ns%d/svc%d", i%100, i)
	}
	read := func() []VirtualServerStats {
		vss, err := f.VirtualServers()
		if err != nil {
			b.Fatal(err)
		}
		var out []VirtualServerStats
		for _, vs := range vss {
			if o, ok := owners[vs.Key()]; ok {
				out = append(out, VirtualServerStats{Service: o, Key: vs.Key(), Stats: vs.Stats})
			}
		}
		return out
	}
	for _, bc := range []struct {
		name string
		h    func() http.Handler
	}{
		{"collector-read", func() http.Handler {
			reg := metrics.NewKubeRegistry()
			reg.CustomMustRegister(newCollectorBaseline(read, false))
			return metrics.HandlerFor(reg, metrics.HandlerOpts{})
		}},
		{"collector-kept", func() http.Handler {
			reg := metrics.NewKubeRegistry()
			reg.CustomMustRegister(newCollectorBaseline(read, true))
			return metrics.HandlerFor(reg, metrics.HandlerOpts{})
		}},
		{"text-read", func() http.Handler { return serveWithIPVSStats(metrics.NewKubeRegistry(), newIPVSStatsText(read, 0)) }},
		{"text-kept", func() http.Handler {
			return serveWithIPVSStats(metrics.NewKubeRegistry(), newIPVSStatsText(read, time.Hour))
		}},
	} {
		b.Run(fmt.Sprintf("%s/%d", bc.name, n), func(b *testing.B) {
			h := bc.h()
			req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			req.Header.Set("Accept", "text/plain")
			scrape := func() int {
				w := &discard{h: http.Header{}}
				h.ServeHTTP(w, req)
				return w.n
			}
			// The first read: the collector's waits for it, the kept
			// text's runs in the background.
			for start := time.Now(); scrape() < 50*n; time.Sleep(10 * time.Millisecond) {
				if time.Since(start) > time.Minute {
					b.Fatal("the 50,000 series were never served")
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if got := scrape(); got < 50*n {
					b.Fatalf("%d bytes served, want the 50,000 series", got)
				}
			}
		})
	}
}
