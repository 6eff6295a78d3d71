//go:build tools

// Package tools pins the helm command for the integration tests.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
