// Package golden compares what a test produced with a file kept under
// testdata, so that a change of output shows as a readable diff in review.
package golden

import (
	"bytes"
	"os"
	"testing"
)

// Check fails tb unless got equals the file at path. With update it
// writes got to path instead: each test package defines its own -update
// flag and passes it here.
func Check(tb testing.TB, path string, got []byte, update bool) {
	tb.Helper()
	if update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			tb.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		tb.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		tb.Errorf("output differs from %s (go test -update rewrites it if intended):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}
