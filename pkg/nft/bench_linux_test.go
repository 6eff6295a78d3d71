package nft_test

import (
	"testing"

	"github.com/keeplb/keeplb/pkg/nft"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// BenchmarkKernelWrite runs what BenchmarkWrite builds with the real nft,
// in a network namespace of its own (root only): one masqueraded real
// server among 100,000 changes back and forth, in the same run:
//   - whole: the table rewritten by a knftables.Transaction of Write;
//   - stream: the same rewrite by Whole, its script streamed to nft;
//   - update: the two elements that differ.
//
// Each op is the sync's work: Compute, the write, and nft parsing and
// committing it. B/op is what the Go process allocated (nft's own memory
// is its own process's): a transaction's objects and command buffer are
// live all at once, a stream's garbage a line at a time.
func BenchmarkKernelWrite(b *testing.B) {
	netnstest.Require(b, "apt-get install iproute2 nftables", "ip", "nft")
	a, c := benchRules(10000)
	for _, mode := range []string{"whole", "stream", "update"} {
		b.Run("100000/"+mode, func(b *testing.B) {
			b.ReportAllocs()
			n, err := nft.NewAt("/run/netns/" + netnstest.New(b, "bench"))
			if err != nil {
				b.Fatal(err)
			}
			written, _ := nft.Compute(a)
			tx := n.NewTransaction()
			nft.Write(tx, written)
			if err := n.Run(b.Context(), tx); err != nil {
				b.Fatal(err)
			}
			next := c
			for b.Loop() {
				e, err := nft.Compute(next)
				if err != nil {
					b.Fatal(err)
				}
				if mode == "stream" {
					err = nft.Whole(b.Context(), n, e)
				} else {
					tx := n.NewTransaction()
					if mode == "whole" {
						nft.Write(tx, e)
					} else if nft.Update(tx, written, e) != 2 {
						b.Fatal("want 2 operations")
					}
					err = n.Run(b.Context(), tx)
				}
				if err != nil {
					b.Fatal(err)
				}
				written = e
				if &next.SNAT[0] == &c.SNAT[0] {
					next = a
				} else {
					next = c
				}
			}
			elements, err := n.ListElements(b.Context(), "set", "snat-v4")
			if want := len(a.SNAT) * 10; err != nil || len(elements) != want {
				b.Fatalf("snat-v4 has %d elements, %v; want %d", len(elements), err, want)
			}
		})
	}
}
