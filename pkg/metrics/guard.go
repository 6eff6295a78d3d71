package metrics

import "k8s.io/component-base/metrics"

// guardDropsCollector serves keeplb_vip_guard_dropped_packets_total from
// what read returns at each scrape: the count lives in an nftables counter,
// and reading it when asked costs one nft call per scrape instead of one
// per sync, and is never stale.
type guardDropsCollector struct {
	metrics.BaseStableCollector

	read  func() (uint64, bool)
	drops *metrics.Desc
}

var _ metrics.StableCollector = (*guardDropsCollector)(nil)

// RegisterGuardDrops serves keeplb_vip_guard_dropped_packets_total from
// read, which returns the packets the VIP port guard dropped since the
// speaker started, or false when it cannot tell (no table): the series is
// then missing from that scrape rather than wrong. read must be safe to
// call concurrently with everything else. Call it once, with RegisterIPVS.
func (m *Speaker) RegisterGuardDrops(read func() (uint64, bool)) {
	m.registry.CustomMustRegister(&guardDropsCollector{
		read: read,
		drops: metrics.NewDesc(namespace+"_vip_guard_dropped_packets_total",
			"Packets to one of keeplb's VIPs that the VIP port guard of this node dropped, because no Service port of the VIP, no ICMP error or neighbour discovery, and no allowed echo request asked for them.",
			nil, nil, metrics.ALPHA, ""),
	})
}

// DescribeWithStability is part of metrics.StableCollector.
func (c *guardDropsCollector) DescribeWithStability(ch chan<- *metrics.Desc) { ch <- c.drops }

// CollectWithStability is part of metrics.StableCollector.
func (c *guardDropsCollector) CollectWithStability(ch chan<- metrics.Metric) {
	if n, ok := c.read(); ok {
		ch <- metrics.NewLazyConstMetric(c.drops, metrics.CounterValue, float64(n))
	}
}
