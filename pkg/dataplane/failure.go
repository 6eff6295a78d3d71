package dataplane

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/ipvs"
)

// FieldIPVS is the Field of a Problem the kernel caused that no
// annotation or field of the Service explains.
const FieldIPVS = "IPVS"

// KernelProblem explains, as a Problem of the Service owner
// ("namespace/name"), why node's kernel refused an op on the Service's
// virtual server vs (Apply's Result.Errors): the one cause a Service can
// set, a scheduler whose module the kernel lacks, names the annotation
// and the module; anything else is passed on with the kernel's words.
// The message depends on nothing that changes between syncs, so that a
// lasting failure is one event, not one per sync.
func KernelProblem(node, owner string, vs ipvs.VirtualServer, err error) Problem {
	if errors.Is(err, syscall.ENOENT) && vs.Scheduler != "" && vs.Scheduler != annotations.DefaultScheduler {
		return Problem{Service: owner, Field: annotations.Scheduler, Message: fmt.Sprintf(
			"node %s's kernel has no IPVS scheduler %q, so it does not forward %s: load its module there (modprobe ip_vs_%s, and ip_vs_%s in /etc/modules-load.d/) on every node that may hold the VIP, or choose another scheduler",
			node, vs.Scheduler, vs.Key(), vs.Scheduler, vs.Scheduler)}
	}
	return Problem{Service: owner, Field: FieldIPVS, Message: fmt.Sprintf(
		"node %s's kernel refused virtual server %s: %v; that node does not forward it fully, and retries at every sync",
		node, vs.Key(), err)}
}
