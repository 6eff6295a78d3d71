package speaker

import (
	"context"
	"errors"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/dataplane"
	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/metrics"
)

// EventForwardingProblem is recorded as a Warning on a Service when the
// IPVS dataplane cannot forward it as asked and does the closest safe thing
// instead (see dataplane.Problem).
const EventForwardingProblem = "ForwardingProblem"

// ipvsSysctls returns the sysctls IPVS forwarding needs on every node.
// They exist only once the ip_vs module is loaded.
func ipvsSysctls() []hostnet.Requirement {
	return []hostnet.Requirement{
		{Name: "net.ipv4.vs.conntrack", Value: "1", Why: "lets netfilter see IPVS connections, so forwarded traffic can be masqueraded"},
		{Name: "net.ipv4.ip_forward", Value: "1", Why: "lets the replies of IPVS-forwarded IPv4 traffic pass through this node"},
	}
}

// ipv6Sysctls returns the sysctl IPv6 VIPs need. It is set only once an
// IPv6 virtual server is wanted, not at start: forwarding on all interfaces
// makes the kernel ignore router advertisements (unless accept_ra is 2),
// which would cost a node that configures IPv6 by SLAAC its default route.
func ipv6Sysctls() []hostnet.Requirement {
	return []hostnet.Requirement{
		{Name: "net.ipv6.conf.all.forwarding", Value: "1", Why: "lets the replies of IPVS-forwarded IPv6 traffic pass through this node"},
	}
}

// openIPVS opens IPVS in the speaker's node-side network namespace: the
// one named by --netns, else the current one.
func openIPVS(netns string) (ipvs.Interface, error) {
	var h *ipvs.Netlink
	var err error
	if netns != "" {
		h, err = ipvs.NewAt("/run/netns/" + netns)
	} else {
		h, err = ipvs.New()
	}
	if err != nil {
		return nil, err // not a typed nil in an interface
	}
	return h, nil
}

// ipvsStep is the speaker's IPVS dataplane: after the VRRP step of every
// sync it brings this node's IPVS table to dataplane.Desired, and on exit
// it deletes keeplb's virtual servers. Only the runner calls it, one call
// at a time, so it needs no lock.
type ipvsStep struct {
	node string
	// h is nil when the kernel has no IPVS: every call is then a no-op and
	// the speaker only holds VIPs.
	h ipvs.Interface
	// sysctls is nil with --skip-sysctls.
	sysctls    hostnet.Interface
	keepOnExit bool
	metrics    *metrics.Speaker
	recorder   record.EventRecorder

	// programmed is what the last sync left in the kernel of the virtual
	// servers in its scope: a virtual server that then leaves the scope
	// (its pool deleted, its Service now forwarded by kube-proxy) is still
	// deleted, if nobody changed it since.
	programmed ipvs.Table
	// problems are the last sync's, so each is logged and recorded once.
	problems       map[dataplane.Problem]bool
	loggedProblems string
	ipv6Ready      bool // ipv6Sysctls hold
}

// newIPVSStep opens IPVS with open and checks the sysctls it needs. A
// kernel without IPVS is no error: the step is then inert, and the speaker
// goes on holding VIPs with VRRP.
func newIPVSStep(ctx context.Context, o *Options, open func() (ipvs.Interface, error), net hostnet.Interface, m *metrics.Speaker) (*ipvsStep, error) {
	m.RegisterIPVS()
	d := &ipvsStep{node: o.NodeName, keepOnExit: o.KeepIPVSOnExit, metrics: m, programmed: ipvs.Table{}, problems: map[dataplane.Problem]bool{}}
	h, err := open()
	if errors.Is(err, ipvs.ErrNoIPVS) {
		klog.FromContext(ctx).Error(err, "IPVS forwarding (--ipvs) is off on this node: the kernel has no IPVS. Load the ip_vs module (modprobe ip_vs) and restart the speaker; meanwhile it only holds VIPs with VRRP")
		m.IPVSAvailable.Set(0)
		return d, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open IPVS: %w", err)
	}
	if !o.SkipSysctls {
		if err := hostnet.Ensure(net, ipvsSysctls()); err != nil {
			closeIPVS(h)
			return nil, fmt.Errorf("IPVS forwarding (--ipvs) needs these sysctls: %w", err)
		}
		d.sysctls = net
	}
	d.h = h
	m.IPVSAvailable.Set(1)
	return d, nil
}

func closeIPVS(h ipvs.Interface) {
	if c, ok := h.(interface{ Close() }); ok {
		c.Close()
	}
}

// close releases the IPVS handle.
func (d *ipvsStep) close() {
	if d.h != nil {
		closeIPVS(d.h)
	}
}

// sync brings this node's IPVS table to what in asks for.
func (d *ipvsStep) sync(ctx context.Context, in Inputs) error {
	if d.h == nil {
		return nil
	}
	start := time.Now()
	st, problems := dataplane.Desired(dataplane.Inputs(in), d.node)
	d.report(ctx, in, problems)
	var errs []error
	if err := d.ensureIPv6(st.IPVS); err != nil {
		errs = append(errs, err) // IPv4 is unaffected: program anyway
	}
	res, err := d.apply(ctx, st.IPVS, st.Owns)
	if err != nil {
		errs = append(errs, err)
	}
	if res.Changes() > 0 || res.Failed > 0 {
		klog.FromContext(ctx).V(2).Info("IPVS table changed", "result", res)
	}
	d.metrics.IPVSSyncDuration.Observe(time.Since(start).Seconds())
	reals := 0
	for _, e := range st.IPVS {
		reals += len(e.Reals)
	}
	d.metrics.IPVSVirtualServers.Set(float64(len(st.IPVS)))
	d.metrics.IPVSRealServers.Set(float64(reals))
	if err := errors.Join(errs...); err != nil {
		d.metrics.IPVSSyncErrors.Inc()
		return fmt.Errorf("IPVS sync: %w", err)
	}
	return nil
}

// exit deletes keeplb's virtual servers (those of its pools, and those it
// programmed), unless --keep-ipvs-on-exit.
func (d *ipvsStep) exit(ctx context.Context, in Inputs) error {
	if d.h == nil {
		return nil
	}
	logger := klog.FromContext(ctx)
	if d.keepOnExit {
		logger.Info("Leaving IPVS virtual servers in place (--keep-ipvs-on-exit)", "programmed", len(d.programmed))
		return nil
	}
	st, _ := dataplane.Desired(dataplane.Inputs(in), d.node)
	res, err := d.apply(ctx, ipvs.Table{}, st.Owns)
	logger.Info("Removed IPVS virtual servers", "deleted", res.VirtualDeleted, "failed", res.Failed)
	if err != nil {
		return fmt.Errorf("remove IPVS virtual servers: %w", err)
	}
	return nil
}

// apply brings the virtual servers that owns selects, and those programmed
// before, to desired: one dump, a diff, the changes. A virtual server this
// speaker programmed that is no longer owned is deleted only if the
// kernel still has it as programmed: if another program (kube-proxy in IPVS
// mode, for a Service switched to kube-proxy forwarding) has changed it
// since, it is that program's now and is left alone.
func (d *ipvsStep) apply(ctx context.Context, desired ipvs.Table, owns func(ipvs.Key) bool) (dataplane.Result, error) {
	current, err := ipvs.Dump(d.h, func(k ipvs.Key) bool {
		_, before := d.programmed[k]
		return before || owns(k)
	})
	if err != nil {
		return dataplane.Result{}, err
	}
	taken := map[ipvs.Key]bool{}
	for k, e := range current {
		if prev, before := d.programmed[k]; before && !owns(k) && !e.Equal(prev) {
			taken[k] = true
			klog.FromContext(ctx).Info("Leaving alone an IPVS virtual server keeplb no longer owns: another program changed it", "virtualServer", k)
		}
	}
	scope := func(k ipvs.Key) bool {
		if taken[k] {
			return false
		}
		_, before := d.programmed[k]
		return before || owns(k)
	}
	res, err := dataplane.Apply(d.h, dataplane.Diff(current, desired, scope))
	// Remember what the kernel now has in scope: desired, unless something
	// failed, then what a fresh dump shows.
	next := ipvs.Table{}
	if err == nil {
		for k, e := range desired {
			if scope(k) {
				next[k] = e
			}
		}
	} else if after, dumpErr := ipvs.Dump(d.h, scope); dumpErr == nil {
		next = after
	} else {
		for k, e := range d.programmed {
			if !taken[k] {
				next[k] = e
			}
		}
		for k, e := range desired {
			if scope(k) {
				next[k] = e
			}
		}
	}
	d.programmed = next
	return res, err
}

// ensureIPv6 sets the IPv6 forwarding sysctl once t has an IPv6 virtual
// server.
func (d *ipvsStep) ensureIPv6(t ipvs.Table) error {
	if d.sysctls == nil || d.ipv6Ready {
		return nil
	}
	for k := range t {
		if !k.Address.Is6() {
			continue
		}
		if err := hostnet.Ensure(d.sysctls, ipv6Sysctls()); err != nil {
			return fmt.Errorf("IPv6 VIPs need these sysctls: %w", err)
		}
		d.ipv6Ready = true
		return nil
	}
	return nil
}

// report logs the dataplane's problems when they change, and records a
// Warning event on the Service of each problem not reported by the last
// sync.
func (d *ipvsStep) report(ctx context.Context, in Inputs, problems []dataplane.Problem) {
	logger := klog.FromContext(ctx)
	logged := fmt.Sprint(problems)
	seen := make(map[dataplane.Problem]bool, len(problems))
	for _, p := range problems {
		if logged != d.loggedProblems {
			logger.Info("Forwarding problem", "service", p.Service, "field", p.Field, "message", p.Message)
		}
		seen[p] = true
		if d.problems[p] || d.recorder == nil {
			continue
		}
		if svc := serviceByKey(in, p.Service); svc != nil {
			d.recorder.Eventf(svc, v1.EventTypeWarning, EventForwardingProblem, "%s: %s", p.Field, p.Message)
		}
	}
	d.loggedProblems = logged
	d.problems = seen
}

// serviceByKey returns the Service "namespace/name" of in, or nil.
func serviceByKey(in Inputs, key string) *v1.Service {
	for _, svc := range in.Services {
		if svc.Namespace+"/"+svc.Name == key {
			return svc
		}
	}
	return nil
}
