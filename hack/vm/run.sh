#!/usr/bin/env bash
# run.sh boots the test VM (hack/vm/build.sh builds it on first use) under
# qemu, runs one command inside as root and exits with its exit code.
#
# Usage: hack/vm/run.sh SHARE_DIR... -- COMMAND [ARG...]
#   e.g. hack/vm/run.sh /tmp/x -- sh -c 'cat /proc/net/ip_vs && ipvsadm -Ln'
#        hack/vm/run.sh "$PWD" -- ./_output/ipvs.test -test.v
#
# Each SHARE_DIR is shared over 9p and mounted at the same absolute path
# inside the VM (read-write; files the VM creates belong to the user running
# qemu; share project or scratch folders, not / or /usr, which the VM's own
# programs live in). COMMAND runs through /bin/sh (the host's dash) with its arguments quoted
# as given, in the current folder if that lies in a share, else in the first
# share; its stdin is the console if ours is a terminal, else /dev/null.
# The console (kernel messages, the command's output) streams to stdout.
# Inside: the modules from build.sh are loaded, lo is up, /tmp and /run are
# tmpfs, KEEPLB_IN_VM=1 is set; ip, bridge, ipvsadm, keepalived, nft, env
# and timeout are the host's, the rest busybox's (busybox's own applets, e.g.
# xargs, run busybox's ip rather than PATH's: give them /usr/sbin/ip).
#
# Exit code: the command's, or 124 when the VM hit the timeout, or 125 when
# the VM gave no exit code (bad usage, build failure, no boot, kernel panic).
#
# Environment:
#   KEEPLB_VM_TIMEOUT   seconds before the VM is killed (default 600)
#   KEEPLB_VM_MEM       memory (default 512M)     KEEPLB_VM_CPUS (default 2)
#   KEEPLB_VM_ACCEL     qemu accelerator: kvm or tcg (default: kvm only when
#                       /dev/kvm is usable and the CPU shows vmx/svm)
#   KEEPLB_VM_DIR       a build directory to use instead of running build.sh
#   KEEPLB_VM_APPEND    extra kernel command line
#   KEEPLB_VM_NET       "user" gives the VM a NIC (eth0, 10.0.2.15/24) on
#                       qemu's user-mode network, where 10.0.2.2 is the
#                       host's loopback: the VM reaches an API server that
#                       listens on the host's 127.0.0.1. But qemu's user
#                       network also sends out of the host whatever the VM
#                       cannot deliver itself (seen in the cluster spike:
#                       a probe to a pod address left the machine), so
#                       tests that route other traffic use "tap:IFNAME":
#                       eth0 on the tap device IFNAME, which the caller
#                       creates (ip tuntap add IFNAME mode tap) in a
#                       network namespace of its own, without a default
#                       route, and runs qemu in. Default: no NIC.
set -uo pipefail

usage() {
  echo "usage: $0 SHARE_DIR... -- COMMAND [ARG...]" >&2
  exit 125
}

shares=()
while (($#)) && [[ $1 != -- ]]; do
  [[ -d $1 ]] || { echo "run.sh: $1 is not a folder" >&2; exit 125; }
  shares+=("$(cd "$1" && pwd -P)")
  shift
done
if (($# < 2 || ${#shares[@]} == 0)); then usage; fi
shift

here=$(cd "$(dirname "$0")" && pwd)
dir=${KEEPLB_VM_DIR:-}
if [[ -z $dir ]]; then
  dir=$("$here/build.sh") || { echo "run.sh: hack/vm/build.sh failed" >&2; exit 125; }
fi
kernel=$dir/vmlinux
[[ -f $kernel ]] || kernel=$dir/vmlinuz
[[ -f $kernel && -f $dir/initrd.cpio ]] || { echo "run.sh: no VM in $dir" >&2; exit 125; }
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2; exit 125; }

ctl=$(mktemp -d "${TMPDIR:-/tmp}/keeplb-vm.XXXXXX")
trap 'rm -rf "$ctl"' EXIT
# SIGTERM to our process group (what pkg/testing/vm sends) also stops
# timeout and qemu; then bash runs this trap and the EXIT one.
trap 'echo "run.sh: interrupted" >&2; exit 125' INT TERM

# The command, quoted for sh: each argument in single quotes.
q() { printf "'%s' " "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  for a in "$@"; do q "$a"; done
  echo
} >"$ctl/cmd"

cwd=${shares[0]}
phys=$(pwd -P)
for s in "${shares[@]}"; do
  [[ $phys == "$s" || $phys == "$s"/* ]] && cwd=$phys && break
done
echo "$cwd" >"$ctl/cwd"
[[ -t 0 ]] && echo tty >"$ctl/stdin"

args=()
: >"$ctl/mounts"
i=0
for s in "${shares[@]}"; do
  args+=(-fsdev "local,id=fs$i,path=${s//,/,,},security_model=none,multidevs=remap"
    -device "virtio-9p-pci,fsdev=fs$i,mount_tag=share$i")
  echo "share$i $s" >>"$ctl/mounts"
  i=$((i + 1))
done
case ${KEEPLB_VM_NET:-} in
  "") ;;
  user) args+=(-netdev "user,id=net0" -device "virtio-net-pci,netdev=net0") ;;
  tap:?*) args+=(-netdev "tap,id=net0,ifname=${KEEPLB_VM_NET#tap:},script=no,downscript=no" -device "virtio-net-pci,netdev=net0") ;;
  *) echo "run.sh: KEEPLB_VM_NET=$KEEPLB_VM_NET: only \"user\" and \"tap:IFNAME\" are known" >&2; exit 125 ;;
esac
args+=(-fsdev "local,id=fsctl,path=${ctl//,/,,},security_model=none"
  -device "virtio-9p-pci,fsdev=fsctl,mount_tag=ctl")

accel=${KEEPLB_VM_ACCEL:-}
if [[ -z $accel ]]; then
  accel=tcg
  if [[ -r /dev/kvm && -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; fi
fi
case $accel in
  kvm) accel_args=(-accel kvm -cpu host) ;;
  *) accel_args=(-accel "tcg,thread=multi" -cpu max) ;;
esac

start=${EPOCHREALTIME/./}
timeout --foreground -k 5 "${KEEPLB_VM_TIMEOUT:-600}" \
  qemu-system-x86_64 "${accel_args[@]}" -smp "${KEEPLB_VM_CPUS:-2}" -m "${KEEPLB_VM_MEM:-512M}" \
  -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$kernel" -initrd "$dir/initrd.cpio" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic ${KEEPLB_VM_APPEND:-}" \
  "${args[@]}"
qrc=$?
us=$((${EPOCHREALTIME/./} - start))
took=$((us / 1000000)).$(printf %03d $((us / 1000 % 1000)))

if [[ $qrc == 124 || $qrc == 137 ]]; then
  echo "run.sh: the VM timed out after ${KEEPLB_VM_TIMEOUT:-600}s" >&2
  exit 124
fi
if [[ ! -s $ctl/rc ]]; then
  echo "run.sh: the VM gave no exit code (qemu exited $qrc after ${took}s): it did not boot or crashed" >&2
  exit 125
fi
rc=$(cat "$ctl/rc")
echo "run.sh: command exited $rc; VM ran ${took}s ($accel)" >&2
exit "$rc"
