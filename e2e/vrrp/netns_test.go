package vrrp

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The test binary doubles as the small programs that run inside the
// test's network namespaces: an HTTP responder per node that answers its
// node name, and the client's prober. TestMain runs them when asked.
const helperEnv = "KEEPLB_E2E_HELPER"

func TestMain(m *testing.M) {
	switch mode, arg, _ := strings.Cut(os.Getenv(helperEnv), ":"); mode {
	case "http":
		os.Exit(serveName(arg))
	case "probe":
		os.Exit(probe(arg))
	}
	os.Exit(m.Run())
}

// serveName answers every HTTP request on port 80 with name.
func serveName(name string) int {
	srv := &http.Server{Addr: ":80", ReadHeaderTimeout: time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Connection", "close")
		_, _ = fmt.Fprint(w, name)
	})}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// probe sends short concurrent requests to "vip,max,interval[,old]" and
// prints one line per request as it completes: start offset in ms, then
// the answering node or "-". Many short requests, not one client: a single
// TCP client would hide the real takeover time behind its 1 s SYN retry.
// With old, it stops 100 ms after another node first answers, so that a
// slow handover under load is measured rather than cut off.
func probe(arg string) int {
	parts := strings.Split(arg, ",")
	if len(parts) < 3 {
		return 2
	}
	vip := parts[0]
	maxDur, _ := time.ParseDuration(parts[1])
	every, _ := time.ParseDuration(parts[2])
	old := ""
	if len(parts) > 3 {
		old = parts[3]
	}
	client := &http.Client{Timeout: 150 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	end := maxDur
	out := bufio.NewWriter(os.Stdout)
	for t := time.Duration(0); ; t += every {
		mu.Lock()
		stop := t >= end
		mu.Unlock()
		if stop {
			break
		}
		time.Sleep(time.Until(start.Add(t)))
		wg.Add(1)
		go func(t time.Duration) {
			defer wg.Done()
			who := "-"
			if resp, err := client.Get("http://" + net.JoinHostPort(vip, "80")); err == nil {
				b := make([]byte, 64)
				n, _ := resp.Body.Read(b)
				resp.Body.Close()
				who = string(b[:n])
			}
			mu.Lock()
			defer mu.Unlock()
			_, _ = fmt.Fprintf(out, "%d %s\n", t.Milliseconds(), who)
			_ = out.Flush()
			if old != "" && who != old && who != "-" {
				end = min(end, time.Since(start)+100*time.Millisecond)
			}
		}(t)
	}
	wg.Wait()
	return 0
}

// sample is one probe request: when it started and who answered ("-" for
// no answer).
type sample struct {
	at  time.Duration
	who string
}

// runProbe runs the prober in the client namespace for at most maxDur
// and returns its samples sorted by start time. With old, the prober stops
// soon after another node answers, and runProbe closes seen (if not nil)
// once old has answered: the moment a failover may begin.
func runProbe(ctx context.Context, ns, vip string, maxDur, every time.Duration, old string, seen chan<- struct{}) ([]sample, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, self)
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=probe:%s,%s,%s,%s", helperEnv, vip, maxDur, every, old))
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("probe: %w", err)
	}
	var ss []sample
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		ms, _ := strconv.Atoi(f[0])
		ss = append(ss, sample{time.Duration(ms) * time.Millisecond, f[1]})
		if seen != nil && old != "" && f[1] == old {
			close(seen)
			seen = nil
		}
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("probe: %w", err)
	}
	sortSamples(ss)
	return ss, nil
}

func sortSamples(ss []sample) {
	for i := 1; i < len(ss); i++ {
		for j := i; j > 0 && ss[j].at < ss[j-1].at; j-- {
			ss[j], ss[j-1] = ss[j-1], ss[j]
		}
	}
}

// gap measures a takeover from the client's side: from the first request
// the old node stopped answering (for good) to the first request another
// node answered, and returns that node. It does not depend on when the
// prober started relative to the failure.
func gap(ss []sample, old string) (time.Duration, string, bool) {
	var lost time.Duration = -1
	seenOld := false
	for _, s := range ss {
		switch {
		case s.who == old:
			seenOld, lost = true, -1 // an earlier miss was noise
		case lost < 0 && seenOld:
			lost = s.at
			if s.who != "-" {
				return 0, s.who, true
			}
		case lost >= 0 && s.who != "-":
			return s.at - lost, s.who, true
		}
	}
	return 0, "", false
}

// topology is a switch namespace with a bridge, node namespaces and a
// client namespace cabled to it, all created by the test.
type topology struct {
	t      *testing.T
	id     string
	sw     string
	nodes  []string // namespace names, also the Kubernetes node names
	ips    map[string]string
	client string
	procs  []*exec.Cmd
}

func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newTopology builds the namespaces: subnet 10.77.0.0/24, nodes at .11,
// .12, ..., the client at .100.
func newTopology(t *testing.T, n int) *topology { return newTopologyWith(t, topoOptions{nodes: n}) }

// topoOptions are what a test may change in the topology.
type topoOptions struct {
	// nodes is the number of node namespaces.
	nodes int
	// name returns the name of node i (from 0) and of its namespace; id is
	// unique to the test process. Default kln<i+1>-<id>.
	name func(i int, id string) string
	// ipv6 adds fd77:1234:5678:9abc::/64 on eth0: nodes at ::11, ::12,
	// ..., the client at ::100.
	ipv6 bool
	// eth1 cables every node to a second bridge as eth1, subnet
	// 10.78.0.0/24, nodes at .11, .12, ...
	eth1 bool
}

// v6Subnet is the IPv6 subnet of a topology with topoOptions.ipv6.
const v6Subnet = "fd77:1234:5678:9abc::"

// newTopologyWith builds the namespaces as o says.
func newTopologyWith(t *testing.T, o topoOptions) *topology {
	t.Helper()
	id := strconv.Itoa(os.Getpid() % 100000)
	tp := &topology{t: t, id: id, sw: "klsw" + id, client: "klc" + id, ips: map[string]string{}}
	t.Cleanup(tp.destroy)
	ip(t, "netns", "add", tp.sw)
	for _, br := range []string{"br0", "br1"} {
		ip(t, "-n", tp.sw, "link", "add", br, "type", "bridge")
		ip(t, "-n", tp.sw, "link", "set", br, "up")
	}
	cable := func(ns, br, port, dev, addr string) {
		ip(t, "-n", tp.sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
		ip(t, "-n", tp.sw, "link", "set", port, "master", br, "up")
		ip(t, "-n", ns, "addr", "add", addr, "dev", dev)
		ip(t, "-n", ns, "link", "set", dev, "up")
	}
	attach := func(ns string, host, i int) {
		ip(t, "netns", "add", ns)
		ip(t, "-n", ns, "link", "set", "lo", "up")
		cable(ns, "br0", fmt.Sprintf("p%d", i), "eth0", fmt.Sprintf("10.77.0.%d/24", host))
		if o.ipv6 {
			ip(t, "-n", ns, "addr", "add", fmt.Sprintf("%s%x/64", v6Subnet, host), "dev", "eth0", "nodad")
		}
	}
	for i := range o.nodes {
		ns := fmt.Sprintf("kln%d-%s", i+1, id)
		if o.name != nil {
			ns = o.name(i, id)
		}
		attach(ns, 11+i, i)
		if o.eth1 {
			cable(ns, "br1", fmt.Sprintf("q%d", i), "eth1", fmt.Sprintf("10.78.0.%d/24", 11+i))
		}
		tp.nodes = append(tp.nodes, ns)
		tp.ips[ns] = fmt.Sprintf("10.77.0.%d", 11+i)
		for _, kv := range [][2]string{{"net.ipv4.ip_nonlocal_bind", "1"}, {"net.ipv4.conf.all.arp_ignore", "1"}, {"net.ipv4.conf.all.arp_announce", "2"}} {
			if out, err := exec.Command("ip", "netns", "exec", ns, "sysctl", "-qw", kv[0]+"="+kv[1]).CombinedOutput(); err != nil {
				// sysctl may be missing; write /proc/sys directly.
				path := "/proc/sys/" + strings.ReplaceAll(kv[0], ".", "/")
				if out2, err2 := exec.Command("ip", "netns", "exec", ns, "sh", "-c", "echo "+kv[1]+" > "+path).CombinedOutput(); err2 != nil {
					t.Fatalf("set %s in %s: %v %s %s", kv[0], ns, err2, out, out2)
				}
			}
		}
		tp.start(ns, "http:"+ns)
	}
	attach(tp.client, 100, o.nodes)
	return tp
}

// start runs the test binary in helper mode inside ns.
func (tp *topology) start(ns, helper string) {
	self, err := os.Executable()
	if err != nil {
		tp.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", ns, self)
	cmd.Env = append(os.Environ(), helperEnv+"="+helper)
	if err := cmd.Start(); err != nil {
		tp.t.Fatal(err)
	}
	tp.procs = append(tp.procs, cmd)
}

// holders returns the node namespaces that have vip on eth0.
func (tp *topology) holders(vip string) []string { return tp.holdersOn(vip, "eth0") }

// holdersOn returns the node namespaces that have vip, IPv4 or IPv6, on
// dev.
func (tp *topology) holdersOn(vip, dev string) []string {
	fam, bits := "-4", "/32"
	if strings.Contains(vip, ":") {
		fam, bits = "-6", "/128"
	}
	var out []string
	for _, ns := range tp.nodes {
		o, err := exec.Command("ip", "-n", ns, "-br", fam, "addr", "show", "dev", dev).CombinedOutput()
		if err == nil && slices.Contains(strings.Fields(string(o)), vip+bits) {
			out = append(out, ns)
		}
	}
	return out
}

// allHolders returns, for every address on a node's eth0, the node
// namespaces that have it: one command per node, for many VIPs at once.
func (tp *topology) allHolders() map[string][]string {
	out := map[string][]string{}
	for _, ns := range tp.nodes {
		o, err := exec.Command("ip", "-n", ns, "-br", "addr", "show", "dev", "eth0").CombinedOutput()
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(o)) {
			if a, _, ok := strings.Cut(f, "/"); ok {
				out[a] = append(out[a], ns)
			}
		}
	}
	return out
}

// mac returns the MAC address of eth0 in ns.
func (tp *topology) mac(ns string) string {
	f := strings.Fields(ip(tp.t, "-n", ns, "-br", "link", "show", "dev", "eth0"))
	if len(f) < 3 {
		tp.t.Fatalf("no MAC in ns %s", ns)
	}
	return f[2]
}

func (tp *topology) destroy() {
	for _, p := range tp.procs {
		if p.Process != nil {
			_ = p.Process.Kill()
			_ = p.Wait()
		}
	}
	for _, ns := range append([]string{tp.client, tp.sw}, tp.nodes...) {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}
