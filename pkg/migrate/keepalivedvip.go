// Package migrate turns the configuration of other VIP tools into keeplb
// resources. It is pure: it reads bytes and returns a script to review and
// run, warnings and errors; the command line wires it to files and the
// terminal.
package migrate

import (
	"bytes"
	"cmp"
	_ "embed"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/template"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// DefaultPoolName is the IPPool name used when Options.PoolName is empty.
const DefaultPoolName = "keepalived-vip"

// DefaultKeepalivedVIPVRID is the VRID keepalived-vip's manifests give its
// --vrid flag, assumed when Options.KeepalivedVIPVRID is 0.
const DefaultKeepalivedVIPVRID = 50

// FieldManager is the field manager of the changes the generated script
// makes.
const FieldManager = "keeplb-migrate"

//go:embed keepalivedvip.sh.tmpl
var scriptTemplate string

// script renders the output of the conversion. Every value it interpolates
// is validated or generated (addresses, DNS names, the pool's YAML), so none
// needs shell quoting.
var script = template.Must(template.New("keepalivedvip.sh").Parse(scriptTemplate))

// scriptData is what the script says.
type scriptData struct {
	Source, FieldManager string
	// PoolComment is comment lines, PoolYAML the IPPool manifest.
	PoolComment, PoolYAML string
	Services              []scriptService
}

// scriptService is the merge patch of one Service.
type scriptService struct {
	Comment, Namespace, Name, PatchYAML string
}

// Mode is a keepalived-vip forwarding mode, as written after the service
// reference (upper-cased).
type Mode string

// The keepalived-vip forwarding modes.
const (
	ModeNAT   Mode = "NAT"
	ModeDR    Mode = "DR"
	ModePROXY Mode = "PROXY"
)

// Options tune the conversion.
type Options struct {
	// PoolName names the generated IPPool; DefaultPoolName if empty.
	PoolName string
	// VRID, if set, becomes spec.vrrp.virtualRouterIDs: a single id or a
	// range "first-last".
	VRID string
	// KeepalivedVIPVRID is the VRID keepalived-vip runs with (its --vrid
	// flag); DefaultKeepalivedVIPVRID if 0. Both run on the same segment
	// during the migration, so a VRID range containing it is warned about.
	KeepalivedVIPVRID int
}

// AddFlags registers the options on fs.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.PoolName, "pool-name", o.PoolName, "Name of the generated IPPool.")
	fs.StringVar(&o.VRID, "vrid", o.VRID, "spec.vrrp.virtualRouterIDs of the IPPool: a VRID or a range first-last, free on the segment and without keepalived-vip's VRID.")
	fs.IntVar(&o.KeepalivedVIPVRID, "keepalived-vip-vrid", cmp.Or(o.KeepalivedVIPVRID, DefaultKeepalivedVIPVRID), "The VRID keepalived-vip runs with (its --vrid flag), which --vrid must leave out while both run side by side.")
}

// keepalivedVIPVRID is KeepalivedVIPVRID with its default.
func (o Options) keepalivedVIPVRID() int {
	return cmp.Or(o.KeepalivedVIPVRID, DefaultKeepalivedVIPVRID)
}

// Validate reports options keeplb would refuse.
func (o Options) Validate() error {
	var errs []error
	if o.PoolName != "" {
		if msgs := validation.IsDNS1123Subdomain(o.PoolName); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("--pool-name %q is not a valid IPPool name: %s", o.PoolName, strings.Join(msgs, "; ")))
		}
	}
	if o.VRID != "" {
		if _, _, err := vrrp.ParseVRIDRange(o.VRID); err != nil {
			errs = append(errs, fmt.Errorf("--vrid: %w", err))
		}
	}
	if o.KeepalivedVIPVRID < 0 || o.KeepalivedVIPVRID > 255 {
		errs = append(errs, fmt.Errorf("--keepalived-vip-vrid %d is not a VRID; want 1-255", o.KeepalivedVIPVRID))
	}
	return errors.Join(errs...)
}

// Entry is one valid line of keepalived-vip's ConfigMap.
type Entry struct {
	// Key is the ConfigMap key as written.
	Key string
	// VIP is the parsed key.
	VIP netip.Addr
	// Namespace and Name reference the Service.
	Namespace, Name string
	// Mode is the forwarding mode, NAT if none was written.
	Mode Mode
}

// ParseEntry parses one key/value pair of keepalived-vip's ConfigMap:
// "<VIP>": "<namespace>/<service>[:NAT|DR|PROXY]".
func ParseEntry(key, value string) (Entry, error) {
	e := Entry{Key: key, Mode: ModeNAT}
	a, err := netip.ParseAddr(strings.TrimSpace(key))
	if err != nil || a.Zone() != "" {
		return e, fmt.Errorf("entry %q: the key is not an IP address; keepalived-vip keys are the VIP, such as 192.0.2.10", key)
	}
	e.VIP = a.Unmap()
	if !e.VIP.IsGlobalUnicast() {
		return e, fmt.Errorf("entry %q: %s is not a unicast address usable as a VIP", key, e.VIP)
	}
	v := strings.TrimSpace(value)
	ref, mode, hasMode := strings.Cut(v, ":")
	if hasMode {
		switch m := Mode(strings.ToUpper(strings.TrimSpace(mode))); m {
		case ModeNAT, ModeDR, ModePROXY:
			e.Mode = m
		default:
			return e, fmt.Errorf("entry %q: forwarding mode %q is unknown; use NAT, DR or PROXY (or none, for NAT)", key, mode)
		}
	}
	ns, name, ok := strings.Cut(strings.TrimSpace(ref), "/")
	if !ok || ns == "" || name == "" {
		return e, fmt.Errorf("entry %q: value %q is not a service reference; want <namespace>/<service>[:NAT|DR|PROXY]", key, value)
	}
	if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
		return e, fmt.Errorf("entry %q: %q is not a valid namespace: %s", key, ns, strings.Join(msgs, "; "))
	}
	if msgs := validation.IsDNS1035Label(name); len(msgs) > 0 {
		return e, fmt.Errorf("entry %q: %q is not a valid Service name: %s", key, name, strings.Join(msgs, "; "))
	}
	e.Namespace, e.Name = ns, name
	return e, nil
}

// Result is the outcome of a conversion.
type Result struct {
	// Script is the output, a POSIX shell script that server-side
	// applies the IPPool, then merge-patches each Service, sorted by namespace and name, into a LoadBalancer with
	// keeplb's annotations. Empty if no entry was valid.
	//
	// The Services are patched rather than server-side applied because
	// kubectl apply --server-side, on an object last deployed with
	// client-side kubectl apply, hands every field of that earlier apply to
	// the new field manager: a stub would then own the Service's ports and
	// selector, and applying it again fails for want of ports.
	Script []byte
	// Warnings are differences the user must review, without prefix.
	Warnings []string
	// Errors name the entries that were not converted.
	Errors []error
}

// ParseConfigMap reads a ConfigMap manifest (YAML or JSON).
func ParseConfigMap(data []byte) (*corev1.ConfigMap, error) {
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal(data, &cm); err != nil {
		return nil, fmt.Errorf("reading the ConfigMap: %w", err)
	}
	if cm.Kind != "" && cm.Kind != "ConfigMap" {
		return nil, fmt.Errorf("the input is a %s, not a ConfigMap; export it with kubectl get configmap <name> -o yaml", cm.Kind)
	}
	if len(cm.Data) == 0 {
		return nil, errors.New("the ConfigMap has no data: nothing to migrate")
	}
	return &cm, nil
}

// service gathers what the entries say about one Service.
type service struct {
	namespace, name string
	entries         []Entry // at most one per family, sorted by VIP
	shareKey        string
}

func (s *service) ref() string { return s.namespace + "/" + s.name }

// Convert turns the data of keepalived-vip's ConfigMap into keeplb
// resources. source names the ConfigMap in the header comment.
func Convert(source string, data map[string]string, o Options) Result {
	var r Result
	if o.PoolName == "" {
		o.PoolName = DefaultPoolName
	}

	// Parse every entry, in a fixed order: by address, then key.
	var entries []Entry
	for k, v := range data {
		e, err := ParseEntry(k, v)
		if err != nil {
			r.Errors = append(r.Errors, err)
			continue
		}
		entries = append(entries, e)
	}
	slices.SortFunc(entries, func(a, b Entry) int {
		return cmp.Or(a.VIP.Compare(b.VIP), cmp.Compare(a.Key, b.Key))
	})

	// One VIP per family per Service.
	services := map[string]*service{}
	for _, e := range entries {
		ref := e.Namespace + "/" + e.Name
		s := services[ref]
		if s == nil {
			s = &service{namespace: e.Namespace, name: e.Name}
			services[ref] = s
		}
		if i := slices.IndexFunc(s.entries, func(o Entry) bool { return o.VIP.Is4() == e.VIP.Is4() }); i >= 0 {
			r.Errors = append(r.Errors, fmt.Errorf("entry %q: Service %s already gets %s %s from entry %q; keeplb.io/ips takes at most one address per family",
				e.Key, ref, familyName(e.VIP), s.entries[i].VIP, s.entries[i].Key))
			continue
		}
		s.entries = append(s.entries, e)
	}

	// VIPs used by several Services: the Services need a common share key,
	// which only works within one namespace.
	r.Errors = append(r.Errors, shareKeys(services, &r.Warnings)...)

	// Forwarding warnings, per kept entry.
	refs := sortedRefs(services)
	for _, ref := range refs {
		for _, e := range services[ref].entries {
			switch e.Mode {
			case ModeDR:
				r.Warnings = append(r.Warnings, fmt.Sprintf("entry %q (%s, DR): keeplb has no direct routing; it forwards with keeplb.io/forwarding: pod instead, so replies return through the node holding the VIP, and the client IP is preserved only with externalTrafficPolicy: Local", e.Key, ref))
			case ModePROXY:
				r.Warnings = append(r.Warnings, fmt.Sprintf("entry %q (%s, PROXY): keeplb does not send the PROXY protocol header; it forwards with keeplb.io/forwarding: pod, and the backend must stop expecting the header", e.Key, ref))
			}
		}
	}

	var vips []netip.Addr
	for _, ref := range refs {
		for _, e := range services[ref].entries {
			vips = append(vips, e.VIP)
		}
	}
	if len(vips) == 0 {
		return r
	}
	slices.SortFunc(vips, netip.Addr.Compare)
	vips = slices.Compact(vips)
	r.Warnings = append(r.Warnings, vridWarnings(o)...)

	d := scriptData{
		Source:       source,
		FieldManager: FieldManager,
		PoolComment:  poolComment(o),
		PoolYAML:     marshalYAML(poolObject(o, vips)),
	}
	for _, ref := range refs {
		s := services[ref]
		if len(s.entries) == 0 {
			continue
		}
		var c strings.Builder
		// The address, not the key as written: a hand-written key may
		// carry whitespace, even a line break, around the address.
		for _, e := range s.entries {
			fmt.Fprintf(&c, "# from entry %s: %s:%s\n", e.VIP, ref, e.Mode)
		}
		c.WriteString("# keepalived-vip served a ClusterIP Service; keeplb needs type LoadBalancer.\n")
		d.Services = append(d.Services, scriptService{
			Comment:   c.String(),
			Namespace: s.namespace,
			Name:      s.name,
			PatchYAML: marshalYAML(servicePatch(s, o.PoolName)),
		})
	}
	var b bytes.Buffer
	if err := script.Execute(&b, d); err != nil {
		// Strings into a parsed template: cannot fail.
		panic(err)
	}
	r.Script = b.Bytes()
	return r
}

// KeepalivedVIP reads keepalived-vip's ConfigMap manifest and converts it.
// The error is about the manifest as a whole; per-entry problems are in
// the Result, whose Errors are sorted.
func KeepalivedVIP(manifest []byte, o Options) (Result, error) {
	if err := o.Validate(); err != nil {
		return Result{}, err
	}
	cm, err := ParseConfigMap(manifest)
	if err != nil {
		return Result{}, err
	}
	source := "a ConfigMap"
	if cm.Name != "" {
		source = "ConfigMap " + cm.Name
		if cm.Namespace != "" {
			source = "ConfigMap " + cm.Namespace + "/" + cm.Name
		}
		// The name goes into a comment of a shell script: a hand-edited
		// manifest's name could carry a line break, and the next line
		// would run. A name the API server would refuse is quoted, so
		// that it stays on the comment's line.
		if len(validation.IsDNS1123Subdomain(cm.Name)) > 0 || cm.Namespace != "" && len(validation.IsDNS1123Label(cm.Namespace)) > 0 {
			source = "a ConfigMap named " + strconv.Quote(strings.TrimPrefix(source, "ConfigMap "))
		}
	}
	r := Convert(source, cm.Data, o)
	slices.SortFunc(r.Errors, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return r, nil
}

// vridWarnings reports a --vrid of a single VRID, and one that contains
// keepalived-vip's VRID: until keepalived-vip is removed both speak VRRP on
// the same segment, where a VRID must name one virtual router.
func vridWarnings(o Options) []string {
	if o.VRID == "" {
		return nil
	}
	first, last, err := vrrp.ParseVRIDRange(o.VRID)
	if err != nil {
		return nil // Validate reported it.
	}
	kv := o.keepalivedVIPVRID()
	var w []string
	if first <= kv && kv <= last {
		w = append(w, fmt.Sprintf("--vrid %s contains VRID %d, keepalived-vip's: until keepalived-vip is removed, both run VRRP on the same segment, and instances with one VRID but different addresses disrupt each other; give a range without it, such as %s", o.VRID, kv, suggestVRIDs(first, kv)))
	}
	if last == first {
		w = append(w, fmt.Sprintf("--vrid %s is a single VRID: keeplb runs several VRRP instances per pool (one per address family, and one per Service with externalTrafficPolicy: Local), each with its own VRID; give a range free on the network segment, such as %s", o.VRID, suggestVRIDs(first, kv)))
	}
	return w
}

// suggestVRIDs suggests up to 32 VRIDs from first, moved past avoid if they
// would contain it.
func suggestVRIDs(first, avoid int) string {
	last := min(first+31, 255)
	if first <= avoid && avoid <= last {
		if avoid < 255 {
			first, last = avoid+1, min(avoid+32, 255)
		} else {
			first, last = avoid-32, avoid-1
		}
	}
	return fmt.Sprintf("%d-%d", first, last)
}

// shareKeys gives a common keeplb.io/share-key to the Services that use a
// common VIP, grouping Services linked through several VIPs. It returns an
// error per entry of a group keeplb could not share.
func shareKeys(services map[string]*service, warnings *[]string) []error {
	byVIP := map[netip.Addr][]*service{}
	for _, ref := range sortedRefs(services) {
		for _, e := range services[ref].entries {
			byVIP[e.VIP] = append(byVIP[e.VIP], services[ref])
		}
	}
	// Union-find over the Services, keyed by ref.
	parent := map[string]string{}
	var find func(string) string
	find = func(x string) string {
		if p, ok := parent[x]; ok && p != x {
			parent[x] = find(p)
			return parent[x]
		}
		return x
	}
	vips := make([]netip.Addr, 0, len(byVIP))
	for vip, ss := range byVIP {
		vips = append(vips, vip)
		for _, s := range ss[1:] {
			a, b := find(ss[0].ref()), find(s.ref())
			if a != b {
				parent[max(a, b)] = min(a, b)
			}
		}
	}
	slices.SortFunc(vips, netip.Addr.Compare)

	groups := map[string][]*service{}
	var roots []string
	for _, vip := range vips {
		if len(byVIP[vip]) < 2 {
			continue
		}
		root := find(byVIP[vip][0].ref())
		if _, ok := groups[root]; !ok {
			roots = append(roots, root)
			for _, ref := range sortedRefs(services) {
				if find(ref) == root {
					groups[root] = append(groups[root], services[ref])
				}
			}
		}
	}

	var errs []error
	for _, root := range roots {
		group := groups[root]
		var names []string
		namespaces := map[string]bool{}
		perFamily := map[bool][]netip.Addr{}
		for _, s := range group {
			names = append(names, s.ref())
			namespaces[s.namespace] = true
			for _, e := range s.entries {
				perFamily[e.VIP.Is4()] = append(perFamily[e.VIP.Is4()], e.VIP)
			}
		}
		var why string
		if len(namespaces) > 1 {
			why = "keeplb shares an address only between Services of one namespace (keeplb.io/share-key)"
		} else {
			for _, is4 := range []bool{true, false} {
				if v := slices.Compact(slices.SortedFunc(slices.Values(perFamily[is4]), netip.Addr.Compare)); len(v) > 1 {
					why = fmt.Sprintf("Services sharing one key must share one address per family, but they use %s", joinAddrs(v))
				}
			}
		}
		if why != "" {
			for _, s := range group {
				for _, e := range s.entries {
					if len(byVIP[e.VIP]) > 1 {
						errs = append(errs, fmt.Errorf("entry %q: %s is used by Services %s; %s", e.Key, e.VIP, strings.Join(refsOf(byVIP[e.VIP]), ", "), why))
					}
				}
				s.entries = slices.DeleteFunc(s.entries, func(e Entry) bool { return len(byVIP[e.VIP]) > 1 })
			}
			continue
		}
		key := shareKeyFor(group, byVIP)
		for _, s := range group {
			s.shareKey = key
		}
		*warnings = append(*warnings, fmt.Sprintf("Services %s share an address with keeplb.io/share-key: %s; their ports must not overlap, and they need externalTrafficPolicy: Cluster or the same pod selector, because one node holds the address", strings.Join(names, ", "), key))
	}
	return errs
}

// shareKeyFor derives a share key from the lowest VIP the group shares:
// stable from run to run, and a valid label value (at most 54 characters).
func shareKeyFor(group []*service, byVIP map[netip.Addr][]*service) string {
	var lowest netip.Addr
	for _, s := range group {
		for _, e := range s.entries {
			if len(byVIP[e.VIP]) > 1 && (!lowest.IsValid() || e.VIP.Less(lowest)) {
				lowest = e.VIP
			}
		}
	}
	return "keepalived-vip-" + strings.NewReplacer(".", "-", ":", "-").Replace(lowest.StringExpanded())
}

func poolComment(o Options) string {
	var b strings.Builder
	b.WriteString("# The VIPs of keepalived-vip. autoAssign is false: only the Services below,\n")
	b.WriteString("# which name this pool and their address, draw from it. forwarding is left\n")
	b.WriteString("# to the default; each Service sets keeplb.io/forwarding itself.\n")
	fmt.Fprintf(&b, "# keepalived-vip announced every VIP in a single VRRP instance (its --vrid,\n# taken to be %d);", o.keepalivedVIPVRID())
	if o.VRID != "" {
		fmt.Fprintf(&b, " this pool uses VRIDs %s.\n", o.VRID)
	} else {
		b.WriteString(" keeplb spreads them over several instances. Without\n# --vrid, their VRIDs come from a slice of 1-255 that may contain\n# keepalived-vip's: pass --vrid to pin spec.vrrp.virtualRouterIDs to VRIDs\n# free on the segment.\n")
	}
	return b.String()
}

func poolObject(o Options, vips []netip.Addr) map[string]any {
	addrs := make([]string, len(vips))
	for i, a := range vips {
		addrs[i] = netip.PrefixFrom(a, a.BitLen()).String()
	}
	spec := map[string]any{
		"addresses":  addrs,
		"autoAssign": false,
	}
	if o.VRID != "" {
		spec["vrrp"] = map[string]any{"virtualRouterIDs": strings.TrimSpace(o.VRID)}
	}
	return map[string]any{
		"apiVersion": v1alpha1.SchemeGroupVersion.String(),
		"kind":       v1alpha1.IPPoolKind,
		"metadata":   map[string]any{"name": o.PoolName},
		"spec":       spec,
	}
}

// servicePatch is the merge patch that makes a Service keeplb's.
func servicePatch(s *service, pool string) map[string]any {
	ips := make([]string, len(s.entries))
	for i, e := range s.entries {
		ips[i] = e.VIP.String()
	}
	ann := map[string]any{
		annotations.Pool:       pool,
		annotations.IPs:        strings.Join(ips, ","),
		annotations.Forwarding: string(v1alpha1.ForwardingPod),
	}
	if s.shareKey != "" {
		ann[annotations.ShareKey] = s.shareKey
	}
	return map[string]any{
		"metadata": map[string]any{"annotations": ann},
		"spec":     map[string]any{"type": string(corev1.ServiceTypeLoadBalancer)},
	}
}

// marshalYAML marshals v, whose maps sigs.k8s.io/yaml writes with sorted
// keys.
func marshalYAML(v any) string {
	out, err := yaml.Marshal(v)
	if err != nil {
		// Only maps, strings and bools: cannot fail.
		panic(err)
	}
	return string(out)
}

func sortedRefs(services map[string]*service) []string {
	refs := make([]string, 0, len(services))
	for ref := range services {
		refs = append(refs, ref)
	}
	slices.Sort(refs)
	return refs
}

func refsOf(ss []*service) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.ref()
	}
	return out
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, " and ")
}

func familyName(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}
