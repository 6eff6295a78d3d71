package annotations

import (
	"net/netip"
	"slices"
	"strings"
)

// Holders maps each VIP of a Service to the node holding it, as the Holder
// annotation records them.
//
// A Service has one annotation but possibly several VIPs (one per family),
// each in a VRRP instance of its own whose master is often another node.
// So the annotation lists one node per VIP, "192.0.2.1=node-a,2001:db8::1=node-b",
// and each speaker rewrites only the entries of the VIPs it holds: two
// speakers holding different VIPs of one Service then agree after one write
// each, where a single node name made them overwrite each other for as long
// as both held. When one node holds every VIP, the value is that node's
// name alone, as keeplb wrote it before it had entries: what `kubectl get`
// shows stays readable, and older values parse.
type Holders map[netip.Addr]string

// ParseHolders reads a Holder annotation value of a Service whose VIPs are
// vips: a bare node name holds every one of vips; entries "address=node"
// name each VIP's holder. Entries that do not parse are ignored, so a
// speaker that rewrites the value drops them.
func ParseHolders(value string, vips []netip.Addr) Holders {
	h := Holders{}
	value = strings.TrimSpace(value)
	if value == "" {
		return h
	}
	if !strings.Contains(value, "=") {
		for _, v := range vips {
			h[v.Unmap()] = value
		}
		return h
	}
	for _, entry := range strings.Split(value, ",") {
		a, node, ok := strings.Cut(entry, "=")
		if !ok {
			continue
		}
		addr, err := netip.ParseAddr(strings.TrimSpace(a))
		node = strings.TrimSpace(node)
		if err != nil || addr.Zone() != "" || node == "" {
			continue
		}
		h[addr.Unmap()] = node
	}
	return h
}

// Format returns the annotation value recording h for a Service whose VIPs
// are vips: entries for the VIPs of vips that h names, sorted by address,
// or the node's name alone when one node holds every one of vips. VIPs the
// Service no longer has are dropped. The value depends on h and the set of
// vips only, so every speaker writes the same value for the same holders.
func (h Holders) Format(vips []netip.Addr) string {
	sorted := make([]netip.Addr, 0, len(vips))
	for _, v := range vips {
		sorted = append(sorted, v.Unmap())
	}
	slices.SortFunc(sorted, netip.Addr.Compare)
	sorted = slices.Compact(sorted)
	var entries []string
	one, same := "", true
	for _, v := range sorted {
		node := h[v]
		if node == "" {
			same = false
			continue
		}
		if one == "" {
			one = node
		}
		same = same && node == one
		entries = append(entries, v.String()+"="+node)
	}
	if same && one != "" {
		return one
	}
	return strings.Join(entries, ",")
}

// Nodes returns the holder of each of vips, in their order, "" for a VIP
// with none recorded.
func (h Holders) Nodes(vips []netip.Addr) []string {
	out := make([]string, len(vips))
	for i, v := range vips {
		out[i] = h[v.Unmap()]
	}
	return out
}
