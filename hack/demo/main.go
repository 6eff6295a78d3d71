// Command keeplb-demo runs the whole of keeplb locally: a real
// kube-apiserver and etcd, keeplb's controller, and a node side of three
// nodes with a speaker (keepalived + IPVS) each, in network namespaces of
// the lab (pkg/testing/lab), inside the VM of hack/vm when the host kernel has no
// IPVS. `make demo` builds it and runs `keeplb-demo up`; `make demo-down`
// runs `keeplb-demo down`.
//
// Everything it starts lives in the state folder (_output/demo): the
// control plane's data, the kubeconfig, logs/, pids.json, and the mailbox
// through which the host asks the node side to send requests from the
// client namespace or to cut a node off (mail.go).
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

const usageText = `usage: keeplb-demo COMMAND [flags]

  up          start the demo (what make demo runs), or say it is up already
  down        stop everything the demo started and delete its state
  curl SVC    GET a Service's VIP from the client namespace
  failover SVC
              cut the node holding the Service's VIP off and measure the gap
  controlplane, node
              internal: the processes up starts
`

// config is where things are.
type config struct {
	state  string // the state folder
	repo   string // the repository
	tools  string // kube-apiserver, etcd, kubectl
	vmDir  string // the VM of hack/vm/build.sh
	keeplb string // the keeplb binary
	self   string // this binary
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usageText)
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	wd, _ := os.Getwd()
	c := config{}
	fs.StringVar(&c.repo, "repo", wd, "the repository")
	fs.StringVar(&c.state, "state", filepath.Join(wd, "_output", "demo"), "the state folder")
	fs.StringVar(&c.tools, "tools", os.Getenv("KEEPLB_TOOLS_DIR"), "folder with kube-apiserver, etcd and kubectl (hack/tools.sh)")
	fs.StringVar(&c.vmDir, "vm-dir", "", "the VM build (hack/vm/build.sh); empty: build.sh runs")
	fs.StringVar(&c.keeplb, "keeplb", filepath.Join(wd, "_output", "bin", "keeplb"), "the keeplb binary")
	kubeconfig := fs.String("kubeconfig", "", "node: the kubeconfig of the speakers")
	where := fs.String("where", "VM", "node: where it runs, for the output")
	_ = fs.Parse(args)
	c.self, _ = os.Executable()
	var err error
	switch cmd {
	case "up":
		err = up(c)
	case "down":
		err = down(c)
	case "curl", "failover":
		if fs.NArg() != 1 {
			err = fmt.Errorf("usage: keeplb-demo %s SERVICE", cmd)
			break
		}
		err = poke(c, cmd, fs.Arg(0))
	case "controlplane":
		err = runControlPlane(c)
	case "node":
		err = runNode(c.state, c.keeplb, *kubeconfig, *where)
	default:
		fmt.Fprint(os.Stderr, usageText)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "keeplb-demo:", err)
		os.Exit(1)
	}
}

// progress prints what happens, with the time since start.
type progress struct{ start time.Time }

func (p progress) step(format string, args ...any) {
	fmt.Printf("[%5.1fs] %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}
