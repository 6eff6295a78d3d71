package metrics

import (
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/testutil"

	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

func TestIPVSStatsCollector(t *testing.T) {
	read := func() []VirtualServerStats {
		return []VirtualServerStats{
			{Service: "ns/web", Key: ipvs.Key{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80},
				Stats: ipvs.Stats{Connections: 3, PacketsIn: 40, PacketsOut: 30, BytesIn: 4000, BytesOut: 90000}},
			{Service: "ns/dns", Key: ipvs.Key{Address: netip.MustParseAddr("2001:db8::5"), Protocol: ipvs.UDP, Port: 53},
				Stats: ipvs.Stats{Connections: 1, PacketsIn: 2, PacketsOut: 2, BytesIn: 120, BytesOut: 300}},
		}
	}
	want := `
# HELP keeplb_ipvs_connections_total [ALPHA] Connections IPVS scheduled to one of keeplb's virtual servers on this node, since the virtual server was created (the kernel counts in 32 bits, so it wraps).
# TYPE keeplb_ipvs_connections_total counter
keeplb_ipvs_connections_total{port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 1
keeplb_ipvs_connections_total{port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 3
# HELP keeplb_ipvs_packets_total [ALPHA] Packets through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created (32 bits, so it wraps).
# TYPE keeplb_ipvs_packets_total counter
keeplb_ipvs_packets_total{direction="in",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 2
keeplb_ipvs_packets_total{direction="out",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 2
keeplb_ipvs_packets_total{direction="in",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 40
keeplb_ipvs_packets_total{direction="out",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 30
# HELP keeplb_ipvs_bytes_total [ALPHA] Bytes through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created.
# TYPE keeplb_ipvs_bytes_total counter
keeplb_ipvs_bytes_total{direction="in",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 120
keeplb_ipvs_bytes_total{direction="out",port="53",protocol="UDP",service="ns/dns",vip="2001:db8::5"} 300
keeplb_ipvs_bytes_total{direction="in",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 4000
keeplb_ipvs_bytes_total{direction="out",port="80",protocol="TCP",service="ns/web",vip="192.0.2.1"} 90000
`
	if err := testutil.CustomCollectAndCompare(newIPVSStatsCollector(read, 0), strings.NewReader(want),
		"keeplb_ipvs_connections_total", "keeplb_ipvs_packets_total", "keeplb_ipvs_bytes_total"); err != nil {
		t.Error(err)
	}
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
	c := newIPVSStatsCollector(read, 30*time.Second)
	metrics.NewKubeRegistry().CustomMustRegister(c) // makes its descriptions
	var mu sync.Mutex
	c.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clk }
	advance := func(d time.Duration) { mu.Lock(); clk = clk.Add(d); mu.Unlock() }
	readDone := make(chan struct{}, 1)
	c.done = func() { readDone <- struct{}{} }
	scrape := func() float64 {
		t.Helper()
		ch := make(chan metrics.Metric, 16)
		c.CollectWithStability(ch)
		close(ch)
		for m := range ch {
			var out dto.Metric
			if err := m.Write(&out); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(m.Desc().String(), `"keeplb_ipvs_connections_total"`) {
				return out.GetCounter().GetValue()
			}
		}
		t.Fatal("no keeplb_ipvs_connections_total")
		return 0
	}

	conns.Store(1)
	if got := scrape(); got != 1 || reads.Load() != 1 {
		t.Fatalf("first scrape: %v connections, %d reads; want 1, 1", got, reads.Load())
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

// oldIPVSStatsCollector is the collector as it was before the cache, the
// benchmark's baseline: a read at every scrape, the series built in the
// read's order.
type oldIPVSStatsCollector struct{ *ipvsStatsCollector }

func (c oldIPVSStatsCollector) CollectWithStability(ch chan<- metrics.Metric) {
	for _, s := range c.read() {
		l := []string{s.Service, s.Key.Address.String(), strconv.Itoa(int(s.Key.Port)), s.Key.Protocol}
		ch <- metrics.NewLazyConstMetric(c.connections, metrics.CounterValue, float64(s.Stats.Connections), l...)
		ch <- metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsIn), append(l, "in")...)
		ch <- metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsOut), append(l, "out")...)
		ch <- metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesIn), append(l, "in")...)
		ch <- metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesOut), append(l, "out")...)
	}
}

// BenchmarkIPVSStatsScrape measures one scrape of the IPVS counters (the
// collector's series gathered and written in the text format, as /metrics
// does) at 10,000 virtual servers, read from the state-modelling fake as
// Reconciler.Stats reads the kernel: "old" is the collector before the
// cache (oldIPVSStatsCollector, the baseline), "every-scrape" today's with
// --ipvs-stats-max-age=0 (a read at every scrape, series in the registry's
// order), "cached" the default, serving the last read's series. The
// fake's dump is far cheaper than the kernel's, so the gaps here are a
// floor.
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
		name   string
		maxAge time.Duration
		old    bool
	}{{"old", 0, true}, {"every-scrape", 0, false}, {"cached", time.Hour, false}} {
		b.Run(fmt.Sprintf("%s/%d", bc.name, n), func(b *testing.B) {
			reg := metrics.NewKubeRegistry()
			var c metrics.StableCollector = newIPVSStatsCollector(read, bc.maxAge)
			if bc.old {
				c = oldIPVSStatsCollector{newIPVSStatsCollector(read, 0)}
			}
			reg.CustomMustRegister(c)
			scrape := func() {
				mfs, err := reg.Gather()
				if err != nil {
					b.Fatal(err)
				}
				enc := expfmt.NewEncoder(io.Discard, expfmt.NewFormat(expfmt.TypeTextPlain))
				series := 0
				for _, mf := range mfs {
					series += len(mf.GetMetric())
					if err := enc.Encode(mf); err != nil {
						b.Fatal(err)
					}
				}
				if series != 5*n {
					b.Fatalf("%d series, want %d", series, 5*n)
				}
			}
			scrape() // the first read, which every variant waits for
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				scrape()
			}
		})
	}
}
