#!/usr/bin/env bash
# e2e.sh runs the tests that need a kernel with IPVS, inside the VM of
# hack/vm where the host kernel has none (a stock Debian kernel under qemu;
# the first run builds it, about 20 s, and installs qemu with apt as root):
#   pkg/ipvs        our IPVS boundary against the real kernel
#   e2e/dataplane   client -> VIP -> IPVS -> NodePort with keeplb's nftables; keeplb prepare-node
#                   loading ip_vs on a kernel that had it unloaded
#   e2e/ipvs        the dataplane scenarios with real speakers and keepalived
#   e2e/demo        make demo's script, and what it prints
# They run one package at a time, after the integration tests (make test
# calls this as its last stage): two qemu VMs under TCG would starve each
# other, and the VRRP timing tests, of the 2 cores.
# Extra arguments go to go test.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

dir=$(hack/tools.sh)
if [[ ! -e /proc/net/ip_vs ]] && ! command -v qemu-system-x86_64 >/dev/null && [[ $(id -u) != 0 ]]; then
  echo ">> no IPVS in the host kernel and no qemu (and not root to install it): the IPVS tests will skip" >&2
elif [[ ! -e /proc/net/ip_vs ]]; then
  echo ">> the host kernel has no IPVS: building the VM (hack/vm/build.sh; cached)" >&2
  hack/vm/build.sh >/dev/null
fi
KEEPLB_VM=1 KEEPLB_TOOLS_DIR=$dir go test -race -count=1 -p 1 -timeout 30m \
  ./pkg/ipvs/ ./e2e/dataplane/ ./e2e/ipvs/ ./e2e/demo/ "$@"
