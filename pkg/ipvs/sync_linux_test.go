package ipvs_test

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// TestSyncDaemonsInNamespaces starts the kernel's connection sync daemons
// through our generic netlink commands and checks that they work: a TCP
// connection a client (namespace c) opens through the virtual server of
// the holder (a, master daemon) appears in the standby's (b, backup
// daemon) connection table, bound to the same real server (r), and stays
// there while the stream runs. It also checks what the commands answer:
// the settings listed back as set, EEXIST for a second daemon of a state,
// ESRCH for stopping one that does not run.
//
//	c (10.7.0.2) ── a (10.7.0.1; VIP 192.0.2.1 on lo; 10.8.0.1) ── r (10.8.0.2:8080)
//	                └ sync: a/sa 10.9.0.1 ── b/sb 10.9.0.2 (VIP's virtual server too)
func TestSyncDaemonsInNamespaces(t *testing.T) {
	if inVM(t) {
		return
	}
	l := newSyncLab(t)
	a, b := l.a, l.b
	real := l.real
	ha, hb := l.ha, l.hb

	group := netip.MustParseAddr("239.0.7.81")
	master := ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: "sa", SyncID: 7, Group: group, Port: 8850, TTL: 1, MaxLen: 1400}
	backup := ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "sb", SyncID: 7, Group: group, Port: 8850, TTL: 1, MaxLen: 1400}
	if err := ha.StartSyncDaemon(master); err != nil {
		t.Fatal(err)
	}
	if err := hb.StartSyncDaemon(backup); err != nil {
		t.Fatal(err)
	}
	if err := ha.StartSyncDaemon(master); !errors.Is(err, syscall.EEXIST) {
		t.Errorf("a second master: %v, want EEXIST", err)
	}
	if err := ha.StopSyncDaemon(ipvs.SyncBackup); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("stopping a backup that does not run: %v, want ESRCH", err)
	}
	if err := ha.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "sa", Group: netip.MustParseAddr("10.9.0.9")}); err == nil {
		t.Error("a unicast group was taken")
	}
	for ns, want := range map[string]ipvs.SyncDaemon{a: master, b: backup} {
		got, err := map[string]*ipvs.Netlink{a: ha, b: hb}[ns].SyncDaemons()
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0] != want {
			t.Errorf("%s lists %v, want [%v]", ns, got, want)
		}
	}

	conn := l.dial(t)
	rd := bufio.NewReader(conn)
	exchange := func(i int) {
		t.Helper()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		msg := "hello " + strconv.Itoa(i) + "\n"
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		if got, err := rd.ReadString('\n'); err != nil || got != msg {
			t.Fatalf("echo %d: %q, %v", i, got, err)
		}
	}
	client := netip.MustParseAddrPort(conn.LocalAddr().String())
	want := ipvsConn{client: client, virtual: netip.MustParseAddrPort("192.0.2.1:80"), real: real.AddrPort()}
	// The master syncs a connection when its state changes and every
	// sync_threshold packets: exchange until the backup has it.
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		exchange(i)
		if conns := conns(t, a); !contains(conns, want) {
			t.Fatalf("a's own table %v lacks the client's connection %v", conns, want)
		}
		if contains(conns(t, b), want) {
			t.Logf("b has the connection after %d exchanges", i+1)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("b's connection table %v never got %v", conns(t, b), want)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The holder's counters, read by our own dump, saw the stream.
	vss, err := ha.VirtualServers()
	if err != nil || len(vss) != 1 {
		t.Fatalf("a's virtual servers: %v, %v", vss, err)
	}
	if st := vss[0].Stats; st.Connections != 1 || st.PacketsIn < 3 || st.PacketsOut < 3 || st.BytesIn == 0 || st.BytesOut == 0 {
		t.Errorf("a's counters %+v, want the one connection and its packets both ways", st)
	}

	for _, h := range []*ipvs.Netlink{ha, hb} {
		for _, s := range []ipvs.SyncState{ipvs.SyncMaster, ipvs.SyncBackup} {
			_ = h.StopSyncDaemon(s)
		}
		if got, err := h.SyncDaemons(); err != nil || len(got) != 0 {
			t.Errorf("after stopping: %v, %v; want none", got, err)
		}
	}
}

// inVM runs the calling test in the VM of hack/vm where the host kernel
// lacks IPVS and KEEPLB_VM=1 asks for it, and says so: the caller then
// returns. Otherwise it skips the test where it cannot run.
func inVM(t *testing.T) bool {
	t.Helper()
	if ipvs.Available() != nil && !vm.InVM() && os.Getenv("KEEPLB_VM") == "1" {
		vm.RunSelf(t)
		return true
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and program IPVS")
	}
	if err := ipvs.Available(); err != nil {
		t.Skipf("skipping the real-kernel sync daemon test: %v", err)
	}
	return false
}

// syncLab is the namespaces of the sync daemon tests, with the virtual
// server in a and b and the echo server in r running:
//
//	c (10.7.0.2) ── a (10.7.0.1; VIP 192.0.2.1 on lo; 10.8.0.1) ── r (10.8.0.2:8080)
//	                └ sync: a/sa 10.9.0.1 ── b/sb 10.9.0.2 (VIP's virtual server too)
type syncLab struct {
	a, b, c, r string
	ha, hb     *ipvs.Netlink
	vs         ipvs.VirtualServer
	real       ipvs.RealServer
}

func newSyncLab(t *testing.T) *syncLab {
	t.Helper()
	p := fmt.Sprintf("kl-sync-%d-", os.Getpid())
	a, b, c, r := p+"a", p+"b", p+"c", p+"r"
	for _, ns := range []string{a, b, c, r} {
		if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
			t.Skipf("network namespaces are unavailable here: %v %s", err, out)
		}
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	ip := func(ns string, args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip -n %s %v: %v %s", ns, args, err, out)
		}
	}
	link := func(ns1, if1, addr1, ns2, if2, addr2 string) {
		t.Helper()
		ip(ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2)
		ip(ns1, "addr", "add", addr1, "dev", if1)
		ip(ns2, "addr", "add", addr2, "dev", if2)
		ip(ns1, "link", "set", if1, "up")
		ip(ns2, "link", "set", if2, "up")
	}
	for _, ns := range []string{a, b, c, r} {
		ip(ns, "link", "set", "lo", "up")
	}
	link(a, "ac", "10.7.0.1/24", c, "ca", "10.7.0.2/24")
	link(a, "ar", "10.8.0.1/24", r, "ra", "10.8.0.2/24")
	link(a, "sa", "10.9.0.1/24", b, "sb", "10.9.0.2/24")
	ip(a, "addr", "add", "192.0.2.1/32", "dev", "lo")
	ip(c, "route", "add", "default", "via", "10.7.0.1")
	ip(r, "route", "add", "default", "via", "10.8.0.1")
	ip(b, "route", "add", "10.8.0.0/24", "via", "10.9.0.1") // b's real server must be routable
	if out, err := exec.Command("ip", "netns", "exec", a, "sysctl", "-qw", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		t.Fatalf("ip_forward: %v %s", err, out)
	}

	vs := ipvs.VirtualServer{Address: netip.MustParseAddr("192.0.2.1"), Protocol: ipvs.TCP, Port: 80, Scheduler: "rr"}
	real := ipvs.RealServer{Address: netip.MustParseAddr("10.8.0.2"), Port: 8080, Weight: 1}
	handles := map[string]*ipvs.Netlink{}
	for _, ns := range []string{a, b} {
		h, err := ipvs.NewAt("/run/netns/" + ns)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close)
		handles[ns] = h
		if err := h.AddVirtualServer(vs); err != nil {
			t.Fatal(err)
		}
		if err := h.AddRealServer(vs.Key(), real); err != nil {
			t.Fatal(err)
		}
	}

	l := &syncLab{a: a, b: b, c: c, r: r, ha: handles[a], hb: handles[b], vs: vs, real: real}
	// The real server echoes every line, in r.
	var ln net.Listener
	if err := inNetns(r, func() (err error) { ln, err = net.Listen("tcp", "10.8.0.2:8080"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(conn, conn); _ = conn.Close() }()
		}
	}()
	return l
}

// dial opens a connection from c through a's virtual server.
func (l *syncLab) dial(t *testing.T) net.Conn {
	t.Helper()
	var conn net.Conn
	if err := inNetns(l.c, func() (err error) {
		conn, err = net.DialTimeout("tcp", "192.0.2.1:80", 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("connect through the virtual server: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// TestSyncDaemonCost measures what synchronising connections costs: the
// bytes and packets the master sends for n new connections (each an echo
// exchange, then held open), and again when they close, and the kernel's
// memory per connection entry (the ip_vs_conn slab's object size). It
// asserts that the backup got every connection; the figures are logged
// for docs/connections.md.
func TestSyncDaemonCost(t *testing.T) {
	if inVM(t) {
		return
	}
	const n = 200
	l := newSyncLab(t)
	if err := l.ha.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: "sa", SyncID: 9}); err != nil {
		t.Fatal(err)
	}
	if err := l.hb.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "sb", SyncID: 9}); err != nil {
		t.Fatal(err)
	}
	sent := func() (bytes, packets int) {
		t.Helper()
		read := func(what string) int {
			out, err := exec.Command("ip", "netns", "exec", l.a, "cat", "/sys/class/net/sa/statistics/"+what).Output()
			if err != nil {
				t.Fatal(err)
			}
			v, err := strconv.Atoi(strings.TrimSpace(string(out)))
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		return read("tx_bytes"), read("tx_packets")
	}
	synced := func() int {
		k := 0
		for _, c := range conns(t, l.b) {
			if c.real == l.real.AddrPort() {
				k++
			}
		}
		return k
	}
	waitSynced := func(want int, what string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for synced() != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the backup has %d connections, want %d", what, synced(), want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	b0, p0 := sent()
	var open []net.Conn
	for i := range n {
		conn := l.dial(t)
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		msg := "conn " + strconv.Itoa(i) + "\n"
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		if got, err := bufio.NewReader(conn).ReadString('\n'); err != nil || got != msg {
			t.Fatalf("echo %d: %q, %v", i, got, err)
		}
		open = append(open, conn)
	}
	waitSynced(n, "after opening")
	b1, p1 := sent()
	for _, conn := range open {
		_ = conn.Close()
	}
	// Closing syncs each connection's new state; the entries stay in the
	// backup's table until they time out.
	time.Sleep(2 * time.Second) // the master sends at most every second; nothing asserts on it
	b2, p2 := sent()
	// SLUB names the cache's object size in sysfs, also where it merged
	// the cache with another of the same size (and /proc/slabinfo then
	// has no line of its own for it).
	objsize := 0
	if out, err := os.ReadFile("/sys/kernel/slab/ip_vs_conn/object_size"); err == nil {
		objsize, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	}
	t.Logf("sync cost: %d connections opened: %d bytes in %d packets on the sync link (%.0f bytes per connection); closed: %d bytes in %d packets more; a connection entry is a %d-byte kernel object on each node",
		n, b1-b0, p1-p0, float64(b1-b0)/n, b2-b1, p2-p1, objsize)
}

// TestSyncDaemonTakesForgedEntries measures what docs/connections.md
// warns of: a backup daemon installs whatever connection entries reach it
// with its sync ID, from any sender, to any destination. Here a sender at
// an address no node has plants an entry sending a client's flow through
// the VIP to an address that is no real server. The speaker must
// therefore let sync messages in only from its nodes' addresses, and not
// run a backup daemon where it cannot install that filter.
func TestSyncDaemonTakesForgedEntries(t *testing.T) {
	if inVM(t) {
		return
	}
	l := newSyncLab(t)
	if err := l.hb.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "sb", SyncID: 9}); err != nil {
		t.Fatal(err)
	}
	forged, forge := l.forger(t)
	deadline := time.Now().Add(10 * time.Second)
	for !contains(conns(t, l.b), forged) {
		if time.Now().After(deadline) {
			t.Fatalf("the backup did not take the forged entry; its table: %v", conns(t, l.b))
		}
		forge()
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("a sender at 10.9.0.66, no node's address, planted %v -> %v -> %v in the backup's table", forged.client, forged.virtual, forged.real)
}

// forger gives a sender at 10.9.0.66, an address on a's sync link that is
// no node's, and the established connection it forges: forge sends one
// sync message (sync ID 9) planting it, to the sync daemons' group.
func (l *syncLab) forger(t *testing.T) (forged ipvsConn, forge func()) {
	t.Helper()
	for _, args := range [][]string{{"addr", "add", "10.9.0.66/24", "dev", "sa"}, {"route", "add", "224.0.0.0/4", "dev", "sa"}} {
		if out, err := exec.Command("ip", append([]string{"-n", l.a}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	forged = ipvsConn{
		client:  netip.MustParseAddrPort("10.7.0.66:4444"),
		virtual: netip.MustParseAddrPort("192.0.2.1:80"),
		real:    netip.MustParseAddrPort("10.66.66.66:80"),
	}
	msg := syncMessage(9, forged)
	return forged, func() {
		t.Helper()
		if err := inNetns(l.a, func() error {
			c, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("10.9.0.66:0")), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("224.0.0.81:8848")))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write(msg)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// syncMessage is an IPVS sync message of protocol version 1 with one
// established TCP connection (struct ip_vs_sync_mesg and ip_vs_sync_v4,
// net/netfilter/ipvs/ip_vs_sync.c), as a master sends it.
func syncMessage(syncID uint8, c ipvsConn) []byte {
	const connSize = 36
	b := []byte{0, syncID, 0, 0, 1, 1, 0, 0} // reserved, syncid, size, nr_conns, version, spare
	binary.BigEndian.PutUint16(b[2:], 8+connSize)
	b = append(b, 0, 6) // type (IPv4), protocol (TCP)
	b = binary.BigEndian.AppendUint16(b, connSize)
	b = binary.BigEndian.AppendUint32(b, 0) // flags: masquerade
	b = binary.BigEndian.AppendUint16(b, 1) // state: IP_VS_TCP_S_ESTABLISHED
	b = binary.BigEndian.AppendUint16(b, c.client.Port())
	b = binary.BigEndian.AppendUint16(b, c.virtual.Port())
	b = binary.BigEndian.AppendUint16(b, c.real.Port())
	b = binary.BigEndian.AppendUint32(b, 0)   // fwmark
	b = binary.BigEndian.AppendUint32(b, 900) // timeout, seconds
	for _, a := range []netip.Addr{c.client.Addr(), c.virtual.Addr(), c.real.Addr()} {
		a4 := a.As4()
		b = append(b, a4[:]...)
	}
	return b
}

// ipvsConn is an entry of /proc/net/ip_vs_conn.
type ipvsConn struct{ client, virtual, real netip.AddrPort }

func contains(cs []ipvsConn, c ipvsConn) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}

// conns reads namespace ns's IPVS connection table (IPv4 entries).
func conns(t *testing.T, ns string) []ipvsConn {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "cat", "/proc/net/ip_vs_conn").Output()
	if err != nil {
		t.Fatalf("read %s's connections: %v", ns, err)
	}
	var cs []ipvsConn
	for _, line := range strings.Split(string(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 7 {
			continue
		}
		ap := func(addr, port string) netip.AddrPort {
			b, err1 := hex.DecodeString(addr)
			p, err2 := strconv.ParseUint(port, 16, 16)
			a, ok := netip.AddrFromSlice(b)
			if err1 != nil || err2 != nil || !ok {
				return netip.AddrPort{}
			}
			return netip.AddrPortFrom(a, uint16(p))
		}
		cs = append(cs, ipvsConn{client: ap(f[1], f[2]), virtual: ap(f[3], f[4]), real: ap(f[5], f[6])})
	}
	return cs
}

// inNetns runs f on a thread of its own in namespace name, so that the
// sockets f opens live there; the thread stays locked and dies with its
// goroutine.
func inNetns(name string, f func() error) error {
	h, err := netns.GetFromName(name)
	if err != nil {
		return err
	}
	defer h.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// TestSyncGuardKeepsForgedEntriesOut: with keeplb's nftables table in the
// backup's namespace admitting sync messages from the master's address
// only (nft.SyncGuard), the backup installs the master's entries and none
// of a stranger's. The forged datagram of TestSyncDaemonTakesForgedEntries
// goes out before every echo exchange of a real connection through the
// master, until that connection's entry reaches the backup: the forged
// one, sent first each time, is then still absent, and the guard counted
// its drops.
func TestSyncGuardKeepsForgedEntriesOut(t *testing.T) {
	if inVM(t) {
		return
	}
	l := newSyncLab(t)
	n, err := nft.NewAt("/run/netns/" + l.b)
	if err != nil {
		t.Fatal(err)
	}
	e, err := nft.Compute(nft.Rules{Sync: nft.SyncGuard{Ports: []uint16{8848}, Peers: []netip.Addr{netip.MustParseAddr("10.9.0.1")}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := nft.Whole(t.Context(), n, e); err != nil {
		t.Fatal(err)
	}
	if err := l.ha.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncMaster, Interface: "sa", SyncID: 9}); err != nil {
		t.Fatal(err)
	}
	if err := l.hb.StartSyncDaemon(ipvs.SyncDaemon{State: ipvs.SyncBackup, Interface: "sb", SyncID: 9}); err != nil {
		t.Fatal(err)
	}
	forged, forge := l.forger(t)
	conn := l.dial(t)
	r := bufio.NewReader(conn)
	real := func() bool {
		for _, c := range conns(t, l.b) {
			if c.real == l.real.AddrPort() && c.virtual == forged.virtual {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(20 * time.Second)
	exchanges := 0
	for !real() {
		if time.Now().After(deadline) {
			t.Fatalf("the master's connection did not reach the backup in 20s (%d exchanges); its table: %v", exchanges, conns(t, l.b))
		}
		forge()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(conn, "ping\n"); err != nil {
			t.Fatal(err)
		}
		if got, err := r.ReadString('\n'); err != nil || got != "ping\n" {
			t.Fatalf("echo: %q, %v", got, err)
		}
		exchanges++
		time.Sleep(50 * time.Millisecond) // the pace of a stream, not an assertion
	}
	if contains(conns(t, l.b), forged) {
		t.Fatalf("the backup took the forged entry through the sync guard: %v", conns(t, l.b))
	}
	out, err := exec.Command("ip", "netns", "exec", l.b, "nft", "list", "chain", "inet", "keeplb", nft.ChainSync).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list chain: %v %s", err, out)
	}
	if !strings.Contains(string(out), "counter packets") || strings.Contains(string(out), "ip saddr != @sync-peers-v4 counter packets 0 ") {
		t.Errorf("the sync guard counted no drop of the %d forged datagrams:\n%s", exchanges, out)
	}
	t.Logf("the master's connection reached the backup after %d exchanges, each after a forged datagram; the backup took none of them", exchanges)
}
