// Package nsthread runs code inside another network namespace without
// moving the process: on a goroutine locked to an OS thread that has
// entered the namespace. Sockets opened there belong to the namespace for
// their whole life, whichever goroutine uses them later, and processes
// started there inherit it (knftables' nft, ipvsadm).
//
// The thread is never unlocked: it exits with its goroutine instead of
// going back to the Go scheduler in the wrong namespace.
package nsthread

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// Path returns the path of the named namespace of ip netns.
func Path(name string) string { return "/run/netns/" + name }

// Call runs f in the network namespace at path (such as Path(name)) and
// returns what f returns.
func Call[T any](path string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see the package comment
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			c <- result{err: fmt.Errorf("open network namespace %s: %w", path, err)}
			return
		}
		defer func() { _ = unix.Close(fd) }()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			c <- result{err: fmt.Errorf("enter network namespace %s: %w", path, err)}
			return
		}
		v, err := f()
		c <- result{v, err}
	}()
	r := <-c
	return r.v, r.err
}

// Do runs f in the network namespace at path and returns its error.
func Do(path string, f func() error) error {
	_, err := Call(path, func() (struct{}, error) { return struct{}{}, f() })
	return err
}
