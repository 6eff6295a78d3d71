package controlplane

import (
	"context"
	"errors"
	"testing"
)

// StartForTest starts a control plane for a test (or a parent test whose
// subtests share it) and registers Stop with tb.Cleanup. It calls tb.Skip
// when $KEEPLB_TOOLS_DIR is not set, so that a plain `go test ./...` without
// the binaries still passes, and tb.Fatal, with the tail of the apiserver
// log, when the control plane does not start. A set but incomplete
// $KEEPLB_TOOLS_DIR is a broken setup and fails rather than skips.
//
// If the test has failed by the time of cleanup, the work dir with the etcd
// and kube-apiserver logs is kept and its path logged.
func StartForTest(tb testing.TB) *ControlPlane {
	tb.Helper()
	cp, err := Start(tb.Context(), Options{})
	if errors.Is(err, errNoToolsDir) {
		tb.Skip(err.Error())
	}
	if err != nil {
		tb.Fatalf("start control plane: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() && cp.removeDir {
			cp.removeDir = false
			tb.Logf("control plane work dir kept for inspection: %s", cp.WorkDir())
		}
		if err := cp.Stop(); err != nil {
			tb.Errorf("stop control plane: %v", err)
		}
	})
	return cp
}

// StartForMain starts a control plane from TestMain, where no testing.TB
// exists. When $KEEPLB_TOOLS_DIR is not set it returns a non-empty
// skipReason and no error; TestMain should then print the reason and either
// exit 0 or run only the tests that need no control plane. The caller must
// Stop the control plane before os.Exit, which skips deferred calls.
func StartForMain() (cp *ControlPlane, skipReason string, err error) {
	cp, err = Start(context.Background(), Options{})
	if errors.Is(err, errNoToolsDir) {
		return nil, err.Error(), nil
	}
	if err != nil {
		return nil, "", err
	}
	return cp, "", nil
}
