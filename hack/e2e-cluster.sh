#!/usr/bin/env bash
# e2e-cluster.sh runs keeplb as its users run it (e2e/cluster): on a real
# cluster of three nodes in the test VM (pkg/testing/cluster), from its
# image, installed with kubectl apply -k and with helm install. It builds
# what that needs, each cached by content outside git:
#   hack/tools.sh          etcd, kube-apiserver, kubectl, helm
#   hack/cluster-tools.sh  kube-controller-manager, kube-scheduler, kubelet,
#                          kube-proxy, containerd, runc, CNI plugins
#   hack/image.sh          keeplb's image stamped v0.0.1, and from it one
#                          stamped v0.0.2 for the upgrade test
#                          (_output/cluster/keeplb-v0.0.N.tar); buildah's
#                          layer cache makes a rebuild of an unchanged tree
#                          quick
#   hack/vm/build.sh       the VM, with the modules the nodes need (the
#                          test builds it, pkg/testing/cluster names them)
# make test runs it as its last stage. Extra arguments go to go test.
# It needs root (network namespaces, the VM's tap device).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

log() { echo ">> $*" >&2; }

if [[ $(id -u) != 0 ]]; then
  log "not root: the real-cluster tests need network namespaces and a tap device; skipped"
  exit 0
fi
start=$SECONDS
tools=$(hack/tools.sh)
cluster_tools=$(hack/cluster-tools.sh)
log "tools ready after $((SECONDS - start))s"

# v0.0.1 is the Dockerfile as it is, with a fixed commit and date, so that
# a second run on an unchanged tree reuses every layer.
out=$root/_output/cluster
mkdir -p "$out"
t=$SECONDS
VERSION=v0.0.1 COMMIT=e2e DATE=1970-01-01T00:00:00Z IMAGE=keeplb.local/keeplb:v0.0.1 \
  KEEPLB_IMAGE_ARCHIVE=$out/keeplb-v0.0.1.tar hack/image.sh
log "image v0.0.1 ready after $((SECONDS - t))s"

# v0.0.2, for the upgrade test, is v0.0.1 with only the binary replaced by
# make build's, stamped v0.0.2: what a release changes, in a tenth of the
# time of a second Dockerfile build (whose Go build starts without a cache).
t=$SECONDS
make -s build VERSION=v0.0.2 COMMIT=e2e DATE=1970-01-01T00:00:00Z
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp bin/keeplb "$ctx/keeplb"
printf 'FROM keeplb.local/keeplb:v0.0.1\nCOPY keeplb /usr/local/bin/keeplb\n' >"$ctx/Dockerfile"
if docker info >/dev/null 2>&1; then
  docker build -q -t keeplb.local/keeplb:v0.0.2 "$ctx" >/dev/null
  docker save -o "$out/keeplb-v0.0.2.tar" keeplb.local/keeplb:v0.0.2
else
  buildah bud -q --pull=never -t keeplb.local/keeplb:v0.0.2 "$ctx" >/dev/null
  rm -f "$out/keeplb-v0.0.2.tar"
  buildah push -q keeplb.local/keeplb:v0.0.2 "docker-archive:$out/keeplb-v0.0.2.tar:keeplb.local/keeplb:v0.0.2" >/dev/null
fi
log "image v0.0.2 ready after $((SECONDS - t))s"
images=("$out/keeplb-v0.0.1.tar" "$out/keeplb-v0.0.2.tar")

log "ready to test after $((SECONDS - start))s"

KEEPLB_TOOLS_DIR=$tools KEEPLB_CLUSTER_TOOLS_DIR=$cluster_tools KEEPLB_CLUSTER_IMAGES="${images[*]}" \
  go test -count=1 -p 1 -timeout 45m -v ./e2e/cluster/ "$@"
