#!/usr/bin/env bash
# cluster-tools.sh builds what the end-to-end cluster runs besides
# hack/tools.sh's kube-apiserver, etcd and kubectl: kube-controller-manager
# and kube-scheduler for the host, and for each node kubelet, kube-proxy,
# containerd (with its runc v2 shim and ctr), runc and the CNI plugins
# bridge, host-local, loopback and portmap. All come from the Go module
# proxy, pinned by tools/k8s-node, tools/containerd, tools/runc and
# tools/cni-plugins, and are cached outside git keyed by those modules'
# go.mod and go.sum (and libseccomp's version, which runc links statically).
# hack/tools.sh, its modules and its cache key are not touched.
#
# Usage: hack/cluster-tools.sh    # prints the directory holding the binaries
#
# The directory holds the binaries, and cni/ the CNI plugins (containerd's
# CRI plugin: bin_dir). Everything is static, so it runs in the test VM too.
# runc needs cgo and libseccomp: libseccomp-dev is installed with apt-get
# when missing (needs root). Progress and build times go to stderr.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KEEPLB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/tools}
mods="k8s-node containerd runc cni-plugins"

log() { echo ">> $*" >&2; }
die() { echo "hack/cluster-tools.sh: $*" >&2; exit 1; }

if [[ $(dpkg-query -W -f='${Status}' libseccomp-dev 2>/dev/null) != "install ok installed" ]]; then
  [[ $(id -u) == 0 ]] || die "runc needs libseccomp-dev: run as root or apt-get install it"
  log "installing libseccomp-dev (runc links it)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libseccomp-dev >&2
fi
seccompver=$(dpkg-query -W -f='${Version}' libseccomp-dev)

key=$({
  for m in $mods; do cat "$root/tools/$m/go.mod" "$root/tools/$m/go.sum"; done
  echo "libseccomp-dev=$seccompver"
} | sha256sum | cut -c1-16)
dir="$cache/cluster-$key"
bins="kube-controller-manager kube-scheduler kubelet kube-proxy containerd containerd-shim-runc-v2 ctr runc"
cnis="bridge host-local loopback portmap"

done=1
for b in $bins; do [[ -x $dir/$b ]] || done=0; done
for b in $cnis; do [[ -x $dir/cni/$b ]] || done=0; done
if ((done)); then
  echo "$dir"
  exit 0
fi

modver() { sed -n "s#^require $2 \(v[^ ]*\)\$#\1#p" "$root/tools/$1/go.mod"; }
tmp="$dir.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/cni"
start=$SECONDS
times=()
# build MODULE OUT LABEL GOFLAGS... PACKAGE: one go build, timed.
build() {
  local mod=$1 out=$2 label=$3 t=$SECONDS
  shift 3
  log "building $label"
  (cd "$root/tools/$mod" && go build -trimpath -o "$out" "$@")
  times+=("$label $((SECONDS - t))s")
}

k8sver=$(modver k8s-node k8s.io/kubernetes)
[[ -n $k8sver ]] || die "no k8s.io/kubernetes version in tools/k8s-node/go.mod"
# The same version stamp as hack/tools.sh gives kube-apiserver: kubelet
# reports it as the Node's kubeletVersion, and the apiserver's version skew
# rules compare it.
k8sld="-s -w -X k8s.io/component-base/version.gitVersion=$k8sver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$k8sver" | cut -d. -f2) -X k8s.io/component-base/version.gitTreeState=clean"
log "Kubernetes $k8sver (first run: about 8 minutes for all on 2 cores, most of it in the first command; cached afterwards in $dir)"
for c in kube-controller-manager kube-scheduler kubelet kube-proxy; do
  CGO_ENABLED=0 build k8s-node "$tmp/$c" "$c" -ldflags "$k8sld" "k8s.io/kubernetes/cmd/$c"
done

# containerd's Makefile: urfave_cli_no_docs everywhere, no_grpc for the shim.
ctrver=$(modver containerd github.com/containerd/containerd/v2)
ctrpkg=github.com/containerd/containerd/v2
ctrld="-s -w -X $ctrpkg/version.Version=$ctrver -X $ctrpkg/version.Package=$ctrpkg"
for c in containerd ctr; do
  CGO_ENABLED=0 build containerd "$tmp/$c" "$c $ctrver" -tags "urfave_cli_no_docs osusergo netgo" -ldflags "$ctrld" "$ctrpkg/cmd/$c"
done
CGO_ENABLED=0 build containerd "$tmp/containerd-shim-runc-v2" "containerd-shim-runc-v2 $ctrver" \
  -tags "urfave_cli_no_docs no_grpc osusergo netgo" -ldflags "$ctrld" "$ctrpkg/cmd/containerd-shim-runc-v2"

# runc needs cgo (libcontainer/nsenter is C) and, with the seccomp tag,
# libseccomp; linked statically like runc's "make static". The libpathrs tag
# of runc's default set is left out: it needs libpathrs, a Rust library
# that Debian 12 does not package and runc's README calls optional; without
# it runc resolves paths in Go (filepath-securejoin).
runcver=$(modver runc github.com/opencontainers/runc)
CGO_ENABLED=1 build runc "$tmp/runc" "runc $runcver" -buildmode=pie \
  -tags "seccomp urfave_cli_no_docs netgo osusergo" \
  -ldflags "-s -w -linkmode external -extldflags -static-pie" github.com/opencontainers/runc

cniver=$(modver cni-plugins github.com/containernetworking/plugins)
cnild="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$cniver"
for p in ipam/host-local main/bridge main/loopback meta/portmap; do
  CGO_ENABLED=0 build cni-plugins "$tmp/cni/${p#*/}" "cni ${p#*/} $cniver" -ldflags "$cnild" "github.com/containernetworking/plugins/plugins/$p"
done

rm -rf "$dir"
mv "$tmp" "$dir"
log "build times: $(printf '%s, ' "${times[@]}")total $((SECONDS - start))s"
echo "$dir"
