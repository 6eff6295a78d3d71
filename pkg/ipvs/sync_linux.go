package ipvs

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/keeplb/keeplb/pkg/nlattr"
)

// The IPVS generic netlink commands and attributes of the sync daemons
// (linux/ip_vs.h), which moby/ipvs does not send.
const (
	genlVersion    = 1  // IPVS_GENL_VERSION
	cmdNewDaemon   = 9  // IPVS_CMD_NEW_DAEMON
	cmdDelDaemon   = 10 // IPVS_CMD_DEL_DAEMON
	cmdGetDaemon   = 11 // IPVS_CMD_GET_DAEMON
	cmdAttrDaemon  = 3  // IPVS_CMD_ATTR_DAEMON, nested
	daemonState    = 1  // IPVS_DAEMON_ATTR_STATE, u32
	daemonIfn      = 2  // IPVS_DAEMON_ATTR_MCAST_IFN, string
	daemonSyncID   = 3  // IPVS_DAEMON_ATTR_SYNC_ID, u32
	daemonMaxLen   = 4  // IPVS_DAEMON_ATTR_SYNC_MAXLEN, u16 (Linux 4.3)
	daemonGroup    = 5  // IPVS_DAEMON_ATTR_MCAST_GROUP, in_addr
	daemonGroup6   = 6  // IPVS_DAEMON_ATTR_MCAST_GROUP6, in6_addr
	daemonPort     = 7  // IPVS_DAEMON_ATTR_MCAST_PORT, u16, host order
	daemonTTL      = 8  // IPVS_DAEMON_ATTR_MCAST_TTL, u8
	ipvsFamilyName = "IPVS"
)

var _ SyncDaemons = (*Netlink)(nil)

// genlHeader is a generic netlink message header (struct genlmsghdr: the
// command, the family's version, two reserved bytes). nl.Genlmsg is not
// used: it is a 2-byte struct whose Serialize reads 4 bytes through an
// unsafe cast, past its end, into whatever the heap holds next (the race
// detector caught it reading another goroutine's memory, about one run in
// eight of the VM's tests), and sends those 2 bytes as "reserved".
type genlHeader struct{ cmd uint8 }

// Len implements nl.NetlinkRequestData.
func (genlHeader) Len() int { return nl.SizeofGenlmsg }

// Serialize implements nl.NetlinkRequestData.
func (h genlHeader) Serialize() []byte { return []byte{h.cmd, genlVersion, 0, 0} }

// genlSocket opens a generic netlink socket in ns (netns.None(): the
// calling thread's), for the commands moby/ipvs does not send.
func genlSocket(ns netns.NsHandle) (map[int]*nl.SocketHandle, error) {
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_GENERIC)
	if err != nil {
		return nil, err
	}
	return map[int]*nl.SocketHandle{unix.NETLINK_GENERIC: {Socket: s}}, nil
}

// command sends one IPVS command and returns the payloads of the answers,
// after their generic netlink header.
func (n *Netlink) command(cmd uint8, flags int, attrs ...nl.NetlinkRequestData) ([][]byte, error) {
	req := nl.NewNetlinkRequest(int(n.family), flags|unix.NLM_F_ACK)
	req.AddData(genlHeader{cmd: cmd})
	for _, a := range attrs {
		req.AddData(a)
	}
	req.Sockets = n.genl
	msgs, err := req.Execute(unix.NETLINK_GENERIC, 0)
	if err != nil {
		return nil, err
	}
	out := make([][]byte, 0, len(msgs))
	for _, m := range msgs {
		if len(m) >= nl.SizeofGenlmsg {
			out = append(out, m[nl.SizeofGenlmsg:])
		}
	}
	return out, nil
}

// SyncDaemons is part of SyncDaemons.
func (n *Netlink) SyncDaemons() ([]SyncDaemon, error) {
	msgs, err := n.command(cmdGetDaemon, unix.NLM_F_DUMP)
	if err != nil {
		return nil, fmt.Errorf("list IPVS sync daemons: %w", err)
	}
	var out []SyncDaemon
	for _, m := range msgs {
		d, ok, err := parseDaemonMsg(m)
		if err != nil {
			return nil, fmt.Errorf("list IPVS sync daemons: %w", err)
		}
		if ok {
			out = append(out, d)
		}
	}
	return out, nil
}

// StartSyncDaemon is part of SyncDaemons.
func (n *Netlink) StartSyncDaemon(d SyncDaemon) error {
	if err := d.Validate(); err != nil {
		return err
	}
	_, err := n.command(cmdNewDaemon, 0, daemonAttr(d))
	if err != nil {
		return fmt.Errorf("start the IPVS sync daemon (%s): %w", d, err)
	}
	return nil
}

// StopSyncDaemon is part of SyncDaemons.
func (n *Netlink) StopSyncDaemon(s SyncState) error {
	a := nl.NewRtAttr(cmdAttrDaemon, nil)
	a.AddRtAttr(daemonState, nl.Uint32Attr(uint32(s)))
	if _, err := n.command(cmdDelDaemon, 0, a); err != nil {
		return fmt.Errorf("stop the IPVS %s sync daemon: %w", s, err)
	}
	return nil
}

// daemonAttr is the nested IPVS_CMD_ATTR_DAEMON that starts d: the
// optional attributes only where they differ from the kernel's default, so
// that kernels before 4.3, which know only the first three, take a daemon
// that sets none of them.
func daemonAttr(d SyncDaemon) *nl.RtAttr {
	a := nl.NewRtAttr(cmdAttrDaemon, nil)
	a.AddRtAttr(daemonState, nl.Uint32Attr(uint32(d.State)))
	a.AddRtAttr(daemonIfn, nl.ZeroTerminated(d.Interface))
	a.AddRtAttr(daemonSyncID, nl.Uint32Attr(uint32(d.SyncID)))
	if d.MaxLen != 0 {
		a.AddRtAttr(daemonMaxLen, nl.Uint16Attr(d.MaxLen))
	}
	switch {
	case d.Group.Is4():
		b := d.Group.As4()
		a.AddRtAttr(daemonGroup, b[:])
	case d.Group.Is6():
		b := d.Group.As16()
		a.AddRtAttr(daemonGroup6, b[:])
	}
	if d.Port != 0 {
		a.AddRtAttr(daemonPort, nl.Uint16Attr(d.Port))
	}
	if d.TTL != 0 {
		a.AddRtAttr(daemonTTL, []byte{d.TTL})
	}
	return a
}

// parseDaemonMsg reads one answer to IPVS_CMD_GET_DAEMON (after its
// generic netlink header); ok is false for one that holds no daemon.
func parseDaemonMsg(m []byte) (d SyncDaemon, ok bool, err error) {
	daemon, err := nlattr.Find(m, cmdAttrDaemon)
	if err != nil || daemon == nil {
		return SyncDaemon{}, false, err
	}
	err = nlattr.Walk(daemon, func(typ uint16, v []byte) {
		switch typ {
		case daemonState:
			if len(v) >= 4 {
				d.State = SyncState(nl.NativeEndian().Uint32(v))
			}
		case daemonIfn:
			d.Interface, _, _ = strings.Cut(string(v), "\x00")
		case daemonSyncID:
			if len(v) >= 4 {
				d.SyncID = uint8(nl.NativeEndian().Uint32(v))
			}
		case daemonMaxLen:
			if len(v) >= 2 {
				d.MaxLen = nl.NativeEndian().Uint16(v)
			}
		case daemonGroup, daemonGroup6:
			if g, ok := netip.AddrFromSlice(v); ok {
				d.Group = g
			}
		case daemonPort:
			if len(v) >= 2 {
				d.Port = nl.NativeEndian().Uint16(v)
			}
		case daemonTTL:
			if len(v) >= 1 {
				d.TTL = v[0]
			}
		}
	})
	if err != nil {
		return SyncDaemon{}, false, err
	}
	return d, d.State != 0, nil
}
