// Package nft writes keeplb's nftables table, inet keeplb: masquerading
// for traffic IPVS forwards in NAT mode, the Services'
// spec.loadBalancerSourceRanges, and the VIP port guard. Compute turns
// Rules into Elements; Write and Update build the transactions that
// bring the table to them, which dataplane.Reconciler runs (a whole
// write through Whole); Delete and Cleanup remove the table on a clean
// exit. Nothing here reads the kernel but through nft, and no other
// table is ever touched.
//
// # Writing the table
//
// The table's structure (chains, rules, sets, counter) is the same for
// every Rules; only the sets' elements differ. Compute turns Rules into
// Elements, validated and sorted. Write (what Transaction does) rewrites
// the table whole in one atomic transaction: created if missing, deleted
// and written anew, so the result depends on the Elements alone,
// whatever the table held. Whole runs that rewrite: with the real nft it
// streams the same script to nft's input a line at a time instead of
// building a knftables.Transaction (an object per element, then the
// whole text in one buffer: about 45 MB at 100,000 masqueraded real
// servers), and kills nft before its input ends should the script not be
// finished, since nft commits whatever it has read at the end of its
// input. Update sends only "add element" and "delete
// element" for the elements in which two Elements differ, the deletes
// first (an interval set takes a range that contains an old one only
// once the old one is gone): at 100,000 masqueraded real servers, one
// changed is two operations instead of a 9 MB script.
//
// Update is right only on a table that holds what it is told: the caller
// keeps the Elements it last wrote successfully, and writes whole the
// first time, after a failed write, and now and then to heal what others
// did to the table. nft fails an update whole, changing nothing, when it
// deletes an element the table lacks or adds to a set that is gone; the
// caller then writes whole. Update uses delete, not destroy: nft 1.0.6
// (Debian 12) has no destroy, and the failed delete is what shows a table
// not as written. KeepSNAT makes the union a write before IPVS needs.
//
// Every address reaches the script text as a validated netip value: an
// entry Compute cannot express (an invalid or zoned address above all,
// which would be written as "fe80::1%eth0" and make nft reject the whole
// transaction) is left out and named in its error, and the rest of the
// table is written all the same, whole or by an update.
//
// # Table
//
//	set snat-v4, snat-v6         VIP . proto . port . real address . real port
//	set filtered-v4, filtered-v6 VIP . proto . port that have source ranges
//	set allowed-v4, allowed-v6   VIP . proto . port . source CIDR (interval)
//	set vips-v4, vips-v6         every keeplb VIP
//	set ports-v4, ports-v6       VIP . proto . port of the VIP's Services
//	set echo-v4, echo-v6         VIPs that answer ping
//	set sync-ports               UDP ports of the IPVS sync daemons
//	set sync-peers-v4, -v6       node addresses sync messages may come from
//	set snat-vip-v4, -v6         as snat, masqueraded to the VIP (FollowVIP)
//	set transit-v4, -v6          VIPs whose routed flows take TransitZone
//	set snat-vip-whole-v4, -v6   VIP . proto . port masqueraded to the VIP
//	                             whatever the real server (Rules.Whole)
//	counter vip-guard-dropped
//	chain ipvs-masquerade type nat hook postrouting priority srcnat
//	chain source-ranges   type filter hook input priority filter
//	chain vip-guard       type filter hook prerouting priority dstnat - 50
//	chain vip-guard-v4, vip-guard-v6 (jumped to from vip-guard)
//	chain ipvs-sync       type filter hook input priority filter
//	chain vip-transit     type filter hook prerouting priority raw
//
// Two rules per base chain, one per family, and six per guard chain; the
// sets carry the data, so the rule count does not grow with Services or
// real servers. An empty Rules
// still writes the table, its chains and its empty sets: the table's
// presence says keeplb runs here, and every sync writes the same shape.
//
// # Masquerading, and why it matches on conntrack
//
// IPVS schedules a connection in the LOCAL_IN hook (priority 99, after
// the filter chains) and, in NAT mode, rewrites the destination to the real
// server and sends the packet out through LOCAL_OUT and POSTROUTING. With
// net.ipv4.vs.conntrack=1 the packet keeps its conntrack entry: IPVS only
// rewrites the entry's reply tuple, so in POSTROUTING the original tuple
// still holds client → VIP:port while the packet itself is addressed to
// the real server. The ipvs-masquerade rule matches
//
//	meta l4proto { tcp, udp, sctp }
//	ct original ip daddr . meta l4proto . ct original proto-dst . ip daddr . th dport @snat-v4
//
// (the protocol match also tells nft the type of ct original proto-dst,
// which it cannot concatenate otherwise), that is, "a connection opened to
// VIP:port/proto, leaving for this real server", and masquerades it.
// Replies then come back to this node; the NAT reverses the masquerade and
// IPVS (FORWARD hook) restores VIP:port as source, as in kube-proxy's IPVS
// mode. NAT chains only see a connection's first packet, and the
// masquerade binding lives in the conntrack entry, so rewriting the table
// does not disturb established connections.
//
// The alternatives do not work or are less precise:
//
//   - ct status dnat does not match: IPVS alters the reply tuple
//     itself (nf_conntrack_alter_reply) and sets no DNAT status bit.
//   - nftables has no IPVS match (iptables' -m ipvs has no nft
//     counterpart that knftables can express).
//   - Marking VIP traffic before IPVS and masquerading marked packets (the
//     kube-proxy way) takes a packet-mark bit that others (kube-proxy,
//     CNIs) also use, and cannot tell real servers apart: the real server
//     is only chosen by IPVS, after every filter chain. Matching the real
//     server lets Local Services forwarded to this node's own pods keep
//     the client address while other real servers of the same VIP, if
//     any, are masqueraded.
//
// Without net.ipv4.vs.conntrack=1 IPVS untracks its packets, the ct
// expressions never match, nothing is masqueraded, and replies from real
// servers on other nodes bypass this node. Setting the sysctl is the
// speaker's job; this package only writes rules.
//
// # Source ranges
//
// When keeplb publishes ipMode Proxy, kube-proxy leaves the VIP alone, so
// keeplb enforces loadBalancerSourceRanges itself. The source-ranges
// chain hooks input at priority filter (0), so it runs before IPVS
// (LOCAL_IN 99) sees the packet, and it sees the packet exactly as IPVS
// will: after routing decided it is local, with the VIP still as its
// destination. Its rule drops a packet whose destination VIP . proto .
// port is in filtered-v4 and whose VIP . proto . port . source is not in
// allowed-v4 (likewise for IPv6). A VIP:port without ranges is not in
// filtered and is open to all. Ranges of the other family are ignored, so
// an IPv6 VIP whose ranges are all IPv4 admits no IPv6 client, the
// fail-closed reading Kubernetes gives the field.
//
// A virtual server listed in Rules.SourceRanges is filtered whatever its
// list holds: with no range of its family it admits no client. Deciding
// which virtual servers are filtered (per family, as kube-proxy reads the
// field) is package dataplane's job.
//
// Only traffic reaching this node from elsewhere is filtered: IPVS
// schedules connections that local processes open to the VIP in LOCAL_OUT,
// so they never reach input. Non-port protocols (ICMP) are not filtered.
// Nested ranges are reduced to the outermost, because interval sets with
// concatenated keys reject overlapping elements.
//
// # The VIP port guard
//
// A VIP that keepalived adds to a node is a local address: without more,
// every listener on the wildcard address (sshd, the kubelet, exporters)
// answers on it, and kube-proxy in iptables mode translates every
// NodePort on it. The guard accepts, for a destination in vips that is a
// local address (fib daddr type local: the node holds the VIP; a packet
// to a VIP held elsewhere is routed and reaches no listener), only
//
//	iifname "lo"                            the node's own processes
//	ct state established,related            replies, ICMP errors, flows opened before
//	daddr . l4proto . dport in ports        the ports of the VIP's Services, any mode
//	ICMP errors (and for IPv6, neighbour solicitation and advertisement)
//	daddr in echo, echo request             the pool's spec.icmpEcho
//
// and counts and drops the rest. It hooks prerouting between conntrack
// (-200) and destination NAT (-100), so it sees the destination the client
// chose before kube-proxy rewrites it (a Service of kube-proxy forwarding,
// a NodePort), and long before IPVS (input, 98 and 99). A VIP:port it
// accepts is then filtered by the source-ranges chain, forwarded by IPVS
// or translated by kube-proxy. VRRP adverts go to the VRRP multicast
// group or the peers' node addresses, never to a VIP, so the guard does
// not see them. The sets list every VIP of every pool, on every node, so a
// VIP is guarded on whichever node it moves to.
//
// A whole write recreates the table, and the counter with it (an Update
// keeps it): GuardDrops reads it, and a caller that exports a total adds
// it up before a whole write.
//
// # The sync guard
//
// The kernel's IPVS connection sync daemon installs every connection
// entry that reaches its UDP port, unauthenticated, from any sender
// (docs/connections.md measures a forged one). The ipvs-sync chain drops
// UDP to the sync-ports from any source not in sync-peers-v4 or -v6, at
// input, before the daemon's socket reads it. It binds the channel to the
// nodes' addresses, not to the nodes: a sender on the segment that forges
// a node's address still gets through, as with VRRP's own adverts. With
// no ports (no daemon runs) it matches nothing.
//
// # Masquerading that follows the VIP
//
// With Rules.FollowVIP the real servers go to snat-vip instead of snat,
// whose rule translates the source to the VIP the connection was opened
// to (snat ip to ct original ip daddr), keeping the client's port where
// the tuple is free. A backend then sees VIP:client-port from whichever
// node holds the VIP, and replies to the VIP, so they reach the new holder
// after a move, which, given the connection's IPVS entry by the sync
// daemon, forwards the next segment to the same backend with the same
// tuple. A node that does not hold the VIP routes such flows between the
// holder and its own pods; the vip-transit chain puts them in conntrack
// zone TransitZone (from a VIP to an address not local, or to a VIP not
// local), before conntrack sees them. In the default zone their entries
// would break a move both ways: on the new holder, the routed flow's
// entry holds the tuple its NAT needs for the same connection, so the NAT
// picks another port and the pod resets the stream; on the old holder,
// its pods' replies would match the holder's entry and be de-NATed to
// the client with the pod's address. The test of both is
// TestConnSync in e2e/ipvs.
package nft
