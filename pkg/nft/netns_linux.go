package nft

import (
	"context"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"
)

// NewAt returns a knftables.Interface for keeplb's table in the network
// namespace at nsPath (such as /run/netns/NAME); "" means the current one,
// as New.
//
// knftables execs nft, which acts on the namespace it runs in, and offers
// no way to wrap the command (as ip netns exec would). A child process
// inherits the network namespace of the thread that forks it, so every
// call that may exec nft (knftables.New's own probe included) runs on a
// goroutine locked to a thread that has entered the namespace. That
// thread is never unlocked: it exits with its goroutine instead of going
// back to the scheduler in the wrong namespace.
func NewAt(nsPath string) (knftables.Interface, error) {
	if nsPath == "" {
		return New()
	}
	inner, err := inNetns(nsPath, New)
	if err != nil {
		return nil, err
	}
	return &netnsNFT{path: nsPath, inner: inner}, nil
}

// netnsNFT runs an inner knftables.Interface in another network namespace.
type netnsNFT struct {
	path  string
	inner knftables.Interface
}

var _ knftables.Interface = (*netnsNFT)(nil)

// inNetns runs f on a fresh thread in the network namespace at path and
// returns its results. The namespace is opened per call, so a namespace
// deleted and recreated under the same name is found again.
func inNetns[T any](path string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see NewAt
		var zero T
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			c <- result{zero, fmt.Errorf("open network namespace %s: %w", path, err)}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			c <- result{zero, fmt.Errorf("enter network namespace %s: %w", path, err)}
			return
		}
		v, err := f()
		c <- result{v, err}
	}()
	r := <-c
	return r.v, r.err
}

func (n *netnsNFT) do(f func() error) error {
	_, err := inNetns(n.path, func() (struct{}, error) { return struct{}{}, f() })
	return err
}

// NewTransaction is part of knftables.Interface. It builds data only, so
// it runs here.
func (n *netnsNFT) NewTransaction() *knftables.Transaction { return n.inner.NewTransaction() }

// Run is part of knftables.Interface.
func (n *netnsNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	return n.do(func() error { return n.inner.Run(ctx, tx) })
}

// Check is part of knftables.Interface.
func (n *netnsNFT) Check(ctx context.Context, tx *knftables.Transaction) error {
	return n.do(func() error { return n.inner.Check(ctx, tx) })
}

// ListAll is part of knftables.Interface.
func (n *netnsNFT) ListAll(ctx context.Context) (map[string][]string, error) {
	return inNetns(n.path, func() (map[string][]string, error) { return n.inner.ListAll(ctx) })
}

// List is part of knftables.Interface.
func (n *netnsNFT) List(ctx context.Context, objectType string) ([]string, error) {
	return inNetns(n.path, func() ([]string, error) { return n.inner.List(ctx, objectType) })
}

// ListRules is part of knftables.Interface.
func (n *netnsNFT) ListRules(ctx context.Context, chain string) ([]*knftables.Rule, error) {
	return inNetns(n.path, func() ([]*knftables.Rule, error) { return n.inner.ListRules(ctx, chain) })
}

// ListElements is part of knftables.Interface.
func (n *netnsNFT) ListElements(ctx context.Context, objectType, name string) ([]*knftables.Element, error) {
	return inNetns(n.path, func() ([]*knftables.Element, error) { return n.inner.ListElements(ctx, objectType, name) })
}

// ListCounters is part of knftables.Interface.
func (n *netnsNFT) ListCounters(ctx context.Context) ([]*knftables.Counter, error) {
	return inNetns(n.path, func() ([]*knftables.Counter, error) { return n.inner.ListCounters(ctx) })
}
