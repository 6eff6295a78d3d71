#!/usr/bin/env bash
# e2e-vrrp.sh runs the speaker's end-to-end test: a real kube-apiserver,
# keeplb's controller, and one speaker with a real keepalived per node, in
# network namespaces it creates (3 nodes and a client on a bridge). It needs
# root, iproute2 and keepalived; it prints the measured failover times.
# Extra arguments go to go test, e.g. -run TestVRRP/100ms.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

dir=$(hack/tools.sh)
KEEPLB_TOOLS_DIR=$dir go test -race -count=1 -v -timeout 20m ./e2e/vrrp/ "$@" | grep -v '^[IW][0-9]\{4\} \|^[A-Z][a-z][a-z] [A-Z][a-z][a-z] ' || true
test "${PIPESTATUS[0]}" -eq 0
