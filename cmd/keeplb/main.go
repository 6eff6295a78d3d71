// Command keeplb is a bare-metal LoadBalancer for Kubernetes. Its
// subcommands are keeplb's components; see `keeplb --help`.
package main

import (
	"fmt"
	"os"

	"k8s.io/component-base/logs"

	"github.com/keeplb/keeplb/pkg/cmd"
)

func main() { os.Exit(run()) }

// run is main with an exit code, so that deferred calls run before os.Exit.
func run() int {
	// Log lines are buffered; flush them so that the last ones before an
	// exit are not lost.
	defer logs.FlushLogs()
	if err := cmd.NewRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		return 1
	}
	return 0
}
