// Package dataplane computes the IPVS table and the nftables rules a node
// should have (Desired, pure, with a Cache across syncs) and brings the
// kernel there: a Reconciler, which the speaker and the end-to-end tests
// run alike, remembers what it programmed and does, per sync, one dump of
// the virtual servers in its scope → Diff (pure) → Apply (thin) → a report
// of what was removed, with keeplb's nftables table written before and
// after IPVS (see Reconciler.Sync for the order).
//
// A sync's work grows with what changed. Cache.Update recomputes only the
// Services an informer event named and returns a Delta, the virtual
// servers whose entries may have changed; Reconciler.SyncDelta diffs those
// alone against what it programmed, with no dump, so that one endpoint
// change is one real server changed in the kernel, and, when it is
// masqueraded, one element of keeplb's nftables table (the table is
// rewritten whole only by a full sync, or when its state is unknown; see
// Reconciler.SyncDelta). It falls back to the
// full Sync whenever what it remembers may be wrong (after any failure,
// a State skipped, a virtual server leaving keeplb's ownership or one to
// adopt), and the speaker runs a full Sync every few minutes anyway.
//
// # What is programmed
//
// For every Service keeplb handles (type LoadBalancer, class ours, by the
// same rule as the controller and the VRRP plan) and every address of its
// status that lies in an IPPool whose VIPs this node may hold (the pool's
// spec.vrrp.nodeSelector matches the node, which lacks the
// node.kubernetes.io/exclude-from-external-load-balancers label), each port
// becomes a virtual server VIP:port/protocol. Virtual servers are
// programmed on every node that may hold the VIP, not only on the VRRP
// master: IPVS only sees packets for local addresses, so they are inert
// until keepalived moves the VIP here, and a failover needs no IPVS change.
//
// The scheduler comes from keeplb.io/scheduler (default rr); an unknown one
// is reported as a Problem and rr is used. sessionAffinity ClientIP becomes
// persistence with the Service's timeout (default 3 hours, as Kubernetes).
//
// Real servers depend on the forwarding mode (keeplb.io/forwarding, else
// the pool's spec.forwarding, else nodeport):
//
//   - nodeport: InternalIP:NodePort (of the VIP's family) of the other
//     Ready nodes without the exclusion label that are in the Service's
//     subset (the pool's spec.nodePortSubsetSize nodes, 16 by default,
//     chosen by package rendezvous the same way on every node). With
//     externalTrafficPolicy Local, every node with a local endpoint,
//     weighted by its number of ready endpoints; a node whose endpoints
//     are all terminating keeps weight 0. This node's own NodePort, when
//     it is in the subset, is replaced by its own endpoints (as pod
//     forwarding gives them): IPVS hands a connection for a local real
//     server to the local socket layer, past the hooks where kube-proxy
//     translates NodePorts, where nothing would answer.
//   - pod: the endpoints of the Service's EndpointSlices of the VIP's family,
//     on the port the slice resolved for the Service port (so named
//     targetPorts work). Ready endpoints get weight 1; terminating endpoints
//     that still serve get weight 0 (established connections drain, no new
//     ones) until they leave the slice. With Local, only this node's.
//   - kube-proxy: no virtual server; see Ownership.
//
// A Service with allocateLoadBalancerNodePorts false has no NodePorts, so
// nodeport forwarding is impossible: it is reported as a Problem and the
// Service is forwarded to its pods instead, which reaches the same
// backends. Failing closed (no forwarding at all) would turn a
// configuration detail into an outage; kube-proxy forwarding would need a
// different ipMode, which is the controller's decision, not the speaker's.
//
// Forwarding is always NAT (masquerade): NodePorts and pod ports differ from
// the Service port, and DR or tunnel cannot rewrite ports. Replies must come
// back through this node, so forwarded traffic is SNATed, except for Local
// Services forwarded to this node's own pods: those reply through this node
// anyway, and keeping the client address is why users choose Local. The
// same holds for this node's own pods under nodeport forwarding with Local.
// State.SNAT lists what needs masquerading, for the nftables layer.
//
// # Source ranges and the VIP port guard
//
// State.SourceRanges says which virtual servers only admit some clients
// (loadBalancerSourceRanges, read per family as kube-proxy reads them),
// and State.Guard what may reach keeplb's VIPs at all: the ports of the
// Services using each VIP, in every forwarding mode, kube-proxy's
// included, and which VIPs answer ping (the pool's spec.icmpEcho). The
// guard is the same on every node, for every VIP of every pool, so that a
// VIP is guarded wherever it goes. Package nft renders both.
//
// # Ownership
//
// keeplb owns a virtual server when its address lies in one of its pools,
// except the ports of Services forwarded by kube-proxy (kube-proxy in IPVS
// mode programs those itself). Diff never adds, changes or deletes a
// virtual server outside that scope: kube-proxy's and everybody else's stay
// as they are, and the Reconciler does not even read their real servers.
// The table is never flushed.
//
// Within it, the Reconciler changes only what it programmed and what a
// Service of keeplb's wants (adopting what an earlier speaker left); a
// virtual server in a pool that it did not program and nobody wants is
// reported as foreign and left alone. One it programmed stays in scope
// after its pool is deleted or its Service switches to kube-proxy
// forwarding, and is deleted, unless another program changed it since.
package dataplane
