package metrics

import (
	"slices"
	"strconv"
	"sync"
	"time"

	"k8s.io/component-base/metrics"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// VirtualServerStats are the counters of one of keeplb's virtual servers
// and the Service it forwards.
type VirtualServerStats struct {
	// Service is the Service's "namespace/name".
	Service string
	Key     ipvs.Key
	Stats   ipvs.Stats
}

// ipvsStatsCollector turns the counters read reports into
// keeplb_ipvs_*_total series. They are read from the kernel when scraped,
// not at each sync, because syncs can be minutes apart (the periodic resync
// is 5 minutes) and counters that stale would make rates useless. But one
// read is a dump of the whole IPVS table with its counters: at 10,000
// virtual servers a scrape cost 13 s, over Prometheus' 10 s timeout. So a
// scrape serves the series of the last read, built once, and starts a new
// read in the background when that one is maxAge old: reads run at most
// one at a time and once per maxAge however often anyone scrapes, and only
// the first scrape waits for one. maxAge 0 reads at every scrape.
type ipvsStatsCollector struct {
	metrics.BaseStableCollector

	read                        func() []VirtualServerStats
	maxAge                      time.Duration
	now                         func() time.Time
	connections, packets, bytes *metrics.Desc

	mu sync.Mutex
	// series are the last read's, built; at is when that read started,
	// reading says one is under way.
	series  []metrics.Metric
	at      time.Time
	reading bool
	// done, for tests, is told when a background read ends.
	done func()
}

var _ metrics.StableCollector = (*ipvsStatsCollector)(nil)

func newIPVSStatsCollector(read func() []VirtualServerStats, maxAge time.Duration) *ipvsStatsCollector {
	labels := []string{"service", "vip", "port", "protocol"}
	withDirection := slices.Concat(labels, []string{"direction"})
	return &ipvsStatsCollector{
		read: read, maxAge: maxAge, now: time.Now,
		connections: metrics.NewDesc(namespace+"_ipvs_connections_total",
			"Connections IPVS scheduled to one of keeplb's virtual servers on this node, since the virtual server was created (the kernel counts in 32 bits, so it wraps).",
			labels, nil, metrics.ALPHA, ""),
		packets: metrics.NewDesc(namespace+"_ipvs_packets_total",
			"Packets through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created (32 bits, so it wraps).",
			withDirection, nil, metrics.ALPHA, ""),
		bytes: metrics.NewDesc(namespace+"_ipvs_bytes_total",
			"Bytes through one of keeplb's virtual servers on this node, by direction (in: from clients, out: replies), since the virtual server was created.",
			withDirection, nil, metrics.ALPHA, ""),
	}
}

// DescribeWithStability is part of metrics.StableCollector.
func (c *ipvsStatsCollector) DescribeWithStability(ch chan<- *metrics.Desc) {
	ch <- c.connections
	ch <- c.packets
	ch <- c.bytes
}

// CollectWithStability is part of metrics.StableCollector.
func (c *ipvsStatsCollector) CollectWithStability(ch chan<- metrics.Metric) {
	for _, m := range c.current() {
		ch <- m
	}
}

// current returns the series to serve: the last read's, starting a new
// read in the background when it is maxAge old; the first read, and every
// read with maxAge 0, in the caller's time.
func (c *ipvsStatsCollector) current() []metrics.Metric {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	switch {
	case c.maxAge == 0 || c.at.IsZero():
		c.series, c.at = c.build(c.read()), now
	case now.Sub(c.at) >= c.maxAge && !c.reading:
		c.reading = true
		go func() {
			series := c.build(c.read())
			c.mu.Lock()
			c.series, c.at, c.reading = series, now, false
			done := c.done
			c.mu.Unlock()
			if done != nil {
				done()
			}
		}()
	}
	return c.series
}

// build turns counters into their series, five per virtual server, in the
// order the registry sorts them into at every scrape (by label values, in
// the labels' alphabetical order: direction, port, protocol, service, vip),
// so that its sort finds them sorted: in random order it was a third of a
// scrape at 10,000 virtual servers.
func (c *ipvsStatsCollector) build(stats []VirtualServerStats) []metrics.Metric {
	type row struct {
		labels []string // port, protocol, service, vip: sorted by name
		s      ipvs.Stats
	}
	rows := make([]row, len(stats))
	for i, s := range stats {
		rows[i] = row{labels: []string{strconv.Itoa(int(s.Key.Port)), s.Key.Protocol, s.Service, s.Key.Address.String()}, s: s.Stats}
	}
	slices.SortFunc(rows, func(a, b row) int { return slices.Compare(a.labels, b.labels) })
	out := make([]metrics.Metric, 0, 5*len(rows))
	for _, f := range []struct {
		desc      *metrics.Desc
		direction string
		value     func(ipvs.Stats) uint64
	}{
		{c.connections, "", func(s ipvs.Stats) uint64 { return s.Connections }},
		{c.packets, "in", func(s ipvs.Stats) uint64 { return s.PacketsIn }},
		{c.packets, "out", func(s ipvs.Stats) uint64 { return s.PacketsOut }},
		{c.bytes, "in", func(s ipvs.Stats) uint64 { return s.BytesIn }},
		{c.bytes, "out", func(s ipvs.Stats) uint64 { return s.BytesOut }},
	} {
		for _, r := range rows {
			// The descriptions' label order: service, vip, port, protocol.
			l := []string{r.labels[2], r.labels[3], r.labels[0], r.labels[1]}
			if f.direction != "" {
				l = append(l, f.direction)
			}
			out = append(out, metrics.NewLazyConstMetric(f.desc, metrics.CounterValue, float64(f.value(r.s)), l...))
		}
	}
	return out
}

// IPVSStats says how the per-virtual-server counters are served (see
// RegisterIPVSStats). The zero value serves them, read at every scrape.
type IPVSStats struct {
	// Off serves none: five series per virtual server on every member node
	// add up (50,000 per node at 10,000 Services).
	Off bool
	// MaxAge is how old the counters served may be; 0 reads them at every
	// scrape.
	MaxAge time.Duration
}

// RegisterIPVSStats serves keeplb_ipvs_connections_total,
// keeplb_ipvs_packets_total{direction} and keeplb_ipvs_bytes_total{direction},
// labelled by service, vip, port and protocol, from what read returns, as
// m.IPVSStats says. read must be safe to call concurrently with everything
// else. Call it once, with RegisterIPVS.
func (m *Speaker) RegisterIPVSStats(read func() []VirtualServerStats) {
	if m.IPVSStats.Off {
		return
	}
	m.registry.CustomMustRegister(newIPVSStatsCollector(read, m.IPVSStats.MaxAge))
}
