package nft_test

import (
	"bufio"
	"errors"
	"strings"
	"testing"

	"github.com/keeplb/keeplb/pkg/nft"
)

// TestKernelScriptCutShortCommitsNothing: nft commits what it read when
// its input ends, so a streamed script whose writer fails must not end.
// A script that deletes keeplb's table and then fails leaves the table
// whole, and so does one nft refuses (its own words in the error); the
// same deletion, finished, is committed.
func TestKernelScriptCutShortCommitsNothing(t *testing.T) {
	requireKernel(t)
	ns := newNetns(t, "cut")
	n := realNFT{t, ns}.open()
	if err := write(t.Context(), n, dualStack()); err != nil {
		t.Fatal(err)
	}
	list := func() string {
		t.Helper()
		out, _ := nftIn(ns, "", "list", "table", "inet", "keeplb")
		return out
	}
	before := list()
	if !strings.Contains(before, "10.0.0.1") {
		t.Fatalf("the table was not written:\n%s", before)
	}
	deleteTable := func(w *bufio.Writer) error {
		_, err := w.WriteString("delete table inet keeplb\n")
		return errors.Join(err, w.Flush())
	}

	cut := errors.New("the writer failed")
	err := nft.RunScript(t.Context(), n, func(w *bufio.Writer) error {
		if err := deleteTable(w); err != nil {
			return err
		}
		return cut
	})
	if err == nil || !errors.Is(err, cut) {
		t.Errorf("a script cut short: %v; want the writer's error", err)
	}
	if after := list(); after != before {
		t.Fatalf("a script cut short changed the table:\n%s\nwant:\n%s", after, before)
	}

	err = nft.RunScript(t.Context(), n, func(w *bufio.Writer) error {
		if err := deleteTable(w); err != nil {
			return err
		}
		_, err := w.WriteString("add element inet keeplb vips-v4 { not-an-address }\n")
		return errors.Join(err, w.Flush())
	})
	if err == nil || !strings.Contains(err.Error(), "not-an-address") {
		t.Errorf("a script nft refuses: %v; want nft's complaint, naming the word", err)
	}
	if after := list(); after != before {
		t.Fatalf("a script nft refused changed the table:\n%s\nwant:\n%s", after, before)
	}

	if err := nft.RunScript(t.Context(), n, deleteTable); err != nil {
		t.Fatal(err)
	}
	if after, err := nftIn(ns, "", "list", "table", "inet", "keeplb"); err == nil {
		t.Fatalf("the finished script did not delete the table:\n%s", after)
	}
}
