package vrrp

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/speaker"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// plan computes the cluster's VRRP plan from the API, as every speaker
// does, with extra Services added to what the API holds (to try out
// addresses before asking for them).
func (c *cluster) plan(extra ...*v1.Service) vrrp.Plan {
	c.t.Helper()
	return keeplbtest.Plan(c.t, c.client, c.dyn, extra...)
}

// plannedMaster returns the node the plan makes master of vip's instance.
func (c *cluster) plannedMaster(vip string, extra ...*v1.Service) string {
	c.t.Helper()
	a := netip.MustParseAddr(vip)
	for _, inst := range c.plan(extra...).Instances {
		if slices.Contains(inst.VIPs, a) {
			return inst.Master()
		}
	}
	c.t.Fatalf("VIP %s is in no instance of the plan", vip)
	return ""
}

// startMasterFirst starts the speaker of vip's planned master, waits until
// it holds vip, then starts the others: they start as backups of lower
// priority, so vip stays where it is, without waiting for the preempt
// delay. It returns the master.
func (c *cluster) startMasterFirst(vip string, mods ...func(*speaker.Options)) string {
	c.t.Helper()
	m := c.plannedMaster(vip)
	c.speakers.Start(m, mods...)
	eventually(c.t, 15*time.Second, vip+" held by its planned master "+m, func() bool {
		return slices.Equal(c.tp.holders(vip), []string{m})
	})
	for _, ns := range c.tp.nodes {
		if ns != m {
			c.speakers.Start(ns)
		}
	}
	return m
}

// watchHolder samples the holders of vip every 50 ms until stop is
// closed, and the client's requests to it every 50 ms for d, and returns
// what went wrong: a sample where vip was not held by holder alone, or
// answered by another node, or a run of unanswered requests longer than
// maxGap.
func (c *cluster) watchHolder(vip, holder string, d, maxGap time.Duration, stop <-chan struct{}) func() []string {
	var mu sync.Mutex
	var problems []string
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			if h := c.tp.holders(vip); !slices.Equal(h, []string{holder}) {
				mu.Lock()
				problems = append(problems, fmt.Sprintf("%s: %s held by %v, want %s alone", time.Now().Format("15:04:05.000"), vip, h, holder))
				mu.Unlock()
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	var ss []sample
	var perr error
	go func() {
		defer wg.Done()
		ss, perr = runProbe(context.Background(), c.tp.client, vip, d, 50*time.Millisecond, "", nil)
	}()
	return func() []string {
		<-stop
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if perr != nil {
			problems = append(problems, "prober: "+perr.Error())
		}
		answered, longest, since := 0, time.Duration(0), time.Duration(-1)
		for _, s := range ss {
			switch s.who {
			case holder:
				answered++
				since = -1
			case "-":
				if since < 0 {
					since = s.at
				}
				longest = max(longest, s.at-since)
			default:
				problems = append(problems, fmt.Sprintf("request at %s answered by %s, not %s", s.at, s.who, holder))
			}
		}
		if answered == 0 || longest > maxGap {
			problems = append(problems, fmt.Sprintf("%d of %d requests answered by %s; longest run without answers %s (bound %s)", answered, len(ss), holder, longest, maxGap))
		}
		return problems
	}
}

// metricValue returns the value of the sample name (with its labels) that
// the speaker serving metrics at addr exports to a caller with token, ""
// when it exports none, or why the scrape failed (never "" then, so that
// a refused scrape never passes for a missing sample).
func metricValue(addr, token, name string) string {
	body, code, err := keeplbtest.Scrape("https://"+addr+"/metrics", token)
	if err != nil || code != http.StatusOK {
		return fmt.Sprintf("scrape failed: %d %v", code, err)
	}
	for line := range strings.Lines(body) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+" "); ok {
			return v
		}
	}
	return ""
}

// TestFailStatic covers issue 9 item 10 with real keepalived: every Node
// marked NotReady through the API (the node lifecycle controller does
// that when kubelets cannot reach an overloaded API server) used to make
// every speaker withdraw every VIP, the data path being fine; and the API
// server going away must not make them withdraw anything either. The VIP
// must stay on its node and keep answering throughout.
func TestFailStatic(t *testing.T) {
	// 1 s adverts: shorter ones make a backup on this loaded, shared
	// machine miss the master's adverts now and then and take over for a
	// moment, which this test would count against fail-static.
	const advert = time.Second
	c := newCluster(t)
	keeplbtest.CreatePool(t, c.dyn, "vips", fmt.Sprintf(`{addresses: ["10.77.0.200-10.77.0.250"], vrrp: {advertisementInterval: %q}}`, advert))
	c.service("web")
	vip := c.vip("web")
	metricsAddr := keeplbtest.FreeAddr(t)
	holder := c.startMasterFirst(vip, func(o *speaker.Options) { o.MetricsBindAddress = metricsAddr })
	token := keeplbtest.MetricsToken(t, c.client, "prometheus", true)
	// Three master-down intervals of a 1 s advert: far more than a
	// speaker takes to see a Node change, reload keepalived and let its
	// peers take over (or let the VIP go).
	window := 3 * vrrp.MasterDown(time.Second, 1)
	maxGap := vrrp.MasterDown(advert, 1) + 200*time.Millisecond

	// 1. Every Node NotReady, the holder's last (marking it first would
	// move its VIP to the next node while at most half are NotReady, as
	// for any failed node, and back once fail-static begins).
	stop := make(chan struct{})
	problems := c.watchHolder(vip, holder, window, maxGap, stop)
	var order []string
	for _, ns := range c.tp.nodes {
		if ns != holder {
			order = append(order, ns)
		}
	}
	for _, ns := range append(order, holder) {
		c.node(ns, false, nil)
	}
	notReady := time.Now()
	eventually(t, 10*time.Second, "the holder's speaker in fail-static (keeplb_vrrp_fail_static{pool=\"vips\"} 1)", func() bool {
		return metricValue(metricsAddr, token, `keeplb_vrrp_fail_static{pool="vips"}`) == "1"
	})
	time.Sleep(time.Until(notReady.Add(window))) // the observation window; the watcher asserts
	close(stop)
	if ps := problems(); len(ps) > 0 {
		t.Fatalf("with every Node NotReady for %s:\n%s", window, strings.Join(ps, "\n"))
	}
	t.Logf("every Node NotReady for %s: %s held by %s throughout and answering", window, vip, holder)

	// Ready again: the plan is the same, nothing moves.
	for _, ns := range c.tp.nodes {
		c.node(ns, true, nil)
	}
	eventually(t, 10*time.Second, "fail-static over", func() bool {
		return metricValue(metricsAddr, token, `keeplb_vrrp_fail_static{pool="vips"}`) == ""
	})

	// 2. The API server goes away: the speakers keep what they have.
	stop = make(chan struct{})
	problems = c.watchHolder(vip, holder, window, maxGap, stop)
	if err := c.cp.Stop(); err != nil {
		t.Fatal(err)
	}
	gone := time.Now()
	time.Sleep(time.Until(gone.Add(window)))
	close(stop)
	if ps := problems(); len(ps) > 0 {
		t.Fatalf("with the API server gone for %s:\n%s", window, strings.Join(ps, "\n"))
	}
	t.Logf("API server gone for %s: %s held by %s throughout and answering", window, vip, holder)
}
