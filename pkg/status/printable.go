package status

import (
	"bytes"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Printable returns s with every character a terminal could act on shown
// as a visible escape: C0 controls (ESC, BEL, CR, tab, newline), DEL and
// C1 controls become \xNN, bytes that are not UTF-8 become \xNN, and bidi
// controls become \uNNNN. The report's strings come partly from tenants
// (the keeplb.io/holder annotation, event messages any tenant may post in
// its namespace), and a raw ESC or C1 CSI in an operator's terminal can
// set the window title, write the clipboard (OSC 52), move the cursor to
// overwrite other rows or, on some terminals, answer back as typed input:
// the CVE-2021-25743 class. Bidi controls can reorder what the operator
// reads. A backslash is left alone: a tenant can spell a fake escape, but
// never a real one.
func Printable(s string) string {
	if strings.IndexFunc(s, escaped) < 0 {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r < 0x100 && unicode.IsControl(r):
			fmt.Fprintf(&b, `\x%02x`, r)
		case unicode.Is(unicode.Bidi_Control, r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

// escaped reports whether Printable escapes r. strings.IndexFunc hands it
// utf8.RuneError for a byte that is not UTF-8.
func escaped(r rune) bool {
	return r == utf8.RuneError || (r < 0x100 && unicode.IsControl(r)) || unicode.Is(unicode.Bidi_Control, r)
}

// escapeJSONControls rewrites the DEL, C1 and bidi controls that
// encoding/json leaves raw inside strings as \u escapes. The JSON decodes
// to the same strings, but no longer carries a C1 CSI or bidi override to
// a terminal it is printed on. encoding/json already escapes C0 controls
// and replaces invalid UTF-8, and these runes can only occur inside
// strings, so a plain rewrite of the encoded bytes is exact.
func escapeJSONControls(b []byte) []byte {
	var out bytes.Buffer
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if (r >= 0x7f && r < 0xa0) || unicode.Is(unicode.Bidi_Control, r) {
			fmt.Fprintf(&out, `\u%04x`, r)
		} else {
			out.Write(b[i : i+size])
		}
		i += size
	}
	return out.Bytes()
}
