package keepalived_test

import (
	"bytes"
	"flag"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
	"github.com/keeplb/keeplb/pkg/testing/golden"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func prefixes(ss ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range ss {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}

func addrs(ss ...string) []netip.Addr {
	var as []netip.Addr
	for _, s := range ss {
		as = append(as, netip.MustParseAddr(s))
	}
	return as
}

// longNode is a Node name FitName has to shorten for router_id: four DNS
// labels, 253 characters, the most Kubernetes allows.
var longNode = strings.Repeat("n", 63) + "." + strings.Repeat("o", 63) + "." + strings.Repeat("d", 63) + "." + strings.Repeat("e", 61)

// longTail is what tells apart the instances of one pool; FitName keeps it.
const longTail = "_v6_2001-db8-85a3-8d3-1319-8a2e-370-7348"

// longInstance is a Local instance of an IPPool with a long name, shortened.
var longInstance = keepalived.FitName("kl_pool-with-a-very-long-name-for-the-edge-routers.example.internal"+longTail, len(longTail))

// goldenCases are rendered into testdata/<name>.conf. Interfaces are eth0
// and eth1, which the config test creates in its own network namespace.
var goldenCases = []struct {
	name string
	cfg  keepalived.Config
}{
	{"empty", keepalived.Config{}},
	{"multicast_v4_1s", keepalived.Config{
		RouterID:   "node-a",
		NotifyFIFO: "/run/keeplb/keepalived.fifo",
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v4_10", Interface: "eth0", VRID: 10, Priority: 150,
			AdvertInterval: time.Second, Version: 2,
			VIPs: prefixes("192.0.2.10/32"),
		}},
	}},
	{"unicast_v4", keepalived.Config{
		RouterID:          "node-a",
		NotifyFIFO:        "/run/keeplb/keepalived.fifo",
		GARPMasterDelay:   time.Second,
		GARPMasterRefresh: 60 * time.Second,
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v4_11", Interface: "eth0", VRID: 11, Priority: 100,
			AdvertInterval: time.Second, Version: 3,
			UnicastSrc:   netip.MustParseAddr("192.0.2.1"),
			UnicastPeers: addrs("192.0.2.3", "192.0.2.2"),
			PreemptDelay: 2500 * time.Millisecond,
			VIPs:         prefixes("192.0.2.12/32", "192.0.2.11/32"),
		}},
	}},
	{"ipv6_v3", keepalived.Config{
		RouterID: "node-a",
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v6_12", Interface: "eth0", VRID: 12, Priority: 200,
			AdvertInterval: time.Second, Version: 3, IPv6: true, NoPreempt: true,
			VIPs: prefixes("2001:db8::10/128", "2001:db8::2/128"),
		}},
	}},
	{"subsecond_100ms", keepalived.Config{
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v4_13", Interface: "eth0", VRID: 13, Priority: 150,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			VIPs: prefixes("192.0.2.13/32"),
		}},
	}},
	{"subsecond_20ms", keepalived.Config{
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v4_14", Interface: "eth0", VRID: 14, Priority: 150,
			AdvertInterval: 20 * time.Millisecond, Version: 3,
			VIPs: prefixes("192.0.2.14/32"),
		}},
	}},
	{"track_file", keepalived.Config{
		NotifyFIFO: "/run/keeplb/keepalived.fifo",
		TrackFiles: []keepalived.TrackFile{
			{Name: "web-local", Path: "/run/keeplb/track/web-local"},
			{Name: "db-local", Path: "/run/keeplb/track/db-local"},
		},
		Instances: []keepalived.Instance{{
			Name: "web", Interface: "eth0", VRID: 15, Priority: 150,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			TrackFile: "web-local", TrackWeight: -100,
			VIPs: prefixes("192.0.2.15/32"),
		}, {
			Name: "db", Interface: "eth0", VRID: 16, Priority: 150,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			TrackFile: "db-local", TrackWeight: 0, // non-zero value: FAULT
			VIPs: prefixes("192.0.2.16/32"),
		}},
	}},
	{"many_vips", keepalived.Config{
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth1_v4_17", Interface: "eth1", VRID: 17, Priority: 120,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			VIPs: manyVIPs("198.51.100.0", 64),
		}},
	}},
	{"long_names", keepalived.Config{
		RouterID:   keepalived.FitName(longNode, 0),
		NotifyFIFO: "/run/keeplb/notify.fifo",
		TrackFiles: []keepalived.TrackFile{{Name: longInstance, Path: "/run/keeplb/track/" + longInstance}},
		Instances: []keepalived.Instance{{
			Name:      longInstance,
			Comment:   "IPPool pool-with-a-very-long-name-for-the-edge-routers.example.internal, Service default/web",
			Interface: "eth0", VRID: 30, Priority: 100, AdvertInterval: time.Second, Version: 3, IPv6: true,
			TrackFile: longInstance, TrackWeight: 1,
			VIPs: prefixes("2001:db8:85a3:8d3:1319:8a2e:370:7348/128"),
		}},
	}},
	{"dual_stack", keepalived.Config{
		RouterID: "node-b",
		Instances: []keepalived.Instance{{
			Name: "keeplb_eth0_v6_20", Interface: "eth0", VRID: 20, Priority: 90,
			AdvertInterval: 100 * time.Millisecond, Version: 3, IPv6: true,
			VIPs: prefixes("2001:db8::20/128"),
		}, {
			Name: "keeplb_eth0_v4_20", Interface: "eth0", VRID: 20, Priority: 90,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			VIPs: prefixes("192.0.2.20/32"),
		}, {
			Name: "keeplb_eth1_v4_20", Interface: "eth1", VRID: 20, Priority: 90,
			AdvertInterval: 100 * time.Millisecond, Version: 3,
			AdvertAddr: netip.MustParseAddr("169.254.1.20"),
			VIPs:       prefixes("203.0.113.20/32"),
		}},
	}},
}

// manyVIPs returns n /32s after first, in descending order (Render sorts).
func manyVIPs(first string, n int) []netip.Prefix {
	var ps []netip.Prefix
	a := netip.MustParseAddr(first)
	for range n {
		a = a.Next()
		ps = append(ps, netip.PrefixFrom(a, 32))
	}
	slices.Reverse(ps)
	return ps
}

func TestRenderGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := keepalived.Render(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			golden.Check(t, filepath.Join("testdata", tc.name+".conf"), got, *update)
		})
	}
}

// TestRenderOrderIndependent: shuffled slices render the same bytes, and
// Render leaves its input as it was.
func TestRenderOrderIndependent(t *testing.T) {
	for _, tc := range goldenCases {
		want, err := keepalived.Render(tc.cfg)
		if err != nil {
			t.Fatal(err)
		}
		c := tc.cfg
		c.Instances = slices.Clone(c.Instances)
		slices.Reverse(c.Instances)
		c.TrackFiles = slices.Clone(c.TrackFiles)
		slices.Reverse(c.TrackFiles)
		for i := range c.Instances {
			c.Instances[i].VIPs = slices.Clone(c.Instances[i].VIPs)
			slices.Reverse(c.Instances[i].VIPs)
			c.Instances[i].UnicastPeers = slices.Clone(c.Instances[i].UnicastPeers)
			slices.Reverse(c.Instances[i].UnicastPeers)
		}
		before := fmt.Sprint(c)
		got, err := keepalived.Render(c)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: rendering depends on slice order", tc.name)
		}
		if fmt.Sprint(c) != before {
			t.Errorf("%s: Render modified its input", tc.name)
		}
	}
}

// TestGoldenConfigTest runs keepalived --config-test on every golden file,
// in a network namespace that has the interfaces they name.
func TestGoldenConfigTest(t *testing.T) {
	requireKeepalived(t)
	ns := newNetns(t, "cfg")
	ip(t, "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			path, err := filepath.Abs(filepath.Join("testdata", tc.name+".conf"))
			if err != nil {
				t.Fatal(err)
			}
			// keepalived -t reports warnings (an unknown keyword, a missing
			// interface, an option it ignores) with exit status 5.
			out, err := exec.Command("ip", "netns", "exec", ns, "keepalived", "--config-test", "-f", path).CombinedOutput()
			if err != nil || len(bytes.TrimSpace(out)) > 0 {
				t.Errorf("keepalived --config-test -f %s: %v\n%s", path, err, out)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	good := keepalived.Instance{
		Name: "vi", Interface: "eth0", VRID: 1, Priority: 100,
		AdvertInterval: time.Second, Version: 3,
		VIPs: prefixes("192.0.2.1/32"),
	}
	with := func(f func(*keepalived.Instance)) keepalived.Config {
		in := good
		f(&in)
		return keepalived.Config{Instances: []keepalived.Instance{in}}
	}
	for _, tc := range []struct {
		name string
		cfg  keepalived.Config
		want string // substring of the error; "" = valid
	}{
		{"good", with(func(*keepalived.Instance) {}), ""},
		{"no VIPs is fine", with(func(in *keepalived.Instance) { in.VIPs = nil }), ""},
		{"VRID 0", with(func(in *keepalived.Instance) { in.VRID = 0 }), "VRID 0"},
		{"VRID 256", with(func(in *keepalived.Instance) { in.VRID = 256 }), "VRID 256"},
		{"VRID 255", with(func(in *keepalived.Instance) { in.VRID = 255 }), ""},
		{"priority 0", with(func(in *keepalived.Instance) { in.Priority = 0 }), "priority 0"},
		{"priority 255", with(func(in *keepalived.Instance) { in.Priority = 255 }), "priority 255"},
		{"advert 5ms", with(func(in *keepalived.Instance) { in.AdvertInterval = 5 * time.Millisecond }), "advert interval"},
		{"advert 15ms", with(func(in *keepalived.Instance) { in.AdvertInterval = 15 * time.Millisecond }), "multiples of 10ms"},
		{"advert 10ms", with(func(in *keepalived.Instance) { in.AdvertInterval = 10 * time.Millisecond }), ""},
		{"advert 41s v3", with(func(in *keepalived.Instance) { in.AdvertInterval = 41 * time.Second }), "advert interval"},
		{"v2 sub-second", with(func(in *keepalived.Instance) { in.Version = 2; in.AdvertInterval = 100 * time.Millisecond }), "whole seconds"},
		{"v2 IPv6", with(func(in *keepalived.Instance) {
			in.Version = 2
			in.IPv6 = true
			in.VIPs = prefixes("2001:db8::1/128")
		}), "IPv6 needs VRRP version 3"},
		{"version 0", with(func(in *keepalived.Instance) { in.Version = 0 }), "want 2 or 3"},
		{"bad name", with(func(in *keepalived.Instance) { in.Name = "a b" }), "name"},
		{"name with comment", with(func(in *keepalived.Instance) { in.Name = "a#b" }), "name"},
		{"comment with a newline", with(func(in *keepalived.Instance) { in.Comment = "pool p\n}" }), "comment"},
		{"comment too long", with(func(in *keepalived.Instance) { in.Comment = strings.Repeat("c", keepalived.MaxCommentLen+1) }), "comment"},
		{"longest comment", with(func(in *keepalived.Instance) { in.Comment = strings.Repeat("c", keepalived.MaxCommentLen) }), ""},
		{"name too long", with(func(in *keepalived.Instance) { in.Name = strings.Repeat("n", keepalived.MaxNameLen+1) }), "name"},
		{"longest name", with(func(in *keepalived.Instance) { in.Name = strings.Repeat("n", keepalived.MaxNameLen) }), ""},
		{"bad interface", with(func(in *keepalived.Instance) { in.Interface = "eth0 dev" }), "interface"},
		{"long interface", with(func(in *keepalived.Instance) { in.Interface = "abcdefghijklmnop" }), "interface"},
		{"IPv6 VIP in IPv4 instance", with(func(in *keepalived.Instance) { in.VIPs = prefixes("2001:db8::1/128") }), "not IPv4"},
		{"IPv4 VIP in IPv6 instance", with(func(in *keepalived.Instance) { in.IPv6 = true }), "not IPv6"},
		{"VIP /24", with(func(in *keepalived.Instance) { in.VIPs = prefixes("192.0.2.1/24") }), "want /32"},
		{"duplicate VIP", with(func(in *keepalived.Instance) { in.VIPs = prefixes("192.0.2.1/32", "192.0.2.1/32") }), "duplicate"},
		{"unicast without peers", with(func(in *keepalived.Instance) { in.UnicastSrc = netip.MustParseAddr("192.0.2.100") }), "without peers"},
		{"peers without source", with(func(in *keepalived.Instance) { in.UnicastPeers = addrs("192.0.2.101") }), "without a unicast source"},
		{"peer of other family", with(func(in *keepalived.Instance) {
			in.UnicastSrc = netip.MustParseAddr("192.0.2.100")
			in.UnicastPeers = addrs("2001:db8::1")
		}), "not IPv4"},
		{"peer with a zone", with(func(in *keepalived.Instance) {
			in.IPv6 = true
			in.VIPs = nil
			in.UnicastSrc = netip.MustParseAddr("2001:db8::1")
			in.UnicastPeers = addrs("fe80::2%eth0")
		}), "not IPv6"},
		{"IPv4-mapped VIP", with(func(in *keepalived.Instance) {
			in.IPv6 = true
			in.VIPs = prefixes("::ffff:192.0.2.1/128")
		}), "not IPv6"},
		{"peer is source", with(func(in *keepalived.Instance) {
			in.UnicastSrc = netip.MustParseAddr("192.0.2.100")
			in.UnicastPeers = addrs("192.0.2.100")
		}), "is the source"},
		{"preempt delay with nopreempt", with(func(in *keepalived.Instance) { in.NoPreempt = true; in.PreemptDelay = time.Second }), "NoPreempt"},
		{"preempt delay too long", with(func(in *keepalived.Instance) { in.PreemptDelay = 1001 * time.Second }), "preempt delay"},
		{"unknown track file", with(func(in *keepalived.Instance) { in.TrackFile = "nope" }), "not in Config.TrackFiles"},
		{"weight without file", with(func(in *keepalived.Instance) { in.TrackWeight = 10 }), "without a track file"},
		{"advert address of other family", with(func(in *keepalived.Instance) { in.AdvertAddr = netip.MustParseAddr("fe80::1") }), "advert address"},
		{"advert address is a VIP", with(func(in *keepalived.Instance) { in.AdvertAddr = netip.MustParseAddr("192.0.2.1") }), "is a VIP"},
		{"track weight out of range", keepalived.Config{
			TrackFiles: []keepalived.TrackFile{{Name: "f", Path: "/run/f"}},
			Instances:  []keepalived.Instance{func() keepalived.Instance { in := good; in.TrackFile = "f"; in.TrackWeight = 255; return in }()},
		}, "track weight 255"},
		{"relative track path", keepalived.Config{TrackFiles: []keepalived.TrackFile{{Name: "f", Path: "run/f"}}}, "absolute path"},
		{"track path with space", keepalived.Config{TrackFiles: []keepalived.TrackFile{{Name: "f", Path: "/run/a b"}}}, "absolute path"},
		{"duplicate track file", keepalived.Config{TrackFiles: []keepalived.TrackFile{{Name: "f", Path: "/a"}, {Name: "f", Path: "/b"}}}, "duplicate name"},
		{"FIFO with quote", keepalived.Config{NotifyFIFO: `/run/"x`}, "notify FIFO"},
		{"bad router ID", keepalived.Config{RouterID: "a{"}, "router ID"},
		{"GARP delay fraction", keepalived.Config{GARPMasterDelay: 1500 * time.Millisecond}, "whole seconds"},
		{"duplicate instance", keepalived.Config{Instances: []keepalived.Instance{good, func() keepalived.Instance {
			in := good
			in.VRID = 2
			in.VIPs = nil
			return in
		}()}}, "duplicate name"},
		{"duplicate VRID", keepalived.Config{Instances: []keepalived.Instance{good, func() keepalived.Instance {
			in := good
			in.Name = "other"
			in.VIPs = nil
			return in
		}()}}, "VRID 1 already used on eth0"},
		{"same VRID, other family", keepalived.Config{Instances: []keepalived.Instance{good, func() keepalived.Instance {
			in := good
			in.Name = "other"
			in.IPv6 = true
			in.VIPs = prefixes("2001:db8::1/128")
			return in
		}()}}, ""},
		{"same VRID and family on two interfaces", keepalived.Config{Instances: []keepalived.Instance{good, func() keepalived.Instance {
			in := good
			in.Name = "other"
			in.Interface = "eth1"
			in.VIPs = nil
			return in
		}()}}, "advert address 169.254.0.1 already used"},
		{"VIP in two instances", keepalived.Config{Instances: []keepalived.Instance{good, func() keepalived.Instance {
			in := good
			in.Name = "other"
			in.VRID = 2
			return in
		}()}}, "already in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := keepalived.Render(tc.cfg)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tc.want != "" && err == nil:
				t.Errorf("no error, want one containing %q", tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

// TestValidateReportsAll: one call lists every problem.
func TestValidateReportsAll(t *testing.T) {
	err := keepalived.Config{Instances: []keepalived.Instance{{Name: "vi", Interface: "eth0"}}}.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"VRID 0", "priority 0", "version 0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

// TestFitName: names Render accepts stay as they are (instances keep their
// names across upgrades); any other becomes one it accepts, the same every
// time, keeping its tail, and different for names that differ anywhere.
func TestFitName(t *testing.T) {
	for _, name := range []string{"n1", "kl_vips_v4_b00", "node-1.example.internal", strings.Repeat("a", keepalived.MaxNameLen)} {
		if got := keepalived.FitName(name, 7); got != name {
			t.Errorf("FitName(%q) = %q, want it unchanged", name, got)
		}
	}
	long := "kl_" + strings.Repeat("p", 200)
	for _, tc := range []struct {
		name     string
		tail     int
		wantTail string
	}{
		{long + "_v4_b00", 7, "_v4_b00"},
		{long + "_v4_b01", 7, "_v4_b01"},
		{"kl_" + strings.Repeat("p", 199) + "q_v4_b00", 7, "_v4_b00"}, // differs from the first only where it is cut
		{longNode, 0, ""},
		{"a b", 0, ""},
		{"a_b", 0, ""}, // valid: unchanged, and not what "a b" becomes
		{"-starts-with-a-dash", 0, ""},
		{"", 0, ""},
		{"ünïcode", 0, ""},
		{strings.Repeat("x", 300), 500, ""}, // tail longer than the room
	} {
		got := keepalived.FitName(tc.name, tc.tail)
		if got != keepalived.FitName(tc.name, tc.tail) {
			t.Errorf("FitName(%q) is not deterministic", tc.name)
		}
		if !strings.HasSuffix(got, tc.wantTail) {
			t.Errorf("FitName(%q) = %q, want the tail %q kept", tc.name, got, tc.wantTail)
		}
		c := keepalived.Config{RouterID: got, Instances: []keepalived.Instance{{
			Name: got, Interface: "eth0", VRID: 1, Priority: 100, AdvertInterval: time.Second, Version: 3,
		}}}
		if err := c.Validate(); err != nil {
			t.Errorf("FitName(%q) = %q, which Render refuses: %v", tc.name, got, err)
		}
	}
	seen := map[string]string{}
	for _, name := range []string{long + "_v4_b00", long + "_v4_b01", "kl_" + strings.Repeat("p", 199) + "q_v4_b00", "a b", "a/b", "a_b"} {
		got := keepalived.FitName(name, 7)
		if other, ok := seen[got]; ok {
			t.Errorf("FitName gives %q for both %q and %q", got, other, name)
		}
		seen[got] = name
	}
}

// TestRenderValid: a bad instance is left out, with why; the rest renders.
func TestRenderValid(t *testing.T) {
	inst := func(name string, vrid int, iface, vip string) keepalived.Instance {
		return keepalived.Instance{Name: name, Interface: iface, VRID: vrid, Priority: 100, AdvertInterval: time.Second, Version: 3, VIPs: prefixes(vip)}
	}
	zoned := inst("a_zoned_peer", 1, "eth0", "192.0.2.1/32")
	zoned.IPv6, zoned.VIPs = true, prefixes("2001:db8::1/128")
	zoned.UnicastSrc, zoned.UnicastPeers = netip.MustParseAddr("2001:db8::10"), addrs("2001:db8::11", "fe80::12%eth0")
	tracked := inst("c_tracked", 4, "eth0", "192.0.2.4/32")
	tracked.TrackFile, tracked.TrackWeight = "c_tracked", 1
	badTrack := inst("f_bad_track", 6, "eth0", "192.0.2.6/32")
	badTrack.TrackFile, badTrack.TrackWeight = "bad track", 1
	c := keepalived.Config{
		RouterID: "n1",
		TrackFiles: []keepalived.TrackFile{
			{Name: "c_tracked", Path: "/run/keeplb/track/c_tracked"},
			{Name: "bad track", Path: "/run/keeplb/track/bad"},
			{Name: "unused", Path: "/run/keeplb/track/unused"},
		},
		Instances: []keepalived.Instance{
			inst("e_same_anchor", 2, "eth1", "198.51.100.1/32"), // 169.254.0.2, as b_good's
			zoned,
			inst("b_good", 2, "eth0", "192.0.2.2/32"),
			tracked,
			inst("d_same_vip", 5, "eth0", "192.0.2.2/32"),
			badTrack,
			inst("g_anchor_as_vip", 7, "eth0", "169.254.0.2/32"),
		},
	}
	if _, err := keepalived.Render(c); err == nil {
		t.Fatal("Render accepted a configuration with bad instances")
	}
	before := fmt.Sprint(c)
	data, dropped, err := keepalived.RenderValid(c)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(c) != before {
		t.Error("RenderValid modified its input")
	}
	got := map[string]string{}
	for _, d := range dropped {
		got[d.Instance] = d.Error()
	}
	want := map[string]string{
		"a_zoned_peer":    "unicast peer fe80::12%eth0",
		"d_same_vip":      `VIP 192.0.2.2 already in "b_good"`,
		"e_same_anchor":   `advert address 169.254.0.2 already used by "b_good"`,
		"f_bad_track":     `track file name "bad track"`,
		"g_anchor_as_vip": `VIP 169.254.0.2 is the advert address of "b_good"`,
	}
	if len(got) != len(want) {
		t.Errorf("dropped %v, want %v", got, slices.Sorted(maps.Keys(want)))
	}
	for name, w := range want {
		if !strings.Contains(got[name], w) || !strings.Contains(got[name], name) {
			t.Errorf("dropped %q: %q, want it to say %q", name, got[name], w)
		}
	}
	// What stays renders exactly as Render renders it alone.
	ok := c
	ok.Instances = []keepalived.Instance{c.Instances[2], c.Instances[3]}
	ok.TrackFiles = []keepalived.TrackFile{c.TrackFiles[0], c.TrackFiles[2]}
	want2, err := keepalived.Render(ok)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data, want2) {
		t.Errorf("RenderValid rendered\n%s\nwant\n%s", data, want2)
	}
	// Which of two clashing instances stays does not depend on their order.
	slices.Reverse(c.Instances)
	again, _, err := keepalived.RenderValid(c)
	if err != nil || !bytes.Equal(again, data) {
		t.Errorf("RenderValid depends on the order of the instances (err %v)", err)
	}

	// Global settings fail it as a whole.
	c.RouterID = "a b"
	if _, _, err := keepalived.RenderValid(c); err == nil || !strings.Contains(err.Error(), "router ID") {
		t.Errorf("RenderValid with a bad router ID: %v, want an error", err)
	}
}
