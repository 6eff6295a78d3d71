//go:build linux

package ipvs

import (
	"bytes"
	"testing"

	"github.com/vishvananda/netlink/nl"
)

// TestGenlHeader: the generic netlink header keeplb sends is the whole
// struct genlmsghdr, its reserved bytes zero, and Len agrees with it.
func TestGenlHeader(t *testing.T) {
	h := genlHeader{cmd: cmdGetService}
	got := h.Serialize()
	if want := []byte{cmdGetService, genlVersion, 0, 0}; !bytes.Equal(got, want) || h.Len() != len(got) || h.Len() != nl.SizeofGenlmsg {
		t.Errorf("header %v (Len %d), want %v (%d bytes)", got, h.Len(), want, nl.SizeofGenlmsg)
	}
}
