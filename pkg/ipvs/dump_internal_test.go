//go:build linux

package ipvs

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// serviceMsg is an answer to IPVS_CMD_GET_SERVICE as the kernel writes it
// (after the generic netlink header), for the given attributes.
func serviceMsg(attrs ...*nl.RtAttr) []byte {
	svc := nl.NewRtAttr(cmdAttrService, nil)
	for _, a := range attrs {
		svc.AddChild(a)
	}
	return svc.Serialize()
}

func u16(v uint16) []byte { return nl.Uint16Attr(v) }
func u32(v uint32) []byte { return nl.Uint32Attr(v) }
func u64(v uint64) []byte { return nl.Uint64Attr(v) }
func be16(v uint16) []byte {
	return binary.BigEndian.AppendUint16(nil, v)
}

func stats(typ int, conns, inPkts, outPkts, inBytes, outBytes uint64) *nl.RtAttr {
	a := nl.NewRtAttr(typ, nil)
	wide := typ == svcStats64
	for _, c := range []struct {
		t int
		v uint64
	}{{statsConns, conns}, {statsInPkts, inPkts}, {statsOutPkts, outPkts}} {
		if wide {
			a.AddRtAttr(c.t, u64(c.v))
		} else {
			a.AddRtAttr(c.t, u32(uint32(c.v)))
		}
	}
	a.AddRtAttr(statsInBytes, u64(inBytes))
	a.AddRtAttr(statsOutBytes, u64(outBytes))
	return a
}

func TestParseServiceMsg(t *testing.T) {
	// The kernel's union nf_inet_addr: an IPv4 address in its first bytes.
	addr4 := func(s string) []byte {
		var b [16]byte
		b4 := netip.MustParseAddr(s).As4()
		copy(b[:], b4[:])
		return b[:]
	}
	addr6 := func(s string) []byte { b := netip.MustParseAddr(s).As16(); return b[:] }
	v4 := []*nl.RtAttr{
		nl.NewRtAttr(svcAF, u16(unix.AF_INET)), nl.NewRtAttr(svcProtocol, u16(unix.IPPROTO_TCP)),
		nl.NewRtAttr(svcAddr, addr4("192.0.2.1")), nl.NewRtAttr(svcPort, be16(443)),
		nl.NewRtAttr(svcSched, nl.ZeroTerminated("wrr")), nl.NewRtAttr(svcFlags, append(u32(0), u32(^uint32(0))...)),
		nl.NewRtAttr(svcTimeout, u32(0)), stats(svcStats, 7, 70, 60, 7000, 6000),
	}
	for _, tc := range []struct {
		name string
		msg  []byte
		want VirtualServer // zero: not ok
	}{
		{"IPv4, 32-bit counters", serviceMsg(v4...), VirtualServer{
			Address: netip.MustParseAddr("192.0.2.1"), Protocol: TCP, Port: 443, Scheduler: "wrr",
			Stats: Stats{Connections: 7, PacketsIn: 70, PacketsOut: 60, BytesIn: 7000, BytesOut: 6000}}},
		{"IPv6 persistent, 64-bit counters preferred", serviceMsg(
			nl.NewRtAttr(svcAF, u16(unix.AF_INET6)), nl.NewRtAttr(svcProtocol, u16(protoSCTP)),
			nl.NewRtAttr(svcAddr, addr6("2001:db8::1")), nl.NewRtAttr(svcPort, be16(65535)),
			nl.NewRtAttr(svcSched, nl.ZeroTerminated("a-scheduler-of-its-own")),
			nl.NewRtAttr(svcFlags, append(u32(svcFlagPersistent), u32(^uint32(0))...)), nl.NewRtAttr(svcTimeout, u32(10800)),
			stats(svcStats, 1, 1, 1, 1, 1), stats(svcStats64, 1<<40, 1<<41, 1<<42, 1<<63, 1<<62)),
			VirtualServer{Address: netip.MustParseAddr("2001:db8::1"), Protocol: SCTP, Port: 65535, Scheduler: "a-scheduler-of-its-own",
				Persistent: true, Timeout: 10800 * time.Second,
				Stats: Stats{Connections: 1 << 40, PacketsIn: 1 << 41, PacketsOut: 1 << 42, BytesIn: 1 << 63, BytesOut: 1 << 62}}},
		{"IPv4-mapped IPv6 is IPv4, as keeplb keys it", serviceMsg(
			nl.NewRtAttr(svcAF, u16(unix.AF_INET6)), nl.NewRtAttr(svcProtocol, u16(unix.IPPROTO_UDP)),
			nl.NewRtAttr(svcAddr, addr6("::ffff:192.0.2.9")), nl.NewRtAttr(svcPort, be16(53)), nl.NewRtAttr(svcSched, nl.ZeroTerminated("rr"))),
			VirtualServer{Address: netip.MustParseAddr("192.0.2.9"), Protocol: UDP, Port: 53, Scheduler: "rr"}},
		{"firewall mark", serviceMsg(append(slices.Clone(v4), nl.NewRtAttr(svcFWMark, u32(9)))...), VirtualServer{}},
		{"unknown protocol", serviceMsg(nl.NewRtAttr(svcAF, u16(unix.AF_INET)), nl.NewRtAttr(svcProtocol, u16(99)),
			nl.NewRtAttr(svcAddr, addr4("192.0.2.1")), nl.NewRtAttr(svcPort, be16(1))), VirtualServer{}},
		{"address shorter than its family", serviceMsg(nl.NewRtAttr(svcAF, u16(unix.AF_INET6)), nl.NewRtAttr(svcProtocol, u16(unix.IPPROTO_TCP)),
			nl.NewRtAttr(svcAddr, []byte{1, 2, 3, 4}), nl.NewRtAttr(svcPort, be16(1))), VirtualServer{}},
		{"no service attribute", nl.NewRtAttr(cmdAttrDaemon, nil).Serialize(), VirtualServer{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok, err := parseServiceMsg(tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			if ok != (tc.want != VirtualServer{}) || got != tc.want {
				t.Errorf("parseServiceMsg = %+v, %v; want %+v", got, ok, tc.want)
			}
		})
	}
}

// FuzzParseServiceMsg checks that no answer, however malformed, panics,
// and that a virtual server read from one has what keeplb keys it by.
func FuzzParseServiceMsg(f *testing.F) {
	f.Add(serviceMsg(nl.NewRtAttr(svcAF, u16(unix.AF_INET)), nl.NewRtAttr(svcProtocol, u16(unix.IPPROTO_TCP)),
		nl.NewRtAttr(svcAddr, make([]byte, 16)), nl.NewRtAttr(svcPort, be16(80)), stats(svcStats64, 1, 2, 3, 4, 5)))
	f.Fuzz(func(t *testing.T, m []byte) {
		vs, ok, err := parseServiceMsg(slices.Clone(m))
		if err != nil || !ok {
			return
		}
		if !vs.Address.IsValid() || vs.Address.Is4In6() || vs.Protocol == "" {
			t.Fatalf("ok with %+v", vs)
		}
	})
}
