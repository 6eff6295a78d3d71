#!/usr/bin/env bash
# demo-cluster.sh is make demo-cluster: keeplb from its image on a real
# three-node cluster in the test VM (pkg/testing/cluster: kubelets with their
# own containerd, kube-proxy, the real controllers), installed with
# kubectl apply -k, with the docs' examples; it prints the pods next to the
# Services and one answer through each VIP, then keeps the cluster up until
# Ctrl-C (KEEPLB_DEMO_CLUSTER=1 to stop at once). make demo is the quick
# one (seconds, keeplb as processes); this one shows the real thing and
# takes a few minutes: the images are imported into each node under TCG.
# It needs root (network namespaces, the VM's tap device).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

[[ $(id -u) == 0 ]] || { echo "demo-cluster: needs root (network namespaces and a tap device)" >&2; exit 1; }
tools=$(hack/tools.sh)
cluster_tools=$(hack/cluster-tools.sh)
out=$root/_output/cluster
mkdir -p "$out"
# The same image as the real-cluster tests' first one, so that either
# reuses the other's build.
VERSION=v0.0.1 COMMIT=e2e DATE=1970-01-01T00:00:00Z IMAGE=keeplb.local/keeplb:v0.0.1 \
  KEEPLB_IMAGE_ARCHIVE=$out/keeplb-v0.0.1.tar hack/image.sh
go test -c -o "$out/cluster.test" ./e2e/cluster/
cd e2e/cluster
KEEPLB_TOOLS_DIR=$tools KEEPLB_CLUSTER_TOOLS_DIR=$cluster_tools KEEPLB_CLUSTER_IMAGES=$out/keeplb-v0.0.1.tar \
  KEEPLB_DEMO_CLUSTER=${KEEPLB_DEMO_CLUSTER:-hold} "$out/cluster.test" -test.v -test.run '^TestDemoCluster$' -test.timeout 6h
