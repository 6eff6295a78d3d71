package nft

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"

	"sigs.k8s.io/knftables"
)

// Whole rewrites keeplb's table whole, with n, to hold e: the operations
// of Write, in one nft transaction, atomic and idempotent as Write's.
//
// Where n runs the real nft (the Interfaces New and NewAt return), the
// script goes to nft's input as it is written, element by element: a
// knftables.Transaction of a whole write holds an object per element and
// then formats them all into one command buffer, at 100,000 masqueraded
// real servers about 33 MB and 9 MB more on the heap at once, the largest
// transient of a speaker's first sync (docs/scale.md, Memory). The text
// nft reads is the same, byte for byte, as that transaction's. Elsewhere
// (a knftables.Fake) Whole runs Write's transaction.
func Whole(ctx context.Context, n knftables.Interface, e *Elements) error {
	tx := n.NewTransaction()
	if s, ok := n.(streamer); ok && s.nftPath() != "" {
		// The structure, a few dozen operations, formatted by knftables
		// for this Interface (its handling of comments included).
		Write(tx, nil)
		head := tx.String()
		return s.runScript(ctx, func(w *bufio.Writer) error {
			if _, err := w.WriteString(head); err != nil {
				return err
			}
			return writeElements(w, e)
		})
	}
	Write(tx, e)
	return n.Run(ctx, tx)
}

// streamer is a knftables.Interface that can also run nft on a script
// written to its input as it is produced.
type streamer interface {
	// nftPath is the nft binary it runs, "" if it runs none.
	nftPath() string
	// runScript runs nft -f - on what write writes. A script that write
	// does not finish (it returns an error) is never committed.
	runScript(ctx context.Context, write func(*bufio.Writer) error) error
}

// elementPrefix starts every element line of a whole write, as knftables
// formats an "add" of a knftables.Element of keeplb's table.
const elementPrefix = "add element " + string(Family) + " " + Table + " "

// writeElements writes an "add element" line for every element of e, in
// the order and the format in which Write's transaction has them.
func writeElements(w *bufio.Writer, e *Elements) error {
	if e == nil {
		return nil
	}
	eachElement(e, func(set string, key []string) {
		_, _ = w.WriteString(elementPrefix)
		_, _ = w.WriteString(set)
		_, _ = w.WriteString(" { ")
		for i, k := range key {
			if i > 0 {
				_, _ = w.WriteString(" . ")
			}
			_, _ = w.WriteString(k)
		}
		_, _ = w.WriteString(" }\n")
	})
	// A bufio.Writer keeps its first error and returns it from Flush.
	return w.Flush()
}

// scriptBuffer is the size of the buffer between the script's writer and
// nft's input pipe.
const scriptBuffer = 64 << 10

// runScript runs the nft at path on the script write writes to its input.
//
// nft commits what it read when its input ends, so a script cut short
// must never reach an end: when write (or a write to the pipe) fails, nft
// is killed before its input is closed, and nothing is committed. The
// table then stays as it was, as after any failed transaction.
func runScript(ctx context.Context, path string, write func(*bufio.Writer) error) error {
	cmd := exec.CommandContext(ctx, path, "-f", "-")
	stderr := &limitedBuffer{max: 64 << 10}
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return fmt.Errorf("nft -f -: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("nft -f -: %w", err)
	}
	werr := write(bufio.NewWriterSize(stdin, scriptBuffer))
	if werr != nil {
		_ = cmd.Process.Kill()
		// Kill returns once the signal is sent; Wait, once nft is gone.
		// Only then may its input close.
		err := cmd.Wait()
		_ = stdin.Close()
		if msg := stderr.text(); msg != "" {
			// nft stopped reading because it failed: its own words say
			// why (the write's error is then a broken pipe).
			return fmt.Errorf("nft -f -: %w: %s", err, msg)
		}
		return fmt.Errorf("nft -f -: script not finished, nothing committed: %w", werr)
	}
	cerr := stdin.Close()
	if err := cmd.Wait(); err != nil {
		if msg := stderr.text(); msg != "" {
			return fmt.Errorf("nft -f -: %w: %s", err, msg)
		}
		return fmt.Errorf("nft -f -: %w", err)
	}
	if cerr != nil && !errors.Is(cerr, io.ErrClosedPipe) {
		return fmt.Errorf("nft -f -: closing its input: %w", cerr)
	}
	return nil
}

// limitedBuffer keeps the first max bytes written to it: nft's complaint
// about a script of thousands of lines names a line or two, and stderr
// must never grow with the script.
type limitedBuffer struct {
	max int
	buf bytes.Buffer
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *limitedBuffer) text() string { return strings.TrimSpace(b.buf.String()) }
