#!/usr/bin/env bash
# e2e.sh runs the tests that need a kernel with IPVS inside the VM of
# hack/vm (a stock Debian kernel under qemu; the first run builds it, about
# 20 s, and installs qemu with apt if missing): the IPVS kernel boundary and
# the forwarding test (client -> VIP -> IPVS -> NodePort, with keeplb's
# nftables masquerade and source ranges). Not yet part of `make test`.
# Extra arguments go to go test.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

KEEPLB_VM=1 go test -count=1 -v -timeout 20m \
  -run 'TestNetlinkInNamespace|TestForwardingNodePort' ./pkg/ipvs/ ./e2e/dataplane/ "$@"
