package vrrp

// FailStatic reports whether a group of members (the nodes that may hold
// a pool's VIPs of one family, or the nodes that may serve NodePorts), of
// which unready are not Ready, must be treated as if all were Ready: when
// more than half are not Ready at once.
//
// A node's Ready condition is the node lifecycle controller's view of its
// kubelet's heartbeats, not of its data path. One node going NotReady is
// most likely that node's trouble, and its VIPs move away. Most of the
// nodes going NotReady together is most likely the control plane's: an
// overloaded API server, kubelets cut off from it, expired kubelet
// certificates. Withdrawing every VIP then would turn a control-plane
// problem into an outage, so the plan falls back to what VRRP alone
// knows: the nodes that are up keep advertising, and a dead one, Ready or
// not, sends no adverts and holds nothing.
//
// The rule reads only the Nodes' conditions, so every speaker computes the
// same answer from the same informer state, and the plan stays the same
// on every node.
func FailStatic(members, unready int) bool {
	return members > 0 && 2*unready > members
}
