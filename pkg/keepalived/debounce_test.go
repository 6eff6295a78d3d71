package keepalived

import (
	"testing"
	"time"
)

func TestDebouncer(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

	// A script of changes (data at a time) and checks of Due; "reload"
	// means the caller reloaded with the last data.
	type step struct {
		ms     int
		data   string // change to data; "" = no change, just ask Due
		reload bool   // Due must say true; the caller then reloads
	}
	for _, tc := range []struct {
		name    string
		steps   []step
		reloads int
	}{
		{"identical bytes never reload", []step{{ms: 0, data: "A"}, {ms: 100}, {ms: 1000}}, 0},
		{"one change, one reload after the window", []step{{ms: 0, data: "B"}, {ms: 99}, {ms: 100, reload: true}, {ms: 500}}, 1},
		{"a burst costs one reload", []step{
			{ms: 0, data: "B"}, {ms: 10, data: "C"}, {ms: 50, data: "D"}, {ms: 99, data: "E"},
			{ms: 99}, {ms: 100, reload: true}, {ms: 1000},
		}, 1},
		{"the window opens at the first change and is not pushed back", []step{
			{ms: 0, data: "B"}, {ms: 90, data: "C"}, {ms: 100, reload: true},
		}, 1},
		{"a change back to the loaded bytes cancels the reload", []step{
			{ms: 0, data: "B"}, {ms: 50, data: "A"}, {ms: 100}, {ms: 1000},
		}, 0},
		{"changes after a reload open a new window", []step{
			{ms: 0, data: "B"}, {ms: 100, reload: true},
			{ms: 101, data: "C"}, {ms: 150}, {ms: 201, reload: true},
		}, 2},
		{"the same bytes again after a reload do not reload", []step{
			{ms: 0, data: "B"}, {ms: 100, reload: true}, {ms: 150, data: "B"}, {ms: 1000},
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := debouncer{window: 100 * time.Millisecond}
			d.Loaded([]byte("A"))
			current := "A"
			reloads := 0
			for _, s := range tc.steps {
				if s.data != "" {
					current = s.data
					d.Changed([]byte(s.data), at(s.ms))
				}
				got := d.Due(at(s.ms))
				if got != s.reload {
					t.Fatalf("at %dms: Due = %v, want %v", s.ms, got, s.reload)
				}
				if got {
					reloads++
					d.Loaded([]byte(current))
				}
			}
			if reloads != tc.reloads {
				t.Errorf("%d reloads, want %d", reloads, tc.reloads)
			}
		})
	}
}

func TestDebouncerChangedReportsDue(t *testing.T) {
	t0 := time.Now()
	d := debouncer{window: time.Second}
	d.Loaded([]byte("A"))
	due, pending := d.Changed([]byte("B"), t0)
	if !pending || !due.Equal(t0.Add(time.Second)) {
		t.Errorf("Changed = %v, %v; want %v, true", due, pending, t0.Add(time.Second))
	}
	due2, _ := d.Changed([]byte("C"), t0.Add(500*time.Millisecond))
	if !due2.Equal(due) {
		t.Errorf("a second change moved the due time from %v to %v", due, due2)
	}
	if _, pending := d.Changed([]byte("A"), t0.Add(600*time.Millisecond)); pending {
		t.Error("a change back to the loaded bytes left a reload pending")
	}
	// A reload that failed stays pending until Loaded.
	d.Changed([]byte("B"), t0)
	for i := range 3 {
		if !d.Due(t0.Add(time.Duration(i+1) * time.Second)) {
			t.Fatalf("reload no longer pending after %d failed attempts", i)
		}
	}
}
