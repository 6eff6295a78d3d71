package hostnet

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// addrMsg is an RTM_NEWADDR payload as the kernel writes it: ifaddrmsg
// and then each attribute, padded to 4 bytes.
func addrMsg(family, bits uint8, index uint32, attrs ...*nl.RtAttr) []byte {
	h := nl.NewIfAddrmsg(int(family))
	h.Prefixlen, h.Index = bits, index
	b := h.Serialize()
	for _, a := range attrs {
		b = append(b, a.Serialize()...)
	}
	return b
}

func TestParseAddrMsg(t *testing.T) {
	v4 := func(s string) []byte { return netip.MustParseAddr(s).AsSlice() }
	for _, tc := range []struct {
		name string
		msg  []byte
		want netip.Prefix // invalid: not ok
	}{
		{"IPv4, address and local alike", addrMsg(unix.AF_INET, 24, 3,
			nl.NewRtAttr(unix.IFA_ADDRESS, v4("192.0.2.5")), nl.NewRtAttr(unix.IFA_LOCAL, v4("192.0.2.5")),
			nl.NewRtAttr(unix.IFA_LABEL, []byte("eth0\x00"))),
			netip.MustParsePrefix("192.0.2.5/24")},
		{"point-to-point: local first, address the peer's", addrMsg(unix.AF_INET, 32, 3,
			nl.NewRtAttr(unix.IFA_LOCAL, v4("192.0.2.5")), nl.NewRtAttr(unix.IFA_ADDRESS, v4("198.51.100.1"))),
			netip.MustParsePrefix("192.0.2.5/32")},
		{"IPv6, address only", addrMsg(unix.AF_INET6, 64, 7,
			nl.NewRtAttr(unix.IFA_ADDRESS, v4("2001:db8::1"))),
			netip.MustParsePrefix("2001:db8::1/64")},
		{"IPv4-mapped stays IPv6", addrMsg(unix.AF_INET6, 128, 7,
			nl.NewRtAttr(unix.IFA_ADDRESS, v4("::ffff:192.0.2.9"))),
			netip.MustParsePrefix("::ffff:192.0.2.9/128")},
		{"the largest index", addrMsg(unix.AF_INET, 32, 1<<31-1,
			nl.NewRtAttr(unix.IFA_LOCAL, v4("192.0.2.5"))),
			netip.MustParsePrefix("192.0.2.5/32")},
		{"no address", addrMsg(unix.AF_INET, 24, 3, nl.NewRtAttr(unix.IFA_LABEL, []byte("eth0\x00"))), netip.Prefix{}},
		{"family and length disagree", addrMsg(unix.AF_INET, 24, 3, nl.NewRtAttr(unix.IFA_LOCAL, v4("2001:db8::1"))), netip.Prefix{}},
		{"prefix longer than the address", addrMsg(unix.AF_INET, 33, 3, nl.NewRtAttr(unix.IFA_LOCAL, v4("192.0.2.5"))), netip.Prefix{}},
		{"short header", addrMsg(unix.AF_INET, 24, 3)[:7], netip.Prefix{}},
		{"attribute longer than the message", func() []byte {
			b := addrMsg(unix.AF_INET, 24, 3, nl.NewRtAttr(unix.IFA_LOCAL, v4("192.0.2.5")))
			return b[:len(b)-1]
		}(), netip.Prefix{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			index, got, ok := parseAddrMsg(tc.msg)
			if ok != tc.want.IsValid() || got != tc.want {
				t.Fatalf("parseAddrMsg = %v, %v, %v; want %v", index, got, ok, tc.want)
			}
			if ok && index != int(nl.NativeEndian().Uint32(tc.msg[4:8])) {
				t.Errorf("index %d, want the header's", index)
			}
		})
	}
}

// FuzzParseAddrMsg checks that no message, however malformed, panics or
// yields an invalid prefix, and that whatever is read is the family the
// header names.
func FuzzParseAddrMsg(f *testing.F) {
	f.Add(addrMsg(unix.AF_INET, 24, 3, nl.NewRtAttr(unix.IFA_LOCAL, []byte{192, 0, 2, 5})))
	f.Add(addrMsg(unix.AF_INET6, 64, 7, nl.NewRtAttr(unix.IFA_ADDRESS, netip.MustParseAddr("2001:db8::1").AsSlice())))
	f.Add([]byte{2, 32, 0, 0, 1, 0, 0, 0, 4, 0, 2, 0})
	f.Fuzz(func(t *testing.T, m []byte) {
		_, p, ok := parseAddrMsg(slices.Clone(m))
		if !ok {
			return
		}
		if !p.IsValid() {
			t.Fatalf("ok with an invalid prefix %v", p)
		}
		if fam := m[0]; (fam == unix.AF_INET) != p.Addr().Is4() {
			t.Fatalf("family %d gave %v", fam, p)
		}
	})
}
