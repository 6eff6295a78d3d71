package keepalived

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"syscall"

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
	name, ok := strings.CutPrefix(f[1], `"`)
	if name, ok = strings.CutSuffix(name, `"`); !ok || name == "" {
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
func WatchFIFO(ctx context.Context, path string) (<-chan Event, error) {
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
		f.Close()
		return nil, fmt.Errorf("%s is not a FIFO", path)
	}
	logger := klog.FromContext(ctx)
	events := make(chan Event, 64)
	// Closing f ends the blocked read: a FIFO is pollable.
	stop := context.AfterFunc(ctx, func() { f.Close() })
	go func() {
		defer close(events)
		defer f.Close()
		defer stop()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			ev, err := ParseEvent(sc.Text())
			if err != nil {
				logger.V(4).Info("Ignoring notify FIFO line", "err", err)
				continue
			}
			select {
			case events <- ev:
			case <-ctx.Done():
				return
			}
		}
		if err := sc.Err(); err != nil && ctx.Err() == nil {
			logger.Error(err, "Reading keepalived's notify FIFO", "path", path)
		}
	}()
	return events, nil
}
