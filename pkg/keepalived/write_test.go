package keepalived_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/keepalived"
)

func TestWriteAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keepalived.conf")

	for _, step := range []struct {
		data        string
		wantChanged bool
	}{
		{"a\n", true},  // new file
		{"a\n", false}, // same bytes
		{"b\n", true},  // different bytes
		{"", true},     // empty is content too
		{"", false},
	} {
		var mtime time.Time
		if fi, err := os.Stat(path); err == nil {
			mtime = fi.ModTime()
		}
		changed, err := keepalived.WriteAtomic(path, []byte(step.data))
		if err != nil {
			t.Fatal(err)
		}
		if changed != step.wantChanged {
			t.Errorf("WriteAtomic(%q) changed = %v, want %v", step.data, changed, step.wantChanged)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != step.data {
			t.Errorf("file holds %q, want %q", got, step.data)
		}
		if fi, _ := os.Stat(path); !changed && !fi.ModTime().Equal(mtime) {
			t.Errorf("WriteAtomic(%q) touched an unchanged file", step.data)
		}
		if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
			t.Errorf("%s.tmp left behind: %v", path, err)
		}
	}
}

func TestWriteAtomicErrors(t *testing.T) {
	dir := t.TempDir()
	// The directory does not exist: the .tmp cannot be created.
	if _, err := keepalived.WriteAtomic(filepath.Join(dir, "missing", "keepalived.conf"), []byte("x")); err == nil {
		t.Error("no error writing into a missing directory")
	}
	// path is a directory: reading it fails, nothing is written.
	if _, err := keepalived.WriteAtomic(dir, []byte("x")); err == nil {
		t.Error("no error writing over a directory")
	}
	if _, err := os.Stat(dir + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("%s.tmp left behind: %v", dir, err)
	}
}
