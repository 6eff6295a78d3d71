package speaker

import (
	"context"
	"errors"
	"slices"
	"syscall"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/connsync"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/metrics"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/nodeview"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// EventConnSyncFailed is the reason of the Warning event on this node's
// Node when its IPVS connection sync daemons cannot run as --conn-sync
// asks: no sync link found, or the kernel refused them.
const EventConnSyncFailed = "ConnSyncFailed"

// syncStep is the connection sync step (package connsync): which daemons
// this node runs and the guard its nftables table holds for them.
type syncStep struct {
	cfg      connsync.Config
	node     string
	k        ipvs.SyncDaemons // nil: the step does nothing
	metrics  *metrics.Speaker
	recorder record.EventRecorder
	// running is what the kernel runs, as the last apply left it; listed
	// says it was read from the kernel once (a previous speaker's daemons
	// are found, not started twice).
	running []ipvs.SyncDaemon
	listed  bool
	// guard is the last computed guard, so that a change of it alone (a
	// Node's address) makes the forwarding step write the table.
	guard nft.SyncGuard
	// followVIP is the last computed Want.FollowVIP, for the same reason.
	followVIP bool
	// reports shows each problem once while it lasts.
	reports lasting
}

func newSyncStep(o *Options, k Kernel, m *metrics.Speaker, recorder record.EventRecorder) *syncStep {
	st := &syncStep{cfg: o.ConnSync, node: o.NodeName, metrics: m, recorder: recorder}
	if o.ConnSync.Enabled && k.Sync != nil {
		st.k = k.Sync
	}
	return st
}

// compute is the step's share of a sync's computation: pure but for
// remembering the guard it returns, and whether it changed.
func (c *syncStep) compute(nodes []*v1.Node, links []hostnet.Link) (connsync.Want, bool) {
	if c == nil || c.k == nil {
		return connsync.Want{}, false
	}
	views := make([]vrrp.Node, 0, len(nodes))
	for _, n := range nodes {
		v, _ := nodeview.Of(n)
		views = append(views, v)
	}
	want := connsync.Compute(c.cfg, c.node, views, links)
	changed := !slices.Equal(want.Guard.Ports, c.guard.Ports) || !slices.Equal(want.Guard.Peers, c.guard.Peers) || want.FollowVIP != c.followVIP
	c.guard, c.followVIP = want.Guard, want.FollowVIP
	return want, changed
}

// apply brings the daemons to want after the forwarding step wrote
// keeplb's table: guarded says the table holds want.Guard (its last
// write succeeded). Failures are logged and recorded on this node's Node,
// once while they last; they never fail the sync, whose forwarding does
// not depend on them.
func (c *syncStep) apply(ctx context.Context, self *v1.Node, want connsync.Want, guarded bool) {
	if c == nil || c.k == nil {
		return
	}
	logger := klog.FromContext(ctx)
	if !c.listed {
		if running, err := c.k.SyncDaemons(); err == nil {
			c.running, c.listed = running, true
		}
	}
	problems := []error{want.Problem}
	running, err := connsync.Apply(c.k, c.running, want, guarded)
	c.running = running
	if errors.Is(err, syscall.EEXIST) {
		// A daemon runs that this speaker did not list (its first
		// listing failed): list again at the next sync.
		c.listed = false
	}
	problems = append(problems, err)
	if len(want.Daemons) > 0 && !guarded {
		logger.V(2).Info("IPVS connection sync: the backup daemon waits for keeplb's nftables table to admit the peers alone")
	}
	for _, p := range problems {
		if p == nil || !c.reports.fresh(p.Error()) {
			continue
		}
		logger.Error(p, "IPVS connection sync (--conn-sync) is not as asked; forwarding goes on without it")
		if self != nil && c.recorder != nil {
			c.recorder.Eventf(self, v1.EventTypeWarning, EventConnSyncFailed, "IPVS connection sync (--conn-sync): %v", p)
		}
	}
	c.reports.end()
	c.metrics.ConnSyncDaemons.Reset()
	for _, d := range running {
		c.metrics.ConnSyncDaemons.WithLabelValues(d.State.String()).Set(1)
	}
}

// exit stops the daemons, for a clean exit: the backup before the table's
// guard goes.
func (c *syncStep) exit(ctx context.Context) error {
	if c == nil || c.k == nil || len(c.running) == 0 {
		return nil
	}
	err := connsync.Stop(c.k, c.running)
	c.running = nil
	if err == nil {
		klog.FromContext(ctx).Info("Stopped the IPVS connection sync daemons")
	}
	return err
}

// nodeNamed returns the Node called name among nodes, or nil.
func nodeNamed(nodes []*v1.Node, name string) *v1.Node {
	for _, n := range nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}
