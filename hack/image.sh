#!/usr/bin/env bash
# image.sh builds keeplb's container image from the repository's Dockerfile,
# as it is, tags it IMAGE, saves it as a docker-archive in
# _output/keeplb-image.tar (for `docker load`, `podman load` or
# `ctr -n k8s.io images import`), and checks it: the image must run
# `keeplb version` (printing VERSION) and have keepalived, nft and modprobe.
#
# Usage: hack/image.sh                    (make image passes VERSION, COMMIT, DATE)
#
# Where a Docker engine answers (`docker info`), it is `docker build`. Where
# none does, it is `buildah bud` as root, with pulls disabled: the
# Dockerfile's two bases, debian:SUITE-slim and golang:X.Y-SUITE, are made
# here instead of pulled (hack/image/debian.sh: debootstrap from this
# machine's Debian mirror; hack/image/golang.sh: that plus this machine's Go)
# and tagged with exactly those names (docker.io/library/...) in the local
# containers store, replacing any image of those names there. Each base is
# cached outside git, keyed by its script, the suite and mirrors, and for Go
# the Go version, GOPROXY, GOSUMDB and the local certificate authorities, in
#   ${KEEPLB_IMAGE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/keeplb/image}/
#     <name>-<key>.tar   the base as an OCI archive
#     <name>-<key>.id    its image ID
# so that a warm run only rebuilds keeplb's own layers (buildah --layers).
# Bases unused for 14 days are pruned; delete the folder to start afresh.
#
# Environment:
#   VERSION, COMMIT, DATE         the Dockerfile's build arguments
#   IMAGE                         the tag (default keeplb:$VERSION)
#   KEEPLB_IMAGE_BUILDER          docker or buildah (default: docker if its
#                                 engine answers, else buildah)
#   KEEPLB_IMAGE_MIRROR           Debian mirror for the bases (default: this
#   KEEPLB_IMAGE_SECURITY_MIRROR  machine's apt sources, else deb.debian.org)
#   KEEPLB_IMAGE_ARCHIVE          where to save the archive (default
#                                 _output/keeplb-image.tar)
#   KEEPLB_IMAGE_TIMEOUT          seconds the build may take (default 1800)
#   BUILDAH_ISOLATION             how buildah runs RUN steps (default chroot,
#                                 which works where crun cannot, e.g. hybrid
#                                 cgroups); STORAGE_DRIVER, as for buildah
#
# Missing Debian packages (buildah, debootstrap) are installed with apt-get.
# Progress goes to stderr; the whole build output to _output/image.log.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
: "${VERSION:=dev}" "${COMMIT:=unknown}" "${DATE:=unknown}"
image=${IMAGE:-keeplb:$VERSION}
out=$root/_output
archive=${KEEPLB_IMAGE_ARCHIVE:-$out/keeplb-image.tar}
buildlog=$out/image.log
limit=${KEEPLB_IMAGE_TIMEOUT:-1800}

log() { echo ">> $*" >&2; }
die() { echo "hack/image.sh: $*" >&2; exit 1; }
log_tail() { echo "---- last lines of $buildlog ----" >&2; tail -n "$1" "$buildlog" >&2; }

builder=${KEEPLB_IMAGE_BUILDER:-}
if [[ -z $builder ]]; then
  if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
    builder=docker
  else
    builder=buildah
  fi
fi
[[ $builder == docker || $builder == buildah ]] || die "KEEPLB_IMAGE_BUILDER is docker or buildah, not $builder"
mkdir -p "$out"
start=$SECONDS

# --- the bases, for buildah ----------------------------------------------------
# host_mirror prints the first URI of this machine's apt sources that ends in
# /$1 (debian or debian-security).
host_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE "https?://[^[:space:]]+/$1/?([[:space:]]|\$)" | head -n1 |
    sed 's#/*[[:space:]]*$##' || true
}

# base TAG KEY SCRIPT ARGS...: TAG in the local store is the base for KEY:
# already there, loaded from the cache, or made by SCRIPT ARGS... TAG.
base() {
  local tag=$1 key=$2 name id t0=$SECONDS
  shift 2
  name=${tag##*/}
  local stem=$cache/${name//:/-}-$key
  if [[ -f $stem.id ]]; then
    id=$(<"$stem.id")
    if [[ $(buildah inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null) == "$id" ]]; then
      touch "$stem.id" "$stem.tar" 2>/dev/null || true
      log "$name: cached (${id:0:12})"
      return
    fi
    if [[ -f $stem.tar ]] && buildah pull -q "oci-archive:$stem.tar" >/dev/null 2>&1 &&
      buildah tag "$id" "$tag" 2>/dev/null; then
      touch "$stem.id" "$stem.tar"
      log "$name: loaded from $stem.tar in $((SECONDS - t0))s"
      return
    fi
  fi
  log "$name: building (cold; cached afterwards in $cache)"
  rm -f "$stem.id" "$stem.tar"
  "$@" "$tag"
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$tag")
  buildah push -q -D "$tag" "oci-archive:$stem.tar.tmp:$tag" >/dev/null
  mv "$stem.tar.tmp" "$stem.tar"
  echo "$id" >"$stem.id"
  log "$name: built in $((SECONDS - t0))s"
}

if [[ $builder == buildah ]]; then
  [[ $(id -u) == 0 ]] || die "without a Docker engine, the image is built with buildah and debootstrap, as root: run as root, or start Docker"
  missing=()
  for p in buildah debootstrap; do
    command -v "$p" >/dev/null || missing+=("$p")
  done
  if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]}; install them (or Docker)"
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  command -v go >/dev/null || die "no go on PATH: the golang base is made from this machine's Go"
  export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

  # The bases the Dockerfile names: golang:X.Y-SUITE and debian:SUITE-slim.
  golang_ref=$(awk 'toupper($1) == "FROM" && $2 ~ /^golang:/ {print $2; exit}' Dockerfile)
  debian_ref=$(awk 'toupper($1) == "FROM" && $2 ~ /^debian:/ {print $2; exit}' Dockerfile)
  [[ $golang_ref =~ ^golang:([0-9]+\.[0-9]+)-([a-z]+)$ ]] || die "the Dockerfile's build stage is not FROM golang:X.Y-SUITE (found '$golang_ref')"
  gominor=${BASH_REMATCH[1]} gosuite=${BASH_REMATCH[2]}
  [[ $debian_ref =~ ^debian:([a-z]+)-slim$ ]] || die "the Dockerfile's runtime stage is not FROM debian:SUITE-slim (found '$debian_ref')"
  suite=${BASH_REMATCH[1]}
  [[ $gosuite == "$suite" ]] || die "the Dockerfile's bases are on two Debian suites ($golang_ref, $debian_ref)"
  gover=$(go env GOVERSION)
  [[ $gover == "go$gominor" || $gover == go$gominor.* ]] || die "the Dockerfile wants Go $gominor ($golang_ref); this machine has $gover"
  mirror=${KEEPLB_IMAGE_MIRROR:-$(host_mirror debian)}
  mirror=${mirror:-http://deb.debian.org/debian}
  security=${KEEPLB_IMAGE_SECURITY_MIRROR:-$(host_mirror debian-security)}
  security=${security:-http://deb.debian.org/debian-security}

  cache=${KEEPLB_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/image}
  mkdir -p "$cache"
  # One build at a time: they share the cache and the tags.
  exec 9>"$cache/.lock"
  flock 9

  debian_key=$(printf '%s\n' "$(cat hack/image/debian.sh)" "$suite" "$mirror" "$security" "$(dpkg --print-architecture)" |
    sha256sum | cut -c1-16)
  golang_key=$(printf '%s\n' "$(cat hack/image/golang.sh)" "$debian_key" "$(go version)" "$(go env GOROOT)" \
    "$(go env GOPROXY)" "$(go env GOSUMDB)" "$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null)" |
    sha256sum | cut -c1-16)
  base "docker.io/library/$debian_ref" "$debian_key" hack/image/debian.sh "$suite" "$mirror" "$security"
  base "docker.io/library/$golang_ref" "$golang_key" hack/image/golang.sh "docker.io/library/$debian_ref"
  find "$cache" -maxdepth 1 \( -name '*.id' -o -name '*.tar' \) -mtime +14 -delete
fi
bases=$((SECONDS - start))

# --- the build -----------------------------------------------------------------------
args=(--build-arg "VERSION=$VERSION" --build-arg "COMMIT=$COMMIT" --build-arg "DATE=$DATE" -t "$image" -f Dockerfile .)
if [[ $builder == docker ]]; then
  cmd=(docker build "${args[@]}")
else
  cmd=(buildah bud --pull=never --layers --force-rm "${args[@]}")
fi
log "building $image: ${cmd[*]}"
t0=$SECONDS
# run_build: the whole output to the log; the steps (buildah's, BuildKit's,
# the classic builder's) to the terminal. Its status is the build's.
run_build() {
  timeout "$limit" "${cmd[@]}" 2>&1 | tee "$buildlog" |
    grep --line-buffered -E '^(\[[0-9]+/[0-9]+\] )?STEP [0-9]|^Step [0-9]|^#[0-9]+ \[|^--> Using cache' |
    while IFS= read -r line; do
      [[ $line == '--> Using cache'* ]] && line='  (cached)'
      printf '%5ss %s\n' $((SECONDS - t0)) "${line:0:110}" >&2
    done
  return "${PIPESTATUS[0]}"
}
rc=0
run_build || rc=$?
# buildah starts each RUN step by re-executing itself from a sealed memfd
# copy; on some hosts the seal now and then fails with EBUSY (seen here in
# about one build in ten). That is no fault of the Dockerfile: once more,
# from the cached layers.
if ((rc != 0)) && [[ $builder == buildah ]] && grep -q 'sealing memfd copy' "$buildlog"; then
  log "buildah could not start a RUN step (sealing memfd copy: busy); building once more"
  rc=0
  run_build || rc=$?
fi
if ((rc != 0)); then
  log_tail 40
  ((rc == 124)) && die "the build took longer than ${limit}s (KEEPLB_IMAGE_TIMEOUT)"
  die "the build failed ($rc); the whole output is in $buildlog"
fi
build=$((SECONDS - t0))

# --- the check --------------------------------------------------------------------
# in_image runs a program of the image in place of its entrypoint, as the
# image's user, with no network, for at most a minute.
if [[ $builder == docker ]]; then
  in_image() { timeout 60 docker run --rm --network=none --entrypoint "$1" "$image" "${@:2}"; }
else
  ctr=$(buildah from --pull=never "$image")
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  in_image() { timeout 60 buildah run --network=none "$ctr" -- "$@"; }
fi
check() { # check WHAT WANT PROGRAM ARGS...: the output must contain WANT.
  local what=$1 want=$2 got
  shift 2
  if ! got=$(in_image "$@" 2>&1) || [[ $got != *"$want"* ]]; then
    echo "---- $* in $image ----" >&2
    echo "$got" | tail -n 20 >&2
    log_tail 20
    die "the image fails its check: $what"
  fi
  log "  $(echo "$got" | head -n1)"
}
log "checking $image"
check "keeplb version prints $VERSION" "keeplb $VERSION " /usr/local/bin/keeplb version
check "keepalived runs" "Keepalived v" keepalived --version
check "nft runs" "nftables v" nft --version
check "modprobe runs" "kmod version" modprobe --version

# --- the archive ----------------------------------------------------------------------
rm -f "$archive" "$archive.tmp"
if [[ $builder == docker ]]; then
  docker save -o "$archive.tmp" "$image"
  size=$(docker image inspect --format '{{.Size}}' "$image" | numfmt --to=si --suffix=B)
else
  # By ID: by name, buildah would add the store's own name (localhost/...).
  buildah push -q "$(buildah inspect --type image --format '{{.FromImageID}}' "$image")" \
    "docker-archive:$archive.tmp:$image" >/dev/null
  size=$(buildah images --format '{{.Size}}' "$image" | head -n1)
fi
mv "$archive.tmp" "$archive"

log "built $image with $builder in $((SECONDS - start))s (bases ${bases}s, build ${build}s); image $size"
log "saved ${archive#"$root"/} ($(du -h "$archive" | cut -f1)); load it with: docker load -i, podman load -i, or ctr -n k8s.io images import"
