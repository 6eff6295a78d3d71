package keepalived

import (
	"syscall"
	"testing"
)

func TestParseStat(t *testing.T) {
	for _, tc := range []struct {
		stat  string
		state string
		pgrp  int
		ok    bool
	}{
		{"123 (keepalived) S 1 123 123 0 -1", "S", 123, true},
		{"124 (a (b) c) Z 123 123 123 0", "Z", 123, true},
		{"125 (x) R", "", 0, false},
		{"garbage", "", 0, false},
	} {
		state, pgrp, ok := parseStat([]byte(tc.stat))
		if state != tc.state || pgrp != tc.pgrp || ok != tc.ok {
			t.Errorf("parseStat(%q) = %q, %d, %v; want %q, %d, %v", tc.stat, state, pgrp, ok, tc.state, tc.pgrp, tc.ok)
		}
	}
}

func TestGroupAlive(t *testing.T) {
	if !groupAlive(syscall.Getpgrp()) {
		t.Error("our own process group is not alive")
	}
	// PIDs are below pid_max (at most 2^22): no such group.
	if groupAlive(1 << 23) {
		t.Error("a group that cannot exist is alive")
	}
}
