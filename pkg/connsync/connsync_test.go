package connsync

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/keeplb/keeplb/pkg/hostnet"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

var (
	nodes = []vrrp.Node{
		{Name: "node-a", InternalIPs: addrs("10.0.0.1", "fd00::1")},
		{Name: "node-b", InternalIPs: addrs("10.0.0.2", "fd00::2")},
		{Name: "node-c", InternalIPs: addrs("fd00::3")}, // no IPv4
		{Name: "node-d", InternalIPs: addrs("10.0.0.4")},
		{Name: "node-e", InternalIPs: addrs("10.0.0.2")}, // the same as b's
	}
	links = []hostnet.Link{
		{Name: "lo", Prefixes: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/8")}},
		{Name: "eth1", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/24"), netip.MustParsePrefix("fd00::1/64")}},
	}
)

// TestCompute: the daemons go on the link that holds the node's
// InternalIP of the group's family (or the one given), the guard covers
// every thread's port and admits the other nodes' addresses of that
// family, each once; and a node whose link cannot be found runs nothing
// and says what to give.
func TestCompute(t *testing.T) {
	if w := Compute(Config{}, "node-a", nodes, links); len(w.Daemons) != 0 || len(w.Guard.Ports) != 0 || w.Problem != nil || w.FollowVIP {
		t.Errorf("disabled: %+v; want nothing", w)
	}

	w := Compute(Config{Enabled: true, SyncID: 7}, "node-a", nodes, links)
	if w.Problem != nil {
		t.Fatal(w.Problem)
	}
	if !w.FollowVIP {
		t.Error("enabled: the masquerade does not follow the VIP")
	}
	want := []ipvs.SyncDaemon{
		{State: ipvs.SyncMaster, Interface: "eth1", SyncID: 7},
		{State: ipvs.SyncBackup, Interface: "eth1", SyncID: 7},
	}
	if !slices.Equal(w.Daemons, want) {
		t.Errorf("daemons %v; want %v", w.Daemons, want)
	}
	if !slices.Equal(w.Guard.Peers, addrs("10.0.0.2", "10.0.0.4")) {
		t.Errorf("peers %v; want the other nodes' IPv4 InternalIPs, each once", w.Guard.Peers)
	}
	if n := len(w.Guard.Ports); n != MaxThreads || w.Guard.Ports[0] != DefaultPort || w.Guard.Ports[n-1] != DefaultPort+MaxThreads-1 {
		t.Errorf("guarded ports %v; want %d to %d", w.Guard.Ports, DefaultPort, DefaultPort+MaxThreads-1)
	}

	group := netip.MustParseAddr("ff05::8848")
	w = Compute(Config{Enabled: true, Group: group, Port: 9000}, "node-a", nodes, links)
	if w.Problem != nil || w.Daemons[0].Interface != "eth1" || w.Daemons[1].Group != group || w.Daemons[1].Port != 9000 {
		t.Errorf("IPv6 group: %+v", w)
	}
	if !slices.Equal(w.Guard.Peers, addrs("fd00::2", "fd00::3")) || w.Guard.Ports[0] != 9000 {
		t.Errorf("IPv6 group: peers %v, first port %d; want the IPv6 InternalIPs, from 9000", w.Guard.Peers, w.Guard.Ports[0])
	}

	if w := Compute(Config{Enabled: true, Interface: "bond0"}, "node-c", nodes, nil); w.Problem != nil || w.Daemons[0].Interface != "bond0" {
		t.Errorf("given interface: %+v", w)
	}
	for _, tc := range []struct{ node, want string }{
		{"node-c", "no IPv4 InternalIP"},
		{"node-d", "no link of this node holds its InternalIP 10.0.0.4"},
		{"node-x", "no IPv4 InternalIP"},
	} {
		w := Compute(Config{Enabled: true}, tc.node, nodes, links)
		if w.Problem == nil || !strings.Contains(w.Problem.Error(), tc.want) || !strings.Contains(w.Problem.Error(), "--conn-sync-interface") || len(w.Daemons) != 0 || !w.FollowVIP {
			t.Errorf("%s: %+v; want no daemon, a problem saying %q and the flag, and the masquerade following the VIP all the same", tc.node, w, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		c   Config
		err string
	}{
		{Config{}, ""},
		{Config{Enabled: true}, ""},
		{Config{Enabled: true, Interface: "eth0", Group: netip.MustParseAddr("239.1.2.3"), Port: 65472}, ""},
		{Config{Enabled: true, Port: 65473}, "--conn-sync-port 65473"},
		{Config{Enabled: true, Group: netip.MustParseAddr("10.0.0.1")}, "not a multicast address"},
		{Config{Enabled: true, Interface: "an-interface-name-too-long"}, "interface"},
		{Config{Enabled: true, Group: netip.MustParseAddr("ff02::8848")}, "link-local group"},
		{Config{Enabled: true, Group: netip.MustParseAddr("ff05::8848")}, ""},
	} {
		err := tc.c.Validate()
		if (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%+v: %v; want %q", tc.c, err, tc.err)
		}
	}
}

// TestApply walks random sequences of wanted states (enabled or not, one
// interface or another) and guard outcomes against the state-modelling
// fake, and after each Apply checks: a backup daemon never runs while
// the table is unguarded; what runs is what is wanted (and guarded); what
// Apply returns is what the kernel lists; and a kernel that refuses the
// starts leaves nothing running and names the daemon.
func TestApply(t *testing.T) {
	k := ipvstesting.New()
	rng := rand.New(rand.NewPCG(1, 2))
	var running []ipvs.SyncDaemon
	backups := 0
	for step := range 300 {
		c := Config{Enabled: rng.IntN(4) != 0, SyncID: 3}
		if rng.IntN(2) == 0 {
			c.Interface = "eth2"
		}
		want := Compute(c, "node-a", nodes, links)
		guarded := rng.IntN(3) != 0
		refuse := rng.IntN(10) == 0
		if refuse {
			k.FailWith(func(call ipvstesting.Call) error {
				if call.Method == "StartSyncDaemon" {
					return syscall.ENOPROTOOPT
				}
				return nil
			})
		}
		var err error
		running, err = Apply(k, running, want, guarded)
		k.FailWith(nil)
		listed, lerr := k.SyncDaemons()
		if lerr != nil {
			t.Fatal(lerr)
		}
		if !slices.Equal(listed, running) {
			t.Fatalf("step %d: Apply says %v run; the kernel lists %v", step, running, listed)
		}
		for _, d := range listed {
			if d.State == ipvs.SyncBackup {
				backups++
				if !guarded {
					t.Fatalf("step %d: a backup daemon runs with the table unguarded: %v", step, listed)
				}
			}
		}
		var expect []ipvs.SyncDaemon
		for _, d := range want.Daemons {
			if d.State == ipvs.SyncMaster || guarded {
				expect = append(expect, d)
			}
		}
		switch {
		case refuse && len(expect) > 0 && !slices.Equal(listed, expect):
			if err == nil || !errors.Is(err, syscall.ENOPROTOOPT) || !strings.Contains(err.Error(), "start the IPVS sync") {
				t.Fatalf("step %d: refused starts gave %v; want the kernel's error, naming the daemon", step, err)
			}
		case !refuse && err != nil:
			t.Fatalf("step %d: %v", step, err)
		case !refuse && !slices.Equal(listed, expect):
			t.Fatalf("step %d: %v run; want %v", step, listed, expect)
		}
	}
	if backups < 50 {
		t.Errorf("a backup ran in only %d steps: the draws test too little", backups)
	}
	if err := Stop(k, running); err != nil {
		t.Fatal(err)
	}
	if listed, _ := k.SyncDaemons(); len(listed) != 0 {
		t.Errorf("after Stop: %v run", listed)
	}
}
