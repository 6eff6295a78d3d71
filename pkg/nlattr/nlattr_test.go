package nlattr

import (
	"slices"
	"testing"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

func TestWalk(t *testing.T) {
	nested := nl.NewRtAttr(3|unix.NLA_F_NESTED, nil)
	nested.AddRtAttr(1, []byte{9})
	b := slices.Concat(nl.NewRtAttr(1, []byte("abc")).Serialize(), nl.NewRtAttr(2, nil).Serialize(), nested.Serialize())
	type attr struct {
		typ uint16
		v   string
	}
	var got []attr
	if err := Walk(b, func(typ uint16, v []byte) { got = append(got, attr{typ, string(v)}) }); err != nil {
		t.Fatal(err)
	}
	// Values unpadded, the nested flag masked off.
	want := []attr{{1, "abc"}, {2, ""}, {3, string(nl.NewRtAttr(1, []byte{9}).Serialize())}}
	if !slices.Equal(got, want) {
		t.Fatalf("Walk = %+v, want %+v", got, want)
	}
	if v, err := Find(b, 3); err != nil || len(v) != 8 {
		t.Errorf("Find(3) = %v, %v", v, err)
	}
	if v, err := Find(b, 7); err != nil || v != nil {
		t.Errorf("Find(7) = %v, %v; want nothing", v, err)
	}
	// An attribute whose length overruns: an error after the ones before.
	n := 0
	if err := Walk(b[:len(b)-1], func(uint16, []byte) { n++ }); err == nil || n != 2 {
		t.Errorf("a truncated last attribute: %d walked, error %v; want 2 and an error", n, err)
	}
	if v, err := Find(b[:len(b)-1], 1); err != nil || string(v) != "abc" {
		t.Errorf("Find before the malformed attribute = %q, %v", v, err)
	}
}

func FuzzWalk(f *testing.F) {
	f.Add(nl.NewRtAttr(1, []byte("abc")).Serialize())
	f.Fuzz(func(t *testing.T, b []byte) {
		total := 0
		_ = Walk(b, func(_ uint16, v []byte) { total += len(v) })
		if total > len(b) {
			t.Fatalf("values of %d bytes in %d", total, len(b))
		}
	})
}
