#!/usr/bin/env bash
# build.sh builds the test VM that hack/vm/run.sh boots: a stock Debian
# kernel (which has IPVS as modules, unlike many CI hosts) and a small
# initramfs with busybox, the host's ip, bridge, ipvsadm, keepalived, nft
# and dash as /bin/sh (with their shared libraries) and the kernel modules keeplb's tests need.
#
# Usage: hack/vm/build.sh            # prints the build directory on stdout
#
# It is idempotent and quick once built: the result is cached outside git in
#   ${KEEPLB_VM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/keeplb/vm}/
#     debs/                      the downloaded kernel package(s)
#     <kernel-version>-<hash>/   vmlinuz (the package's), vmlinux (the same,
#                                uncompressed, for a faster PVH boot),
#                                initrd.cpio, modules (load order),
#                                kernel-version, manifest (files in the initrd)
# where <hash> covers this script (so the module list and the init), the
# kernel package version, KEEPLB_VM_EXTRA_MODULES and _PROGRAMS and the versions of the
# host packages copied into the initrd. Builds unused for 14 days are pruned
# after a new build; delete the cache folder to rebuild from scratch.
#
# Missing Debian packages (qemu-system-x86, busybox-static, ipvsadm,
# keepalived, nftables, iproute2, iptables, kmod, cpio, xz-utils, zstd) are installed
# with apt-get (needs root). The kernel package is only downloaded and
# unpacked (apt-get download + dpkg -x), never installed on the host.
#
# Environment:
#   KEEPLB_VM_CACHE           cache folder (see above)
#   KEEPLB_VM_KERNEL_PKG      kernel package to use (default: what
#                             linux-image-amd64 depends on)
#   KEEPLB_VM_EXTRA_MODULES   more modules to load at boot, space separated
#                             (their dependencies are added)
#   KEEPLB_VM_EXTRA_PROGRAMS  more host programs to copy, e.g. iptables
#                             iptables-save iptables-restore (each a copy of
#                             the multi-call binary under its own name; with
#                             iptables, its extensions' folder comes along)
#
# Progress goes to stderr; only the build directory goes to stdout.
set -euo pipefail

# Modules loaded at boot, in this order (each after its dependencies).
# crc32c_generic comes first: libcrc32c asks the crypto API for "crc32c" and
# would otherwise need a request_module round trip.
modules="crc32c_generic virtio_pci 9p 9pnet_virtio virtio_net
  ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_lc ip_vs_wlc ip_vs_mh
  nf_conntrack nf_conntrack_netlink nf_nat
  nf_tables nft_nat nft_masq nft_chain_nat nft_ct nft_objref
  nft_fib nft_fib_ipv4 nft_fib_ipv6 nft_fib_inet
  veth bridge dummy ${KEEPLB_VM_EXTRA_MODULES:-}"
# Host programs copied into the initrd, to the same folder, replacing busybox's
# applets of the same name. Debian's busybox-static prefers its own applets
# to PATH when its shell or env/timeout/xargs run a command ("ip" would be
# busybox's ip even with iproute2's first in PATH), so /bin/sh is the host's
# dash, and env and timeout are coreutils'.
programs="ip bridge ipvsadm keepalived nft dash env timeout ${KEEPLB_VM_EXTRA_PROGRAMS:-}"
packages="qemu-system-x86 busybox-static ipvsadm keepalived nftables iproute2 iptables kmod cpio xz-utils zstd"

log() { echo ">> $*" >&2; }
die() { echo "hack/vm/build.sh: $*" >&2; exit 1; }

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cache=${KEEPLB_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/vm}
mkdir -p "$cache"

# One build at a time (go test runs packages in parallel).
exec 9>"$cache/.lock"
flock 9

# --- host packages -----------------------------------------------------------
missing=()
for p in $packages; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}: run as root or apt-get install them"
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- which kernel --------------------------------------------------------------
# One apt-cache call (about 0.5 s) tells both: the metapackage depends on
# "linux-image-VERSION-amd64 (= PACKAGE-VERSION)".
kernel() {
  if [[ -n ${KEEPLB_VM_KERNEL_PKG:-} ]]; then
    apt-cache show --no-all-versions "$KEEPLB_VM_KERNEL_PKG" 2>/dev/null |
      awk -v p="$KEEPLB_VM_KERNEL_PKG" '/^Version:/ {print p, $2; exit}'
  else
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
      sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
  fi
}
read -r kpkg kpkgver < <(kernel) || true
if [[ -z ${kpkgver:-} ]]; then
  apt-get update -qq >&2 || true
  read -r kpkg kpkgver < <(kernel) || true
fi
[[ -n ${kpkgver:-} ]] || die "cannot tell which kernel package to use (apt-get update? KEEPLB_VM_KERNEL_PKG?)"
kver=${kpkg#linux-image-}

hostvers=$(dpkg-query -W -f='${Package}=${Version}\n' busybox-static ipvsadm keepalived nftables iproute2 libc6 iptables 2>/dev/null)
hash=$(printf '%s\n' "$(cat "$self")" "$kpkg=$kpkgver" "$modules" "$programs" "$hostvers" | sha256sum | cut -c1-12)
out="$cache/$kver-$hash"
if [[ -f $out/.done ]]; then
  touch "$out/.done" # marks it used, for the pruning below
  echo "$out"
  exit 0
fi

start=$SECONDS
tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp" "$cache/debs"

# --- kernel ----------------------------------------------------------------------
shopt -s nullglob
debs=("$cache/debs/${kpkg}_${kpkgver//:/%3a}_"*.deb)
if ((${#debs[@]} == 0)); then
  log "downloading $kpkg $kpkgver"
  # Download where apt's sandbox user (_apt) may write, then move into the cache.
  dl=$(mktemp -d)
  chown _apt "$dl" 2>/dev/null || true
  (cd "$dl" && apt-get download -q "$kpkg=$kpkgver") >&2
  mv "$dl"/*.deb "$cache/debs/"
  rmdir "$dl"
  debs=("$cache/debs/${kpkg}_${kpkgver//:/%3a}_"*.deb)
  ((${#debs[@]})) || die "apt-get download $kpkg=$kpkgver gave no .deb"
fi
deb=${debs[0]}
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$tmp/kernel"
kmod="$tmp/kernel/lib/modules/$kver"
[[ -d $kmod ]] || kmod="$tmp/kernel/usr/lib/modules/$kver"
[[ -d $kmod ]] || die "no modules for $kver in $deb"
cp "$tmp/kernel/boot/vmlinuz-$kver" "$tmp/vmlinuz"
# qemu boots an uncompressed vmlinux directly through its PVH entry point,
# which skips the real-mode setup and the xz decompression: under TCG that
# halves the boot (about 3 s instead of 6). run.sh falls back to vmlinuz.
if grep -q '^CONFIG_PVH=y' "$tmp/kernel/boot/config-$kver" 2>/dev/null; then
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$tmp/vmlinuz" | head -n1 | cut -d: -f1 || true)
  # xz stops after the stream, so tail may die of SIGPIPE: no pipefail here.
  if [[ -n $off ]] && (set +o pipefail; tail -c +$((off + 1)) "$tmp/vmlinuz" | xz -dcq --single-stream >"$tmp/vmlinux" 2>/dev/null) &&
    [[ $(head -c4 "$tmp/vmlinux" | od -An -c | tr -d ' ') == 177ELF ]]; then
    log "extracted vmlinux for a PVH boot"
  else
    rm -f "$tmp/vmlinux"
  fi
fi
log "indexing modules (busybox depmod)"
busybox depmod -b "$tmp/kernel" "$kver" 2>/dev/null || depmod -b "$tmp/kernel" "$kver"
[[ -f $kmod/modules.dep ]] || die "depmod made no modules.dep"

# --- module closure, in load order ----------------------------------------------------
declare -A path deps seen
while IFS= read -r line; do
  f=${line%%:*}
  n=$(basename "$f"); n=${n%%.ko*}; n=${n//-/_}
  path[$n]=$f
  deps[$n]=${line#*:}
done <"$kmod/modules.dep"
builtin=$(sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$kmod/modules.builtin")
order=()
visit() {
  local n=${1//-/_} d dn
  [[ -n ${seen[$n]:-} ]] && return
  seen[$n]=1
  if [[ -z ${path[$n]:-} ]]; then
    grep -qx "$n" <<<"$builtin" && return
    die "module $n is neither in modules.dep nor built in"
  fi
  for d in ${deps[$n]}; do
    dn=$(basename "$d"); dn=${dn%%.ko*}
    visit "$dn"
  done
  order+=("${path[$n]}")
}
for m in $modules; do visit "$m"; done

# --- initramfs tree ----------------------------------------------------------------
root="$tmp/root"
log "assembling the initramfs (${#order[@]} modules, busybox, $programs)"
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,run,root,etc/vm,var,mnt}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"

cp "$(command -v busybox)" "$root/usr/bin/busybox"
busybox --list-full | while read -r a; do
  case $a in bin/* | sbin/*) a=usr/$a ;; esac
  [[ -e $root/$a || -L $root/$a ]] || ln -s /usr/bin/busybox "$root/$a"
done

copylib() { # copy a file to the same path in the initrd, following symlinks
  [[ -e $root$1 ]] && return
  mkdir -p "$root$(dirname "$1")"
  cp -L "$1" "$root$1"
}
for p in $programs; do
  bin=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$p") || die "no $p on the host"
  rm -f "$root/usr/bin/$p" "$root/usr/sbin/$p"
  case $bin in */sbin/*) dest=usr/sbin ;; *) dest=usr/bin ;; esac
  cp -L "$bin" "$root/$dest/$p"
  while read -r lib; do copylib "$lib"; done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
ln -sf dash "$root/usr/bin/sh"
# iptables loads its matches and targets at run time, from this folder.
case " $programs " in
  *" iptables "* | *" ip6tables "*)
    for f in /usr/lib/x86_64-linux-gnu/xtables/*.so; do copylib "$f"; done ;;
esac
# glibc loads libgcc_s at run time (thread cancellation).
if [[ -e /lib/x86_64-linux-gnu/libgcc_s.so.1 ]]; then copylib /lib/x86_64-linux-gnu/libgcc_s.so.1; fi

mdir="$root/lib/modules/$kver"
mkdir -p "$mdir"
: >"$root/etc/vm/modules"
for f in "${order[@]}"; do
  src="$kmod/$f" dst="$mdir/${f%.ko*}.ko"
  mkdir -p "$(dirname "$dst")"
  case $f in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
  esac
  # dummy would otherwise make a dummy0 at load; tests make their own links.
  case $f in */dummy.ko*) params=numdummies=0 ;; *) params= ;; esac
  echo "${f%.ko*}.ko $params" >>"$root/etc/vm/modules"
done
cp "$kmod/modules.builtin" "$mdir/"
busybox depmod -b "$root" "$kver" 2>/dev/null || depmod -b "$root" "$kver"
cp "$root/etc/vm/modules" "$tmp/modules"

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
echo keeplb-vm >"$root/etc/hostname"

cat >"$root/init" <<'EOF'
#!/bin/sh
# PID 1 of the keeplb test VM, written by hack/vm/build.sh.
# hack/vm/run.sh shares a control folder with tag "ctl" holding:
#   mounts  lines "TAG PATH": 9p shares to mount at PATH
#   cwd     folder to run the command in
#   stdin   "tty" to give the command the console as stdin (else /dev/null)
#   cmd     the command, a /bin/sh script
# and reads back "rc", the command's exit code, after the VM powers off.
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=dumb KEEPLB_IN_VM=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/netns /run/vm-ctl
hostname -F /etc/hostname
kver=$(uname -r)
# keeplb.skipmods=a,b on the kernel command line (KEEPLB_VM_APPEND) leaves
# those modules unloaded, for tests of what loads them on demand.
skip=" $(sed -n 's/.*keeplb\.skipmods=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ') "
while read -r m params; do
  b=${m##*/}
  case $skip in *" ${b%.ko} "*) continue ;; esac
  insmod "/lib/modules/$kver/$m" $params || echo "vm: insmod $m failed"
done </etc/vm/modules
ip link set lo up
# With KEEPLB_VM_NET=user, run.sh gives the VM a NIC on qemu's user-mode
# network: the host's loopback is 10.0.2.2 from here.
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 ||
    echo "vm: cannot configure eth0"
fi

fail() { echo "vm: $*"; poweroff -f; }
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts" ctl /run/vm-ctl || fail "cannot mount the control share"
while read -r tag dir; do
  mkdir -p "$dir" && mount -t 9p -o "$opts" "$tag" "$dir" || fail "cannot mount $tag at $dir"
done </run/vm-ctl/mounts
cd "$(cat /run/vm-ctl/cwd)" || fail "no folder $(cat /run/vm-ctl/cwd)"
read -r up _ </proc/uptime
echo "vm: up in ${up}s (kernel $kver), running the command"
if [ "$(cat /run/vm-ctl/stdin 2>/dev/null)" = tty ]; then
  /bin/sh /run/vm-ctl/cmd
else
  /bin/sh /run/vm-ctl/cmd </dev/null
fi
echo $? >/run/vm-ctl/rc
sync
poweroff -f
EOF
chmod 755 "$root/init"

# Uncompressed: unpacking gzip under TCG costs about a second at each boot.
log "packing initrd.cpio"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/initrd.cpio"
(cd "$root" && find . ! -type d | LC_ALL=C sort) >"$tmp/manifest"
echo "$kver" >"$tmp/kernel-version"
rm -rf "$tmp/kernel" "$root"
touch "$tmp/.done"
rm -rf "$out"
mv "$tmp" "$out"
# Builds unused for 14 days go (an edit of this script makes a new one).
find "$cache" -mindepth 2 -maxdepth 2 -name .done -mtime +14 -printf '%h\n' | while read -r d; do rm -rf "$d"; done
log "built $kver VM in $((SECONDS - start))s: $out ($(du -h "$out/initrd.cpio" | cut -f1) initrd)"
echo "$out"
