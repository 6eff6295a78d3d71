#!/usr/bin/env bash
# tools.sh builds the real kube-apiserver, kubectl, etcd and helm that the
# integration tests run, from the Go module proxy, and caches them outside git
# keyed by the tool modules' go.sum. It prints the directory holding the
# binaries on stdout; progress goes to stderr.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KEEPLB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/tools}
key=$(cat "$root/tools/k8s/go.mod" "$root/tools/k8s/go.sum" "$root/tools/etcd/go.mod" "$root/tools/etcd/go.sum" "$root/tools/helm/go.mod" "$root/tools/helm/go.sum" | sha256sum | cut -c1-16)
dir="$cache/$key"

if [[ -x "$dir/kube-apiserver" && -x "$dir/etcd" && -x "$dir/kubectl" && -x "$dir/helm" ]]; then
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
# helm's own Makefile sets its version, and the Kubernetes version it
# assumes without a cluster (helm template's .Capabilities, helm lint's
# deprecation checks), from client-go's: v0.N is Kubernetes 1.N.
helmver=$(sed -n 's/^require helm.sh\/helm\/v3 \(v[^ ]*\)$/\1/p' "$root/tools/helm/go.mod")
kubeminor=$(cd "$root/tools/helm" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
helmldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helmver -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helmldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kubeminor"
done
echo ">> building helm $helmver (first run: about 2 minutes more)" >&2
(cd "$root/tools/helm" && CGO_ENABLED=0 go build -trimpath -ldflags "$helmldflags" -o "$dir.tmp/helm" helm.sh/helm/v3/cmd/helm)
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo ">> tools built in $((SECONDS - start))s" >&2
echo "$dir"
