package vm_test

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/keeplb/keeplb/pkg/testing/vm"
)

// needVM skips unless KEEPLB_VM=1: booting the VM takes seconds, and its
// first build downloads a kernel, so these tests do not run by default.
func needVM(t *testing.T) {
	t.Helper()
	if os.Getenv("KEEPLB_VM") != "1" {
		t.Skip("boots a qemu VM: set KEEPLB_VM=1 to run")
	}
}

// TestRunSelf re-runs a subtest inside the VM, where IPVS works.
func TestRunSelf(t *testing.T) {
	t.Run("ipvs in the vm", func(t *testing.T) {
		if !vm.InVM() {
			needVM(t)
			vm.RunSelf(t)
			return
		}
		if os.Getuid() != 0 {
			t.Fatalf("uid %d in the VM, want root", os.Getuid())
		}
		// The working directory is the package's, shared from the host.
		if _, err := os.Stat("vm_test.go"); err != nil {
			t.Fatalf("package folder not shared: %v", err)
		}
		if _, err := os.Stat("/proc/net/ip_vs"); err != nil {
			t.Fatalf("no IPVS in the VM: %v", err)
		}
		if out, err := exec.Command("ipvsadm", "-A", "-t", "10.0.0.1:80", "-s", "rr").CombinedOutput(); err != nil {
			t.Fatalf("ipvsadm -A: %v: %s", err, out)
		}
		out, err := exec.Command("ipvsadm", "-Ln").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "10.0.0.1:80 rr") {
			t.Fatalf("ipvsadm -Ln: %v: %s", err, out)
		}
	})
}

// TestExecExitCode checks that the command's exit code comes back, and that
// the share is writable from inside.
func TestExecExitCode(t *testing.T) {
	if vm.InVM() {
		t.Skip("runs the VM from the host")
	}
	needVM(t)
	dir := t.TempDir()
	var out bytes.Buffer
	rc, err := vm.Exec(t.Context(), &out, []string{dir}, "sh", "-c", "echo \"it's here\" >out; exit 7")
	if err != nil {
		t.Fatal(err)
	}
	if rc != 7 {
		t.Fatalf("exit code %d, want 7; console:\n%s", rc, out.String())
	}
	if b, err := os.ReadFile(dir + "/out"); err != nil || string(b) != "it's here\n" {
		t.Fatalf("file written in the VM: %q, %v", b, err)
	}
}
