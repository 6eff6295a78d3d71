package speaker

import (
	"context"
	"fmt"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/nodeview"
)

// EventInvalidNodeAddress is recorded as a Warning on a Node, by that
// node's own speaker, for each InternalIP keeplb ignores (see package
// nodeview).
const EventInvalidNodeAddress = "InvalidNodeAddress"

// warnNodes logs the InternalIPs of nodes that nodeview ignores, and
// records a Warning event on this node's own Node for each of its own,
// once per change: they are left out of the plan and the dataplane (a
// NodePort real server or unicast peer no node can reach would black-hole
// traffic), and only a fix of the Node brings them back. Only the node's
// own speaker records the event, so that a bad address gives one event,
// not one per node.
func (s *Speaker) warnNodes(ctx context.Context, nodes []*v1.Node, ignoredAddrs map[string][]nodeview.Ignored) {
	logger := klog.FromContext(ctx)
	for _, n := range nodes {
		ignored := ignoredAddrs[n.Name]
		if len(ignored) == 0 {
			continue
		}
		parts := make([]string, len(ignored))
		for i, ig := range ignored {
			parts[i] = ig.String()
		}
		text := strings.Join(parts, "; ")
		if !s.nodeReports.fresh(n.Name + " " + text) {
			continue
		}
		logger.Info("Node InternalIPs ignored: not addresses other nodes can send to", "node", n.Name, "ignored", text)
		if n.Name != s.opts.NodeName || s.recorder == nil {
			continue
		}
		for _, ig := range ignored {
			s.recorder.Event(n, v1.EventTypeWarning, EventInvalidNodeAddress, nodeAddressMessage(ig))
		}
	}
	s.nodeReports.end()
}

// ignoredAddrs returns, by Node, the InternalIPs that nodeview leaves out.
func ignoredAddrs(nodes []*v1.Node) map[string][]nodeview.Ignored {
	out := map[string][]nodeview.Ignored{}
	for _, n := range nodes {
		if _, ignored := nodeview.Of(n); len(ignored) > 0 {
			out[n.Name] = ignored
		}
	}
	return out
}

// nodeAddressMessage is the event message for one ignored InternalIP.
func nodeAddressMessage(ig nodeview.Ignored) string {
	return fmt.Sprintf("%s (InternalIP %q) is ignored: %s. keeplb uses only global unicast InternalIPs without a zone as NodePort real servers and unicast VRRP peers. Make the kubelet report the node's routable address (its --node-ip flag, or the cloud provider's addresses)",
		ig.Field, ig.Value, ig.Reason)
}
