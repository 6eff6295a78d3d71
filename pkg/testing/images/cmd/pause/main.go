// Command pause is the sandbox image of the test cluster's pods: it holds
// the pod's namespaces and does nothing else, as registry.k8s.io/pause
// does, which cannot be pulled here. As PID 1 of a pod that shares its
// process namespace it reaps exited children; it exits on SIGTERM or
// SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		// Reap every child that exited; ECHILD ends the loop.
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
