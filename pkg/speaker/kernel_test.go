package speaker

import (
	"errors"
	"fmt"
	"os/exec"
	"testing"

	"github.com/keeplb/keeplb/pkg/ipvs"
	"github.com/keeplb/keeplb/pkg/nft"
	netnstest "github.com/keeplb/keeplb/pkg/testing/netns"
)

// TestOpenKernelInNetns opens the real kernel with --netns: keeplb's table
// is written in that namespace, not the host's, and the addresses are the
// namespace's.
func TestOpenKernelInNetns(t *testing.T) {
	netnstest.Require(t, "apt-get install iproute2 nftables", "ip", "nft")
	ns := netnstest.New(t, "kernel")
	o := NewOptions()
	o.NodeName, o.NetNS, o.RunDir = "n1", ns, t.TempDir()
	k, err := OpenKernel(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	if k.NFT == nil || k.Keepalived == nil || k.Net == nil {
		t.Fatalf("OpenKernel left out what it must open: %+v", k)
	}
	links, err := k.Net.Links()
	if err != nil || len(links) != 1 || links[0].Name != "lo" {
		t.Errorf("links of %s: %v, %v; want lo alone", ns, links, err)
	}
	tx := k.NFT.NewTransaction()
	if err := nft.Transaction(tx, nft.Rules{}); err != nil {
		t.Fatal(err)
	}
	if err := k.NFT.Run(t.Context(), tx); err != nil {
		t.Fatalf("writing the table in %s: %v", ns, err)
	}
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", string(nft.Family), nft.Table).CombinedOutput(); err != nil {
		t.Errorf("no table in %s: %v: %s", ns, err, out)
	}
	if err := nft.Cleanup(t.Context(), k.NFT); err != nil {
		t.Error(err)
	}
}

// TestIPVSOrNone: a kernel without IPVS leaves the speaker without IPVS
// (not an error); any other failure to open it stops the speaker.
func TestIPVSOrNone(t *testing.T) {
	if h, err := ipvsOrNone(t.Context(), nil, fmt.Errorf("%w: family not found", ipvs.ErrNoIPVS)); h != nil || err != nil {
		t.Errorf("no IPVS: %v, %v; want nil, nil", h, err)
	}
	if _, err := ipvsOrNone(t.Context(), nil, errors.New("socket: permission denied")); err == nil {
		t.Error("a failure other than ErrNoIPVS was ignored")
	}
}
