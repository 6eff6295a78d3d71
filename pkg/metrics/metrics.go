// Package metrics defines the controller's Prometheus metrics. Each
// controller instance has its own registry, so two instances in one process
// (as in tests) never clash.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/legacyregistry"
	controllersmetrics "k8s.io/component-base/metrics/prometheus/controllers"

	// client-go request and workqueue metrics, registered globally.
	_ "k8s.io/component-base/metrics/prometheus/restclient"
	_ "k8s.io/component-base/metrics/prometheus/workqueue"
)

const namespace = "keeplb"

// Controller holds the controller's metrics.
type Controller struct {
	registry metrics.KubeRegistry

	// PoolAddresses is the number of allocatable addresses per pool and family.
	PoolAddresses *metrics.GaugeVec
	// PoolAddressesUsed is the number of addresses in use per pool and family.
	PoolAddressesUsed *metrics.GaugeVec
	// PoolAddressesFree is the number of free addresses per pool and family.
	PoolAddressesFree *metrics.GaugeVec
	// Allocations counts addresses handed out.
	Allocations *metrics.Counter
	// AllocationFailures counts failed allocations by reason.
	AllocationFailures *metrics.CounterVec
	// PendingServices is the number of Services waiting for an address.
	PendingServices *metrics.Gauge
}

// NewController creates and registers the controller metrics.
func NewController() *Controller {
	m := &Controller{
		registry: metrics.NewKubeRegistry(),
		PoolAddresses: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "pool_addresses",
			Help:           "Number of addresses an IPPool can allocate, after overlaps and avoidBuggyIPs.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"pool", "family"}),
		PoolAddressesUsed: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "pool_addresses_used",
			Help:           "Number of an IPPool's addresses held by Services, including those outside its current range.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"pool", "family"}),
		PoolAddressesFree: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "pool_addresses_free",
			Help:           "Number of an IPPool's addresses still free.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"pool", "family"}),
		Allocations: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "allocations_total",
			Help:           "Number of times a Service was given a new set of addresses.",
			StabilityLevel: metrics.ALPHA,
		}),
		AllocationFailures: metrics.NewCounterVec(&metrics.CounterOpts{
			Namespace: namespace, Name: "allocation_failures_total",
			Help:           "Number of failed allocations, by reason (InvalidAnnotation, PoolNotFound, NotAdmitted, NoPool, AddressInUse, AddressOutsidePools, PoolExhausted, FamilyUnavailable, SharingConflict).",
			StabilityLevel: metrics.ALPHA,
		}, []string{"reason"}),
		PendingServices: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "services_pending",
			Help:           "Number of LoadBalancer Services waiting for an address.",
			StabilityLevel: metrics.ALPHA,
		}),
	}
	m.registry.MustRegister(m.PoolAddresses, m.PoolAddressesUsed, m.PoolAddressesFree, m.Allocations, m.AllocationFailures, m.PendingServices)
	controllersmetrics.Register() // running_managed_controllers; registers once per process
	return m
}

// Handler serves these metrics together with the process-wide ones that
// client-go and the upstream service controller register globally.
func (m *Controller) Handler() http.Handler {
	return metrics.HandlerFor(prometheus.Gatherers{m.registry, legacyregistry.DefaultGatherer}, metrics.HandlerOpts{})
}
