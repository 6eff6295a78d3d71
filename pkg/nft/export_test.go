package nft

import (
	"bufio"
	"bytes"
	"context"

	"sigs.k8s.io/knftables"
)

// Capture is a knftables.Interface over a Fake whose whole writes stream
// as the real Interface's do, into Script, and change nothing.
type Capture struct {
	*knftables.Fake
	Script bytes.Buffer
}

func (c *Capture) nftPath() string { return "nft" }

func (c *Capture) runScript(_ context.Context, write func(*bufio.Writer) error) error {
	return write(bufio.NewWriter(&c.Script))
}

// RunScript runs n's nft on what write writes, as Whole does.
func RunScript(ctx context.Context, n knftables.Interface, write func(*bufio.Writer) error) error {
	return n.(streamer).runScript(ctx, write)
}
