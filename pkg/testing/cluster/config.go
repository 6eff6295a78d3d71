package cluster

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
)

// The cluster's addresses. The host side (the control plane, the tests and
// their clients) lives in a network namespace of its own with a tap device
// to the VM; the VM's root namespace routes between it and the nodes.
const (
	// HostAddr is the tap device's address on the host side: the API
	// server listens and advertises here, and the tests' clients send from
	// here (a client outside every node).
	HostAddr = "172.18.1.1"
	// RouterAddr is the VM's eth0, on the tap link.
	RouterAddr = "172.18.1.2"
	// TapPrefix is the tap link's prefix.
	TapPrefix = "172.18.1.0/24"
	// NodesPrefix is the nodes' segment (a bridge in the VM's root
	// namespace); node N has 172.18.0.(10+N), the router 172.18.0.1.
	NodesPrefix = "172.18.0.0/24"
	// Gateway is the router's address on the nodes' segment.
	Gateway = "172.18.0.1"
	// VIPRange is a range of the nodes' segment that no node uses, for the
	// tests' IPPools: a VIP there is answered for on the segment by its
	// holder, and routed to the segment from the host side.
	VIPRange = "172.18.0.200-172.18.0.250"
	// ServiceCIDR is the ClusterIP range (pkg/testing/controlplane's).
	ServiceCIDR = "10.96.0.0/16"
	// AgentPort is the port of the VM's agent on RouterAddr.
	AgentPort = 7300
)

// NodeName is the name of node i (1-based).
func NodeName(i int) string { return "node" + strconv.Itoa(i) }

// NodeAddr is node i's address on the nodes' segment.
func NodeAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{172, 18, 0, byte(10 + i)})
}

// config is what the host tells the VM: written as JSON into the work
// folder, which the VM shares.
type config struct {
	// Nodes is the number of nodes.
	Nodes int
	// ProxyMode is kube-proxy's mode ("" for its default).
	ProxyMode string
	// Tools holds kubectl & co (hack/tools.sh), ClusterTools containerd,
	// kubelet, kube-proxy, runc and cni/ (hack/cluster-tools.sh).
	Tools, ClusterTools string
	// Images are OCI or docker archives to import into every node.
	Images []string
	// Server is the API server's URL, CAFile its certificate.
	Server, CAFile string
	// Tokens are the kubelets' (by node name) and kube-proxy's ("proxy").
	Tokens map[string]string
	// Dir is the work folder: logs go to Dir/logs.
	Dir string
}

func readConfig(file string) (*config, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var c config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return &c, nil
}

func (c *config) write(file string) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
