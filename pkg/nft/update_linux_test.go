package nft_test

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/nft"
)

// TestKernelUpdate applies a sequence of random Rules to a real table by
// element operations alone, and after each checks that nft lists the
// table exactly as it lists a whole write of the same Rules in another
// namespace. It is what checks that nft 1.0.6 and the kernel take every
// update (deletes and adds in concatenated and interval sets, a range
// replaced by one containing it) on a table as written.
func TestKernelUpdate(t *testing.T) {
	requireKernel(t)
	updated, rewritten := newNetns(t, "upd"), newNetns(t, "whole")
	n, w := realNFT{t, updated}.open(), realNFT{t, rewritten}.open()
	list := func(ns string) string {
		t.Helper()
		out, err := nftIn(ns, "", "list", "table", "inet", "keeplb")
		if err != nil {
			t.Fatalf("nft list table inet keeplb: %v: %s", err, out)
		}
		return sortedListing(out)
	}
	run := func(n knftables.Interface, fill func(*knftables.Transaction)) error {
		tx := n.NewTransaction()
		fill(tx)
		return n.Run(t.Context(), tx)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	written, _ := nft.Compute(randomRules(rng, false))
	if err := run(n, func(tx *knftables.Transaction) { nft.Write(tx, written) }); err != nil {
		t.Fatal(err)
	}
	updates := 0
	for i := range 40 {
		in := randomRules(rng, i%5 == 0)
		next, _ := nft.Compute(in)
		if err := nft.Whole(t.Context(), w, next); err != nil {
			t.Fatalf("step %d: whole write: %v", i, err)
		}
		var ops int
		if err := run(n, func(tx *knftables.Transaction) { ops = nft.Update(tx, written, next) }); err != nil && ops > 0 {
			t.Fatalf("step %d: nft refused the update of a table as written: %v", i, err)
		}
		if ops > 0 {
			updates++
		}
		if got, want := list(updated), list(rewritten); got != want {
			t.Fatalf("step %d: the updated table differs from a whole write:\n got:\n%s\nwant:\n%s", i, got, want)
		}
		written = next
	}
	if updates < 30 {
		t.Errorf("only %d of 40 steps changed anything: the draws are too alike to test updates", updates)
	}
}

// TestKernelUpdateOfAnotherTable: on a table not as written (an element
// someone deleted), nft refuses the update whole and the table keeps
// everything it had; a whole write then restores it.
func TestKernelUpdateOfAnotherTable(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "drift")
	n := realNFT{t, ns}.open()
	in := dualStack()
	from, _ := nft.Compute(in)
	tx := n.NewTransaction()
	nft.Write(tx, from)
	if err := n.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	if out, err := nftIn(ns, "", "delete", "element", "inet", "keeplb", "snat-v4", "{ 192.0.2.10 . tcp . 80 . 10.0.0.1 . 30080 }"); err != nil {
		t.Fatalf("deleting an element behind keeplb's back: %v: %s", err, out)
	}
	before, _ := nftIn(ns, "", "list", "table", "inet", "keeplb")
	in.SNAT = in.SNAT[1:] // 192.0.2.10 . tcp . 80 . 10.0.0.1 . 30080 leaves
	in.Guard.Echo = nil
	to, _ := nft.Compute(in)
	tx = n.NewTransaction()
	if nft.Update(tx, from, to) == 0 {
		t.Fatal("no update")
	}
	if err := n.Run(t.Context(), tx); err == nil {
		t.Fatal("nft took the delete of an element the table lacks")
	}
	if after, _ := nftIn(ns, "", "list", "table", "inet", "keeplb"); after != before {
		t.Errorf("the refused update changed the table:\n got:\n%s\nwant:\n%s", after, before)
	}
	tx = n.NewTransaction()
	nft.Write(tx, to)
	if err := n.Run(t.Context(), tx); err != nil {
		t.Fatal(err)
	}
	other := newNetns(t, "drift2")
	if err := (realNFT{t, other}).sync(in); err != nil {
		t.Fatal(err)
	}
	got, _ := nftIn(ns, "", "list", "table", "inet", "keeplb")
	if want, _ := nftIn(other, "", "list", "table", "inet", "keeplb"); sortedListing(got) != sortedListing(want) {
		t.Errorf("a whole write after the refused update:\n%s\nwant:\n%s", got, want)
	}
}

// sortedListing is nft's listing of a table with each set's elements
// sorted: nft lists an interval set's elements in the order they were
// added, and a set has no order.
func sortedListing(listing string) string {
	var out []string
	var set []string // the lines of an elements block being read
	for _, l := range strings.Split(listing, "\n") {
		if set == nil && !strings.Contains(l, "elements = {") {
			out = append(out, l)
			continue
		}
		set = append(set, l)
		if !strings.HasSuffix(strings.TrimSpace(l), "}") {
			continue
		}
		block := strings.Join(set, " ")
		open, end := strings.Index(block, "{"), strings.LastIndex(block, "}")
		var els []string
		for _, e := range strings.Split(block[open+1:end], ",") {
			els = append(els, strings.Join(strings.Fields(e), " "))
		}
		slices.Sort(els)
		out = append(out, block[:open]+"{ "+strings.Join(els, ", ")+" }")
		set = nil
	}
	return strings.Join(out, "\n")
}
