//go:build tools

// Package tools pins the golangci-lint command for make lint.
package tools

import _ "github.com/golangci/golangci-lint/v2/cmd/golangci-lint"
