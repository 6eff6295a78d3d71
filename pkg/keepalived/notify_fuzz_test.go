package keepalived

import (
	"fmt"
	"strings"
	"testing"
)

// FuzzParseEvent feeds ParseEvent what keepalived, or anything else that
// can write to the FIFO, might: an accepted line always names an instance
// that could be rendered (no blank, no quote) with a priority 0-255, and
// formatting the event again parses to the same event.
func FuzzParseEvent(f *testing.F) {
	for _, s := range []string{
		`INSTANCE "kl_public_v4_b00" MASTER 254`,
		`INSTANCE "x" BACKUP 0`,
		`INSTANCE "x" FAULT 255`,
		`INSTANCE "x" MASTER 256`,
		`INSTANCE "" MASTER 1`,
		`GROUP "g" MASTER 100`,
		`INSTANCE "a b" MASTER 1`,
		`INSTANCE x" MASTER 1`,
		`INSTANCE "x MASTER 1`,
		"INSTANCE \"x\"\tSTOP\t-1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		ev, err := ParseEvent(line)
		if err != nil {
			return
		}
		if ev.Instance == "" || strings.ContainsAny(ev.Instance, " \t\n\r\v\f\"") {
			t.Fatalf("%q: instance %q", line, ev.Instance)
		}
		if ev.Priority < 0 || ev.Priority > 255 {
			t.Fatalf("%q: priority %d", line, ev.Priority)
		}
		// As keepalived writes it: the name between plain quotes.
		//nolint:gocritic // sprintfQuotedString: keepalived does not escape as %q would
		again, err := ParseEvent(fmt.Sprintf("INSTANCE \"%s\" %s %d", ev.Instance, ev.State, ev.Priority))
		if err != nil || again != ev {
			t.Fatalf("%q: %+v formats to something that parses to %+v, %v", line, ev, again, err)
		}
	})
}
