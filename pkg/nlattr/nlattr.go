// Package nlattr reads netlink attributes (struct nlattr / rtattr: a
// 16-bit length, a 16-bit type, the value, padding to 4 bytes) in place,
// for keeplb's own parsers of the kernel's dumps. It allocates nothing and
// never panics: netlink's ParseRouteAttr allocates a slice per message and
// panics on an attribute whose length overruns its message.
package nlattr

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// typeMask clears the nested and byte-order flags from an attribute type.
const typeMask = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)

// Walk calls f with the type (flags masked off) and value of each
// attribute in b, in order, and returns an error for one whose length
// does not fit; f has seen the attributes before it.
func Walk(b []byte, f func(typ uint16, v []byte)) error {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return fmt.Errorf("malformed netlink attribute: length %d of %d bytes left", l, len(b))
		}
		f(binary.NativeEndian.Uint16(b[2:4])&typeMask, b[unix.SizeofRtAttr:l])
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	return nil
}

// Find returns the value of the first attribute of type typ in b, nil if
// there is none (or b is malformed before it: then with the error).
func Find(b []byte, typ uint16) ([]byte, error) {
	var out []byte
	err := Walk(b, func(t uint16, v []byte) {
		if t == typ && out == nil {
			out = v
		}
	})
	if out != nil {
		return out, nil
	}
	return nil, err
}
