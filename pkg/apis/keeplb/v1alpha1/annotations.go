package v1alpha1

// The Service annotations of keeplb's API, named here once: package
// annotations parses them, and the allocator's errors name them as the
// field to fix.
const (
	// AnnotationPrefix starts every keeplb annotation.
	AnnotationPrefix = "keeplb.io/"
	// AnnotationPool names the IPPool to draw the address from.
	AnnotationPool = AnnotationPrefix + "pool"
	// AnnotationIPs names the exact addresses, at most one per family.
	AnnotationIPs = AnnotationPrefix + "ips"
	// AnnotationShareKey lets Services of one namespace share an address.
	AnnotationShareKey = AnnotationPrefix + "share-key"
	// AnnotationForwarding overrides the pool's forwarding mode.
	AnnotationForwarding = AnnotationPrefix + "forwarding"
	// AnnotationHolder is written by the speaker: the node holding each VIP.
	AnnotationHolder = AnnotationPrefix + "holder"
	// AnnotationScheduler chooses the IPVS scheduler.
	AnnotationScheduler = AnnotationPrefix + "scheduler"
)
