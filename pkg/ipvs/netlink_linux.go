package ipvs

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"time"

	mobyipvs "github.com/moby/ipvs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Kernel constants moby/ipvs does not export.
const (
	svcFlagPersistent = 0x1 // IP_VS_SVC_F_PERSISTENT
	protoSCTP         = 132 // IPPROTO_SCTP
)

// Netlink implements Interface with generic netlink, in the network
// namespace it was opened in.
type Netlink struct {
	h *mobyipvs.Handle
	// genl is a generic netlink socket of the same namespace, for the
	// sync daemon commands moby/ipvs does not send (sync_linux.go).
	genl map[int]*nl.SocketHandle
	// family is the IPVS generic netlink family's ID.
	family uint16
}

var _ Interface = (*Netlink)(nil)

// New returns an Interface for the current network namespace, or an error
// wrapping ErrNoIPVS when the kernel has no IPVS.
func New() (*Netlink, error) { return NewAt("") }

// NewAt returns an Interface for the network namespace at nsPath (such as
// /run/netns/NAME); "" means the current one.
//
// moby/ipvs neither fails nor retries when IPVS is missing: it looks the
// netlink family up once per process and then sends every request to family
// 0. So NewAt checks first (after trying modprobe ip_vs) and never opens a
// moby handle on a kernel without IPVS.
func NewAt(nsPath string) (*Netlink, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	ns := netns.None()
	if nsPath != "" {
		var err error
		if ns, err = netns.GetFromPath(nsPath); err != nil {
			return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
		}
		defer func() { _ = ns.Close() }() // the sockets keep it alive
	}
	h, err := mobyipvs.New(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open IPVS netlink socket: %w", err)
	}
	genl, err := genlSocket(ns)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("open a generic netlink socket: %w", err)
	}
	// Generic netlink families are the kernel's, not a namespace's: one
	// lookup serves every command.
	fam, err := netlink.GenlFamilyGet(ipvsFamilyName)
	if err != nil {
		h.Close()
		genl[unix.NETLINK_GENERIC].Socket.Close()
		return nil, fmt.Errorf("%w: %v", ErrNoIPVS, err)
	}
	return &Netlink{h: h, genl: genl, family: fam.ID}, nil
}

// Available reports whether the kernel has IPVS, loading the ip_vs module
// first if modprobe is there (its failure is ignored: the module may be
// built in, or the container may lack modprobe but the host have loaded it).
// The error wraps ErrNoIPVS.
func Available() error {
	if path, err := exec.LookPath("modprobe"); err == nil {
		_ = exec.Command(path, "-q", "ip_vs").Run()
	}
	if _, err := netlink.GenlFamilyGet(ipvsFamilyName); err != nil {
		if _, statErr := os.Stat("/proc/net/ip_vs"); statErr == nil {
			return nil // family lookup failed for another reason, yet IPVS is there
		}
		return fmt.Errorf("%w: %v", ErrNoIPVS, err)
	}
	return nil
}

// Close releases the netlink sockets.
func (n *Netlink) Close() {
	n.h.Close()
	n.genl[unix.NETLINK_GENERIC].Socket.Close()
}

// RealServers is part of Interface.
func (n *Netlink) RealServers(vs Key) ([]RealServer, error) {
	s, err := toService(VirtualServer{Address: vs.Address, Protocol: vs.Protocol, Port: vs.Port})
	if err != nil {
		return nil, err
	}
	dsts, err := n.h.GetDestinations(s)
	if err != nil {
		return nil, err
	}
	out := make([]RealServer, 0, len(dsts))
	for _, d := range dsts {
		a, ok := netip.AddrFromSlice(d.Address)
		if !ok {
			continue
		}
		out = append(out, RealServer{
			Address: a.Unmap(),
			Port:    d.Port,
			Weight:  d.Weight,
			Method:  Method(d.ConnectionFlags & mobyipvs.ConnectionFlagFwdMask),
		})
	}
	return out, nil
}

// AddVirtualServer is part of Interface.
func (n *Netlink) AddVirtualServer(vs VirtualServer) error {
	s, err := toService(vs)
	if err != nil {
		return err
	}
	return n.h.NewService(s)
}

// UpdateVirtualServer is part of Interface.
func (n *Netlink) UpdateVirtualServer(vs VirtualServer) error {
	s, err := toService(vs)
	if err != nil {
		return err
	}
	return n.h.UpdateService(s)
}

// DeleteVirtualServer is part of Interface.
func (n *Netlink) DeleteVirtualServer(vs Key) error {
	s, err := toService(VirtualServer{Address: vs.Address, Protocol: vs.Protocol, Port: vs.Port})
	if err != nil {
		return err
	}
	return n.h.DelService(s)
}

// AddRealServer is part of Interface.
func (n *Netlink) AddRealServer(vs Key, rs RealServer) error {
	return n.dest(vs, rs, n.h.NewDestination)
}

// UpdateRealServer is part of Interface.
func (n *Netlink) UpdateRealServer(vs Key, rs RealServer) error {
	return n.dest(vs, rs, n.h.UpdateDestination)
}

// DeleteRealServer is part of Interface.
func (n *Netlink) DeleteRealServer(vs Key, rs netip.AddrPort) error {
	return n.dest(vs, RealServer{Address: rs.Addr(), Port: rs.Port()}, n.h.DelDestination)
}

func (n *Netlink) dest(vs Key, rs RealServer, op func(*mobyipvs.Service, *mobyipvs.Destination) error) error {
	s, err := toService(VirtualServer{Address: vs.Address, Protocol: vs.Protocol, Port: vs.Port})
	if err != nil {
		return err
	}
	if !rs.Address.IsValid() {
		return fmt.Errorf("real server of %s has no address: %w", vs, unix.EINVAL)
	}
	if rs.Weight < 0 {
		return fmt.Errorf("real server %s has negative weight: %w", rs, unix.ERANGE)
	}
	d := &mobyipvs.Destination{
		Address:         net.IP(rs.Address.Unmap().AsSlice()),
		Port:            rs.Port,
		Weight:          rs.Weight,
		ConnectionFlags: uint32(rs.Method),
		AddressFamily:   family(rs.Address),
	}
	return op(s, d)
}

func family(a netip.Addr) uint16 {
	if a.Unmap().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func protoNumber(p string) (uint16, bool) {
	switch p {
	case TCP:
		return unix.IPPROTO_TCP, true
	case UDP:
		return unix.IPPROTO_UDP, true
	case SCTP:
		return protoSCTP, true
	}
	return 0, false
}

func protoName(n uint16) (string, bool) {
	switch n {
	case unix.IPPROTO_TCP:
		return TCP, true
	case unix.IPPROTO_UDP:
		return UDP, true
	case protoSCTP:
		return SCTP, true
	}
	return "", false
}

// toService converts to moby's type. The persistence netmask is a single
// client address (/32 or /128): sessionAffinity ClientIP is per client.
func toService(vs VirtualServer) (*mobyipvs.Service, error) {
	proto, ok := protoNumber(vs.Protocol)
	if !ok {
		return nil, fmt.Errorf("virtual server %s: unknown protocol %q: %w", vs.Key(), vs.Protocol, unix.EPROTONOSUPPORT)
	}
	if !vs.Address.IsValid() {
		return nil, fmt.Errorf("virtual server %s has no address: %w", vs.Key(), unix.EINVAL)
	}
	a := vs.Address.Unmap()
	s := &mobyipvs.Service{
		Address:       net.IP(a.AsSlice()),
		Protocol:      proto,
		Port:          vs.Port,
		SchedName:     vs.Scheduler,
		AddressFamily: family(a),
		Netmask:       0xffffffff,
	}
	if a.Is6() {
		s.Netmask = 128
	}
	if vs.Persistent {
		s.Flags |= svcFlagPersistent
		s.Timeout = uint32(vs.Timeout / time.Second)
	}
	return s, nil
}
