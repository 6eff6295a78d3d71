#!/usr/bin/env bash
# demo.sh is `make demo`: it installs and builds what the demo needs (cached
# after the first run), then runs `keeplb-demo up` (hack/demo), which starts
# a control plane, keeplb's controller and three nodes with a speaker each,
# shows Services getting VIPs, traffic and a failover, and leaves it all
# running. `make demo-down` stops it.
#
# KEEPLB_DEMO_STATE overrides the state folder (default _output/demo), for
# the test of this script (e2e/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { printf '[%5ds] %s\n' $((SECONDS - start)) "$*"; }
# quietly runs a long step, saying every 30 s that it still runs: no silent
# minutes on a first run.
quietly() {
  local what=$1 hb rc=0
  shift
  (while sleep 30; do say "... still $what"; done) >&2 &
  hb=$!
  "$@" || rc=$?
  kill "$hb" 2>/dev/null
  wait "$hb" 2>/dev/null || true
  return "$rc"
}

missing=()
for p in keepalived iproute2 ipvsadm; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { echo "make demo: needs root (network namespaces, IPVS); run it as root" >&2; exit 1; }
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ $(id -u) == 0 ]] || { echo "make demo: needs root (network namespaces, IPVS); run it as root" >&2; exit 1; }

say "building kube-apiserver, kubectl, etcd and helm from the Go module proxy (first run: about 6 minutes on 2 cores; cached in ~/.cache/keeplb/tools)"
tools=$(quietly "building kube-apiserver, kubectl, etcd and helm" hack/tools.sh)
say "building keeplb and keeplb-demo into _output/bin"
mkdir -p _output/bin
quietly "building keeplb" go build -o _output/bin/keeplb ./cmd/keeplb
quietly "building keeplb-demo" go build -o _output/bin/keeplb-demo ./hack/demo
ln -sf "$tools/kubectl" _output/bin/kubectl
vmdir=
if [[ ! -e /proc/net/ip_vs ]] && ! modprobe -q ip_vs 2>/dev/null; then
  say "the host kernel has no IPVS: building the VM for the node side (first run: about 20 s, plus installing qemu with apt; cached in ~/.cache/keeplb/vm)"
  vmdir=$(quietly "building the VM" hack/vm/build.sh)
fi
say "starting the demo"
exec _output/bin/keeplb-demo up -tools "$tools" -vm-dir "$vmdir" ${KEEPLB_DEMO_STATE:+-state "$KEEPLB_DEMO_STATE"}
