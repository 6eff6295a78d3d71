// Package scale_e2e measures one real speaker at the scale of issue 13's
// target 6: 1,000 Nodes, 10,000 LoadBalancer Services and 100,000
// endpoints as API objects in a real kube-apiserver, and one speaker, the
// keeplb command's own, with real keepalived and real IPVS programming
// that state for one of the Nodes.
//
// The host runs the API server and creates the objects in bulk, as the
// controller and the EndpointSlice controller would have left them (each
// Service's status.loadBalancer.ingress written; no kubelet, no
// controller). The node side needs IPVS, so it runs in the VM of hack/vm,
// which reaches the API server over qemu's user-mode network: there the
// test starts the speaker as a process of its own and measures its memory
// (VmRSS, VmHWM) and CPU, the first full sync, syncs that change nothing,
// and keepalived's reload when a Service is added, and checks that the
// kernel's IPVS table and the VIPs on the node match the objects.
//
// It runs only when asked (KEEPLB_SCALE=1; hack/bench-scale.sh, part of
// make bench): it takes minutes, and needs root, qemu and the control
// plane's binaries ($KEEPLB_TOOLS_DIR).
package scale_e2e

import (
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/client-go/tools/clientcmd"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/testing/controlplane"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

var (
	flagNodes     = flag.Int("scale.nodes", 1000, "Nodes")
	flagServices  = flag.Int("scale.services", 10000, "LoadBalancer Services, one EndpointSlice each")
	flagEndpoints = flag.Int("scale.endpoints", 10, "ready endpoints per Service")
	flagNodePort  = flag.Int("scale.nodeport", 1000, "how many of the Services are forwarded by nodeport (the rest by pod)")
	flagPools     = flag.Int("scale.pools", 4, "IPPools the Services' VIPs are spread over")
	flagVRRPNodes = flag.Int("scale.vrrp-nodes", 5, "Nodes the pools' spec.vrrp.nodeSelector picks (node-0000, the VM's, among them)")
	flagCold      = flag.Int("scale.cold", 200, "Services created without a holder annotation, which the speaker writes")
	flagExtra     = flag.Int("scale.reloads", 2, "Services added one at a time to time keepalived's reload")
	flagResyncs   = flag.Int("scale.resyncs", 3, "syncs that change nothing to time")
	flagMemory    = flag.String("scale.vm-memory", "3G", "the VM's memory")
	flagMemLimit  = flag.String("scale.gomemlimit", "", "GOMEMLIMIT for the speaker, e.g. 180MiB, or none (default: the DaemonSet's, "+daemonSetPath+")")
	flagGOGC      = flag.String("scale.gogc", "", "GOGC for the speaker, e.g. 50, or none (default: the DaemonSet's)")
	_             = flag.String("scale.godebug", "", "GODEBUG for the speaker, e.g. gctrace=1: its log then has the heap at each collection (default: the DaemonSet's)")
	flagTable     = flag.String("scale.table", "", "write the results as a markdown table to this file")

	flagNodeSide = flag.String("scale.node-side", "", "internal: the folder of the kubeconfigs when the test runs in the VM")
)

// EnvScale must be 1 for the test to run.
const EnvScale = "KEEPLB_SCALE"

// envExec makes the test binary run the keeplb command with its
// arguments instead of the tests: the VM's speaker is the command's own
// code path (pkg/cmd), plus a pprof server.
const envExec = "KEEPLB_SCALE_EXEC"

func TestMain(m *testing.M) {
	if os.Getenv(envExec) == "1" {
		os.Exit(runKeeplb())
	}
	os.Exit(m.Run())
}

func specOfFlags() spec {
	return spec{Nodes: *flagNodes, Services: *flagServices, Endpoints: *flagEndpoints, NodePort: *flagNodePort,
		Pools: *flagPools, VRRPNodes: *flagVRRPNodes, Cold: *flagCold, Extra: *flagExtra}
}

// TestSpeakerAtScale builds the cluster on the host, then measures the
// speaker in the VM (nodeSide).
func TestSpeakerAtScale(t *testing.T) {
	s := specOfFlags()
	if *flagNodeSide != "" {
		nodeSide(t, s, *flagNodeSide)
		return
	}
	if os.Getenv(EnvScale) != "1" {
		t.Skipf("a measurement of minutes: set %s=1 or run hack/bench-scale.sh", EnvScale)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the speaker programs IPVS and runs keepalived")
	}
	if ipvs.Available() != nil {
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			t.Skipf("the host kernel has no IPVS and %v", vm.ErrNoQEMU)
		}
	}
	if s.Nodes < 1 || s.Pools < 1 || s.VRRPNodes < 1 || s.Pools > 60 {
		t.Fatalf("bad scale %+v", s)
	}
	cp := controlplane.StartForTest(t)
	keeplbtest.Install(t, cp)
	took, err := populate(t.Context(), cp.AdminConfig(), s)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("created %d Nodes in %s, %d IPPools in %s, %d Services with their status in %s, %d EndpointSlices (%d endpoints) in %s",
		s.Nodes, took.Nodes.Round(time.Millisecond), s.Pools, took.Pools.Round(time.Millisecond),
		s.Services, took.Services.Round(time.Millisecond), s.Services, s.Services*s.Endpoints, took.Slices.Round(time.Millisecond))

	dir := t.TempDir()
	// The API server's certificate names "kubernetes", not 10.0.2.2.
	admin := filepath.Join(dir, "admin.kubeconfig")
	if err := vm.WriteKubeconfig(cp.KubeconfigPath(), admin, "kubernetes"); err != nil {
		t.Fatal(err)
	}
	if err := speakerKubeconfig(admin, filepath.Join(dir, "speaker.kubeconfig")); err != nil {
		t.Fatal(err)
	}
	// The Go runtime's settings: the flag's, else the DaemonSet's, else
	// none; the VM side is always told.
	args := []string{"-scale.node-side=" + dir}
	given := map[string]bool{}
	for _, e := range goEnv {
		v := flag.Lookup(e.flag).Value.String()
		if v == "" {
			if v, err = manifestEnv(e.name); err != nil {
				t.Fatal(err)
			}
		}
		if v == "" {
			v = "none"
		}
		args = append(args, "-"+e.flag+"="+v)
		given[e.flag] = true
	}
	flag.Visit(func(f *flag.Flag) {
		if f.Name != "scale.node-side" && f.Name != "scale.table" && !given[f.Name] && len(f.Name) > 6 && f.Name[:6] == "scale." {
			args = append(args, "-"+f.Name+"="+f.Value.String())
		}
	})
	start := time.Now()
	vm.RunSelfWith(t, vm.Options{Net: true, Memory: *flagMemory, Shares: []string{dir}}, args...)
	t.Logf("VM run (boot, measurements, shutdown): %s", time.Since(start).Round(100*time.Millisecond))

	b, err := os.ReadFile(filepath.Join(dir, resultsFile))
	if err != nil {
		t.Fatalf("the VM wrote no results: %v", err)
	}
	var r results
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	r.Populated = took
	table := r.markdown(s)
	t.Log("\n" + table)
	if *flagTable != "" {
		if err := os.WriteFile(*flagTable, []byte(table), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A missed target is a measurement, reported; the test fails on
	// wrong results only (the kernel's table, the VIPs).
	for _, f := range r.Failures {
		t.Logf("target missed: %s", f)
	}
}

// speakerKubeconfig writes to to the admin kubeconfig at from, made to
// act as the speaker's ServiceAccount (impersonation): the speaker has
// only the rights manifests/ give it.
func speakerKubeconfig(from, to string) error {
	cfg, err := clientcmd.LoadFromFile(from)
	if err != nil {
		return err
	}
	for _, a := range cfg.AuthInfos {
		a.Impersonate = keeplbtest.SpeakerUser
		a.ImpersonateGroups = keeplbtest.Groups
	}
	return clientcmd.WriteToFile(*cfg, to)
}

// resultsFile is where the VM leaves its results, in the shared folder.
const resultsFile = "results.json"
