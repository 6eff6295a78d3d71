package metrics

import (
	"net/netip"
	"strings"
	"testing"

	"k8s.io/component-base/metrics/testutil"

	"github.com/keeplb/keeplb/pkg/ipvs"
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
	if err := testutil.CustomCollectAndCompare(newIPVSStatsCollector(read), strings.NewReader(want),
		"keeplb_ipvs_connections_total", "keeplb_ipvs_packets_total", "keeplb_ipvs_bytes_total"); err != nil {
		t.Error(err)
	}
}
