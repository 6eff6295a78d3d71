package controlplane

import "syscall"

// sysProcAttr puts the child in its own process group, so that Stop can
// signal everything it might spawn, and asks the kernel to SIGKILL it when
// the parent dies, so that a crashed or killed test binary does not leave an
// etcd and an apiserver behind.
//
// Pdeathsig is tied to the OS thread that started the child, not to the
// whole process, and the Go runtime retires a thread when a goroutine exits
// while locked to it (runtime.LockOSThread), as pkg/nsthread's do:
// startProcess therefore starts and waits for each child on a thread it
// keeps locked until the child has exited.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// signalGroup sends sig to every process in the process group pgid.
func signalGroup(pgid int, sig syscall.Signal) error {
	return syscall.Kill(-pgid, sig)
}
