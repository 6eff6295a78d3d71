package nft

import (
	"bufio"
	"context"
	"sync"

	"sigs.k8s.io/knftables"
)

// bigTransaction is the size, in operations, above which a Run is
// followed by a fresh knftables.Interface.
//
// knftables formats every transaction into one command buffer that the
// Interface keeps for the next Run and never shrinks. keeplb's table is
// written whole only now and then (the first write, after a failure, the
// periodic full sync) and updated by a few elements in between, so the
// buffer of the largest whole write would stay allocated for nothing: at
// 100,000 masqueraded real servers that was 16 MB of a speaker's 160 MB
// live heap (docs/benchmarks.md, the speaker at scale). Starting afresh
// costs knftables.New's probe (two runs of nft), after a write that ran
// nft on thousands of operations anyway.
const bigTransaction = 4096

// releasing is a knftables.Interface that replaces its inner Interface,
// with renew, after a Run of more than bigTransaction operations, so that
// the old one's command buffer is freed. Should renew fail, it goes on
// with the old one.
type releasing struct {
	renew func() (knftables.Interface, error)
	path  string // the nft Whole streams to; "" for none
	big   int    // bigTransaction; smaller in tests
	mu    sync.Mutex
	inner knftables.Interface
}

var (
	_ knftables.Interface = (*releasing)(nil)
	_ streamer            = (*releasing)(nil)
)

func newReleasing(renew func() (knftables.Interface, error)) (*releasing, error) {
	inner, err := renew()
	if err != nil {
		return nil, err
	}
	return &releasing{renew: renew, big: bigTransaction, inner: inner}, nil
}

func (r *releasing) get() knftables.Interface {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inner
}

// NewTransaction is part of knftables.Interface.
func (r *releasing) NewTransaction() *knftables.Transaction { return r.get().NewTransaction() }

// Run is part of knftables.Interface.
func (r *releasing) Run(ctx context.Context, tx *knftables.Transaction) error {
	err := r.get().Run(ctx, tx)
	r.after(tx)
	return err
}

// Check is part of knftables.Interface. A check formats the transaction
// into the same buffer as a Run.
func (r *releasing) Check(ctx context.Context, tx *knftables.Transaction) error {
	err := r.get().Check(ctx, tx)
	r.after(tx)
	return err
}

// after renews the inner Interface if tx was big.
func (r *releasing) after(tx *knftables.Transaction) {
	if tx.NumOperations() <= r.big {
		return
	}
	if fresh, err := r.renew(); err == nil {
		r.mu.Lock()
		r.inner = fresh
		r.mu.Unlock()
	}
}

// ListAll is part of knftables.Interface.
func (r *releasing) ListAll(ctx context.Context) (map[string][]string, error) {
	return r.get().ListAll(ctx)
}

// List is part of knftables.Interface.
func (r *releasing) List(ctx context.Context, objectType string) ([]string, error) {
	return r.get().List(ctx, objectType)
}

// ListRules is part of knftables.Interface.
func (r *releasing) ListRules(ctx context.Context, chain string) ([]*knftables.Rule, error) {
	return r.get().ListRules(ctx, chain)
}

// ListElements is part of knftables.Interface.
func (r *releasing) ListElements(ctx context.Context, objectType, name string) ([]*knftables.Element, error) {
	return r.get().ListElements(ctx, objectType, name)
}

// ListCounters is part of knftables.Interface.
func (r *releasing) ListCounters(ctx context.Context) ([]*knftables.Counter, error) {
	return r.get().ListCounters(ctx)
}

func (r *releasing) nftPath() string { return r.path }

// runScript streams a script to nft, without knftables and its buffer.
func (r *releasing) runScript(ctx context.Context, write func(*bufio.Writer) error) error {
	return runScript(ctx, r.path, write)
}
