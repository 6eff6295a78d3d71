package keepalived_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

func TestParseEvent(t *testing.T) {
	for _, tc := range []struct {
		line    string
		want    keepalived.Event
		wantErr bool
	}{
		{line: `INSTANCE "VI_1" MASTER 100`, want: keepalived.Event{Instance: "VI_1", State: keepalived.StateMaster, Priority: 100}},
		{line: `INSTANCE "keeplb_eth0_v4_10" BACKUP 150`, want: keepalived.Event{Instance: "keeplb_eth0_v4_10", State: keepalived.StateBackup, Priority: 150}},
		{line: `INSTANCE "vi" FAULT 0`, want: keepalived.Event{Instance: "vi", State: keepalived.StateFault}},
		{line: `INSTANCE "vi" STOP 150`, want: keepalived.Event{Instance: "vi", State: keepalived.StateStop, Priority: 150}},
		{line: `INSTANCE "vi" DELETED 150`, want: keepalived.Event{Instance: "vi", State: keepalived.StateDeleted, Priority: 150}},
		{line: `INSTANCE "vi" MASTER_RX_LOWER_PRI 150`, want: keepalived.Event{Instance: "vi", State: keepalived.StateMasterRxLowerPri, Priority: 150}},
		{line: `GROUP "G1" MASTER 0`, wantErr: true},
		{line: `VS [192.168.201.15]:tcp:80 UP`, wantErr: true},
		{line: `INSTANCE vi MASTER 100`, wantErr: true},
		// Found by FuzzParseEvent: only the closing quote was checked.
		{line: `INSTANCE vi" MASTER 100`, wantErr: true},
		{line: `INSTANCE "vi MASTER 100`, wantErr: true},
		{line: `INSTANCE "v"i" MASTER 100`, wantErr: true},
		{line: `INSTANCE "" MASTER 100`, wantErr: true},
		{line: `INSTANCE "vi" MASTER high`, wantErr: true},
		{line: `INSTANCE "vi" MASTER 256`, wantErr: true},
		{line: `INSTANCE "vi" MASTER`, wantErr: true},
		{line: ``, wantErr: true},
	} {
		got, err := keepalived.ParseEvent(tc.line)
		if (err != nil) != tc.wantErr {
			t.Errorf("ParseEvent(%q) error = %v, want error: %v", tc.line, err, tc.wantErr)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseEvent(%q) = %+v, want %+v", tc.line, got, tc.want)
		}
	}
}

func TestWatchFIFO(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	path := filepath.Join(t.TempDir(), "notify.fifo")
	events, err := keepalived.WatchFIFO(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Type() != os.ModeNamedPipe {
		t.Fatalf("%s is not a FIFO: %v", path, err)
	}

	// A writer as keepalived opens it, which then goes away (keepalived
	// restarts) and comes back: no event is lost, the channel stays open.
	write := func(lines string) {
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		if _, err := w.WriteString(lines); err != nil {
			t.Fatal(err)
		}
	}
	write("INSTANCE \"a\" BACKUP 100\nGROUP \"g\" MASTER 0\nINSTANCE \"a\" MASTER 100\n")
	write("INSTANCE \"a\" STOP 100\n")
	want := []keepalived.Event{
		{Instance: "a", State: keepalived.StateBackup, Priority: 100},
		{Instance: "a", State: keepalived.StateMaster, Priority: 100},
		{Instance: "a", State: keepalived.StateStop, Priority: 100},
	}
	for _, w := range want {
		select {
		case got, ok := <-events:
			if !ok {
				t.Fatal("channel closed")
			}
			if got != w {
				t.Errorf("got %+v, want %+v", got, w)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no event, want %+v", w)
		}
	}

	// Cancelling ends the watch: the blocked read returns, the channel
	// closes.
	cancel()
	select {
	case ev, ok := <-events:
		if ok {
			t.Errorf("event %+v after cancel", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed after cancel")
	}

	// The FIFO stays and is reused.
	ctx2, cancel2 := context.WithCancel(t.Context())
	defer cancel2()
	events, err = keepalived.WatchFIFO(ctx2, path)
	if err != nil {
		t.Fatalf("WatchFIFO on an existing FIFO: %v", err)
	}
	write("INSTANCE \"b\" FAULT 50\n")
	select {
	case got := <-events:
		if got != (keepalived.Event{Instance: "b", State: keepalived.StateFault, Priority: 50}) {
			t.Errorf("got %+v", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event from the reused FIFO")
	}
}

// TestWatchFIFOSkipsLongLines: a line longer than bufio.Scanner's 64 KiB,
// which used to end the watch for good, is skipped, and the next event
// still arrives.
func TestWatchFIFOSkipsLongLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.fifo")
	events, err := keepalived.WatchFIFO(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	long := "INSTANCE \"" + strings.Repeat("x", 100<<10) + "\" MASTER 100\n"
	if _, err := w.WriteString(long + "INSTANCE \"a\" MASTER 100\n" + long + long + "INSTANCE \"a\" BACKUP 90\n"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []keepalived.Event{
		{Instance: "a", State: keepalived.StateMaster, Priority: 100},
		{Instance: "a", State: keepalived.StateBackup, Priority: 90},
	} {
		select {
		case got, ok := <-events:
			if !ok {
				t.Fatal("the watch ended at an over-long line")
			}
			if got != want {
				t.Fatalf("got %+v, want %+v", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no event after an over-long line, want %+v", want)
		}
	}
}

func TestWatchFIFONotAFIFO(t *testing.T) {
	path := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := keepalived.WatchFIFO(t.Context(), path); err == nil {
		t.Error("WatchFIFO accepted a regular file")
	}
	if _, err := keepalived.WatchFIFO(t.Context(), filepath.Join(t.TempDir(), "missing", "fifo")); err == nil {
		t.Error("WatchFIFO accepted a path in a missing directory")
	}
}
