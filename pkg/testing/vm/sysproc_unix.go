//go:build unix

package vm

import (
	"os/exec"
	"syscall"
)

// setProcessGroup starts cmd in its own process group and makes cancelling
// terminate the whole group: run.sh, timeout and the qemu it started (run.sh
// then removes its control folder). exec.Cmd.WaitDelay kills what is left.
func setProcessGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
}
