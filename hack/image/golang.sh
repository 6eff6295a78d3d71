#!/usr/bin/env bash
# golang.sh makes a stand-in for Docker Hub's golang:X.Y-SUITE in the local
# buildah store, from the Debian base debian.sh made and this machine's Go
# toolchain, for hosts that cannot pull it (hack/image.sh calls it).
#
# Usage: hack/image/golang.sh FROM TAG
#   e.g. hack/image/golang.sh docker.io/library/debian:bookworm-slim \
#          docker.io/library/golang:1.26-bookworm
#
# It has what a Go build in a Dockerfile uses of the official image: Go at
# /usr/local/go (a copy of `go env GOROOT`), git, ca-certificates (with this
# machine's own authorities from /usr/local/share/ca-certificates) and the
# official image's environment (GOPATH=/go, /go/bin and /usr/local/go/bin on
# PATH, GOTOOLCHAIN=local, GOLANG_VERSION, WORKDIR /go), plus this machine's
# GOPROXY and GOSUMDB, so that `go mod download` reaches the same module
# proxy the same way. Not the C toolchain (gcc, make, pkg-config): keeplb
# builds with CGO_ENABLED=0. hack/image.sh keys its cache on this file, the
# base, and the Go version and settings.
#
# Needs root and buildah; BUILDAH_ISOLATION picks how apt-get runs.
set -euo pipefail

[[ $# == 2 ]] || { echo "usage: $0 FROM TAG" >&2; exit 2; }
from=$1 tag=$2
goroot=$(go env GOROOT)
gover=$(go env GOVERSION)

log() { echo ">>   $*" >&2; }

aptlog=$(mktemp)
ctr=$(buildah from --pull=never "$from")
trap 'if [[ -n $ctr ]]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi; rm -f "$aptlog"' EXIT

log "copying $gover from $goroot"
mnt=$(buildah mount "$ctr")
mkdir -p "$mnt/usr/local/go" "$mnt/go/src" "$mnt/go/bin" "$mnt/usr/local/share/ca-certificates"
cp -a "$goroot/." "$mnt/usr/local/go/"
chmod -R 1777 "$mnt/go"
# The certificate authorities this machine adds to Debian's (a proxy that
# inspects TLS, say): `go mod download` reaches GOPROXY through the same
# network. ca-certificates, installed next, adds them to the bundle.
cp -a /usr/local/share/ca-certificates/. "$mnt/usr/local/share/ca-certificates/" 2>/dev/null || true
buildah umount "$ctr" >/dev/null

log "apt-get install git ca-certificates"
if ! timeout 600 buildah run "$ctr" -- sh -ec '
    apt-get update -q
    apt-get install -yq --no-install-recommends ca-certificates git
    rm -rf /var/lib/apt/lists/*' >"$aptlog" 2>&1; then
  tail -n 30 "$aptlog" >&2
  echo "hack/image/golang.sh: apt-get failed in $from" >&2
  exit 1
fi

buildah config \
  --env GOLANG_VERSION="${gover#go}" \
  --env GOTOOLCHAIN=local \
  --env GOPATH=/go \
  --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env GOPROXY="$(go env GOPROXY)" \
  --env GOSUMDB="$(go env GOSUMDB)" \
  --workingdir /go \
  --created-by "hack/image/golang.sh: $gover from $goroot, git, ca-certificates" "$ctr"
buildah commit -q --rm "$ctr" "$tag" >/dev/null
ctr=
