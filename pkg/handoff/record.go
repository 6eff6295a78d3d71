// Package handoff is the speaker's hand-off: how a speaker that is being
// replaced (a DaemonSet rolling update, a `kubectl rollout restart`)
// leaves this node's VIPs, IPVS table, nftables table and conntrack
// entries in place for its replacement, and how the replacement adopts
// them, so that replacing a speaker moves no VIP and resets no
// connection.
//
// The leaving speaker:
//
//  1. decides that a replacement will come (Decide);
//  2. makes its keepalived announce, in one advert per instance it is
//     master of, an advert interval of Patience(timeout) (VRRPv3 backups
//     take the master's advert interval from its adverts, RFC 5798 §6.4.2),
//     so that the backups wait three times as long before they take over;
//  3. kills keepalived, so that it sends no priority-0 advert and leaves
//     the addresses where they are;
//  4. writes a Record of the instances it was master of, and exits
//     without deleting anything.
//
// The replacement reads the Record (Take) before keepalived starts, keeps
// the recorded VIPs on the node, and renders those instances without
// them until keepalived reports MASTER for each: a starting keepalived
// deletes the addresses of its instances (see the package keepalived
// documentation). What it has not become master of by the Record's
// Deadline, it releases. A crash never writes a Record: it still fails
// over as before.
package handoff

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/keeplb/keeplb/pkg/ipvs"
)

// FileName is the Record's file in the hand-off directory.
const FileName = "handoff.json"

// MaxAdvert is the longest advert interval VRRPv3 can carry: 4095
// centiseconds.
const MaxAdvert = 40950 * time.Millisecond

// MaxTimeout is the longest hand-off the backups can be made to wait for:
// three times MaxAdvert.
const MaxTimeout = 3 * MaxAdvert

// MaxRecordBytes bounds what Take reads: a Record of 10,000 IPv6 VIPs is
// well under 1 MiB.
const MaxRecordBytes = 4 << 20

// Record is what a speaker that hands off writes for its replacement.
type Record struct {
	// Node is the node's name; a Record of another node is void.
	Node string `json:"node"`
	// BootID is the kernel's boot ID: a Record from before a reboot is
	// void (the kernel state it describes is gone).
	BootID string `json:"bootID"`
	// Written is when the leaving speaker killed keepalived.
	Written time.Time `json:"written"`
	// Deadline is when the backups stop waiting: Written plus three
	// times the announced advert interval. The replacement releases what
	// it has not become master of by then.
	Deadline time.Time `json:"deadline"`
	// Instances are the VRRP instances the node was master of, by name,
	// with the VIPs each held.
	Instances map[string][]netip.Prefix `json:"instances"`
	// VirtualServers are the IPVS virtual servers the node's speaker
	// programmed: the replacement owns them too, and deletes those whose
	// Services went while no speaker ran.
	VirtualServers []ipvs.Key `json:"virtualServers,omitempty"`
	// Since is when the leaving speaker started serving (or the speaker
	// whose hand-off it adopted): the replacement's failback holds count
	// from it, so that a rolling update does not hold the node down on the
	// instances it masters (vrrp.Hold). Zero, or after Written, counts as
	// unknown: the replacement counts from its own start.
	Since time.Time `json:"since,omitzero"`
}

// Ours reports whether r describes the kernel state of node in this boot
// (bootID): even once it is void (expired), the IPVS virtual servers it
// names are still in the kernel, and keeplb's.
func (r Record) Ours(node, bootID string) bool {
	return r.Node == node && r.BootID == bootID
}

// VIPs returns every VIP of the Record's instances, sorted.
func (r Record) VIPs() []netip.Prefix {
	var out []netip.Prefix
	for _, ps := range r.Instances {
		out = append(out, ps...)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return slices.Compact(out)
}

// Patience returns the advert interval a leaving master announces so that
// its backups wait at least timeout before they take over: a third of it,
// in whole centiseconds (what VRRPv3 carries), at least advert (never
// shorter than today's) and at most MaxAdvert.
func Patience(timeout, advert time.Duration) time.Duration {
	p := (timeout / 3).Truncate(10 * time.Millisecond)
	if timeout%(30*time.Millisecond) != 0 {
		p += 10 * time.Millisecond // round up: wait at least timeout
	}
	return min(max(p, advert), MaxAdvert)
}

// Write writes r to dir, atomically (a temporary file renamed over it,
// synced), so that a replacement never reads half a Record.
func Write(dir string, r Record) error {
	data, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+FileName+".*")
	if err != nil {
		return err
	}
	// Gone after the rename; left behind only by a failure.
	defer func() { _ = os.Remove(f.Name()) }()
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(dir, FileName))
}

// Take reads and removes the Record in dir. It returns ok only for a
// Record of node, from this boot (bootID), whose Deadline is after now.
// A missing Record is no error; an unreadable or void one is removed all
// the same, and the error or reason is returned for the log.
func Take(dir, node, bootID string, now time.Time) (r Record, ok bool, why error) {
	path := filepath.Join(dir, FileName)
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, err
	}
	// Read once: a second start must not adopt again. A removal that
	// fails leaves a record whose deadline voids it soon.
	defer func() { _ = os.Remove(path) }()
	data, err := io.ReadAll(io.LimitReader(f, MaxRecordBytes+1))
	_ = f.Close() // read-only: nothing to lose
	if err != nil {
		return Record{}, false, err
	}
	if len(data) > MaxRecordBytes {
		return Record{}, false, fmt.Errorf("hand-off record %s is over %d bytes", path, MaxRecordBytes)
	}
	r, err = Parse(data)
	if err != nil {
		return Record{}, false, fmt.Errorf("hand-off record %s: %w", path, err)
	}
	switch {
	case r.Node != node:
		return r, false, fmt.Errorf("hand-off record %s is of node %q, not %q", path, r.Node, node)
	case r.BootID != bootID:
		return r, false, fmt.Errorf("hand-off record %s is from another boot of the node", path)
	case r.Written.After(now):
		return r, false, fmt.Errorf("hand-off record %s was written at %s, after now (%s)", path, r.Written, now)
	case !now.Before(r.Deadline):
		return r, false, fmt.Errorf("hand-off record %s expired %s ago: the backups have taken over", path, now.Sub(r.Deadline).Round(time.Millisecond))
	}
	return r, true, nil
}

// Parse decodes a Record and checks it: a node name, a Deadline after
// Written, and host prefixes (/32, /128) without zones.
func Parse(data []byte) (Record, error) {
	var r Record
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Record{}, err
	}
	if dec.More() {
		return Record{}, errors.New("trailing data after the record")
	}
	if r.Node == "" {
		return Record{}, errors.New("no node")
	}
	if !r.Deadline.After(r.Written) {
		return Record{}, fmt.Errorf("deadline %s is not after written %s", r.Deadline, r.Written)
	}
	if r.Deadline.Sub(r.Written) > MaxTimeout {
		// No backup waits longer: a record that says so is not a
		// speaker's, and would keep VIPs on the node for as long.
		return Record{}, fmt.Errorf("deadline %s is more than %v after written %s", r.Deadline, MaxTimeout, r.Written)
	}
	for _, k := range r.VirtualServers {
		if !k.Address.IsValid() || k.Address.Zone() != "" || k.Address.Is4In6() {
			return Record{}, fmt.Errorf("virtual server %v: not an address keeplb programs", k)
		}
	}
	for name, ps := range r.Instances {
		if name == "" {
			return Record{}, errors.New("an instance without a name")
		}
		for _, p := range ps {
			if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() || !p.IsSingleIP() {
				return Record{}, fmt.Errorf("instance %s: %v is not a host address", name, p)
			}
		}
	}
	return r, nil
}

// bootIDPath is the kernel's boot ID, new at every boot.
const bootIDPath = "/proc/sys/kernel/random/boot_id"

// BootID returns the kernel's boot ID (the same in every container of the
// node: it is not namespaced).
func BootID() (string, error) {
	data, err := os.ReadFile(bootIDPath)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(data)), nil
}
