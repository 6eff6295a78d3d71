package vrrp

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
	"github.com/keeplb/keeplb/pkg/vrrp"
)

// poolAndIP puts a Service in the named IPPool at the given address.
func poolAndIP(pool, ip string) func(*v1.Service) {
	return func(s *v1.Service) {
		s.Annotations = map[string]string{v1alpha1.AnnotationPool: pool, v1alpha1.AnnotationIPs: ip}
	}
}

// TestFailbackPolicies: a VIP of a failback Never pool stays on the node
// that took it over when its planned master comes back, while a VIP of a
// failback Immediate pool with the same planned master goes back to it at
// once. The second VIP is the witness that the planned master's keepalived
// is up and winning elections while the first one stays away.
func TestFailbackPolicies(t *testing.T) {
	c := newCluster(t)
	const returns, stays = "10.77.0.210", "10.77.0.200"
	keeplbtest.CreatePool(t, c.dyn, "immediate", `{addresses: ["10.77.0.210-10.77.0.219"], vrrp: {advertisementInterval: "100ms", virtualRouterIDs: "80-99", failback: Immediate}}`)
	c.service("returns", poolAndIP("immediate", returns))
	if got := c.vip("returns"); got != returns {
		t.Fatalf("returns got %s, want %s", got, returns)
	}
	m := c.plannedMaster(returns)

	// The Never pool's name decides its instance's planned master: try
	// names until it is m, with the Service it will have.
	never := ""
	for i := range 30 {
		name := fmt.Sprintf("never-%d", i)
		keeplbtest.CreatePool(t, c.dyn, name, `{addresses: ["10.77.0.200-10.77.0.209"], vrrp: {advertisementInterval: "100ms", virtualRouterIDs: "60-79", failback: Never}}`)
		svc := &v1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "e2e", Name: "stays", Annotations: map[string]string{v1alpha1.AnnotationPool: name}},
			Spec:       v1.ServiceSpec{Type: v1.ServiceTypeLoadBalancer, Ports: []v1.ServicePort{{Port: 80, Protocol: v1.ProtocolTCP}}},
			Status:     v1.ServiceStatus{LoadBalancer: v1.LoadBalancerStatus{Ingress: []v1.LoadBalancerIngress{{IP: stays}}}},
		}
		if c.plannedMaster(stays, svc) == m {
			never = name
			break
		}
		if err := c.dyn.Resource(v1alpha1.IPPoolResource).Delete(t.Context(), name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if never == "" {
		t.Fatalf("no Never pool name of 30 tried gives planned master %s", m)
	}
	c.service("stays", poolAndIP(never, stays))
	if got := c.vip("stays"); got != stays || c.plannedMaster(stays) != m {
		t.Fatalf("stays got %s, planned on %s; want %s on %s", got, c.plannedMaster(stays), stays, m)
	}

	// m starts first, so holds both; it leaves gracefully; both move.
	c.startMasterFirst(stays)
	eventually(t, 15*time.Second, "both VIPs on "+m, func() bool {
		return slices.Equal(c.tp.holders(stays), []string{m}) && slices.Equal(c.tp.holders(returns), []string{m})
	})
	c.stopSpeaker(m)
	taker := ""
	eventually(t, 10*time.Second, "both VIPs to leave "+m, func() bool {
		hs, hr := c.tp.holders(stays), c.tp.holders(returns)
		if len(hs) == 1 && hs[0] != m && len(hr) == 1 && hr[0] != m {
			taker = hs[0]
			return true
		}
		return false
	})

	// m comes back: Immediate's VIP returns, Never's stays.
	c.startSpeaker(m)
	start := time.Now()
	eventually(t, 20*time.Second, returns+" (Immediate) back on "+m, func() bool {
		return slices.Equal(c.tp.holders(returns), []string{m}) && slices.Equal(c.tp.holders(stays), []string{taker})
	})
	t.Logf("failback Immediate: %s back on %s %s after its speaker started", returns, m, time.Since(start).Round(10*time.Millisecond))
	c.steady("failback Never, "+m+" back and master of the Immediate pool", []string{stays}, map[string][]string{stays: {taker}}, 5*time.Second)
	t.Logf("failback Never: %s stayed on %s for 5 s (50 adverts) with its planned master %s up", stays, taker, m)
}

// move is a VIP's change of holder: when, and to which node.
type move struct {
	at time.Time
	to string
}

// moves samples the holders of the VIPs vips returns every 50 ms until
// stop is closed, and returns, for each VIP, its moves after it first had
// a holder (a sample with one holder other than the last), and when it
// first had one.
func (c *cluster) moves(vips func() []string, stop <-chan struct{}) func() (moves map[string][]move, first map[string]time.Time) {
	done := make(chan struct{})
	moves, first := map[string][]move{}, map[string]time.Time{}
	go func() {
		defer close(done)
		last := map[string]string{}
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			all := c.tp.allHolders()
			for _, v := range vips() {
				h := all[v]
				if len(h) != 1 {
					continue
				}
				switch prev, ok := last[v]; {
				case !ok:
					first[v] = time.Now()
				case prev != h[0]:
					moves[v] = append(moves[v], move{time.Now(), h[0]})
				}
				last[v] = h[0]
			}
		}
	}()
	return func() (map[string][]move, map[string]time.Time) { <-done; return moves, first }
}

// TestFailbackDelayedUnderChurn: a node that comes back takes its VIP back
// once the pool's failback delay has passed, although a Service is added
// every 2 s meanwhile and every one reloads keepalived on every node.
// keepalived's preempt_delay, which keeplb used before the speaker's hold,
// restarts at every reload, and the node never took the VIP back. It
// also checks that the churn's new VIPs start where the plan puts them:
// none moves, but those that joined an instance the node that came back
// was held down on, which move with it.
func TestFailbackDelayedUnderChurn(t *testing.T) {
	c := newCluster(t)
	const delay = 8 * time.Second
	keeplbtest.CreatePool(t, c.dyn, "delayed", `{addresses: ["10.77.0.200-10.77.0.249"], vrrp: {advertisementInterval: "250ms", virtualRouterIDs: "100-119", failbackDelay: "8s"}}`)
	c.service("watched", inPool("delayed"))
	vip := c.vip("watched")
	m := c.plannedMaster(vip)
	metrics := map[string]string{m: c.startWithMetrics(m)}
	eventually(t, 15*time.Second, vip+" held by its planned master "+m, func() bool {
		return slices.Equal(c.tp.holders(vip), []string{m})
	})
	for _, ns := range c.tp.nodes {
		if ns != m {
			metrics[ns] = c.startWithMetrics(ns)
		}
	}
	c.waitBackups(vip, m, metrics)
	c.stopSpeaker(m)
	taker := ""
	eventually(t, 10*time.Second, vip+" to leave "+m, func() bool {
		h := c.tp.holders(vip)
		if len(h) == 1 && h[0] != m {
			taker = h[0]
			return true
		}
		return false
	})

	// The churn: a Service every 2 s, each a keepalived reload everywhere.
	// keepalived restarts a backup's Master_Down_Interval at every reload,
	// so with reloads more often than that interval no backup ever takes
	// over: 250 ms adverts (about 0.8 s) leave room between reloads, and
	// tolerate a reload that stalls adverts on a loaded machine.
	stop := make(chan struct{})
	var mu sync.Mutex
	var names []string
	churnDone := make(chan struct{})
	go func() {
		defer close(churnDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Second):
			}
			name := fmt.Sprintf("churn-%02d", i)
			c.service(name, inPool("delayed"))
			mu.Lock()
			names = append(names, name)
			mu.Unlock()
		}
	}()
	addrs := map[string]string{} // the churn's Services' VIPs, by name, once the controller set them
	churned := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := []string{vip}
		for _, n := range names {
			if addrs[n] == "" {
				if s, err := c.client.CoreV1().Services("e2e").Get(context.Background(), n, metav1.GetOptions{}); err == nil && len(s.Status.LoadBalancer.Ingress) > 0 {
					addrs[n] = s.Status.LoadBalancer.Ingress[0].IP
				}
			}
			if addrs[n] != "" {
				out = append(out, addrs[n])
			}
		}
		return out
	}
	watch := c.moves(churned, stop)

	c.startSpeaker(m)
	start := time.Now()
	// Held: the speaker needs a second or so to start; the hold counts
	// from its start, so until 2 s before the delay, vip stays.
	c.steady(m+" held down, "+vip+" stays on "+taker, []string{vip}, map[string][]string{vip: {taker}}, delay-2*time.Second)
	eventually(t, 15*time.Second, vip+" back on "+m+" while Services keep coming", func() bool {
		return slices.Equal(c.tp.holders(vip), []string{m})
	})
	back := time.Since(start)
	// A few more reloads: it stays.
	c.steady(vip+" stays on "+m, []string{vip}, map[string][]string{vip: {m}}, 3*time.Second)
	close(stop)
	<-churnDone
	moves, first := watch()
	if len(moves[vip]) != 1 {
		t.Errorf("%s moved %d times after the churn began, want once (back to %s)", vip, len(moves[vip]), m)
	}
	all := churned()[1:]
	if len(all) < int(delay/(2*time.Second)) {
		t.Fatalf("only %d Services added during the hold: the churn proves nothing", len(all))
	}
	// A new VIP starts on its planned master (the other nodes defer a
	// new instance for a grace), so the churn's VIPs move only when they
	// joined an instance m, back, was held down on (to m, once, at the
	// hold's end), or, on a loaded machine, when their planned master's
	// speaker came after the grace (to it, once, at once).
	planned := map[string]string{}
	for _, inst := range c.plan().Instances {
		for _, a := range inst.VIPs {
			planned[a.String()] = inst.Master()
		}
	}
	var moved []string
	for _, v := range all {
		for _, mv := range moves[v] {
			moved = append(moved, fmt.Sprintf("%s to %s +%s", v, mv.to, mv.at.Sub(first[v]).Round(10*time.Millisecond)))
		}
		if n := len(moves[v]); n > 1 || n == 1 && moves[v][0].to != planned[v] {
			t.Errorf("new VIP %s moved %d times: %v; want at most once, to its planned master %s", v, n, moves[v], planned[v])
		}
	}
	t.Logf("moves row: | churn: a Service every 2 s (%d, each a keepalived reload on every node), 250 ms adverts, while a node that came back waits %v (failback Delayed) | new VIPs: %d moves of %d; the returned node's VIP: %d move, back %s after its speaker started |",
		len(all), delay, len(moved), len(all), len(moves[vip]), back.Round(10*time.Millisecond))
	t.Logf("failback Delayed 8s: %s back on %s %s after its speaker started, with %d Services added 2 s apart (each a reload on every node); moves of the new VIPs after their first holder: %d of %d %v",
		vip, m, back.Round(10*time.Millisecond), len(all), len(moved), len(all), moved)
}

// TestCreationBurst creates a pool and, at once, a burst of Services in
// it, with every speaker up: every VIP starts on its planned master and
// none moves afterwards. Before the new instances were deferred on the
// other nodes, most of a burst's VIPs started on whichever node configured
// their instance first and moved to their planned master 60 s later (344 of
// 500 on one node, then all moved in one second).
func TestCreationBurst(t *testing.T) {
	const n = 120
	c := newCluster(t)
	for _, ns := range c.tp.nodes {
		c.startSpeaker(ns)
	}
	keeplbtest.CreatePool(t, c.dyn, "burst", `{addresses: ["10.77.0.128-10.77.0.254"], vrrp: {advertisementInterval: "1s", virtualRouterIDs: "1-64"}}`)
	// Watch from before the first Service: a VIP that started on another
	// node and moved within a second would be missed otherwise.
	stop := make(chan struct{})
	watch := c.moves(func() []string {
		var out []string
		if l, err := c.client.CoreV1().Services("e2e").List(context.Background(), metav1.ListOptions{}); err == nil {
			for _, s := range l.Items {
				if len(s.Status.LoadBalancer.Ingress) > 0 {
					out = append(out, s.Status.LoadBalancer.Ingress[0].IP)
				}
			}
		}
		return out
	}, stop)
	start := time.Now()
	for i := range n {
		c.service(fmt.Sprintf("b%03d", i), inPool("burst"))
	}
	created := time.Since(start)
	var vips []string
	for i := range n {
		vips = append(vips, c.vip(fmt.Sprintf("b%03d", i)))
	}
	planned := map[string]string{}
	p := c.plan()
	for _, v := range vips {
		a := netip.MustParseAddr(v)
		for _, inst := range p.Instances {
			if slices.Contains(inst.VIPs, a) {
				planned[v] = inst.Master()
			}
		}
	}
	eventually(t, 60*time.Second, "every VIP of the burst on its planned master", func() bool {
		all := c.tp.allHolders()
		for _, v := range vips {
			if h := all[v]; len(h) != 1 || h[0] != planned[v] {
				return false
			}
		}
		return true
	})
	settled := time.Since(start)
	// Twice the grace: a deferred instance comes back into the others'
	// configurations in that time, and a move would show.
	time.Sleep(2 * vrrp.NewInstanceGrace(vrrp.Instance{Advert: time.Second}))
	close(stop)
	moves, first := watch()
	// A VIP that started on its planned master never moves. One whose
	// planned master's speaker came later than the grace (a loaded
	// machine: make test runs this next to other packages, under the race
	// detector) starts on another node and moves once, to its planned
	// master, at once: the instance has no preempt_delay while new.
	moved := 0
	for _, v := range vips {
		if len(moves[v]) == 0 {
			continue
		}
		moved++
		grace := vrrp.NewInstanceGrace(vrrp.Instance{Advert: time.Second})
		if mv := moves[v][0]; len(moves[v]) > 1 || mv.to != planned[v] || mv.at.Sub(first[v]) > 2*grace {
			t.Errorf("%s moved %v after it first had a holder; want at most once, to its planned master %s, within %v", v, moves[v], planned[v], 2*grace)
		}
	}
	per := map[string]int{}
	for _, m := range planned {
		per[m]++
	}
	t.Logf("moves row: | creation burst: a new pool and %d Services at once, every speaker up, 1 s adverts | %d of %d VIPs moved (each once, to its planned master, whose speaker came late); every VIP on its planned master %s after the first Service |",
		n, moved, n, settled.Round(10*time.Millisecond))
	t.Logf("a new pool and %d Services created in %s: every VIP on its planned master %s after the first was created, %d moved from their first holder (watched until two graces after); VIPs per node %v",
		n, created.Round(10*time.Millisecond), settled.Round(10*time.Millisecond), moved, per)
}
