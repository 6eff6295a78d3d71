package nft

import (
	"errors"
	"fmt"
	"testing"

	"sigs.k8s.io/knftables"
)

// handle is one Interface that renew hands out, over a table they all
// share: as with the real one, the table lives outside the Interface.
type handle struct{ *knftables.Fake }

// TestReleasingRenewsAfterABigWrite: after a Run or Check of more than
// bigTransaction operations the Interface in use is a new one (the old
// one, with its command buffer, can be freed), after a small one it is
// the same, the table written is intact either way, and a renew that
// fails leaves the old Interface in use.
func TestReleasingRenewsAfterABigWrite(t *testing.T) {
	table := knftables.NewFake(Family, Table)
	renewals, fail := 0, false
	r, err := newReleasing(func() (knftables.Interface, error) {
		if fail {
			return nil, errors.New("nft is gone")
		}
		renewals++
		return &handle{table}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	r.big = 200 // bigTransaction's thousands make knftables' fake slow
	big := r.big + 1
	write := func(n int) *knftables.Transaction {
		tx := r.NewTransaction()
		tx.Add(&knftables.Table{})
		tx.Add(&knftables.Set{Name: "s", Type: "ipv4_addr"})
		for i := range n - 2 {
			tx.Add(&knftables.Element{Set: "s", Key: []string{fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)}})
		}
		return tx
	}
	first := r.get()

	if err := r.Run(t.Context(), write(100)); err != nil {
		t.Fatal(err)
	}
	if r.get() != first || renewals != 1 {
		t.Fatalf("after 100 operations: renewed %d times, same Interface %v; want 1 and true", renewals-1, r.get() == first)
	}
	if err := r.Run(t.Context(), write(big)); err != nil {
		t.Fatal(err)
	}
	second := r.get()
	if second == first || renewals != 2 {
		t.Fatalf("after %d operations: renewals %d, same Interface %v; want a new one", big, renewals, second == first)
	}
	if els, err := r.ListElements(t.Context(), "set", "s"); err != nil || len(els) != big-2 {
		t.Fatalf("through the new Interface: %d elements, %v; want the %d written", len(els), err, big-2)
	}
	if err := r.Check(t.Context(), write(big)); err != nil {
		t.Fatal(err)
	}
	if r.get() == second {
		t.Fatal("a big Check did not renew the Interface")
	}
	third := r.get()
	fail = true
	if err := r.Run(t.Context(), write(big)); err != nil {
		t.Fatalf("the write succeeded, but Run returned %v", err)
	}
	if r.get() != third {
		t.Fatal("a renew that failed replaced the Interface")
	}
}
