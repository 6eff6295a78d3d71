package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/component-base/metrics"
	"k8s.io/component-base/metrics/legacyregistry"
)

// Speaker holds the speaker's metrics.
type Speaker struct {
	registry metrics.KubeRegistry
	// ipvsStats serves the IPVS counters, after RegisterIPVSStats.
	ipvsStats *ipvsStatsText

	// VRRPState is 1 while this node is MASTER for the VIP, 0 while BACKUP
	// and -1 in FAULT.
	VRRPState *metrics.GaugeVec
	// Transitions counts VRRP state changes by instance and new state.
	Transitions *metrics.CounterVec
	// Reloads counts keepalived reloads; Restarts its restarts.
	Reloads, Restarts *metrics.Gauge
	// KeepalivedUp is 1 while keepalived runs.
	KeepalivedUp *metrics.Gauge
	// RenderDuration times computing the plan and rendering keepalived.conf.
	RenderDuration *metrics.Histogram
	// Problems is the number of VRRP plan problems by severity.
	Problems *metrics.GaugeVec
	// InstancesDropped is the number of VRRP instances of this node's
	// share of the plan that the last sync left out of keepalived.conf;
	// PeersDropped the number of unicast peers it left out of the others.
	InstancesDropped, PeersDropped *metrics.Gauge
	// VRRPSyncErrors counts syncs whose VRRP step failed as a whole: no
	// keepalived.conf or track file could be rendered or written.
	VRRPSyncErrors *metrics.Counter
	// LastSyncSuccess is when a sync last succeeded, in Unix seconds.
	LastSyncSuccess *metrics.Gauge
	// NotifyFIFOUp is 1 while the speaker reads keepalived's notify FIFO.
	NotifyFIFOUp *metrics.Gauge
	// FailStatic is 1 for each pool whose VRRP plan ignores Ready because
	// more than half of its nodes are not Ready (vrrp.FailStatic).
	FailStatic *metrics.GaugeVec
	// CanForward is 1 while this node can forward what keeplb forwards
	// with IPVS (its kernel has IPVS and keeplb's nftables table is
	// loaded); at 0 it lowers its VRRP priority for such VIPs.
	CanForward *metrics.Gauge
	// ConnSyncDaemons is 1 for each IPVS connection sync daemon (state
	// master or backup) that runs on this node (--conn-sync).
	ConnSyncDaemons *metrics.GaugeVec
	// HandoffAdopting is the number of VIPs adopted from the previous
	// speaker's hand-off that keepalived does not hold yet.
	HandoffAdopting *metrics.Gauge
	// FailbackHeld is the number of VRRP instances this node came back
	// to (failback Delayed) less than the pool's delay ago: it does not
	// take them over until then.
	FailbackHeld *metrics.Gauge
	// NewInstancesDeferred is the number of VRRP instances new to the
	// cluster that this node, not their planned master, leaves out of its
	// keepalived.conf for a short grace.
	NewInstancesDeferred *metrics.Gauge
	// HandoffAdopted counts the VIPs of hand-offs this speaker adopted,
	// by result: held (keepalived took them over) or released (taken off
	// the node: the deadline passed, or no instance has them).
	HandoffAdopted *metrics.CounterVec
	// HolderPending is the number of Services whose holder annotation the
	// last sync found not naming this node for VIPs it masters: writes
	// queued, held back or being retried.
	HolderPending *metrics.Gauge
	// HolderWriteErrors counts holder annotation writes that failed and
	// are retried (conflicts with other writers included).
	HolderWriteErrors *metrics.Counter
	// HolderEventsDropped counts VIPAcquired events never written.
	HolderEventsDropped *metrics.Counter

	// IPVSStats says how RegisterIPVSStats serves the per-virtual-server
	// counters; set it before.
	IPVSStats IPVSStats

	// The IPVS metrics below are served only after RegisterIPVS, so that a
	// speaker without --ipvs exports nothing about a dataplane it does not
	// run.

	// IPVSAvailable is 1 when the speaker programs IPVS and 0 when IPVS
	// forwarding is on but the kernel has no IPVS (the speaker then only
	// holds VIPs).
	IPVSAvailable *metrics.Gauge
	// IPVSSyncDuration times one IPVS sync: the desired table, one dump of
	// the kernel's, the diff and the changes sent.
	IPVSSyncDuration *metrics.Histogram
	// IPVSVirtualServers is the number of virtual servers keeplb wants on
	// this node; IPVSRealServers the number of their real servers.
	IPVSVirtualServers, IPVSRealServers *metrics.Gauge
	// IPVSSyncErrors counts IPVS syncs that failed, wholly or in part.
	IPVSSyncErrors *metrics.Counter
	// NFTSyncErrors counts failed writes of keeplb's nftables table (its
	// masquerading and loadBalancerSourceRanges), and failed deletions of
	// it on exit.
	NFTSyncErrors *metrics.Counter
}

// NewSpeaker creates and registers the speaker metrics.
func NewSpeaker() *Speaker {
	m := &Speaker{
		registry: metrics.NewKubeRegistry(),
		VRRPState: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "vrrp_state",
			Help:           "VRRP state of a VIP on this node: 1 MASTER, 0 BACKUP, -1 FAULT.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"vip", "node"}),
		Transitions: metrics.NewCounterVec(&metrics.CounterOpts{
			Namespace: namespace, Name: "vrrp_transitions_total",
			Help:           "VRRP state changes reported by keepalived, by instance and new state.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"instance", "state"}),
		Reloads: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "keepalived_reloads",
			Help:           "Number of keepalived reloads since the speaker started.",
			StabilityLevel: metrics.ALPHA,
		}),
		Restarts: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "keepalived_restarts",
			Help:           "Number of times keepalived was restarted after it exited.",
			StabilityLevel: metrics.ALPHA,
		}),
		KeepalivedUp: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "keepalived_up",
			Help:           "1 while keepalived runs.",
			StabilityLevel: metrics.ALPHA,
		}),
		RenderDuration: metrics.NewHistogram(&metrics.HistogramOpts{
			Namespace: namespace, Name: "speaker_render_duration_seconds",
			Help:           "Time to compute the VRRP plan and render keepalived.conf.",
			Buckets:        metrics.ExponentialBuckets(0.0001, 4, 10),
			StabilityLevel: metrics.ALPHA,
		}),
		Problems: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "vrrp_plan_problems",
			Help:           "Problems in the VRRP plan (VRID ranges, interfaces), by severity.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"severity"}),
		InstancesDropped: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_vrrp_instances_dropped",
			Help:           "VRRP instances this node should take part in that the last sync left out of keepalived.conf (see the VRRPConfigProblem events).",
			StabilityLevel: metrics.ALPHA,
		}),
		PeersDropped: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_vrrp_peers_dropped",
			Help:           "Unicast peers the last sync left out of the VRRP instances of this node's keepalived.conf (see the VRRPConfigProblem events).",
			StabilityLevel: metrics.ALPHA,
		}),
		VRRPSyncErrors: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "speaker_vrrp_sync_errors_total",
			Help:           "Syncs that could not render or write keepalived.conf or its track files at all.",
			StabilityLevel: metrics.ALPHA,
		}),
		LastSyncSuccess: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_last_sync_success_timestamp_seconds",
			Help:           "When a sync (VRRP, and with --ipvs the dataplane) last succeeded, in Unix seconds.",
			StabilityLevel: metrics.ALPHA,
		}),
		NotifyFIFOUp: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_notify_fifo_up",
			Help:           "1 while the speaker reads keepalived's notify FIFO, which tells it VRRP state changes.",
			StabilityLevel: metrics.ALPHA,
		}),
		FailStatic: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "vrrp_fail_static",
			Help:           "1 for each IPPool whose VRRP plan ignores the Nodes' Ready condition because more than half of its nodes are not Ready at once (a control-plane problem, most likely).",
			StabilityLevel: metrics.ALPHA,
		}, []string{"pool"}),
		CanForward: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_can_forward",
			Help:           "1 while this node can forward the VIPs keeplb forwards with IPVS (nodeport, pod): IPVS is on and in the kernel, and keeplb's nftables table is loaded. At 0 the node ranks below every node that can, for those VIPs.",
			StabilityLevel: metrics.ALPHA,
		}),
		ConnSyncDaemons: metrics.NewGaugeVec(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_conn_sync_daemons",
			Help:           "1 for each of the kernel's IPVS connection sync daemons (state master or backup) that runs on this node (--conn-sync). The backup runs only while keeplb's nftables table admits sync messages from the other Nodes alone.",
			StabilityLevel: metrics.ALPHA,
		}, []string{"state"}),
		FailbackHeld: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_failback_held_instances",
			Help:           "VRRP instances of failback Delayed pools that this node came back to (its speaker started, its link came back, it became Ready again) less than the pool's failback delay ago: it does not take them over until then (keepalived's preempt_delay, whose clock the speaker keeps across reloads), then takes over those it is the preferred node of.",
			StabilityLevel: metrics.ALPHA,
		}),
		NewInstancesDeferred: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_new_instances_deferred",
			Help:           "VRRP instances new to the cluster (a new pool's, or a new VIP's first in its bucket) that this node, not their planned master, leaves out of its keepalived.conf for a few seconds, so that the new VIPs start on their planned master instead of moving there.",
			StabilityLevel: metrics.ALPHA,
		}),
		HandoffAdopting: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_handoff_adopting_vips",
			Help:           "VIPs adopted from the previous speaker's hand-off (a rolling update) that keepalived does not hold yet; the speaker is not ready meanwhile.",
			StabilityLevel: metrics.ALPHA,
		}),
		HandoffAdopted: metrics.NewCounterVec(&metrics.CounterOpts{
			Namespace: namespace, Name: "speaker_handoff_adopted_vips_total",
			Help:           "VIPs of the previous speakers' hand-offs this speaker adopted, by result: held (keepalived took them over) or released (taken off the node: the hand-off's deadline passed, or no instance of this node has them).",
			StabilityLevel: metrics.ALPHA,
		}, []string{"result"}),
		HolderPending: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "speaker_holder_writes_pending",
			Help:           "Services whose keeplb.io/holder annotation the last sync found not naming this node for VIPs it masters: writes queued, held back or being retried.",
			StabilityLevel: metrics.ALPHA,
		}),
		HolderWriteErrors: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "speaker_holder_write_errors_total",
			Help:           "Writes of the keeplb.io/holder annotation that failed and are retried with backoff, conflicts with other writers included.",
			StabilityLevel: metrics.ALPHA,
		}),
		HolderEventsDropped: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "speaker_holder_events_dropped_total",
			Help:           "VIPAcquired events this node never wrote to the API server (refused, or still failing after retries).",
			StabilityLevel: metrics.ALPHA,
		}),
		IPVSAvailable: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "ipvs_available",
			Help:           "1 when the speaker programs IPVS, 0 when IPVS forwarding is on but the kernel has no IPVS (load ip_vs).",
			StabilityLevel: metrics.ALPHA,
		}),
		IPVSSyncDuration: metrics.NewHistogram(&metrics.HistogramOpts{
			Namespace: namespace, Name: "ipvs_sync_duration_seconds",
			Help:           "Time to compute this node's IPVS table, read the kernel's and send the changes.",
			Buckets:        metrics.ExponentialBuckets(0.0001, 4, 10),
			StabilityLevel: metrics.ALPHA,
		}),
		IPVSVirtualServers: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "ipvs_virtual_servers",
			Help:           "Number of IPVS virtual servers keeplb wants on this node.",
			StabilityLevel: metrics.ALPHA,
		}),
		IPVSRealServers: metrics.NewGauge(&metrics.GaugeOpts{
			Namespace: namespace, Name: "ipvs_real_servers",
			Help:           "Number of real servers of the IPVS virtual servers keeplb wants on this node.",
			StabilityLevel: metrics.ALPHA,
		}),
		IPVSSyncErrors: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "ipvs_sync_errors_total",
			Help:           "Number of IPVS syncs that failed, wholly or in part.",
			StabilityLevel: metrics.ALPHA,
		}),
		NFTSyncErrors: metrics.NewCounter(&metrics.CounterOpts{
			Namespace: namespace, Name: "nft_sync_errors_total",
			Help:           "Number of failed writes (or, on exit, deletions) of keeplb's nftables table, inet keeplb.",
			StabilityLevel: metrics.ALPHA,
		}),
	}
	m.registry.MustRegister(m.VRRPState, m.Transitions, m.Reloads, m.Restarts, m.KeepalivedUp, m.RenderDuration, m.Problems,
		m.InstancesDropped, m.PeersDropped, m.VRRPSyncErrors, m.LastSyncSuccess, m.NotifyFIFOUp, m.FailStatic, m.CanForward,
		m.ConnSyncDaemons, m.FailbackHeld, m.NewInstancesDeferred, m.HandoffAdopting, m.HandoffAdopted, m.HolderPending, m.HolderWriteErrors, m.HolderEventsDropped)
	return m
}

// RegisterIPVS adds the IPVS metrics to those served. Call it once, when
// the speaker runs the IPVS dataplane; until then they record nothing.
func (m *Speaker) RegisterIPVS() {
	m.registry.MustRegister(m.IPVSAvailable, m.IPVSSyncDuration, m.IPVSVirtualServers, m.IPVSRealServers, m.IPVSSyncErrors, m.NFTSyncErrors)
}

// Handler serves these metrics with the process-wide ones.
func (m *Speaker) Handler() http.Handler {
	g := prometheus.Gatherers{m.registry, legacyregistry.DefaultGatherer}
	if m.ipvsStats != nil {
		return serveWithIPVSStats(g, m.ipvsStats)
	}
	return metrics.HandlerFor(g, metrics.HandlerOpts{})
}
