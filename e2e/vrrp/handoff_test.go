package vrrp

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// TestHandOff restarts every speaker in turn, as a DaemonSet rolling
// update does, with the hand-off (package handoff): each speaker is gone
// for longer than its backups' master-down interval, and the VIP must
// stay on its holder alone, answering every request, throughout. Each
// restarted speaker must turn ready (/readyz) before the next one goes.
// Then a hand-off that no replacement adopts: the VIP leaves the holder
// when the backups stop waiting, never on two nodes at once. Then the
// control: the holder's speaker stops without the hand-off, and the VIP
// moves at once.
func TestHandOff(t *testing.T) {
	const (
		advert = 500 * time.Millisecond
		// Longer than the master-down interval of 500 ms adverts (at
		// most 2 s): without the hand-off, a backup would take over.
		gone = 2500 * time.Millisecond
	)
	c := newCluster(t)
	keeplbtest.CreatePool(t, c.dyn, "vips", fmt.Sprintf(`{addresses: ["10.77.0.200-10.77.0.250"], vrrp: {advertisementInterval: %q, failback: Immediate}}`, advert))
	c.service("web")
	vip := c.vip("web")
	addrs := map[string]string{}
	handOff := func(ns string) func(*speaker.Options) {
		return func(o *speaker.Options) {
			o.Handoff, o.HandoffDir, o.HandoffTimeout = speaker.HandoffAlways, filepath.Join(os.TempDir(), "keeplb-e2e-handoff-"+ns), 10*time.Second
			o.MetricsBindAddress, o.MetricsSecure = addrs[ns], false
		}
	}
	for _, ns := range c.tp.nodes {
		addrs[ns] = keeplbtest.FreeAddr(t)
		dir := filepath.Join(os.TempDir(), "keeplb-e2e-handoff-"+ns)
		_ = os.RemoveAll(dir)
		t.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	ready := func(ns string) bool {
		resp, err := http.Get("http://" + addrs[ns] + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	m := c.plannedMaster(vip)
	c.speakers.Start(m, handOff(m))
	eventually(t, 15*time.Second, vip+" held by its planned master "+m, func() bool {
		return slices.Equal(c.tp.holders(vip), []string{m})
	})
	for _, ns := range c.tp.nodes {
		if ns != m {
			c.speakers.Start(ns, handOff(ns))
		}
	}
	for _, ns := range c.tp.nodes {
		eventually(t, 15*time.Second, ns+" ready", func() bool { return ready(ns) })
	}

	// The rolling restart, the holder second.
	order := slices.DeleteFunc(slices.Clone(c.tp.nodes), func(ns string) bool { return ns == m })
	order = slices.Insert(order, 1, m)
	stop := make(chan struct{})
	problems := c.watchHolder(vip, m, time.Duration(len(order))*(gone+5*time.Second), 100*time.Millisecond, stop)
	for _, ns := range order {
		start := time.Now()
		c.speakers.Stop(ns)
		stopped := time.Since(start)
		time.Sleep(gone)
		c.speakers.Start(ns, handOff(ns))
		restarted := time.Now()
		eventually(t, 20*time.Second, ns+" ready again", func() bool { return ready(ns) })
		t.Logf("%s: exit by hand-off %v, gone %v, ready %v after its start", ns, stopped.Round(time.Millisecond), gone, time.Since(restarted).Round(time.Millisecond))
	}
	close(stop)
	ps := problems()
	for _, p := range ps {
		t.Error(p)
	}
	if len(ps) == 0 {
		t.Logf("moves row: | rolling restart of %d speakers with the hand-off, each gone %v | 0 moves: the VIP on %s alone and answering throughout |", len(order), gone, m)
	}
	if conf := keepalivedConf(t, m); !strings.Contains(conf, vip+"/32 dev eth0") {
		t.Errorf("%s's keepalived.conf does not have %s back after the adoption:\n%s", m, vip, conf)
	}

	// No replacement: the holder hands off and stays away. The kernel
	// removes its VIP at the end of the hand-off's timeout, as the
	// backups take over: the VIP is never on two nodes.
	c.speakers.Stop(m)
	c.speakers.Start(m, handOff(m), func(o *speaker.Options) { o.HandoffTimeout = 4 * time.Second })
	eventually(t, 20*time.Second, m+" ready", func() bool { return ready(m) })
	c.speakers.Stop(m)
	left := time.Now()
	for {
		h := c.tp.holders(vip)
		if len(h) > 1 {
			t.Fatalf("%s on %v at once, %v after a hand-off with no replacement", vip, h, time.Since(left).Round(time.Millisecond))
		}
		if len(h) == 1 && h[0] != m {
			t.Logf("no replacement: %s moved to %s %v after the hand-off (timeout 4 s)", vip, h[0], time.Since(left).Round(time.Millisecond))
			break
		}
		if time.Since(left) > 15*time.Second {
			t.Fatalf("%s still on %v 15 s after a hand-off with a 4 s timeout", vip, h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if time.Since(left) < 3*time.Second {
		t.Errorf("the VIP moved %v after the hand-off: the backups did not wait", time.Since(left))
	}
	c.speakers.Start(m, handOff(m))
	eventually(t, 20*time.Second, vip+" back on "+m+" (failback Immediate)", func() bool {
		return ready(m) && slices.Equal(c.tp.holders(vip), []string{m})
	})

	// The control: without the hand-off, the holder's exit moves the VIP.
	c.speakers.Stop(m)
	c.speakers.Start(m, handOff(m), func(o *speaker.Options) { o.Handoff = speaker.HandoffNever })
	eventually(t, 20*time.Second, m+" ready", func() bool { return ready(m) })
	c.speakers.Stop(m)
	eventually(t, 5*time.Second, vip+" to leave "+m, func() bool {
		h := c.tp.holders(vip)
		return len(h) == 1 && h[0] != m
	})
}
