//go:build tools

// Package tools pins containerd, its runc v2 shim and ctr for the end-to-end
// cluster's nodes (hack/cluster-tools.sh builds them).
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
