package vm

import (
	"slices"
	"testing"
)

func TestDedupe(t *testing.T) {
	got := dedupe([]string{"/nonexistent/a", "/nonexistent/a/b", "/nonexistent/c/", "/nonexistent/a", "/nonexistent/ab"})
	want := []string{"/nonexistent/a", "/nonexistent/c", "/nonexistent/ab"}
	if !slices.Equal(got, want) {
		t.Fatalf("dedupe = %q, want %q", got, want)
	}
}
