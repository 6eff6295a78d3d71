package metrics

import "k8s.io/component-base/metrics"

// Event drop reasons, the values of keeplb_controller_events_dropped_total's
// reason label.
const (
	// EventDropQueueFull: more distinct events waited to be written than
	// the writer holds.
	EventDropQueueFull = "queue-full"
	// EventDropRejected: the API server refused the event (a namespace
	// being deleted, an invalid event); writing it again cannot help.
	EventDropRejected = "rejected"
	// EventDropFailed: the API server could not be reached after retries.
	EventDropFailed = "failed"
	// EventDropShutdown: the controller stopped (or lost the lead) before
	// the event was written.
	EventDropShutdown = "shutdown"
)

// Events holds the metrics of the controller's event writer.
type Events struct {
	// Dropped counts the occurrences of events that were never written,
	// by reason.
	Dropped *metrics.CounterVec
	// Pending is the number of distinct events waiting to be written.
	Pending *metrics.Gauge
}

// NewEvents creates the event writer's metrics and registers them with
// c's registry.
func NewEvents(c *Controller) *Events {
	m := &Events{
		Dropped: metrics.NewCounterVec(&metrics.CounterOpts{
			Namespace: namespace, Subsystem: "controller", Name: "events_dropped_total",
			Help:           "Number of event occurrences the controller never wrote to the API server, by reason (queue-full, rejected, failed, shutdown).",
			StabilityLevel: metrics.ALPHA,
		}, []string{"reason"}),
		Pending: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Subsystem: "controller", Name: "events_pending",
			Help:           "Number of distinct events waiting to be written to the API server.",
			StabilityLevel: metrics.ALPHA,
		}),
	}
	c.registry.MustRegister(m.Dropped, m.Pending)
	// Every reason has a series from the start, so that an alert on an
	// increase sees the first drop.
	for _, reason := range []string{EventDropQueueFull, EventDropRejected, EventDropFailed, EventDropShutdown} {
		m.Dropped.WithLabelValues(reason)
	}
	return m
}
