//go:build tools

// Package tools pins runc for the end-to-end cluster's nodes
// (hack/cluster-tools.sh builds it, with cgo and libseccomp).
package tools

import _ "github.com/opencontainers/runc"
