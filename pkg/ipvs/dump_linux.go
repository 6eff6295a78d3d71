package ipvs

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/keeplb/keeplb/pkg/nlattr"
)

// The IPVS generic netlink attributes of a virtual server (linux/ip_vs.h).
const (
	cmdGetService  = 4  // IPVS_CMD_GET_SERVICE
	cmdAttrService = 1  // IPVS_CMD_ATTR_SERVICE, nested
	svcAF          = 1  // IPVS_SVC_ATTR_AF, u16
	svcProtocol    = 2  // IPVS_SVC_ATTR_PROTOCOL, u16
	svcAddr        = 3  // IPVS_SVC_ATTR_ADDR, union nf_inet_addr
	svcPort        = 4  // IPVS_SVC_ATTR_PORT, be16
	svcFWMark      = 5  // IPVS_SVC_ATTR_FWMARK, u32
	svcSched       = 6  // IPVS_SVC_ATTR_SCHED_NAME, string
	svcFlags       = 7  // IPVS_SVC_ATTR_FLAGS, struct ip_vs_flags
	svcTimeout     = 8  // IPVS_SVC_ATTR_TIMEOUT, u32 seconds
	svcStats       = 10 // IPVS_SVC_ATTR_STATS, nested, 32-bit counters
	svcStats64     = 12 // IPVS_SVC_ATTR_STATS64, nested, 64-bit (Linux 4.1)
	statsConns     = 1  // IPVS_STATS_ATTR_CONNS
	statsInPkts    = 2  // IPVS_STATS_ATTR_INPKTS
	statsOutPkts   = 3  // IPVS_STATS_ATTR_OUTPKTS
	statsInBytes   = 4  // IPVS_STATS_ATTR_INBYTES, u64 in both
	statsOutBytes  = 5  // IPVS_STATS_ATTR_OUTBYTES, u64 in both
)

// VirtualServers is part of Interface. Firewall-mark services and
// protocols keeplb does not know are left out.
//
// It reads the kernel's dump itself rather than through moby/ipvs, which
// copied every message and made each virtual server a struct of slices:
// at 10,000 virtual servers one read allocated about 13 MB, and reads run
// at every scrape of the counters (see metrics.IPVSStats). It also reads
// the 64-bit counters where the kernel has them (Linux 4.1), which
// moby/ipvs does not.
func (n *Netlink) VirtualServers() ([]VirtualServer, error) {
	req := nl.NewNetlinkRequest(int(n.family), unix.NLM_F_DUMP)
	req.AddData(genlHeader{cmd: cmdGetService})
	req.Sockets = n.genl
	var (
		out  []VirtualServer
		perr error
	)
	err := req.ExecuteIter(unix.NETLINK_GENERIC, n.family, func(m []byte) bool {
		if len(m) < nl.SizeofGenlmsg {
			return true
		}
		vs, ok, err := parseServiceMsg(m[nl.SizeofGenlmsg:])
		if err != nil {
			perr = err
			return false
		}
		if ok {
			out = append(out, vs)
		}
		return true
	})
	if err == nil {
		err = perr
	}
	if err != nil {
		return nil, fmt.Errorf("dump the IPVS virtual servers: %w", err)
	}
	return out, nil
}

// schedulers are the kernel's scheduler names, shared rather than
// allocated anew for every virtual server of every dump.
var schedulers = func() map[string]string {
	m := map[string]string{}
	for _, s := range []string{"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos"} {
		m[s] = s
	}
	return m
}()

// parseServiceMsg reads one answer to IPVS_CMD_GET_SERVICE (after its
// generic netlink header). ok is false for one keeplb does not model: a
// firewall-mark service, a protocol it does not know, an address that
// does not fit its family.
func parseServiceMsg(m []byte) (vs VirtualServer, ok bool, err error) {
	svc, err := nlattr.Find(m, cmdAttrService)
	if err != nil || svc == nil {
		return VirtualServer{}, false, err
	}
	var (
		af, proto       uint16
		addr            []byte
		fwmark, flags   uint32
		timeout         uint32
		stats, stats64  []byte
		havePort, known bool
	)
	err = nlattr.Walk(svc, func(typ uint16, v []byte) {
		switch typ {
		case svcAF:
			if len(v) >= 2 {
				af = nl.NativeEndian().Uint16(v)
			}
		case svcProtocol:
			if len(v) >= 2 {
				proto = nl.NativeEndian().Uint16(v)
			}
		case svcAddr:
			addr = v
		case svcPort:
			if len(v) >= 2 {
				vs.Port, havePort = binary.BigEndian.Uint16(v), true
			}
		case svcFWMark:
			if len(v) >= 4 {
				fwmark = nl.NativeEndian().Uint32(v)
			}
		case svcSched:
			name, _, _ := strings.Cut(string(v), "\x00")
			if s, ok := schedulers[name]; ok {
				vs.Scheduler = s
			} else {
				vs.Scheduler = name
			}
		case svcFlags:
			if len(v) >= 4 {
				flags = nl.NativeEndian().Uint32(v)
			}
		case svcTimeout:
			if len(v) >= 4 {
				timeout = nl.NativeEndian().Uint32(v)
			}
		case svcStats:
			stats = v
		case svcStats64:
			stats64 = v
		}
	})
	if err != nil {
		return VirtualServer{}, false, err
	}
	if fwmark != 0 || !havePort {
		return VirtualServer{}, false, nil
	}
	if vs.Protocol, known = protoName(proto); !known {
		return VirtualServer{}, false, nil
	}
	switch {
	case af == unix.AF_INET && len(addr) >= 4:
		vs.Address = netip.AddrFrom4([4]byte(addr[:4]))
	case af == unix.AF_INET6 && len(addr) >= 16:
		vs.Address = netip.AddrFrom16([16]byte(addr[:16])).Unmap()
	default:
		return VirtualServer{}, false, nil
	}
	if flags&svcFlagPersistent != 0 {
		vs.Persistent, vs.Timeout = true, time.Duration(timeout)*time.Second
	}
	if stats64 != nil {
		vs.Stats, err = parseStats(stats64, true)
	} else if stats != nil {
		vs.Stats, err = parseStats(stats, false)
	}
	if err != nil {
		return VirtualServer{}, false, err
	}
	return vs, true, nil
}

// parseStats reads a nested IPVS_SVC_ATTR_STATS (wide false: connections
// and packets in 32 bits) or IPVS_SVC_ATTR_STATS64.
func parseStats(b []byte, wide bool) (Stats, error) {
	var s Stats
	err := nlattr.Walk(b, func(typ uint16, v []byte) {
		var x uint64
		switch {
		case len(v) >= 8 && (wide || typ == statsInBytes || typ == statsOutBytes):
			x = nl.NativeEndian().Uint64(v)
		case len(v) >= 4:
			x = uint64(nl.NativeEndian().Uint32(v))
		default:
			return
		}
		switch typ {
		case statsConns:
			s.Connections = x
		case statsInPkts:
			s.PacketsIn = x
		case statsOutPkts:
			s.PacketsOut = x
		case statsInBytes:
			s.BytesIn = x
		case statsOutBytes:
			s.BytesOut = x
		}
	})
	return s, err
}
