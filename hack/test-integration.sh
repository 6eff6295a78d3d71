#!/usr/bin/env bash
# test-integration.sh runs the tests that need a real kube-apiserver and
# etcd: it builds them once (hack/tools.sh caches them outside git) and
# points the tests at them. Extra arguments go to go test, e.g. -run X or -v.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

dir=$(hack/tools.sh)
# Each test package starts its own control plane; two at a time keeps a
# 2-core machine busy without starving the apiservers into timeouts.
# The packages that need IPVS run in hack/e2e.sh, one at a time.
pkgs=$(go list ./e2e/... ./pkg/testing/... | grep -vE '/e2e/(dataplane|ipvs|demo|cluster)$')
# shellcheck disable=SC2086 # one word per package
KEEPLB_TOOLS_DIR=$dir go test -race -count=1 -p 2 -timeout 30m $pkgs "$@"
