package status

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/pools"
)

// Options select keeplb's Services, as the controller's flags of the same
// names do.
type Options struct {
	// LoadBalancerClass is the spec.loadBalancerClass keeplb answers to.
	LoadBalancerClass string
	// DefaultClass counts Services that set no class as keeplb's.
	DefaultClass bool
}

// Collect reads the IPPools, the Services and the Warning events about
// Services (one LIST each) and builds the report.
func Collect(ctx context.Context, kube kubernetes.Interface, dyn dynamic.Interface, o Options) (Report, error) {
	ul, err := dyn.Resource(v1alpha1.IPPoolResource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return Report{}, fmt.Errorf("list IPPools: %w", err)
	}
	ippools := make([]*v1alpha1.IPPool, 0, len(ul.Items))
	for i := range ul.Items {
		p, err := v1alpha1.FromUnstructured(&ul.Items[i])
		if err != nil {
			return Report{}, err
		}
		ippools = append(ippools, p)
	}
	svcs, err := kube.CoreV1().Services(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return Report{}, fmt.Errorf("list Services: %w", err)
	}
	// One LIST for every Service rather than one per pending Service.
	evs, err := kube.CoreV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
		FieldSelector: fields.Set{"involvedObject.kind": "Service", "type": v1.EventTypeWarning}.String(),
	})
	if err != nil {
		return Report{}, fmt.Errorf("list events: %w", err)
	}
	return Build(ippools, svcs.Items, evs.Items, o), nil
}

// Build makes the report from API objects. Services that are not keeplb's
// are left out.
func Build(ippools []*v1alpha1.IPPool, svcs []v1.Service, events []v1.Event, o Options) Report {
	r := Report{Pools: []Pool{}, Services: []Service{}}
	byName := make(map[string]*v1alpha1.IPPool, len(ippools))
	for _, p := range ippools {
		byName[p.Name] = p
		r.Pools = append(r.Pools, poolRow(p))
	}
	sort.Slice(r.Pools, func(i, j int) bool { return r.Pools[i].Name < r.Pools[j].Name })
	parsed := pools.Parse(ippools)
	warnings := lastWarnings(events)

	for i := range svcs {
		svc := &svcs[i]
		if !annotations.Handles(svc, o.LoadBalancerClass, o.DefaultClass) {
			continue
		}
		row := Service{Namespace: svc.Namespace, Name: svc.Name, VIPs: []VIP{}, Pools: []string{}}
		var addrs []netip.Addr
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			if a, err := netip.ParseAddr(ing.IP); err == nil {
				addrs = append(addrs, a.Unmap())
			}
		}
		holders := annotations.ParseHolders(svc.Annotations[annotations.Holder], addrs)
		var pool *v1alpha1.IPPool
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			v := VIP{IP: ing.IP}
			if v.IP == "" {
				v.IP = ing.Hostname
			}
			if ing.IPMode != nil {
				v.IPMode = string(*ing.IPMode)
			}
			a, err := netip.ParseAddr(ing.IP)
			if err != nil {
				row.VIPs = append(row.VIPs, v)
				continue
			}
			v.Holder = holders[a.Unmap()]
			row.VIPs = append(row.VIPs, v)
			name := pools.Find(parsed, a.Unmap())
			if name == "" || slices.Contains(row.Pools, name) {
				continue
			}
			row.Pools = append(row.Pools, name)
			if pool == nil {
				pool = byName[name]
			}
		}
		if pool == nil {
			// Pending: the pool the Service asks for, if it exists, gives
			// the default forwarding it will get.
			pool = byName[svc.Annotations[annotations.Pool]]
		}
		row.Holder = holderColumn(row.VIPs)
		f, _ := annotations.ForwardingOf(svc, pool)
		row.Forwarding = string(f)
		if row.Pending() {
			row.Problem = warnings.last(svc)
		}
		r.Services = append(r.Services, row)
	}
	sort.Slice(r.Services, func(i, j int) bool {
		a, b := r.Services[i], r.Services[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return a.Name < b.Name
	})
	return r
}

// holderColumn sums up the VIPs' holders: the node's name when one node
// holds them all, else each VIP's holder in order, "-" for none; empty
// when none is recorded.
func holderColumn(vips []VIP) string {
	nodes := make([]string, len(vips))
	same, known := true, false
	for i, v := range vips {
		nodes[i] = orNone(v.Holder)
		same = same && v.Holder == vips[0].Holder
		known = known || v.Holder != ""
	}
	switch {
	case !known:
		return ""
	case same:
		return vips[0].Holder
	}
	return strings.Join(nodes, ",")
}

func poolRow(p *v1alpha1.IPPool) Pool {
	st := p.Status
	return Pool{
		Name:        p.Name,
		Addresses:   append([]string{}, p.Spec.Addresses...),
		Total:       st.Total,
		Used:        st.Used,
		Free:        st.Free,
		OutOfRange:  st.OutOfRange,
		Ready:       condition(st.Conditions, v1alpha1.ConditionReady),
		Conflicting: condition(st.Conditions, v1alpha1.ConditionConflicting),
	}
}

func condition(cs []metav1.Condition, t string) Condition {
	c := meta.FindStatusCondition(cs, t)
	if c == nil {
		return Condition{}
	}
	return Condition{Status: string(c.Status), Reason: c.Reason, Message: c.Message}
}

// warningIndex holds the most recent Warning event of each Service, by
// namespace, name and UID (an event about an earlier Service of the same
// name must not be reported on its successor), in tiers of preference
// (see tier): keeplb's own components, then the upstream service
// controller keeplb runs, then any.
type warningIndex [tiers]map[string]*v1.Event

// The tiers of warningIndex, most preferred first.
const (
	tierKeeplb = iota
	tierUpstream
	tierAny
	tiers
)

// tier returns the most preferred tier of warningIndex that a warning from
// component belongs to. keeplb's controller and speaker (controller.Component,
// speaker.Component: a test keeps these names equal to those constants,
// which this package does not import) name the reason and the fix. The
// upstream service controller's warnings wrap the error keeplb's provider
// returned, which the provider also records as its own event with the
// reason: whichever of the two the API server stamps later, keeplb's says
// more. A pending Service also collects other components' warnings (the
// API server's ClusterIP repair, for one), which would otherwise hide
// keeplb's reason whenever they are newer.
func tier(component string) int {
	switch component {
	case "keeplb-controller", "keeplb-speaker":
		return tierKeeplb
	case "service-controller":
		return tierUpstream
	}
	return tierAny
}

func warningKey(ns, name string, uid types.UID) string {
	return ns + "/" + name + "/" + string(uid)
}

// lastWarnings indexes events. The filter repeats the field selector, which
// not every client (fakes among them) applies.
func lastWarnings(events []v1.Event) warningIndex {
	var ix warningIndex
	for t := range ix {
		ix[t] = map[string]*v1.Event{}
	}
	for i := range events {
		ev := &events[i]
		if ev.Type != v1.EventTypeWarning || ev.InvolvedObject.Kind != "Service" {
			continue
		}
		ns := ev.InvolvedObject.Namespace
		if ns == "" {
			ns = ev.Namespace
		}
		key := warningKey(ns, ev.InvolvedObject.Name, ev.InvolvedObject.UID)
		// An event counts in its own tier and every less preferred one.
		for t := min(tier(ev.Source.Component), tier(ev.ReportingController)); t < tiers; t++ {
			if prev, ok := ix[t][key]; !ok || eventTime(ev).After(eventTime(prev)) {
				ix[t][key] = ev
			}
		}
	}
	return ix
}

// last returns the message of svc's most recent Warning event of the most
// preferred tier that has one, counting events that name no UID as svc's.
func (ix warningIndex) last(svc *v1.Service) string {
	for _, m := range ix {
		var best *v1.Event
		for _, uid := range []types.UID{svc.UID, ""} {
			if ev := m[warningKey(svc.Namespace, svc.Name, uid)]; ev != nil && (best == nil || eventTime(ev).After(eventTime(best))) {
				best = ev
			}
		}
		if best != nil {
			return best.Message
		}
	}
	return ""
}

// eventTime is when the event last happened, whichever API wrote it.
func eventTime(ev *v1.Event) time.Time {
	t := ev.LastTimestamp.Time
	if s := ev.Series; s != nil && s.LastObservedTime.After(t) {
		t = s.LastObservedTime.Time
	}
	for _, c := range []time.Time{ev.EventTime.Time, ev.FirstTimestamp.Time, ev.CreationTimestamp.Time} {
		if t.IsZero() {
			t = c
		}
	}
	return t
}
