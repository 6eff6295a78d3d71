package conntrack_test

import (
	"net/netip"
	"testing"

	"github.com/keeplb/keeplb/pkg/conntrack"
	conntracktesting "github.com/keeplb/keeplb/pkg/conntrack/testing"
)

var (
	vip  = netip.MustParseAddrPort("192.0.2.1:53")
	real = netip.MustParseAddrPort("10.0.0.2:5353")
)

// flow is a flow from client to dst whose replies come from replySrc.
func flow(proto uint8, client, dst, replySrc string) conntrack.Flow {
	c := netip.MustParseAddrPort(client)
	return conntrack.Flow{
		Protocol: proto,
		Original: conntrack.Tuple{Src: c, Dst: netip.MustParseAddrPort(dst)},
		Reply:    conntrack.Tuple{Src: netip.MustParseAddrPort(replySrc), Dst: c},
	}
}

func TestMatches(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    conntrack.Flow
		want bool
	}{
		{"to the VIP, replies from the real server", flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.2:5353"), true},
		{"masqueraded: reply destination is the node", conntrack.Flow{Protocol: conntrack.UDP,
			Original: conntrack.Tuple{Src: netip.MustParseAddrPort("198.51.100.7:40000"), Dst: vip},
			Reply:    conntrack.Tuple{Src: real, Dst: netip.MustParseAddrPort("10.0.0.1:61000")}}, true},
		{"IPv4-mapped VIP", flow(conntrack.UDP, "198.51.100.7:40000", "[::ffff:192.0.2.1]:53", "10.0.0.2:5353"), true},
		{"TCP", flow(conntrack.TCP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.2:5353"), false},
		{"other real server", flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.3:5353"), false},
		{"other real port", flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.2:5354"), false},
		{"other VIP port", flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:54", "10.0.0.2:5353"), false},
		{"other VIP", flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.9:53", "10.0.0.2:5353"), false},
		{"straight to the real server", flow(conntrack.UDP, "198.51.100.7:40000", "10.0.0.2:5353", "10.0.0.2:5353"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := conntrack.Matches(tc.f, vip, real); got != tc.want {
				t.Errorf("Matches(%+v) = %v, want %v", tc.f, got, tc.want)
			}
		})
	}
}

func TestFakeDeletesOnlyMatches(t *testing.T) {
	keep := []conntrack.Flow{
		flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.3:5353"),
		flow(conntrack.TCP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.2:5353"),
	}
	f := conntracktesting.New(append([]conntrack.Flow{
		flow(conntrack.UDP, "198.51.100.7:40000", "192.0.2.1:53", "10.0.0.2:5353"),
		flow(conntrack.UDP, "198.51.100.8:40000", "192.0.2.1:53", "10.0.0.2:5353"),
	}, keep...)...)
	n, err := f.DeleteUDP(vip, real)
	if err != nil || n != 2 {
		t.Fatalf("DeleteUDP = %d, %v; want 2", n, err)
	}
	if got := f.Flows(); len(got) != len(keep) || got[0] != keep[0] || got[1] != keep[1] {
		t.Errorf("flows left %+v, want %+v", got, keep)
	}
	if n, err := f.DeleteUDP(vip, real); err != nil || n != 0 {
		t.Errorf("second DeleteUDP = %d, %v; want 0", n, err)
	}
}
