package keepalived

import (
	"crypto/sha256"
	"time"
)

// debouncer decides when keepalived must reload. It is pure: callers pass
// the time, so tests need no clock.
//
// The first change after a reload opens a window; the reload is due when
// the window ends and picks up every change made meanwhile. So a burst of
// changes costs one reload, reloads are at least a window apart, and a
// change waits at most a window. A change back to the bytes keepalived
// already runs cancels the pending reload: identical bytes never reload.
type debouncer struct {
	window  time.Duration
	loaded  [sha256.Size]byte // what the running keepalived read
	pending bool
	due     time.Time
}

// Loaded records that keepalived has just read data, at a start or a
// reload. Nothing is pending afterwards.
func (d *debouncer) Loaded(data []byte) {
	d.loaded = sha256.Sum256(data)
	d.pending = false
}

// Changed records that the configuration file holds data since now. It
// returns whether a reload is pending and, if so, when it is due.
func (d *debouncer) Changed(data []byte, now time.Time) (due time.Time, pending bool) {
	if sha256.Sum256(data) == d.loaded {
		d.pending = false
		return time.Time{}, false
	}
	if !d.pending {
		d.pending, d.due = true, now.Add(d.window)
	}
	return d.due, true
}

// Due reports whether a pending reload is due at now. The caller then
// reloads and calls Loaded; until it does, the reload stays pending.
func (d *debouncer) Due(now time.Time) bool {
	return d.pending && !now.Before(d.due)
}
