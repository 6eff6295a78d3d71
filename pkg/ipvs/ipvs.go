// Package ipvs is keeplb's boundary to the kernel's IP Virtual Server table.
//
// It speaks in small domain types (VirtualServer, RealServer, Key) with Equal
// and String, so that the dataplane can compute and diff the table in
// memory. Netlink implements Interface for one network namespace: writes
// over github.com/moby/ipvs, the virtual server dump parsed by our own
// code (it runs at every read of the counters); and it implements
// SyncDaemons, the kernel's connection synchronisation daemons, with
// generic netlink commands moby/ipvs does not send. Package ipvstesting
// has a fake that models the table and the daemons.
//
// Only NAT (masquerade) forwarding is modelled for writing: keeplb forwards
// to NodePorts and pod ports, which needs port rewriting, and DR or tunnel
// cannot rewrite ports. Firewall-mark virtual servers are not modelled:
// VirtualServers skips them, so they are never touched.
package ipvs

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"syscall"
	"time"
)

// ErrNoIPVS is returned by New when the kernel has no IPVS: the ip_vs module
// is neither built in nor loadable, so the generic netlink family "IPVS" does
// not exist. Test for it with errors.Is.
var ErrNoIPVS = errors.New("the kernel has no IPVS (generic netlink family \"IPVS\" not found); load the ip_vs module (modprobe ip_vs) or use a kernel built with CONFIG_IP_VS")

// Protocols of virtual servers.
const (
	TCP  = "TCP"
	UDP  = "UDP"
	SCTP = "SCTP"
)

// Method is how IPVS forwards to a real server. The values are the kernel's
// (IP_VS_CONN_F_*), so the zero value is Masquerade.
type Method uint8

// Forwarding methods.
const (
	// Masquerade is NAT: the destination address and port are rewritten.
	Masquerade Method = 0
	// LocalNode delivers to the local stack (kernel-internal; read only).
	LocalNode Method = 1
	// Tunnel encapsulates in IP-in-IP; the port cannot be rewritten.
	Tunnel Method = 2
	// Route is direct routing; the port cannot be rewritten.
	Route Method = 3
)

// String returns ipvsadm's name of the method.
func (m Method) String() string {
	switch m {
	case Masquerade:
		return "masq"
	case LocalNode:
		return "local"
	case Tunnel:
		return "tunnel"
	case Route:
		return "route"
	}
	return "method(" + strconv.Itoa(int(m)) + ")"
}

// Key identifies a virtual server: address, protocol and port.
type Key struct {
	Address  netip.Addr
	Protocol string
	Port     uint16
}

// String returns "TCP/192.0.2.1:80" or "UDP/[2001:db8::1]:53".
func (k Key) String() string {
	return k.Protocol + "/" + netip.AddrPortFrom(k.Address, k.Port).String()
}

// Compare orders keys by address, then protocol, then port.
func (k Key) Compare(o Key) int {
	if c := k.Address.Compare(o.Address); c != 0 {
		return c
	}
	if c := cmp.Compare(k.Protocol, o.Protocol); c != 0 {
		return c
	}
	return cmp.Compare(k.Port, o.Port)
}

// VirtualServer is an IPVS service: what clients connect to.
type VirtualServer struct {
	Address  netip.Addr
	Protocol string // TCP, UDP or SCTP
	Port     uint16
	// Scheduler is the IPVS scheduler name, such as "rr".
	Scheduler string
	// Persistent sends a client to the same real server for Timeout after
	// its last connection (sessionAffinity ClientIP).
	Persistent bool
	// Timeout is the persistence timeout, in whole seconds; zero unless
	// Persistent.
	Timeout time.Duration
	// Stats are the kernel's counters, filled in by VirtualServers.
	// They are not settings: Equal ignores them and writes never send
	// them.
	Stats Stats
}

// Stats are a virtual server's traffic counters since it was created. In
// is from clients, Out is replies to them. Read from the kernel's 64-bit
// counters where it has them (Linux 4.1); before that it counts
// connections and packets in 32 bits, so they wrap.
type Stats struct {
	Connections           uint64
	PacketsIn, PacketsOut uint64
	BytesIn, BytesOut     uint64
}

// Key returns the virtual server's identity.
func (v VirtualServer) Key() Key {
	return Key{Address: v.Address, Protocol: v.Protocol, Port: v.Port}
}

// Equal reports whether v and o are the same, settings included, stats
// aside.
func (v VirtualServer) Equal(o VirtualServer) bool {
	v.Stats, o.Stats = Stats{}, Stats{}
	return v == o
}

// String returns the key, scheduler and persistence, e.g.
// "TCP/192.0.2.1:80 rr persistent 3h0m0s".
func (v VirtualServer) String() string {
	s := v.Key().String() + " " + v.Scheduler
	if v.Persistent {
		s += " persistent " + v.Timeout.String()
	}
	return s
}

// RealServer is a destination of a virtual server.
type RealServer struct {
	Address netip.Addr
	Port    uint16
	// Weight is the scheduler weight; 0 takes no new connections but keeps
	// the established ones (graceful drain).
	Weight int
	// Method is the forwarding method; keeplb writes only Masquerade.
	Method Method
}

// AddrPort returns the real server's identity within its virtual server.
func (r RealServer) AddrPort() netip.AddrPort { return netip.AddrPortFrom(r.Address, r.Port) }

// Equal reports whether r and o are the same, weight and method included.
func (r RealServer) Equal(o RealServer) bool { return r == o }

// String returns e.g. "10.0.0.1:30080 w1 masq".
func (r RealServer) String() string {
	return fmt.Sprintf("%s w%d %s", r.AddrPort(), r.Weight, r.Method)
}

// CompareReal orders real servers by address, then port.
func CompareReal(a, b RealServer) int { return a.AddrPort().Compare(b.AddrPort()) }

// Entry is a virtual server with its real servers, sorted by CompareReal.
type Entry struct {
	Virtual VirtualServer
	Reals   []RealServer
}

// Equal reports whether e and o have equal virtual servers and the same
// real servers, in any order.
func (e Entry) Equal(o Entry) bool {
	if !e.Virtual.Equal(o.Virtual) || len(e.Reals) != len(o.Reals) {
		return false
	}
	a := slices.SortedFunc(slices.Values(e.Reals), CompareReal)
	b := slices.SortedFunc(slices.Values(o.Reals), CompareReal)
	return slices.Equal(a, b)
}

// String returns the virtual server and its real servers, one per line.
func (e Entry) String() string {
	s := e.Virtual.String()
	for _, r := range e.Reals {
		s += "\n  -> " + r.String()
	}
	return s
}

// Table is an IPVS table, or the part of one that matters.
type Table map[Key]Entry

// Equal reports whether t and o hold equal entries.
func (t Table) Equal(o Table) bool {
	if len(t) != len(o) {
		return false
	}
	for k, e := range t {
		oe, ok := o[k]
		if !ok || !e.Equal(oe) {
			return false
		}
	}
	return true
}

// String returns the entries sorted by key, as a readable listing for test
// failures and debugging.
func (t Table) String() string {
	s := ""
	for _, k := range slices.SortedFunc(maps.Keys(t), Key.Compare) {
		s += t[k].String() + "\n"
	}
	return s
}

// Interface is what keeplb needs from IPVS. Errors from the kernel keep
// their errno (errors.Is(err, syscall.EEXIST) and the like).
type Interface interface {
	// VirtualServers lists every virtual server, keeplb's and others'.
	VirtualServers() ([]VirtualServer, error)
	// RealServers lists the real servers of one virtual server.
	RealServers(vs Key) ([]RealServer, error)
	// AddVirtualServer creates a virtual server; EEXIST if it exists.
	AddVirtualServer(vs VirtualServer) error
	// UpdateVirtualServer changes the scheduler and persistence of an
	// existing virtual server, keeping its real servers and connections.
	UpdateVirtualServer(vs VirtualServer) error
	// DeleteVirtualServer deletes a virtual server and its real servers.
	DeleteVirtualServer(vs Key) error
	// AddRealServer adds a real server; EEXIST if it exists.
	AddRealServer(vs Key, rs RealServer) error
	// UpdateRealServer changes the weight and method of a real server.
	UpdateRealServer(vs Key, rs RealServer) error
	// DeleteRealServer removes a real server from a virtual server.
	DeleteRealServer(vs Key, rs netip.AddrPort) error
}

// Dump reads the virtual servers that keep selects, with their real
// servers: one listing of virtual servers, then one real-server listing
// per selected one. Virtual servers keep rejects (other owners') cost no
// further call. A nil keep selects everything.
func Dump(h Interface, keep func(Key) bool) (Table, error) {
	vss, err := h.VirtualServers()
	if err != nil {
		return nil, fmt.Errorf("list IPVS virtual servers: %w", err)
	}
	t := make(Table, len(vss))
	for _, vs := range vss {
		k := vs.Key()
		if keep != nil && !keep(k) {
			continue
		}
		rss, err := h.RealServers(k)
		if err != nil {
			return nil, fmt.Errorf("list real servers of %s: %w", k, err)
		}
		slices.SortFunc(rss, CompareReal)
		t[k] = Entry{Virtual: vs, Reals: rss}
	}
	return t, nil
}

// IsNotFound reports whether err says a virtual or real server does not
// exist: the kernel answers ESRCH for a missing virtual server, ENOENT for a
// missing real server.
func IsNotFound(err error) bool {
	return errors.Is(err, syscall.ESRCH) || errors.Is(err, syscall.ENOENT)
}

// IsExist reports whether err says the virtual or real server exists.
func IsExist(err error) bool { return errors.Is(err, syscall.EEXIST) }
