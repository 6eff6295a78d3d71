// Package provider implements k8s.io/cloud-provider's Interface for keeplb.
// Only LoadBalancer is supported: EnsureLoadBalancer turns a Service into an
// allocator request, and returns the status to publish. It never writes the
// Service; the service controller that calls it does.
package provider

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	cloudprovider "k8s.io/cloud-provider"
	"k8s.io/cloud-provider/api"
	"k8s.io/klog/v2"

	"github.com/keeplb/keeplb/pkg/allocator"
	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/metrics"
)

// Name is the provider name keeplb reports.
const Name = "keeplb"

// Event reasons keeplb records on Services.
const (
	EventIPAllocated        = "IPAllocated"
	EventAllocationFailed   = "AllocationFailed"
	EventUnknownAnnotation  = "UnknownAnnotation"
	EventAddressOutsidePool = "AddressOutsidePool"
	// EventStatusOverwritten: the Service's status listed an address keeplb
	// did not give it, and is rewritten.
	EventStatusOverwritten = "StatusOverwritten"
)

// PoolGetter returns an IPPool by name, or nil.
type PoolGetter func(name string) *v1alpha1.IPPool

// NamespaceLabels returns a namespace's labels, or nil when unknown.
type NamespaceLabels func(namespace string) map[string]string

// Config holds what a Provider needs.
type Config struct {
	// Allocator hands out the addresses; it must be seeded (Restore) before
	// the first EnsureLoadBalancer.
	Allocator *allocator.Allocator
	// Pools looks up IPPools for their default forwarding mode.
	Pools PoolGetter
	// Namespaces looks up namespace labels for namespaceSelector.
	Namespaces NamespaceLabels
	// Recorder records events on Services.
	Recorder record.EventRecorder
	// Metrics counts allocations; may be nil.
	Metrics *metrics.Controller
	// RetryInterval is how soon a failed Service is retried at the latest.
	RetryInterval time.Duration
	// OnFreed is called after an address went back to a pool, so pending
	// Services are retried at once; may be nil.
	OnFreed func()
	// OnChange is called after any allocation or release, so pool status
	// follows; may be nil.
	OnChange func()
}

// Provider is keeplb's cloudprovider.Interface and LoadBalancer.
type Provider struct {
	cfg Config
}

var (
	_ cloudprovider.Interface    = (*Provider)(nil)
	_ cloudprovider.LoadBalancer = (*Provider)(nil)
)

// New returns a Provider.
func New(cfg Config) *Provider {
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = time.Minute
	}
	return &Provider{cfg: cfg}
}

// Initialize is part of cloudprovider.Interface.
func (p *Provider) Initialize(cloudprovider.ControllerClientBuilder, <-chan struct{}) {}

// LoadBalancer is part of cloudprovider.Interface.
func (p *Provider) LoadBalancer() (cloudprovider.LoadBalancer, bool) { return p, true }

// Instances is part of cloudprovider.Interface; keeplb does not manage nodes.
func (p *Provider) Instances() (cloudprovider.Instances, bool) { return nil, false }

// InstancesV2 is part of cloudprovider.Interface; keeplb does not manage nodes.
func (p *Provider) InstancesV2() (cloudprovider.InstancesV2, bool) { return nil, false }

// Zones is part of cloudprovider.Interface; not supported.
func (p *Provider) Zones() (cloudprovider.Zones, bool) { return nil, false }

// Clusters is part of cloudprovider.Interface; not supported.
func (p *Provider) Clusters() (cloudprovider.Clusters, bool) { return nil, false }

// Routes is part of cloudprovider.Interface; not supported.
func (p *Provider) Routes() (cloudprovider.Routes, bool) { return nil, false }

// ProviderName is part of cloudprovider.Interface.
func (p *Provider) ProviderName() string { return Name }

// HasClusterID is part of cloudprovider.Interface.
func (p *Provider) HasClusterID() bool { return true }

// GetLoadBalancer is part of cloudprovider.LoadBalancer.
func (p *Provider) GetLoadBalancer(_ context.Context, _ string, svc *v1.Service) (*v1.LoadBalancerStatus, bool, error) {
	if alloc, ok := p.cfg.Allocator.Lookup(key(svc)); ok {
		return p.statusFor(svc, alloc), true, nil
	}
	if len(svc.Status.LoadBalancer.Ingress) > 0 {
		return svc.Status.LoadBalancer.DeepCopy(), true, nil
	}
	return nil, false, nil
}

// GetLoadBalancerName is part of cloudprovider.LoadBalancer.
func (p *Provider) GetLoadBalancerName(_ context.Context, _ string, svc *v1.Service) string {
	return cloudprovider.DefaultLoadBalancerName(svc)
}

// EnsureLoadBalancer is part of cloudprovider.LoadBalancer. A Service that
// cannot get an address gets a Warning event and a RetryError; it is also
// retried as soon as an address is freed or pools change.
func (p *Provider) EnsureLoadBalancer(ctx context.Context, _ string, svc *v1.Service, _ []*v1.Node) (*v1.LoadBalancerStatus, error) {
	logger := klog.FromContext(ctx).WithValues("service", klog.KObj(svc))
	cfg, err := annotations.Parse(svc)
	for _, w := range cfg.Warnings {
		p.cfg.Recorder.Event(svc, v1.EventTypeWarning, EventUnknownAnnotation, w)
	}
	if err != nil {
		p.cfg.Allocator.MarkPending(key(svc))
		return nil, p.fail(svc, err)
	}
	// svc is the informer's current copy: what its status lists now is
	// what the allocator must hold for it (and for nobody else) before it
	// decides, whatever the status handler has or has not seen yet.
	if p.cfg.Allocator.SetStatus(key(svc), StatusAddrs(svc)) {
		p.freed()
	}
	before, had := p.cfg.Allocator.Lookup(key(svc))
	alloc, err := p.cfg.Allocator.Assign(RequestFor(svc, cfg, p.nsLabels(svc.Namespace)))
	if err != nil {
		return nil, p.fail(svc, err)
	}
	if !had || !slices.Equal(before.Addrs, alloc.Addrs) {
		logger.V(2).Info("Allocated", "addresses", alloc.Addrs, "pool", alloc.Pool)
		p.cfg.Recorder.Eventf(svc, v1.EventTypeNormal, EventIPAllocated, "Allocated %s", alloc)
		if p.cfg.Metrics != nil {
			p.cfg.Metrics.Allocations.Inc()
		}
		p.changed()
		if had && slices.ContainsFunc(before.Addrs, func(a netip.Addr) bool { return !slices.Contains(alloc.Addrs, a) }) {
			p.freed()
		}
	}
	return p.statusFor(svc, alloc), nil
}

// UpdateLoadBalancer is part of cloudprovider.LoadBalancer. Node changes
// are the speakers' business; the address does not depend on them.
func (p *Provider) UpdateLoadBalancer(context.Context, string, *v1.Service, []*v1.Node) error {
	return nil
}

// EnsureLoadBalancerDeleted is part of cloudprovider.LoadBalancer. It is
// idempotent.
func (p *Provider) EnsureLoadBalancerDeleted(ctx context.Context, _ string, svc *v1.Service) error {
	if p.cfg.Allocator.Release(key(svc)) {
		klog.FromContext(ctx).V(2).Info("Released addresses", "service", klog.KObj(svc))
		p.freed()
		p.changed()
	}
	return nil
}

// Restore records the addresses svc already has in its status, before any
// allocation, so a restart never moves or duplicates an address.
func (p *Provider) Restore(svc *v1.Service) error {
	addrs := StatusAddrs(svc)
	if len(addrs) == 0 {
		return nil
	}
	cfg, _ := annotations.Parse(svc) // what parsed still describes the Service
	return p.cfg.Allocator.Restore(RequestFor(svc, cfg, p.nsLabels(svc.Namespace)), addrs)
}

// StatusAddrs returns the addresses svc lists in status.loadBalancer.ingress
// (IPv4-mapped ones as IPv4). Entries that are not plain addresses (a
// hostname, a zone) name nothing keeplb could allocate, and are left out.
func StatusAddrs(svc *v1.Service) []netip.Addr {
	var addrs []netip.Addr
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(ing.IP); err == nil && a.Zone() == "" {
			addrs = append(addrs, a.Unmap())
		}
	}
	return addrs
}

func (p *Provider) freed() {
	if p.cfg.OnFreed != nil {
		p.cfg.OnFreed()
	}
}

func (p *Provider) changed() {
	if p.cfg.OnChange != nil {
		p.cfg.OnChange()
	}
}

func (p *Provider) nsLabels(ns string) map[string]string {
	if p.cfg.Namespaces == nil {
		return nil
	}
	return p.cfg.Namespaces(ns)
}

// fail records the failure and returns an error the service controller
// retries after RetryInterval at the latest.
func (p *Provider) fail(svc *v1.Service, err error) error {
	reason := allocator.ReasonInvalid
	var ae *allocator.Error
	if errors.As(err, &ae) {
		reason = ae.Reason
	}
	if p.cfg.Metrics != nil {
		p.cfg.Metrics.AllocationFailures.WithLabelValues(string(reason)).Inc()
	}
	p.cfg.Recorder.Eventf(svc, v1.EventTypeWarning, EventAllocationFailed, "%s: %v", reason, err)
	p.changed()
	return api.NewRetryError(fmt.Sprintf("keeplb: %v", err), p.cfg.RetryInterval)
}

// statusFor returns the status to publish: each address with ipMode Proxy
// when keeplb forwards (kube-proxy must then leave the address alone), and
// VIP when kube-proxy forwards.
func (p *Provider) statusFor(svc *v1.Service, alloc allocator.Allocation) *v1.LoadBalancerStatus {
	mode := v1.LoadBalancerIPModeProxy
	if f, _ := annotations.ForwardingOf(svc, p.pool(alloc.Pool)); f == v1alpha1.ForwardingKubeProxy {
		mode = v1.LoadBalancerIPModeVIP
	}
	st := &v1.LoadBalancerStatus{}
	for _, a := range alloc.Addrs {
		st.Ingress = append(st.Ingress, v1.LoadBalancerIngress{IP: a.String(), IPMode: &mode})
	}
	return st
}

func (p *Provider) pool(name string) *v1alpha1.IPPool {
	if name == "" || p.cfg.Pools == nil {
		return nil
	}
	return p.cfg.Pools(name)
}

// RequestFor builds the allocator request for svc.
func RequestFor(svc *v1.Service, cfg annotations.Config, nsLabels map[string]string) allocator.Request {
	r := allocator.Request{
		Key:             key(svc),
		Namespace:       svc.Namespace,
		NamespaceLabels: nsLabels,
		ServiceLabels:   svc.Labels,
		Pool:            cfg.Pool,
		IPs:             cfg.IPs,
		IPsSource:       cfg.IPsSource,
		ShareKey:        cfg.ShareKey,
		KubeProxy:       cfg.Forwarding == v1alpha1.ForwardingKubeProxy,
		Backends:        "cluster",
	}
	for _, f := range svc.Spec.IPFamilies {
		if f == v1.IPv6Protocol {
			r.Families = append(r.Families, allocator.IPv6)
		} else {
			r.Families = append(r.Families, allocator.IPv4)
		}
	}
	if pol := svc.Spec.IPFamilyPolicy; pol != nil {
		switch *pol {
		case v1.IPFamilyPolicyPreferDualStack:
			r.Policy = allocator.PreferDualStack
		case v1.IPFamilyPolicyRequireDualStack:
			r.Policy = allocator.RequireDualStack
		}
	}
	if svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal {
		r.Backends = "local:" + labels.Set(svc.Spec.Selector).String()
	}
	for _, port := range svc.Spec.Ports {
		proto := port.Protocol
		if proto == "" {
			proto = v1.ProtocolTCP
		}
		r.Ports = append(r.Ports, allocator.Port{Protocol: string(proto), Port: port.Port})
	}
	return r
}

func key(svc *v1.Service) string {
	k, _ := cache.MetaNamespaceKeyFunc(svc)
	return k
}
