#!/usr/bin/env bash
# tools.sh builds the real kube-apiserver, kubectl and etcd that the
# integration tests run, from the Go module proxy, and caches them outside git
# keyed by the tool modules' go.sum. It prints the directory holding the
# binaries on stdout; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KEEPLB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/tools}
key=$(cat "$root/tools/k8s/go.mod" "$root/tools/k8s/go.sum" "$root/tools/etcd/go.mod" "$root/tools/etcd/go.sum" | sha256sum | cut -c1-16)
dir="$cache/$key"

if [[ -x "$dir/kube-apiserver" && -x "$dir/etcd" && -x "$dir/kubectl" ]]; then
  echo "$dir"
  exit 0
fi

mkdir -p "$dir.tmp"
k8sver=$(sed -n 's/^require k8s.io\/kubernetes \(v[^ ]*\)$/\1/p' "$root/tools/k8s/go.mod")
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8sver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$k8sver" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
start=$SECONDS
echo ">> building kube-apiserver and kubectl $k8sver (first run: about 4 minutes on 2 cores; cached afterwards in $dir)" >&2
(cd "$root/tools/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir.tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
echo ">> building etcd" >&2
(cd "$root/tools/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir.tmp/etcd" go.etcd.io/etcd/server/v3)
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo ">> tools built in $((SECONDS - start))s" >&2
echo "$dir"
