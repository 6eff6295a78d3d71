package vrrp

import (
	"bytes"
	"context"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/klog/v2/ktesting"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

// TestUnicastIgnoresAdvertsFromNonPeers: a host on the segment that is not
// one of a unicast pool's nodes sends VRRP adverts for the pool's VRID at
// priority 255, the highest there is, to the nodes' addresses: here a third
// keepalived in the client's namespace, configured like the nodes (the same
// anchor address, so its adverts are valid in every other respect) but with
// the two nodes as its unicast peers. The nodes run the configuration keeplb
// renders for a unicast pool, which has check_unicast_src: they drop the
// adverts, and the VIP stays on its master. The same adverts against the
// configuration without check_unicast_src (keeplb's before it) take the VIP
// from the master at once: the test shows both, so its first half cannot
// pass for want of an attack. Last, an nftables rule on the nodes that
// accepts VRRP from the nodes only gives the VIP back to its master even
// without check_unicast_src.
func TestUnicastIgnoresAdvertsFromNonPeers(t *testing.T) {
	requireNetns(t)
	tp := newTopology(t, 2)
	vip := netip.MustParsePrefix("10.77.0.200/32")
	const vrid, advert = 42, 100 * time.Millisecond
	instance := func(src string, priority int, peers ...string) keepalived.Config {
		in := keepalived.Instance{
			Name: "kl_uni_v4_b00", Interface: "eth0", VRID: vrid, Priority: priority, Version: 3,
			AdvertInterval: advert, UnicastSrc: netip.MustParseAddr(src), VIPs: []netip.Prefix{vip},
		}
		for _, p := range peers {
			in.UnicastPeers = append(in.UnicastPeers, netip.MustParseAddr(p))
		}
		return keepalived.Config{RouterID: src, Instances: []keepalived.Instance{in}}
	}
	render := func(c keepalived.Config) []byte {
		t.Helper()
		b, err := keepalived.Render(c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	node1, node2 := tp.nodes[0], tp.nodes[1]
	ip1, ip2 := tp.ips[node1], tp.ips[node2]
	conf1, conf2 := render(instance(ip1, 254, ip2)), render(instance(ip2, 253, ip1))
	for _, c := range [][]byte{conf1, conf2} {
		if !bytes.Contains(c, []byte("\n    check_unicast_src\n")) {
			t.Fatalf("a unicast instance renders without check_unicast_src:\n%s", c)
		}
	}
	k1, k2 := startKeepalived(t, node1), startKeepalived(t, node2)
	k1.apply(t, conf1)
	k2.apply(t, conf2)
	// Settled first: node1 alone, for ten adverts in a row, with node2 in
	// BACKUP. A loaded machine can starve a keepalived just started past
	// its master-down timer, and the two then briefly both hold the VIP
	// (CI saw that once, a second after start); that race is not the
	// attack, so it must be over before the attack begins.
	settled := time.Time{}
	eventually(t, 20*time.Second, "the VIP on "+node1+" only, for "+(10*advert).String(), func() bool {
		h := tp.holders(vip.Addr().String())
		if len(h) != 1 || h[0] != node1 || !strings.Contains(k2.output(), "Entering BACKUP STATE") {
			settled = time.Time{}
			return false
		}
		if settled.IsZero() {
			settled = time.Now()
		}
		return time.Since(settled) >= 10*advert
	})

	// The attacker: keeplb's own rendering for the client's address, with
	// the priority raised to 255, which keeplb never renders.
	attackerConf := bytes.Replace(render(instance("10.77.0.100", 254, ip1, ip2)), []byte("priority 254"), []byte("priority 255"), 1)
	attacker := startKeepalived(t, tp.client)
	attacker.apply(t, attackerConf)
	// It hears no adverts (the nodes send theirs to each other), so it
	// becomes master and advertises at 255 every 100 ms from now on.
	eventually(t, 10*time.Second, "the attacker advertising as master", func() bool { return hasAddr(t, tp.client, vip) })

	// What forged adverts that got through would do: node1 sees priority
	// 255, yields (keepalived logs BACKUP) and drops the VIP. So node1 must
	// hold it at every sample and never log BACKUP from the attack on.
	// node2 briefly holding it too would be the start-up race above, not
	// the attack: it is counted and shown, not failed on.
	const window = 30 * advert
	logFrom := len(k1.output())
	deadline := time.Now().Add(window)
	both := 0
	for time.Now().Before(deadline) {
		h := tp.holders(vip.Addr().String())
		if !slices.Contains(h, node1) {
			t.Fatalf("with check_unicast_src, forged adverts moved the VIP: holders %v\n%s", h, k1.output())
		}
		if len(h) > 1 {
			both++
		}
		time.Sleep(20 * time.Millisecond)
	}
	if tail := k1.output()[logFrom:]; strings.Contains(tail, "Entering BACKUP STATE") {
		t.Fatalf("with check_unicast_src, %s yielded to forged adverts:\n%s", node1, tail)
	}
	if both > 0 {
		t.Logf("%d samples saw %s hold the VIP as well (a starved keepalived, not the forged adverts):\n%s", both, node2, k2.output())
	}
	t.Logf("with check_unicast_src: the VIP stayed on %s for %s of priority-255 adverts from 10.77.0.100", node1, window)

	// Without check_unicast_src the master yields to the forged adverts.
	strip := func(c []byte) []byte { return bytes.Replace(c, []byte("    check_unicast_src\n"), nil, 1) }
	k1.apply(t, strip(conf1))
	k2.apply(t, strip(conf2))
	start := time.Now()
	eventually(t, 10*time.Second, "the VIP to leave "+node1+" without check_unicast_src", func() bool {
		return len(tp.holders(vip.Addr().String())) == 0
	})
	t.Logf("without check_unicast_src: %s lost the VIP %s after the reload", node1, time.Since(start).Round(10*time.Millisecond))

	// The host firewall docs/speaker.md suggests, VRRP accepted from the
	// nodes only, keeps the forged adverts out as well: node1, master-down,
	// takes the VIP back.
	guard := `table inet vrrp_guard {
	set peers4 {
		type ipv4_addr
		elements = { ` + ip1 + `, ` + ip2 + ` }
	}
	chain input {
		type filter hook input priority filter - 10; policy accept;
		meta l4proto vrrp ip saddr != @peers4 drop
	}
}
`
	for _, ns := range []string{node1, node2} {
		cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(guard)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft in %s: %v\n%s", ns, err, out)
		}
	}
	eventually(t, 10*time.Second, "the VIP back on "+node1+" behind the VRRP filter", func() bool {
		h := tp.holders(vip.Addr().String())
		return len(h) == 1 && h[0] == node1
	})
}

// keepalivedNode is a keepalived under keeplb's Supervisor in one network
// namespace, as a speaker runs it.
type keepalivedNode struct {
	sup *keepalived.Supervisor
	out *logBuffer
}

// startKeepalived runs a Supervisor for a keepalived in ns until t ends;
// apply gives it its configuration.
func startKeepalived(t *testing.T, ns string) *keepalivedNode {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, "keepalived.conf")
	out := &logBuffer{}
	proc, err := keepalived.NewExecProcess(keepalived.ExecOptions{
		Command: []string{"ip", "netns", "exec", ns, "keepalived"}, ConfigPath: conf, RunDir: dir, Output: out,
	})
	if err != nil {
		t.Fatal(err)
	}
	sup, err := keepalived.NewSupervisor(proc, keepalived.SupervisorOptions{ConfigPath: conf})
	if err != nil {
		t.Fatal(err)
	}
	_, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sup.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return &keepalivedNode{sup: sup, out: out}
}

func (k *keepalivedNode) apply(t *testing.T, conf []byte) {
	t.Helper()
	if _, err := k.sup.Apply(conf); err != nil {
		t.Fatal(err)
	}
}

func (k *keepalivedNode) output() string { return k.out.String() }

// hasAddr reports whether ns has p on eth0.
func hasAddr(t *testing.T, ns string, p netip.Prefix) bool {
	t.Helper()
	return slices.Contains(strings.Fields(ip(t, "-n", ns, "-br", "-4", "addr", "show", "dev", "eth0")), p.String())
}

// logBuffer collects keepalived's log, written by the process's copier and
// read by the test.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
