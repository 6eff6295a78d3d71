package keepalived_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

// TestE2EHandOff is the keepalived half of a speaker's hand-off (package
// handoff) on real keepalived: the master announces a long advert
// interval, is killed, and a new keepalived in its namespace takes the
// instance back before its backup gives up, with the VIP on the master's
// interface all along. Then the control: the same kill with the usual
// advert interval, after which the backup takes over.
func TestE2EHandOff(t *testing.T) {
	a, b := newPair(t)
	vip := netip.MustParsePrefix("10.250.0.100/32")
	one := []netip.Prefix{vip}
	a.apply(t, a.config(150, one))
	b.apply(t, b.config(100, one))
	eventually(t, "a MASTER, b BACKUP, VIP on a only", func() bool {
		return a.events.state("vi_1") == keepalived.StateMaster &&
			b.events.state("vi_1") == keepalived.StateBackup && a.hasAddrs(t, vip) && b.hasNone(t, vip)
	})

	// The hand-off: 1 s adverts announced, so b waits 3 s (it would wait
	// 0.36 s at 100 ms adverts), then keepalived killed.
	const patience = time.Second
	patient := a.config(150, one)
	patient.Instances[0].AdvertInterval = patience
	data, err := keepalived.Render(patient)
	if err != nil {
		t.Fatal(err)
	}
	eventsB := b.events.len()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.sup.HandOff(ctx, data, 5*e2eAdvert); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	<-a.done
	if a.proc.Running() {
		t.Fatal("keepalived still runs after the hand-off")
	}

	// The replacement starts 1.5 s later: four master-down intervals of
	// 100 ms adverts. It renders the instance without the VIP until it is
	// master, as a speaker adopting it does.
	stays(t, "VIP on a, b BACKUP with no new event", 1500*time.Millisecond, func() bool {
		return a.hasAddrs(t, vip) && b.hasNone(t, vip) && b.events.len() == eventsB
	})
	a2 := newNode(t, a.ns)
	a2.apply(t, a2.config(150, nil))
	for !(a2.events.state("vi_1") == keepalived.StateMaster) {
		if !a.hasAddrs(t, vip) {
			t.Fatal("the starting keepalived removed the VIP it was not given")
		}
		if b.events.len() != eventsB {
			t.Fatalf("b changed state during the hand-off: %v", b.events.all()[eventsB:])
		}
		if time.Since(killed) > 2*3*patience {
			t.Fatal("the replacement did not become master")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("hand-off: replacement MASTER %v after the kill; b stayed BACKUP", time.Since(killed).Round(time.Millisecond))
	a2.apply(t, a2.config(150, one))
	eventually(t, "the replacement reloaded with the VIP", func() bool { return a2.sup.Status().Reloads == 1 })
	stays(t, "VIP on a, b BACKUP with no new event, back at 100 ms adverts", 10*e2eAdvert, func() bool {
		return a.hasAddrs(t, vip) && b.hasNone(t, vip) && b.events.len() == eventsB
	})

	// The control: a kill without the longer interval; b takes over
	// within a master-down interval.
	plain, err := keepalived.Render(a2.config(150, one))
	if err != nil {
		t.Fatal(err)
	}
	if err := a2.sup.HandOff(ctx, plain, 5*e2eAdvert); err != nil {
		t.Fatal(err)
	}
	killed = time.Now()
	took := b.addrs.waitAdded(t, vip.Addr()).Sub(killed)
	t.Logf("control: b took over %v after a kill with 100 ms adverts", took.Round(time.Millisecond))
	if took > patience {
		t.Errorf("b took over after %v: the control does not show that the announced interval held it back", took)
	}
}
