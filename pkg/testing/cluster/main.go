package cluster

import (
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// The environment that tells a test binary which part of the cluster it
// is: the host side in its namespace, the VM's agent, or one node.
const (
	envRole   = "KEEPLB_CLUSTER_ROLE"   // "host", "agent", "node" or "get"
	envNode   = "KEEPLB_CLUSTER_NODE"   // the node's number, for "node"
	envConfig = "KEEPLB_CLUSTER_CONFIG" // the config file, for "agent" and "node"
	envNetns  = "KEEPLB_CLUSTER_NETNS"  // the host side's namespace, for "host"
)

// tapName is the tap device in the host side's namespace.
const tapName = "tap0"

// Main is the TestMain of a package that uses Start. The test binary is
// each part of the cluster in turn:
//   - run by go test on the host, it makes a network namespace of its own
//     (keeplb-cluster-PID) with the tap device towards the VM and routes to
//     the nodes through it, and no default route, then runs itself again
//     there: the tests, the control plane and the VM all live in it, and
//     nothing they send can leave the machine;
//   - in that namespace, it runs the tests (m.Run);
//   - in the VM, as the agent (runAgent) or one node (runNode), which Start
//     asks for.
//
// Without root (or without `ip`), the tests run as they are, and Start
// skips.
func Main(m *testing.M) {
	switch os.Getenv(envRole) {
	case "get":
		os.Exit(get(os.Args[len(os.Args)-1]))
	case "agent", "node":
		log.SetFlags(log.Lmicroseconds)
		cfg, err := readConfig(os.Getenv(envConfig))
		if err == nil {
			if os.Getenv(envRole) == "agent" {
				err = runAgent(cfg)
			} else {
				var i int
				i, err = strconv.Atoi(os.Getenv(envNode))
				if err == nil {
					err = runNode(cfg, i)
				}
			}
		}
		if err != nil {
			log.Printf("%s: %v", os.Getenv(envRole), err)
			os.Exit(1)
		}
		os.Exit(0)
	case "host":
		os.Exit(m.Run())
	}
	if os.Geteuid() != 0 {
		os.Exit(m.Run())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		os.Exit(m.Run())
	}
	os.Exit(inNamespace())
}

// Namespace is the host side's network namespace (in Main's run of the
// tests), for commands a user runs by hand against a cluster kept up.
func Namespace() string { return os.Getenv(envNetns) }

// inNamespace makes the host side's namespace, runs this test binary again
// in it with the same arguments, removes the namespace and returns the
// run's exit code.
func inNamespace() int {
	ns := "keeplb-cluster-" + strconv.Itoa(os.Getpid())
	steps := [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "tuntap", "add", tapName, "mode", "tap"},
		{"ip", "-n", ns, "addr", "add", HostAddr + "/24", "dev", tapName},
		{"ip", "-n", ns, "link", "set", tapName, "up"},
		{"ip", "-n", ns, "route", "add", NodesPrefix, "via", RouterAddr},
		{"ip", "-n", ns, "route", "add", "10.244.0.0/16", "via", RouterAddr},
	}
	defer func() { _ = exec.Command("ip", "netns", "del", ns).Run() }()
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "cluster: %v: %v: %s\n", s, err, out)
			return 1
		}
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		return 1
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, self}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), envRole+"=host", envNetns+"="+ns)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "cluster:", err)
		return 1
	}
	return 0
}
