package nft

import (
	"bufio"
	"context"
	"errors"

	"sigs.k8s.io/knftables"

	"github.com/keeplb/keeplb/pkg/nsthread"
)

// NewAt returns a knftables.Interface for keeplb's table in the network
// namespace at nsPath (such as /run/netns/NAME); "" means the current one,
// as New.
//
// knftables execs nft, which acts on the namespace it runs in, and offers
// no way to wrap the command (as ip netns exec would). A child process
// inherits the network namespace of the thread that forks it, so every
// call that may exec nft (knftables.New's own probe included) runs through
// package nsthread, on a thread that has entered the namespace.
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

var (
	_ knftables.Interface = (*netnsNFT)(nil)
	_ streamer            = (*netnsNFT)(nil)
)

// inNetns runs f in the namespace at path. The namespace is opened per
// call, so a namespace deleted and recreated under the same name is found
// again.
func inNetns[T any](path string, f func() (T, error)) (T, error) { return nsthread.Call(path, f) }

func (n *netnsNFT) do(f func() error) error { return nsthread.Do(n.path, f) }

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

func (n *netnsNFT) nftPath() string {
	if s, ok := n.inner.(streamer); ok {
		return s.nftPath()
	}
	return ""
}

// runScript runs the inner Interface's nft in the namespace; the script
// is written from the namespace's thread too, which only formats text.
func (n *netnsNFT) runScript(ctx context.Context, write func(*bufio.Writer) error) error {
	s, ok := n.inner.(streamer)
	if !ok {
		return errors.New("nft: this Interface cannot stream a script")
	}
	return n.do(func() error { return s.runScript(ctx, write) })
}
