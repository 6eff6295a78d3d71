package speaker

import (
	"context"
	"fmt"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/nodeview"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// EventInvalidNodeAddress is recorded as a Warning on a Node, by that
// node's own speaker, for each InternalIP keeplb ignores (see package
// nodeview).
const EventInvalidNodeAddress = "InvalidNodeAddress"

// observe reports what one sync learned beyond the plan's own problems:
// the Nodes' InternalIPs that keeplb ignores, the pools whose plan ignores
// Ready (fail-static), and whether this node can forward.
func (s *Speaker) observe(ctx context.Context, in dataplane.Inputs, plan vrrp.Plan) {
	s.warnNodes(ctx, in.Nodes)
	s.metrics.FailStatic.Reset()
	for _, p := range plan.Problems {
		if p.Reason == vrrp.ReasonFailStatic {
			s.metrics.FailStatic.WithLabelValues(p.Pool).Set(1)
		}
	}
	can := 0.0
	if s.dp.canForward() {
		can = 1
	}
	s.metrics.CanForward.Set(can)
}

// warnNodes logs the InternalIPs of nodes that nodeview ignores, and
// records a Warning event on this node's own Node for each of its own,
// once per change: they are left out of the plan and the dataplane (a
// NodePort real server or unicast peer no node can reach would black-hole
// traffic), and only a fix of the Node brings them back. Only the node's
// own speaker records the event, so that a bad address gives one event,
// not one per node.
func (s *Speaker) warnNodes(ctx context.Context, nodes []*v1.Node) {
	logger := klog.FromContext(ctx)
	seen := make(map[string]string)
	for _, n := range nodes {
		_, ignored := nodeview.Of(n)
		if len(ignored) == 0 {
			continue
		}
		parts := make([]string, len(ignored))
		for i, ig := range ignored {
			parts[i] = ig.String()
		}
		text := strings.Join(parts, "; ")
		seen[n.Name] = text
		if s.nodeWarned[n.Name] == text {
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
	s.nodeWarned = seen
}

// nodeAddressMessage is the event message for one ignored InternalIP.
func nodeAddressMessage(ig nodeview.Ignored) string {
	return fmt.Sprintf("%s (InternalIP %q) is ignored: %s. keeplb uses only global unicast InternalIPs without a zone as NodePort real servers and unicast VRRP peers. Make the kubelet report the node's routable address (its --node-ip flag, or the cloud provider's addresses)",
		ig.Field, ig.Value, ig.Reason)
}
