//go:build unix && !linux

package controlplane

import "syscall"

// sysProcAttr puts the child in its own process group, so that Stop can
// signal everything it might spawn. Only Linux can also have the kernel kill
// the children when the test binary dies; elsewhere a killed test binary may
// leave them running.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// signalGroup sends sig to every process in the process group pgid.
func signalGroup(pgid int, sig syscall.Signal) error {
	return syscall.Kill(-pgid, sig)
}
