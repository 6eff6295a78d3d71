package ipvs

import (
	"fmt"
	"net/netip"
)

// SyncState is the role of one of the kernel's IPVS connection
// synchronisation daemons. The values are the kernel's (IP_VS_STATE_*).
type SyncState uint32

// Sync daemon roles. A network namespace runs at most one of each, and
// may run both at once.
const (
	// SyncMaster sends this node's connection entries to the others.
	SyncMaster SyncState = 1
	// SyncBackup installs the entries the others send.
	SyncBackup SyncState = 2
)

// String returns "master" or "backup".
func (s SyncState) String() string {
	switch s {
	case SyncMaster:
		return "master"
	case SyncBackup:
		return "backup"
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// SyncDaemon is one of the kernel's IPVS connection synchronisation
// daemons: it sends (master) or receives (backup) connection entries as
// UDP multicast on one interface. Zero values of the optional fields are
// the kernel's defaults.
type SyncDaemon struct {
	State SyncState
	// Interface is the multicast interface, at most 15 bytes.
	Interface string
	// SyncID tags the messages a master sends; a backup installs only
	// those with its own (0 takes every ID). The kernel keeps 8 bits.
	SyncID uint8
	// MaxLen is the largest UDP payload a master sends (0: the
	// interface's MTU less the headers).
	MaxLen uint16
	// Group is the multicast group (invalid: 224.0.0.81); an IPv6 group
	// sends over IPv6.
	Group netip.Addr
	// Port is the multicast port (0: 8848); each master thread uses the
	// next one.
	Port uint16
	// TTL is the multicast TTL or hop limit (0: 1).
	TTL uint8
}

// String returns e.g. "backup on eth0 id 7 group 239.1.2.3:8848 ttl 1".
func (d SyncDaemon) String() string {
	s := fmt.Sprintf("%s on %s id %d", d.State, d.Interface, d.SyncID)
	if d.Group.IsValid() || d.Port != 0 {
		s += fmt.Sprintf(" group %s:%d", d.Group, d.Port)
	}
	if d.TTL != 0 {
		s += fmt.Sprintf(" ttl %d", d.TTL)
	}
	if d.MaxLen != 0 {
		s += fmt.Sprintf(" maxlen %d", d.MaxLen)
	}
	return s
}

// Validate checks what the kernel would refuse with a bare EINVAL, so that
// the error names the field.
func (d SyncDaemon) Validate() error {
	switch {
	case d.State != SyncMaster && d.State != SyncBackup:
		return fmt.Errorf("sync daemon state %d: want master (1) or backup (2)", uint32(d.State))
	case d.Interface == "" || len(d.Interface) > 15:
		return fmt.Errorf("sync daemon interface %q: want a name of 1 to 15 bytes", d.Interface)
	case d.Group.IsValid() && !d.Group.IsMulticast():
		return fmt.Errorf("sync daemon group %s is not a multicast address", d.Group)
	case d.Group.Is4In6():
		return fmt.Errorf("sync daemon group %s: give an IPv4 group as IPv4", d.Group)
	}
	return nil
}

// SyncDaemons starts, stops and lists the kernel's IPVS connection
// synchronisation daemons of one network namespace.
type SyncDaemons interface {
	// SyncDaemons lists the running daemons, master first.
	SyncDaemons() ([]SyncDaemon, error)
	// StartSyncDaemon starts a daemon; EEXIST if one of its state runs.
	StartSyncDaemon(d SyncDaemon) error
	// StopSyncDaemon stops the daemon of a state; ESRCH if none runs.
	StopSyncDaemon(s SyncState) error
}
