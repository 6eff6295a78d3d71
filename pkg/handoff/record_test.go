package handoff

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 7, 1, 0, 0, 0, time.UTC)

func record() Record {
	return Record{
		Node: "node-a", BootID: "boot-1", Written: t0, Deadline: t0.Add(30 * time.Second),
		Instances: map[string][]netip.Prefix{
			"kl_pool_v4_b00": {netip.MustParsePrefix("10.0.0.2/32"), netip.MustParsePrefix("10.0.0.1/32")},
			"kl_pool_v6_b01": {netip.MustParsePrefix("2001:db8::1/128")},
		},
	}
}

func TestWriteTake(t *testing.T) {
	dir := t.TempDir()
	if err := Write(dir, record()); err != nil {
		t.Fatal(err)
	}
	got, ok, why := Take(dir, "node-a", "boot-1", t0.Add(29*time.Second))
	if !ok || why != nil {
		t.Fatalf("Take = ok %v, %v; want a valid record", ok, why)
	}
	want := []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32"), netip.MustParsePrefix("10.0.0.2/32"), netip.MustParsePrefix("2001:db8::1/128")}
	if !slices.Equal(got.VIPs(), want) {
		t.Errorf("VIPs = %v, want %v", got.VIPs(), want)
	}
	if _, err := os.Stat(filepath.Join(dir, FileName)); !os.IsNotExist(err) {
		t.Errorf("the record is still there after Take (stat: %v): a second start would adopt again", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("Write left %d files behind", len(entries))
	}
}

func TestTakeVoid(t *testing.T) {
	for name, tc := range map[string]struct {
		node, boot string
		at         time.Time
		raw        string
		wantErr    string
	}{
		"missing":      {node: "node-a", boot: "boot-1", at: t0, raw: "-"},
		"other node":   {node: "node-b", boot: "boot-1", at: t0, wantErr: `of node "node-a"`},
		"other boot":   {node: "node-a", boot: "boot-2", at: t0, wantErr: "another boot"},
		"expired":      {node: "node-a", boot: "boot-1", at: t0.Add(30 * time.Second), wantErr: "expired"},
		"future":       {node: "node-a", boot: "boot-1", at: t0.Add(-time.Second), wantErr: "after now"},
		"garbage":      {node: "node-a", boot: "boot-1", at: t0, raw: "{not json", wantErr: "hand-off record"},
		"unknown keys": {node: "node-a", boot: "boot-1", at: t0, raw: `{"node":"node-a","extra":1}`, wantErr: "unknown field"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			switch tc.raw {
			case "-":
			case "":
				if err := Write(dir, record()); err != nil {
					t.Fatal(err)
				}
			default:
				if err := os.WriteFile(filepath.Join(dir, FileName), []byte(tc.raw), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, ok, why := Take(dir, tc.node, tc.boot, tc.at)
			if ok {
				t.Fatal("Take accepted a void record")
			}
			if tc.wantErr == "" && why != nil || tc.wantErr != "" && (why == nil || !strings.Contains(why.Error(), tc.wantErr)) {
				t.Errorf("why = %v, want %q", why, tc.wantErr)
			}
			if _, err := os.Stat(filepath.Join(dir, FileName)); !os.IsNotExist(err) {
				t.Errorf("a void record stays (stat: %v)", err)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for name, raw := range map[string]string{
		"no node":        `{"written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z"}`,
		"deadline first": `{"node":"a","written":"2026-12-07T01:00:30Z","deadline":"2026-12-07T01:00:00Z"}`,
		"zone":           `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z","instances":{"i":["fe80::1%eth0/128"]}}`,
		"mapped":         `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z","instances":{"i":["::ffff:10.0.0.1/128"]}}`,
		"network":        `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z","instances":{"i":["10.0.0.0/24"]}}`,
		"empty name":     `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z","instances":{"":["10.0.0.1/32"]}}`,
		"trailing":       `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z"} {}`,
		"a year":         `{"node":"a","written":"2026-12-07T01:00:00Z","deadline":"2027-12-07T01:00:00Z"}`,
	} {
		if _, err := Parse([]byte(raw)); err == nil {
			t.Errorf("%s: Parse accepted %s", name, raw)
		}
	}
}

func TestPatience(t *testing.T) {
	for _, tc := range []struct{ timeout, advert, want time.Duration }{
		{30 * time.Second, time.Second, 10 * time.Second},
		{10 * time.Second, time.Second, 3340 * time.Millisecond}, // 3 × 3.34 s ≥ 10 s
		{time.Second, 2 * time.Second, 2 * time.Second},          // never shorter than today's
		{10 * time.Minute, time.Second, MaxAdvert},               // what VRRPv3 can carry
	} {
		got := Patience(tc.timeout, tc.advert)
		if got != tc.want {
			t.Errorf("Patience(%v, %v) = %v, want %v", tc.timeout, tc.advert, got, tc.want)
		}
		if got%(10*time.Millisecond) != 0 {
			t.Errorf("Patience(%v, %v) = %v: not whole centiseconds", tc.timeout, tc.advert, got)
		}
		if got < MaxAdvert && 3*got < tc.timeout {
			t.Errorf("Patience(%v, %v) = %v: the backups would wait less than the timeout", tc.timeout, tc.advert, got)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"node":"a","bootID":"b","written":"2026-12-07T01:00:00Z","deadline":"2026-12-07T01:00:30Z","instances":{"i":["10.0.0.1/32","2001:db8::1/128"]}}`))
	f.Add([]byte(`{"node":"a","instances":{"i":["fe80::1%eth0/128"]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Parse(data)
		if err != nil {
			return
		}
		// What Parse accepts, the replacement puts on the node: host
		// addresses without zones, and a deadline after it was written.
		if r.Node == "" || !r.Deadline.After(r.Written) || r.Deadline.Sub(r.Written) > MaxTimeout {
			t.Fatalf("accepted %+v", r)
		}
		for _, p := range r.VIPs() {
			if !p.IsSingleIP() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
				t.Fatalf("accepted VIP %v", p)
			}
		}
		// And it survives its own round trip.
		dir := t.TempDir()
		r.BootID = "x"
		if err := Write(dir, r); err != nil {
			t.Fatal(err)
		}
		if _, ok, why := Take(dir, r.Node, "x", r.Written); !ok {
			t.Fatalf("a written record does not read back: %v", why)
		}
	})
}
