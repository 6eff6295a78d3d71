//go:build !unix

package vm

import "os/exec"

// setProcessGroup leaves cmd as is: the VM needs qemu on a Unix host anyway.
func setProcessGroup(*exec.Cmd) {}
