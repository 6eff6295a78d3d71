package controller

import (
	"context"
	"errors"
	"fmt"
	"sort"

	v1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	k8smetrics "k8s.io/component-base/metrics"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/pools"
	"github.com/keeplb/keeplb/pkg/provider"
)

// poolMemory is what one pool sync leaves for the next to compare with.
// Only seed and then the runner's syncs, one at a time, touch it.
type poolMemory struct {
	// forwarding is each pool's forwarding, as last applied.
	forwarding map[string]v1alpha1.Forwarding
	// kickedAt is the capacity generation at which the pending Services
	// were last retried.
	kickedAt int64
	// gauges are the pools whose metrics are published.
	gauges map[string]bool
}

// poolInput is what a pool sync computes from.
type poolInput struct {
	// ippools are the IPPools in the informer cache.
	ippools []*v1alpha1.IPPool
	// capacity is the capacity generation, read before the allocator is
	// given the pools: a change after that is retried by the next sync.
	capacity int64
	last     poolMemory
	now      metav1.Time
}

// poolPlan is one pool sync, computed: everything it does besides giving
// the allocator its pools.
type poolPlan struct {
	// outside are the Services that had an address fall outside its pool
	// (the pool shrank, was deleted or now overlaps an older one).
	outside []string
	// kick are the Services to reconcile again at once: those of the pools
	// whose forwarding changed, which decides their ipMode, and, when
	// capacity moved since they were last retried, the pending ones.
	kick []string
	// statuses are the IPPools whose status changes, with the new one.
	statuses []*v1alpha1.IPPool
	// gauges are the pool metrics to set; stale are the pools whose
	// series go, as the pools themselves have gone.
	gauges []poolGauge
	stale  []string
	// pending counts the Services that could not get their addresses.
	pending int
	next    poolMemory
}

// poolGauge is one pool and family's address counts.
type poolGauge struct {
	pool, family      string
	total, free, used float64
}

// planPools computes one pool sync: it gives alloc the pools of
// in.ippools, and returns as data all the rest the sync is to do. Nothing
// outside the allocator (in memory, with no I/O of its own) is touched:
// no API write, event, kick or metric. seed takes only the allocator's
// part of it; the runner's syncs have writePools do the rest.
func planPools(alloc *allocator.Allocator, in poolInput) poolPlan {
	parsed := pools.Parse(in.ippools)
	aps := make([]allocator.Pool, len(parsed))
	byName := make(map[string]pools.Parsed, len(parsed))
	for i, p := range parsed {
		aps[i] = p.Pool
		byName[p.Pool.Name] = p
	}
	p := poolPlan{
		outside: alloc.SetPools(aps),
		next:    poolMemory{forwarding: make(map[string]v1alpha1.Forwarding, len(in.ippools)), kickedAt: in.last.kickedAt},
	}
	// A pool's forwarding decides its Services' ipMode: re-ensure them.
	changed := map[string]bool{}
	for _, ip := range in.ippools {
		f := ip.Spec.ForwardingOrDefault()
		p.next.forwarding[ip.Name] = f
		if old, ok := in.last.forwarding[ip.Name]; ok && old != f {
			changed[ip.Name] = true
		}
	}
	if len(changed) > 0 {
		p.kick = alloc.ServicesOf(changed)
	}
	stats := alloc.Stats()
	p.gauges, p.stale, p.next.gauges = poolGauges(stats, in.last.gauges)
	pending := alloc.Pending()
	p.pending = len(pending)
	if in.capacity != in.last.kickedAt {
		p.next.kickedAt = in.capacity
		p.kick = append(p.kick, pending...)
	}
	for _, ip := range in.ippools {
		st := pools.Status(ip, byName[ip.Name], stats[ip.Name], in.now)
		if apiequality.Semantic.DeepEqual(st, ip.Status) {
			continue
		}
		updated := ip.DeepCopy()
		updated.Status = st
		p.statuses = append(p.statuses, updated)
	}
	return p
}

// poolGauges returns the address counts of every pool in stats, sorted,
// the pools of published that stats no longer has, and the pools now
// published.
func poolGauges(stats map[string]allocator.PoolStats, published map[string]bool) (gauges []poolGauge, stale []string, now map[string]bool) {
	now = make(map[string]bool, len(stats))
	for name, st := range stats {
		now[name] = true
		for f, fs := range st.Families {
			total, _ := fs.Total.Float64()
			free, _ := fs.Free.Float64()
			gauges = append(gauges, poolGauge{pool: name, family: allocator.Family(f).String(), total: total, free: free, used: float64(fs.Used)})
		}
	}
	sort.Slice(gauges, func(i, j int) bool {
		if gauges[i].pool != gauges[j].pool {
			return gauges[i].pool < gauges[j].pool
		}
		return gauges[i].family < gauges[j].family
	})
	for name := range published {
		if !now[name] {
			stale = append(stale, name)
		}
	}
	sort.Strings(stale)
	return gauges, stale, now
}

// observePools returns what a pool sync computes from: the IPPools in the
// informer cache, leaving out (and logging) those it cannot read, and what
// the last sync left.
func (c *Controller) observePools(ctx context.Context) poolInput {
	logger := klog.FromContext(ctx)
	var ippools []*v1alpha1.IPPool
	for _, obj := range c.poolInf.GetStore().List() {
		p, err := v1alpha1.FromUnstructured(obj)
		if err != nil {
			logger.Error(err, "Ignoring unreadable IPPool")
			continue
		}
		ippools = append(ippools, p)
	}
	return poolInput{ippools: ippools, capacity: c.capacity.Load(), last: c.pools, now: metav1.Now()}
}

// syncPools is the runner's sync: it applies pool changes to the
// allocator, writes pool status and metrics, and retries pending Services
// when capacity may have changed.
func (c *Controller) syncPools(ctx context.Context) error {
	return c.writePools(ctx, planPools(c.alloc, c.observePools(ctx)))
}

// takePools does what seed does of a pool sync besides setting the
// allocator's pools: it warns the Services whose address left its pool,
// and remembers the pools' forwarding for the next sync to compare with.
func (c *Controller) takePools(p poolPlan) {
	for _, key := range p.outside {
		c.warnOutsidePool(key)
	}
	c.pools.forwarding = p.next.forwarding
}

// writePools does what p says: events, retries, metrics, and the IPPool
// statuses, each written even when another fails.
func (c *Controller) writePools(ctx context.Context, p poolPlan) error {
	c.takePools(p)
	c.kick(p.kick)
	c.setPoolMetrics(p)
	c.pools = p.next
	var errs []error
	for _, ip := range p.statuses {
		u, err := v1alpha1.ToUnstructured(ip)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if _, err := c.dyn.Resource(v1alpha1.IPPoolResource).UpdateStatus(ctx, u, metav1.UpdateOptions{FieldManager: Component}); err != nil {
			errs = append(errs, fmt.Errorf("update status of IPPool %s: %w", ip.Name, err))
		}
	}
	return errors.Join(errs...)
}

func (c *Controller) warnOutsidePool(key string) {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	svc, err := c.services.Lister().Services(ns).Get(name)
	if err != nil {
		return
	}
	al, _ := c.alloc.Lookup(key)
	c.recorder.Eventf(svc, v1.EventTypeWarning, provider.EventAddressOutsidePool,
		"%s is no longer in an IPPool (the pool shrank, was deleted or now overlaps an older one); the Service keeps it. To move the Service, delete and re-create it or set keeplb.io/ips", al)
}

func (c *Controller) setPoolMetrics(p poolPlan) {
	for _, g := range p.gauges {
		c.metrics.PoolAddresses.WithLabelValues(g.pool, g.family).Set(g.total)
		c.metrics.PoolAddressesFree.WithLabelValues(g.pool, g.family).Set(g.free)
		c.metrics.PoolAddressesUsed.WithLabelValues(g.pool, g.family).Set(g.used)
	}
	for _, name := range p.stale {
		for _, g := range []*k8smetrics.GaugeVec{c.metrics.PoolAddresses, c.metrics.PoolAddressesFree, c.metrics.PoolAddressesUsed} {
			g.DeletePartialMatch(map[string]string{"pool": name})
		}
	}
	c.metrics.PendingServices.Set(float64(p.pending))
}
