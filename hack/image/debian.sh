#!/usr/bin/env bash
# debian.sh makes a stand-in for Docker Hub's debian:SUITE-slim in the local
# buildah store, for hosts that cannot pull it (hack/image.sh calls it).
#
# Usage: hack/image/debian.sh SUITE MIRROR SECURITY_MIRROR TAG
#   e.g. hack/image/debian.sh bookworm http://deb.debian.org/debian \
#          http://deb.debian.org/debian-security docker.io/library/debian:bookworm-slim
#
# Like the official image it is `debootstrap --variant=minbase`, brought up
# to date from SUITE-updates and SUITE-security, with the official image's
# container settings (no services started by package installs, apt's caches
# cleaned after each run, no translations, compressed package lists) and its
# "slim" trimming (no docs but copyright files, no man or info pages, no
# locales), which dpkg keeps applying to packages installed later. apt's
# sources point at MIRROR and SECURITY_MIRROR, so that `apt-get update &&
# apt-get install` works in images built on it. hack/image.sh keys its cache
# on this file, so an edit here makes a new base.
#
# Needs root, debootstrap and buildah. Progress goes to stderr.
set -euo pipefail

[[ $# == 4 ]] || { echo "usage: $0 SUITE MIRROR SECURITY_MIRROR TAG" >&2; exit 2; }
suite=$1 mirror=$2 security=$3 tag=$4
arch=$(dpkg --print-architecture)

log() { echo ">>   $*" >&2; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/keeplb-debian.XXXXXX")
rootfs=$work/rootfs
ctr=
cleanup() {
  # debootstrap mounts /proc and /sys in the tree; a failed run may leave them.
  findmnt -rn -o TARGET | grep -F "$rootfs" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
  if [[ -n $ctr ]]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# in_root runs a command chrooted in the tree, with /proc and the host's /dev
# mounted in a mount namespace of its own, so that nothing outlives it.
in_root() {
  # shellcheck disable=SC2016 # the inner sh expands them
  unshare --mount --propagation private -- sh -ec '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"' sh "$rootfs" "$@"
}

log "debootstrap --variant=minbase $suite ($arch) from $mirror"
if ! timeout 900 debootstrap --variant=minbase --arch="$arch" \
  --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
  "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  [[ -f $rootfs/debootstrap/debootstrap.log ]] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
  echo "hack/image/debian.sh: debootstrap failed" >&2
  exit 1
fi

# --- the official image's container settings ----------------------------------
# The same file names as there, so that whatever looks for them (or deletes
# them) behaves the same.
printf '#!/bin/sh\n# No services start in image builds or containers.\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
echo force-unsafe-io >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"

# --- slim: what dpkg leaves out from now on, and what goes now ---------------------
# dpkg applies the last matching rule, so the includes follow the excludes.
excludes=(/usr/share/doc/'*' /usr/share/groff/'*' /usr/share/info/'*' /usr/share/linda/'*'
  /usr/share/lintian/overrides/'*' /usr/share/locale/'*' /usr/share/man/'*')
includes=(/usr/share/doc/'*'/copyright /usr/share/locale/locale.alias /usr/share/locale/languages
  /usr/share/locale/all_languages /usr/share/locale/currency/'*' /usr/share/locale/l10n/'*')
{
  echo '# The "slim" variant: files containers do not need are left out, also'
  echo '# from packages installed later.'
  printf 'path-exclude %s\n' "${excludes[@]}"
  printf 'path-include %s\n' "${includes[@]}"
} >"$rootfs/etc/dpkg/dpkg.cfg.d/docker"

# --- apt's sources, and the updates -------------------------------------------------
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
log "apt-get update && apt-get dist-upgrade (from $suite-updates and $suite-security)"
if ! in_root timeout 600 sh -ec 'apt-get update -q && apt-get dist-upgrade -yq' >"$work/upgrade.log" 2>&1; then
  tail -n 30 "$work/upgrade.log" >&2
  echo "hack/image/debian.sh: apt-get update or dist-upgrade failed in the new tree" >&2
  exit 1
fi

log "trimming (slim) and cleaning up"
keep=()
for p in "${includes[@]}"; do keep+=(-o -path "$p"); done
for p in "${excludes[@]}"; do
  d=${p%/\*}
  [[ -d $rootfs$d ]] || continue
  # Files first (not the kept ones), then what that leaves empty or dangling.
  in_root find "$d" -mindepth 1 -depth ! \( -false "${keep[@]}" \) ! -type d ! -type l -delete
  while [[ -n $(in_root find "$d" -mindepth 1 -depth \( -empty -o -xtype l \) -delete -print) ]]; do :; done
done
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/ldconfig/aux-cache \
  "$rootfs"/var/log/dpkg.log "$rootfs"/var/log/bootstrap.log "$rootfs"/var/log/alternatives.log \
  "$rootfs"/var/log/apt/history.log "$rootfs"/var/log/apt/term.log "$rootfs"/run/mount/utab \
  "$rootfs"/etc/apt/apt.conf.d/01autoremove-kernels
# Container engines provide /dev, /proc, /sys and these two files. Nothing
# may be mounted there any more: rm would reach into the host's.
if findmnt -rn -o TARGET | grep -qF "$rootfs"; then
  echo "hack/image/debian.sh: something is still mounted in $rootfs" >&2
  exit 1
fi
rm -rf "${rootfs:?}"/dev/* "${rootfs:?}"/proc/* "${rootfs:?}"/sys/*
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

log "committing $tag ($(du -sh "$rootfs" | cut -f1))"
ctr=$(buildah from scratch)
mnt=$(buildah mount "$ctr")
cp -a "$rootfs/." "$mnt/"
buildah umount "$ctr" >/dev/null
buildah config --os linux --arch "$arch" \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd '["bash"]' \
  --created-by "hack/image/debian.sh: debootstrap --variant=minbase $suite $mirror, slim" "$ctr"
buildah commit -q --rm "$ctr" "$tag" >/dev/null
ctr=
