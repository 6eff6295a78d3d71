package nft_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
)

// TestWholeStreamsWritesScript: what Whole streams to nft is, byte for
// byte, the text of the transaction Write builds for the same Elements,
// for every golden case, for entries Compute leaves out, and at a
// hundred virtual servers of both families; and a Fake (which cannot
// stream) gets that transaction, so the two paths write the same table.
func TestWholeStreamsWritesScript(t *testing.T) {
	big, _ := benchRules(100)
	for i := range 30 {
		v := ipvs.Key{Address: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), Protocol: ipvs.UDP, Port: uint16(1000 + i)}
		big.SNAT = append(big.SNAT, nft.SNAT{Virtual: v, Reals: []netip.AddrPort{netip.MustParseAddrPort(fmt.Sprintf("[fd00::%d]:53", i+1))}})
		big.Guard.VIPs = append(big.Guard.VIPs, v.Address)
		big.Guard.Ports = append(big.Guard.Ports, v)
	}
	big.SourceRanges = map[ipvs.Key][]netip.Prefix{big.SNAT[3].Virtual: prefixes("192.0.2.0/24", "2001:db8::/32")}
	invalid := dualStack()
	invalid.SNAT = append(slices.Clone(invalid.SNAT), nft.SNAT{Virtual: key(ipvs.TCP, "[fe80::1%eth0]:80"), Reals: []netip.AddrPort{netip.MustParseAddrPort("[fd00::9]:80")}})
	cases := append(slices.Clone(goldenCases), struct {
		name string
		in   nft.Rules
	}{"invalid-entries", invalid}, struct {
		name string
		in   nft.Rules
	}{"130-virtual-servers", big})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := nft.Compute(tc.in)
			c := &nft.Capture{Fake: knftables.NewFake(nft.Family, nft.Table)}
			if err := nft.Whole(context.Background(), c, e); err != nil {
				t.Fatal(err)
			}
			tx := c.NewTransaction()
			nft.Write(tx, e)
			got, want := c.Script.String(), tx.String()
			if got != want {
				gl, wl := strings.Split(got, "\n"), strings.Split(want, "\n")
				for i := range min(len(gl), len(wl)) {
					if gl[i] != wl[i] {
						t.Fatalf("streamed script differs from Write's at line %d:\n got: %s\nwant: %s", i+1, gl[i], wl[i])
					}
				}
				t.Fatalf("streamed script has %d lines, Write's %d", len(gl), len(wl))
			}
			if n := strings.Count(got, "add element "); n < e.SNATs() {
				t.Fatalf("%d elements streamed, fewer than the %d masqueraded real servers", n, e.SNATs())
			}

			fake := knftables.NewFake(nft.Family, nft.Table)
			if err := nft.Whole(context.Background(), fake, e); err != nil {
				t.Fatal(err)
			}
			direct := knftables.NewFake(nft.Family, nft.Table)
			if err := direct.Run(context.Background(), tx); err != nil {
				t.Fatal(err)
			}
			if fake.Dump() != direct.Dump() {
				t.Errorf("Whole on a Fake wrote another table than Write's transaction:\n%s\nwant:\n%s", fake.Dump(), direct.Dump())
			}
		})
	}
}
