package keepalived

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// State is a VRRP instance state, as keepalived's notify FIFO spells it.
type State string

// The states keepalived 2.2 reports for an instance.
const (
	StateBackup State = "BACKUP"
	StateMaster State = "MASTER"
	StateFault  State = "FAULT"
	// StateStop is reported for every instance when keepalived stops.
	StateStop State = "STOP"
	// StateDeleted is reported when a reload removed the instance.
	StateDeleted State = "DELETED"
	// StateMasterRxLowerPri is reported when a master receives an advert
	// of lower priority: another node took over and must give back.
	StateMasterRxLowerPri State = "MASTER_RX_LOWER_PRI"
)

// Event is one line of keepalived's notify FIFO about an instance.
type Event struct {
	// Instance is the instance's name.
	Instance string
	// State is its new state.
	State State
	// Priority is the instance's effective priority: its configured one
	// adjusted by its track file.
	Priority int
}

// ParseEvent parses a notify FIFO line about an instance:
//
//	INSTANCE "name" STATE PRIORITY
//
// Other lines (GROUP for sync groups, VS and RS for the checker) are
// errors.
func ParseEvent(line string) (Event, error) {
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "INSTANCE" {
		return Event{}, fmt.Errorf("not an instance notification: %q", line)
	}
	name, opened := strings.CutPrefix(f[1], `"`)
	name, closed := strings.CutSuffix(name, `"`)
	if !opened || !closed || name == "" || strings.Contains(name, `"`) {
		return Event{}, fmt.Errorf("instance name not quoted: %q", line)
	}
	prio, err := strconv.Atoi(f[3])
	if err != nil || prio < 0 || prio > 255 {
		return Event{}, fmt.Errorf("bad priority: %q", line)
	}
	return Event{Instance: name, State: State(f[2]), Priority: prio}, nil
}

// WatchFIFO creates the FIFO at path if it does not exist (Config's
// NotifyFIFO) and sends the Events keepalived writes to it, in order,
// until ctx is done; then it closes the channel. It keeps reading across
// keepalived restarts and reloads. Read the channel promptly: keepalived
// drops what does not fit in the FIFO.
//
// A line longer than 64 KiB (keepalived writes none) is skipped. After a
// read error it opens the FIFO again, with backoff; only when that keeps
// failing (10 times in a row, over about 30 s) does it give up and close
// the channel while ctx is not done: callers tell that apart by ctx.Err()
// and must report it, since keepalived's state changes then go unseen.
func WatchFIFO(ctx context.Context, path string) (<-chan Event, error) {
	w := fifoWatcher{path: path, open: openFIFO, minBackoff: 100 * time.Millisecond, maxBackoff: 5 * time.Second, maxFailures: 10}
	f, err := w.open(path)
	if err != nil {
		return nil, err
	}
	return w.watch(ctx, f), nil
}

// openFIFO creates the FIFO at path if needed and opens it.
func openFIFO(path string) (io.ReadCloser, error) {
	if err := syscall.Mkfifo(path, 0o600); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, &fs.PathError{Op: "mkfifo", Path: path, Err: err}
	}
	// Open for reading and writing: the open does not wait for a writer,
	// and reads never see end-of-file when keepalived closes its end (it
	// exits or restarts), since we hold a writing end too.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || fi.Mode().Type() != fs.ModeNamedPipe {
		_ = f.Close()
		return nil, fmt.Errorf("%s is not a FIFO", path)
	}
	return f, nil
}

// maxLine is the longest notify FIFO line read; keepalived's are below
// 200 bytes.
const maxLine = 64 << 10

// fifoWatcher reads a notify FIFO, opening it again after read errors.
type fifoWatcher struct {
	path string
	open func(path string) (io.ReadCloser, error)
	// minBackoff doubles up to maxBackoff between attempts to read again;
	// after maxFailures attempts in a row without a line read, it gives up.
	minBackoff, maxBackoff time.Duration
	maxFailures            int
}

func (w fifoWatcher) watch(ctx context.Context, r io.ReadCloser) <-chan Event {
	logger := klog.FromContext(ctx).WithValues("path", w.path)
	events := make(chan Event, 64)
	// Closing the reader ends a blocked read: a FIFO is pollable.
	var mu sync.Mutex
	cur := r
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		_ = cur.Close()
	})
	go func() {
		defer close(events)
		defer stop()
		failures, skipped := 0, 0
		backoff := w.minBackoff
		for {
			lines, err := w.read(ctx, cur, events, &skipped, logger)
			mu.Lock()
			_ = cur.Close()
			mu.Unlock()
			if ctx.Err() != nil {
				return
			}
			if lines > 0 {
				failures, backoff = 0, w.minBackoff
			}
			logger.Error(err, "Reading keepalived's notify FIFO failed; opening it again", "retryIn", backoff)
			for {
				if failures++; failures > w.maxFailures {
					logger.Error(nil, "Giving up on keepalived's notify FIFO: VRRP state changes are no longer seen", "attempts", w.maxFailures)
					return
				}
				if !sleep(ctx, backoff) {
					return
				}
				backoff = min(2*backoff, w.maxBackoff)
				next, err := w.open(w.path)
				if err != nil {
					logger.Error(err, "Opening keepalived's notify FIFO again failed", "retryIn", backoff)
					continue
				}
				mu.Lock()
				cur = next
				if ctx.Err() != nil { // too late for the AfterFunc to close it
					_ = cur.Close()
				}
				mu.Unlock()
				break
			}
		}
	}()
	return events
}

// read sends the events of r's lines until reading fails or ctx is done,
// and returns how many lines it read and the error. skipped counts the
// over-long lines skipped, the first of which is logged.
func (w fifoWatcher) read(ctx context.Context, r io.Reader, events chan<- Event, skipped *int, logger klog.Logger) (int, error) {
	br := bufio.NewReaderSize(r, maxLine)
	for lines := 0; ; lines++ {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if *skipped++; *skipped == 1 {
				logger.Info("Skipped a notify FIFO line longer than the limit; further ones are skipped without a word", "limit", maxLine)
			}
		} else if err == nil {
			ev, perr := ParseEvent(string(line))
			if perr != nil {
				logger.V(4).Info("Ignoring notify FIFO line", "err", perr)
				continue
			}
			select {
			case events <- ev:
			case <-ctx.Done():
				return lines, ctx.Err()
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("unexpected end of file") // we hold a writing end: never expected
			}
			return lines, err
		}
	}
}
