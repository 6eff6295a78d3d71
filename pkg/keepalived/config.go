// Package keepalived renders keepalived.conf for the speaker and runs
// keepalived (VRRP only) under supervision.
//
// The configuration is data: a typed Config, validated and rendered by an
// embedded text/template into bytes (Render, or RenderValid, which leaves
// out the instances that fail validation instead of failing as a whole, so
// that one bad instance never stops the others); WriteAtomic writes those bytes
// only when they changed; a Supervisor reloads keepalived, debounced, only
// when the bytes it loaded differ from the current ones, and restarts it
// with backoff when it exits. WatchFIFO turns keepalived's notify FIFO into
// Events.
//
// # Adverts carry a fixed anchor address, never the VIPs
//
// By default keepalived drops any advert whose address list differs from
// its own configuration, and the backup then becomes master too (seen
// with keepalived 2.2.7: after a VIP was added on the master only, the
// backup discarded its adverts, became master one master-down interval
// later, and both held the VIP; keepalived issue #1603). skip_check_adv_addr
// does not help when the backup reloads first. Speakers never reload at
// the same instant, so every VIP added or removed would split the brain.
// Render therefore puts one anchor address per instance in
// virtual_ipaddress, the same on every node and never changing
// (169.254.0.VRID/32 or fe80::a9fe:VRID/128 on lo, scope host), and the
// VIPs in virtual_ipaddress_excluded: keepalived adds, removes and
// announces them (gratuitous ARP, unsolicited NA) like any VIP, but leaves
// them out of adverts. Membership changes are then invisible to VRRP.
package keepalived

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"time"
)

// Config is one keepalived.conf: global settings and VRRP instances.
type Config struct {
	// RouterID names this node in keepalived's logs (router_id); empty
	// leaves keepalived's default, the host name.
	RouterID string
	// NotifyFIFO is the absolute path of the FIFO keepalived writes state
	// changes to (notify_fifo); empty writes none. See WatchFIFO.
	NotifyFIFO string
	// GARPMasterDelay is the delay before the second burst of gratuitous
	// ARPs after becoming master, in whole seconds; 0 keeps keepalived's
	// default (5 s).
	GARPMasterDelay time.Duration
	// GARPMasterRefresh repeats gratuitous ARPs this often while master, in
	// whole seconds; 0 sends none after the first bursts.
	GARPMasterRefresh time.Duration
	// TrackFiles are files whose integer content adjusts the priority of
	// the instances that track them, without a reload.
	TrackFiles []TrackFile
	// Instances are the VRRP instances. Render sorts them by name.
	Instances []Instance
}

// TrackFile is a file keepalived watches; see Instance.TrackFile.
type TrackFile struct {
	// Name identifies the file in the configuration.
	Name string
	// Path is the file's absolute path. keepalived creates it with the
	// value 0 if it is missing at start.
	Path string
}

// Instance is one VRRP instance (virtual router). Every instance starts as
// BACKUP: its priority alone decides who becomes master.
type Instance struct {
	// Name identifies the instance in the configuration and in Events.
	Name string
	// Comment is written in the instance's block, for people reading the
	// file: say where the instance comes from, above all when Name had to
	// be shortened (FitName). One line of printable characters, at most
	// MaxCommentLen bytes.
	Comment string
	// Interface is the network interface that sends and receives adverts
	// and holds the VIPs.
	Interface string
	// VRID is the virtual router ID, 1–255, unique per interface and
	// family on the L2 segment.
	VRID int
	// Priority is this node's priority, 1–254; the highest becomes master.
	Priority int
	// AdvertInterval is the advert interval: whole seconds (1–255 s) for
	// VRRPv2, multiples of 10 ms (10 ms–40.95 s) for VRRPv3.
	AdvertInterval time.Duration
	// Version is the VRRP version, 2 or 3. IPv6 and sub-second adverts
	// need 3.
	Version int
	// IPv6 makes this an IPv6 instance; VIPs and unicast addresses must
	// match the family.
	IPv6 bool
	// UnicastSrc is the source of unicast adverts; invalid (the zero
	// Addr) means multicast. Unicast needs at least one peer.
	UnicastSrc netip.Addr
	// UnicastPeers receive unicast adverts. Render sorts them.
	UnicastPeers []netip.Addr
	// VIPs are the virtual addresses, /32 or /128, added to Interface on
	// the master. Render sorts them.
	VIPs []netip.Prefix
	// AdvertAddr, if valid, replaces the anchor address derived from the
	// VRID (see the package documentation). It must be the same on every
	// node; set it only when two instances share a VRID and family on
	// different interfaces.
	AdvertAddr netip.Addr
	// PreemptDelay delays taking over from a lower-priority master, up to
	// 1000 s in steps of 10 ms.
	PreemptDelay time.Duration
	// NoPreempt lets a lower-priority master keep the role.
	NoPreempt bool
	// TrackFile names a Config.TrackFiles entry; empty tracks none.
	TrackFile string
	// TrackWeight multiplies the tracked file's value, which is then added
	// to Priority (the result is kept within 1–254). 0 means any non-zero
	// value puts the instance in FAULT. -254–254.
	TrackWeight int
}

// Render validates c and returns keepalived.conf. The output depends only
// on c's content, not on the order of its slices. Any problem fails it; see
// RenderValid for rendering around bad instances.
func Render(c Config) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return render(c)
}

// RenderValid is Render without the instances that fail validation: each
// is left out, with the track files only it used, and returned with why.
// Of two instances that clash (a name, a VRID on one interface, an advert
// address, a VIP), the one whose name sorts first stays. A track file that
// fails validation is left out with the instances that use it. The error is
// only for c's global settings (RouterID, NotifyFIFO, the GARP timers), and
// then nothing is rendered.
func RenderValid(c Config) ([]byte, []InstanceError, error) {
	chk := c.check()
	if err := errors.Join(chk.global...); err != nil {
		return nil, nil, err
	}
	c.Instances = chk.kept
	used := map[string]bool{}
	for _, in := range chk.kept {
		used[in.TrackFile] = true
	}
	var files []TrackFile
	for _, f := range c.TrackFiles {
		// A file only dropped instances used goes with them; one no
		// instance uses stays, as Render would write it.
		if chk.trackFiles[f.Name] == nil && (used[f.Name] || !chk.trackUsed[f.Name]) {
			files = append(files, f)
		}
	}
	c.TrackFiles = files
	data, err := render(c)
	if err != nil {
		return nil, nil, err
	}
	return data, chk.dropped, nil
}

// InstanceError is why RenderValid left an instance out.
type InstanceError struct {
	// Instance is the instance's name.
	Instance string
	// Err says what is wrong with it.
	Err error
}

// Error implements error.
func (e InstanceError) Error() string { return fmt.Sprintf("instance %q: %v", e.Instance, e.Err) }

// Unwrap returns Err.
func (e InstanceError) Unwrap() error { return e.Err }

func render(c Config) ([]byte, error) {
	var buf bytes.Buffer
	if err := confTemplate.Execute(&buf, newView(c)); err != nil {
		return nil, fmt.Errorf("render keepalived.conf: %w", err)
	}
	return buf.Bytes(), nil
}

//go:embed keepalived.conf.tmpl
var confText string

var confTemplate = template.Must(template.New("keepalived.conf").Parse(confText))

// MaxNameLen is the longest name (instance, track file, router ID) Render
// accepts. keepalived 2.2.7 itself has no limit on these names; this one
// keeps every configuration line far below its parser's 1023 bytes
// (MAXBUF in lib/parser.h), a track file's name below the 249 bytes its
// temporary file (name + "XXXXXX") leaves of NAME_MAX, and logs and
// metric labels readable. FitName makes any name fit.
const MaxNameLen = 64

// MaxCommentLen is the longest Instance.Comment Render accepts: its line
// stays within keepalived's 1023 bytes.
const MaxCommentLen = 512

var (
	// identRE is what Render accepts as a name: no white space, quotes,
	// braces, comment (#, !) or substitution ($) characters.
	identRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,` + strconv.Itoa(MaxNameLen-1) + `}$`)
	// ifaceRE is a Linux interface name (IFNAMSIZ-1 bytes).
	ifaceRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
	// pathRE is an absolute path keepalived's parser takes as one word.
	pathRE = regexp.MustCompile(`^/[A-Za-z0-9_.+/-]*$`)
)

// FitName returns name if Render accepts it as a name, and otherwise a name
// it accepts, derived from name alone: characters Render refuses become
// '_', and the result keeps the last tail bytes of name, then as much of
// its start as fits, with '_' and 8 hex digits of name's SHA-256 in
// between (a name that would start with neither a letter nor a digit gets
// an "x" first). Names that fit are unchanged, so Kubernetes names of up to
// MaxNameLen characters keep their instances across upgrades; two names
// that do not fit map to one with odds of 2^-32.
func FitName(name string, tail int) string {
	if identRE.MatchString(name) {
		return name
	}
	clean := []byte(name)
	for i, b := range clean {
		if !isNameByte(b) {
			clean[i] = '_'
		}
	}
	sum := sha256.Sum256([]byte(name))
	hash := "_" + hex.EncodeToString(sum[:4])
	tail = max(0, min(tail, len(clean), MaxNameLen-len(hash)-1))
	head := string(clean[:len(clean)-tail])
	if head == "" || !isAlnum(head[0]) {
		head = "x" + head
	}
	head = head[:min(len(head), MaxNameLen-len(hash)-tail)]
	return head + hash + string(clean[len(clean)-tail:])
}

func isAlnum(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
}

func isNameByte(b byte) bool { return isAlnum(b) || b == '_' || b == '.' || b == '-' }

// Validate reports every problem in c, joined.
func (c Config) Validate() error {
	chk := c.check()
	errs := chk.global
	for _, f := range c.TrackFiles {
		if err := chk.trackFiles[f.Name]; err != nil {
			errs = append(errs, err)
			chk.trackFiles[f.Name] = nil // report a duplicate once
		}
	}
	for _, d := range chk.dropped {
		errs = append(errs, d)
	}
	return errors.Join(errs...)
}

// checked is c's validation: the global problems, the track files with
// problems, and the instances kept and dropped.
type checked struct {
	global     []error
	trackFiles map[string]error // name -> its problem, nil when valid
	trackUsed  map[string]bool  // track files some instance names
	kept       []Instance
	dropped    []InstanceError
}

func (c Config) check() checked {
	chk := checked{trackFiles: map[string]error{}, trackUsed: map[string]bool{}}
	if c.RouterID != "" && !identRE.MatchString(c.RouterID) {
		chk.global = append(chk.global, fmt.Errorf("router ID %q: want %s", c.RouterID, identRE))
	}
	if c.NotifyFIFO != "" {
		if err := checkPath("notify FIFO", c.NotifyFIFO); err != nil {
			chk.global = append(chk.global, err)
		}
	}
	for _, err := range []error{checkSeconds("GARP master delay", c.GARPMasterDelay), checkSeconds("GARP master refresh", c.GARPMasterRefresh)} {
		if err != nil {
			chk.global = append(chk.global, err)
		}
	}

	for _, f := range c.TrackFiles {
		var err error
		switch _, dup := chk.trackFiles[f.Name]; {
		case dup:
			err = fmt.Errorf("track file %q: duplicate name", f.Name)
		case !identRE.MatchString(f.Name):
			err = fmt.Errorf("track file name %q: want %s", f.Name, identRE)
		default:
			err = checkPath("track file "+f.Name, f.Path)
		}
		if err != nil || chk.trackFiles[f.Name] == nil {
			chk.trackFiles[f.Name] = err
		}
	}

	// In name order, so that of two clashing instances the same one stays
	// whatever the order of c.Instances.
	sorted := slices.SortedStableFunc(slices.Values(c.Instances), func(a, b Instance) int {
		// Formatted only for a duplicate name: cmp.Or would format both
		// instances, every VIP of them, at each comparison.
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(fmt.Sprint(a), fmt.Sprint(b))
	})
	names := map[string]bool{}
	vrids := map[string]string{}       // interface/family/VRID -> instance
	anchors := map[netip.Addr]string{} // anchor -> instance
	vips := map[netip.Addr]string{}    // VIP -> instance
	for _, in := range sorted {
		chk.trackUsed[in.TrackFile] = in.TrackFile != ""
		err := in.validate(chk.trackFiles)
		if err == nil {
			err = in.clash(names, vrids, anchors, vips)
		}
		if err != nil {
			chk.dropped = append(chk.dropped, InstanceError{Instance: in.Name, Err: err})
			continue
		}
		chk.kept = append(chk.kept, in)
		names[in.Name] = true
		vrids[in.vridKey()] = in.Name
		anchors[in.anchor()] = in.Name
		for _, p := range in.VIPs {
			vips[p.Addr()] = in.Name
		}
	}
	return chk
}

// clash reports what in shares with the instances already kept.
func (in Instance) clash(names map[string]bool, vrids map[string]string, anchors map[netip.Addr]string, vips map[netip.Addr]string) error {
	var errs []error
	if names[in.Name] {
		errs = append(errs, errors.New("duplicate name"))
	}
	if other, ok := vrids[in.vridKey()]; ok {
		errs = append(errs, fmt.Errorf("VRID %d already used on %s (%s) by %q", in.VRID, in.Interface, family(in.IPv6), other))
	} else if other, ok := anchors[in.anchor()]; ok {
		errs = append(errs, fmt.Errorf("advert address %s already used by %q; set AdvertAddr on one of them", in.anchor(), other))
	}
	if other, ok := vips[in.anchor()]; ok {
		errs = append(errs, fmt.Errorf("advert address %s is a VIP of %q", in.anchor(), other))
	}
	for _, p := range in.VIPs {
		if other, ok := vips[p.Addr()]; ok {
			errs = append(errs, fmt.Errorf("VIP %s already in %q", p.Addr(), other))
		}
		if other, ok := anchors[p.Addr()]; ok {
			errs = append(errs, fmt.Errorf("VIP %s is the advert address of %q", p.Addr(), other))
		}
		if p.Addr() == in.anchor() {
			errs = append(errs, fmt.Errorf("advert address %s is a VIP of %q", in.anchor(), in.Name))
		}
	}
	return errors.Join(errs...)
}

func (in Instance) vridKey() string {
	return fmt.Sprintf("%s/%s/%d", in.Interface, family(in.IPv6), in.VRID)
}

// validate reports the problems of in alone; trackFiles maps the track
// files to their problems.
func (in Instance) validate(trackFiles map[string]error) error {
	var errs []error
	if !identRE.MatchString(in.Name) {
		errs = append(errs, fmt.Errorf("name: want %s", identRE))
	}
	if len(in.Comment) > MaxCommentLen || strings.ContainsFunc(in.Comment, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		errs = append(errs, fmt.Errorf("comment %q: want one line of at most %d bytes", in.Comment, MaxCommentLen))
	}
	if !ifaceRE.MatchString(in.Interface) {
		errs = append(errs, fmt.Errorf("interface %q: want %s", in.Interface, ifaceRE))
	}
	if in.VRID < 1 || in.VRID > 255 {
		errs = append(errs, fmt.Errorf("VRID %d: want 1-255", in.VRID))
	}
	if in.Priority < 1 || in.Priority > 254 {
		errs = append(errs, fmt.Errorf("priority %d: want 1-254", in.Priority))
	}
	switch in.Version {
	case 2:
		if in.IPv6 {
			errs = append(errs, errors.New("IPv6 needs VRRP version 3"))
		}
		if a := in.AdvertInterval; a < time.Second || a > 255*time.Second || a%time.Second != 0 {
			errs = append(errs, fmt.Errorf("advert interval %v: VRRPv2 wants whole seconds, 1s-255s", a))
		}
	case 3:
		if a := in.AdvertInterval; a < 10*time.Millisecond || a > 40950*time.Millisecond || a%(10*time.Millisecond) != 0 {
			errs = append(errs, fmt.Errorf("advert interval %v: VRRPv3 wants multiples of 10ms, 10ms-40.95s", a))
		}
	default:
		errs = append(errs, fmt.Errorf("VRRP version %d: want 2 or 3", in.Version))
	}
	if d := in.PreemptDelay; d < 0 || d > 1000*time.Second || d%(10*time.Millisecond) != 0 {
		errs = append(errs, fmt.Errorf("preempt delay %v: want multiples of 10ms, 0-1000s", d))
	}
	if in.NoPreempt && in.PreemptDelay != 0 {
		errs = append(errs, errors.New("preempt delay set with NoPreempt"))
	}

	fam := family(in.IPv6)
	// ofFamily rejects IPv4-mapped IPv6 addresses and zones too.
	ofFamily := func(a netip.Addr) bool {
		return a.IsValid() && !a.Is4In6() && a.Zone() == "" && family(a.Is6()) == fam
	}
	if in.UnicastSrc.IsValid() {
		if !ofFamily(in.UnicastSrc) {
			errs = append(errs, fmt.Errorf("unicast source %s: not %s", in.UnicastSrc, fam))
		}
		if len(in.UnicastPeers) == 0 {
			// keepalived would silently fall back to multicast.
			errs = append(errs, errors.New("unicast source without peers; leave UnicastSrc unset for multicast"))
		}
	} else if len(in.UnicastPeers) > 0 {
		errs = append(errs, errors.New("unicast peers without a unicast source"))
	}
	seen := map[netip.Addr]bool{}
	for _, p := range in.UnicastPeers {
		switch {
		case !ofFamily(p):
			errs = append(errs, fmt.Errorf("unicast peer %s: not %s", p, fam))
		case p == in.UnicastSrc:
			errs = append(errs, fmt.Errorf("unicast peer %s: is the source", p))
		case seen[p]:
			errs = append(errs, fmt.Errorf("unicast peer %s: duplicate", p))
		}
		seen[p] = true
	}

	seenVIP := map[netip.Addr]bool{}
	for _, p := range in.VIPs {
		switch {
		case !p.IsValid() || !ofFamily(p.Addr()):
			errs = append(errs, fmt.Errorf("VIP %s: not %s", p, fam))
		case !p.IsSingleIP():
			errs = append(errs, fmt.Errorf("VIP %s: want /%d", p, p.Addr().BitLen()))
		case seenVIP[p.Addr()]:
			errs = append(errs, fmt.Errorf("VIP %s: duplicate", p))
		}
		seenVIP[p.Addr()] = true
	}
	if a := in.AdvertAddr; a.IsValid() && !ofFamily(a) {
		errs = append(errs, fmt.Errorf("advert address %s: not %s", a, fam))
	}

	if in.TrackFile != "" {
		if err, ok := trackFiles[in.TrackFile]; !ok {
			errs = append(errs, fmt.Errorf("track file %q: not in Config.TrackFiles", in.TrackFile))
		} else if err != nil {
			errs = append(errs, err)
		}
	}
	if in.TrackWeight < -254 || in.TrackWeight > 254 {
		errs = append(errs, fmt.Errorf("track weight %d: want -254-254", in.TrackWeight))
	}
	if in.TrackFile == "" && in.TrackWeight != 0 {
		errs = append(errs, errors.New("track weight without a track file"))
	}
	return errors.Join(errs...)
}

// anchor returns the address in this instance's adverts: AdvertAddr, or
// 169.254.0.VRID or fe80::a9fe:VRID.
func (in Instance) anchor() netip.Addr {
	if in.AdvertAddr.IsValid() {
		return in.AdvertAddr
	}
	if in.IPv6 {
		return netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 12: 0xa9, 13: 0xfe, 15: byte(in.VRID)})
	}
	return netip.AddrFrom4([4]byte{169, 254, 0, byte(in.VRID)})
}

type family bool

func (f family) String() string {
	if f {
		return "IPv6"
	}
	return "IPv4"
}

func checkPath(what, p string) error {
	if !pathRE.MatchString(p) || strings.Contains(p, "//") || strings.HasSuffix(p, "/") {
		return fmt.Errorf("%s %q: want an absolute path matching %s", what, p, pathRE)
	}
	return nil
}

func checkSeconds(what string, d time.Duration) error {
	if d < 0 || d%time.Second != 0 {
		return fmt.Errorf("%s %v: want whole seconds", what, d)
	}
	return nil
}

// seconds formats d as keepalived reads it: seconds, as few decimals as
// needed ("1", "0.1", "0.02").
func seconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}

// view is what the template sees: sorted, formatted, nothing to decide.
type view struct {
	RouterID          string
	NotifyFIFO        string
	GARPMasterDelay   string
	GARPMasterRefresh string
	TrackFiles        []TrackFile
	Instances         []instanceView
}

type instanceView struct {
	Name, Interface string
	Comment         string
	VRID, Priority  int
	Version         int
	AdvertInterval  string
	NoPreempt       bool
	PreemptDelay    string
	UnicastSrc      string
	UnicastPeers    []string
	// CheckUnicastSrc drops unicast adverts whose source is none of
	// UnicastPeers: without it keepalived takes an advert from any host
	// that reaches the node, and a priority-255 one takes the VIPs.
	CheckUnicastSrc bool
	Anchor          string
	AnchorScope     bool
	VIPs            []string
	TrackFile       string
	TrackWeight     int
}

func newView(c Config) view {
	v := view{RouterID: c.RouterID, NotifyFIFO: c.NotifyFIFO}
	if c.GARPMasterDelay > 0 {
		v.GARPMasterDelay = seconds(c.GARPMasterDelay)
	}
	if c.GARPMasterRefresh > 0 {
		v.GARPMasterRefresh = seconds(c.GARPMasterRefresh)
	}
	v.TrackFiles = slices.SortedFunc(slices.Values(c.TrackFiles), func(a, b TrackFile) int { return strings.Compare(a.Name, b.Name) })
	for _, in := range c.Instances {
		iv := instanceView{
			Name:           in.Name,
			Comment:        in.Comment,
			Interface:      in.Interface,
			VRID:           in.VRID,
			Priority:       in.Priority,
			Version:        in.Version,
			AdvertInterval: seconds(in.AdvertInterval),
			NoPreempt:      in.NoPreempt,
			Anchor:         netip.PrefixFrom(in.anchor(), in.anchor().BitLen()).String(),
			// keepalived takes no scope for IPv6 addresses.
			AnchorScope: !in.IPv6,
			TrackFile:   in.TrackFile,
			TrackWeight: in.TrackWeight,
		}
		if in.PreemptDelay > 0 {
			iv.PreemptDelay = seconds(in.PreemptDelay)
		}
		if in.UnicastSrc.IsValid() {
			iv.UnicastSrc = in.UnicastSrc.String()
			iv.CheckUnicastSrc = true
		}
		for _, p := range slices.SortedFunc(slices.Values(in.UnicastPeers), netip.Addr.Compare) {
			iv.UnicastPeers = append(iv.UnicastPeers, p.String())
		}
		for _, p := range slices.SortedFunc(slices.Values(in.VIPs), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) }) {
			iv.VIPs = append(iv.VIPs, p.String())
		}
		v.Instances = append(v.Instances, iv)
	}
	slices.SortFunc(v.Instances, func(a, b instanceView) int { return strings.Compare(a.Name, b.Name) })
	return v
}
