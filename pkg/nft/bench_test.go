package nft_test

import (
	"net/netip"
	"slices"
	"testing"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// benchRules returns n virtual servers × 10 masqueraded real servers, as
// the dataplane gives them (sorted), and the same with one real server of
// one virtual server replaced: one endpoint gone and another come.
func benchRules(n int) (a, b nft.Rules) {
	for i := range n {
		v := ipvs.Key{Address: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}), Protocol: ipvs.TCP, Port: 80}
		a.Guard.VIPs = append(a.Guard.VIPs, v.Address)
		a.Guard.Ports = append(a.Guard.Ports, v)
		s := nft.SNAT{Virtual: v}
		for j := range 10 {
			s.Reals = append(s.Reals, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(j + 1), byte(i >> 8), byte(i)}), 8080))
		}
		a.SNAT = append(a.SNAT, s)
	}
	b = a
	b.SNAT = slices.Clone(a.SNAT)
	// Another port of the same address for the last real server: the
	// list stays sorted, as the dataplane keeps it, and is a new slice,
	// as the dataplane gives it.
	mid := &b.SNAT[len(b.SNAT)/2]
	mid.Reals = slices.Clone(mid.Reals)
	last := &mid.Reals[len(mid.Reals)-1]
	*last = netip.AddrPortFrom(last.Addr(), 8081)
	return a, b
}

// BenchmarkWrite measures building the transaction that brings keeplb's
// table from one Rules to the next when one masqueraded real server among
// 100,000 changed (10,000 virtual servers × 10): whole, the table
// rewritten (Compute, Write and the script's text), against update, the
// elements that differ (Compute, Update and the text), in the same run.
// The script's size and its operations are reported per op; the kernel's
// side (nft parsing the script) is BenchmarkKernelWrite's.
func BenchmarkWrite(b *testing.B) {
	a, c := benchRules(10000)
	ea, _ := nft.Compute(a)
	fake := knftables.NewFake(nft.Family, nft.Table)
	report := func(b *testing.B, tx *knftables.Transaction, text string) {
		b.ReportMetric(float64(len(text)), "script-bytes")
		b.ReportMetric(float64(tx.NumOperations()), "nft-ops")
	}
	for _, mode := range []string{"whole", "update"} {
		b.Run("100000/"+mode, func(b *testing.B) {
			b.ReportAllocs()
			var tx *knftables.Transaction
			var text string
			for b.Loop() {
				e, err := nft.Compute(c)
				if err != nil {
					b.Fatal(err)
				}
				tx = fake.NewTransaction()
				if mode == "whole" {
					nft.Write(tx, e)
				} else if n := nft.Update(tx, ea, e); n != 2 {
					b.Fatalf("%d operations; want 2", n)
				}
				text = tx.String()
			}
			report(b, tx, text)
		})
	}
}
