package metrics

import (
	"slices"
	"strconv"

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
// keeplb_ipvs_*_total series at every scrape. They are read from the
// kernel at scrape time, not at each sync, because syncs can be minutes
// apart (the periodic resync is 5 minutes) and counters that stale would
// make rates useless.
type ipvsStatsCollector struct {
	metrics.BaseStableCollector

	read                        func() []VirtualServerStats
	connections, packets, bytes *metrics.Desc
}

var _ metrics.StableCollector = (*ipvsStatsCollector)(nil)

func newIPVSStatsCollector(read func() []VirtualServerStats) *ipvsStatsCollector {
	labels := []string{"service", "vip", "port", "protocol"}
	withDirection := slices.Concat(labels, []string{"direction"})
	return &ipvsStatsCollector{
		read: read,
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
	for _, s := range c.read() {
		l := []string{s.Service, s.Key.Address.String(), strconv.Itoa(int(s.Key.Port)), s.Key.Protocol}
		ch <- metrics.NewLazyConstMetric(c.connections, metrics.CounterValue, float64(s.Stats.Connections), l...)
		ch <- metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsIn), append(l, "in")...)
		ch <- metrics.NewLazyConstMetric(c.packets, metrics.CounterValue, float64(s.Stats.PacketsOut), append(l, "out")...)
		ch <- metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesIn), append(l, "in")...)
		ch <- metrics.NewLazyConstMetric(c.bytes, metrics.CounterValue, float64(s.Stats.BytesOut), append(l, "out")...)
	}
}

// RegisterIPVSStats serves keeplb_ipvs_connections_total,
// keeplb_ipvs_packets_total{direction} and keeplb_ipvs_bytes_total{direction},
// labelled by service, vip, port and protocol, from what read returns at
// each scrape. read must be safe to call concurrently with everything else.
// Call it once, with RegisterIPVS.
func (m *Speaker) RegisterIPVSStats(read func() []VirtualServerStats) {
	m.registry.CustomMustRegister(newIPVSStatsCollector(read))
}
