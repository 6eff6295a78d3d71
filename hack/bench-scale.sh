#!/usr/bin/env bash
# bench-scale.sh measures one real speaker at the scale of issue 13's
# target 6 (e2e/scale): 1,000 Nodes, 10,000 LoadBalancer Services and
# 100,000 endpoints created in bulk in a real kube-apiserver on the host,
# and the keeplb speaker for one of the Nodes, with real keepalived and
# real IPVS, in the VM of hack/vm (qemu; TCG where the host has no KVM).
# It prints a markdown table, ready for docs/benchmarks.md, on stdout; the
# test's whole log goes to _output/bench-scale.txt, the speaker's log and
# its profiles to _output/scale/, and the top of each profile to stderr.
# 8 to 13 minutes on 2 cores (3 to 5 of them creating the Services: the API
# server allocates ClusterIPs one at a time); needs root.
#
#   hack/bench-scale.sh                          the full scale
#   hack/bench-scale.sh -scale.services=100 …    other sizes (flags of e2e/scale)
#   hack/bench-scale.sh -scale.cpuprofiles       CPU profiles of the speaker's
#                                                phases too (the profiler's memory
#                                                then counts in its RSS)
#   hack/bench-scale.sh -scale.godebug=gctrace=1 a line per collection in its log
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [[ $(id -u) -ne 0 ]]; then
  echo ">> skipping the scale measurement: it needs root (IPVS and keepalived, in the VM)" >&2
  exit 0
fi
dir=$(hack/tools.sh)
if [[ ! -e /proc/net/ip_vs ]]; then
  echo ">> the host kernel has no IPVS: building the VM (hack/vm/build.sh; cached)" >&2
  hack/vm/build.sh >/dev/null
fi
mkdir -p _output/scale
rm -f _output/scale/*.pprof _output/bench-scale.md
go test -c -o _output/scale.test ./e2e/scale/
echo ">> e2e/scale: the objects, then the speaker in the VM (log in _output/bench-scale.txt)" >&2
status=0
KEEPLB_SCALE=1 KEEPLB_TOOLS_DIR=$dir _output/scale.test -test.run '^TestSpeakerAtScale$' -test.v -test.timeout 30m \
  -scale.table "$root/_output/bench-scale.md" -scale.profiles "$root/_output/scale" "$@" >_output/bench-scale.txt 2>&1 || status=$?
# Progress and verdicts, without the VM's console noise.
grep -E 'created [0-9]|first sync|VIPs on|holder annotations of|settled:|the first scrape|IPVS:|resync [0-9]|reload [0-9]|target missed|--- (PASS|FAIL)|^(ok|FAIL)' _output/bench-scale.txt |
  sed 's/^ *[a-z_0-9]*\.go:[0-9]*: //' >&2 || true
if [[ ! -s _output/bench-scale.md ]]; then
  tail -n 60 _output/bench-scale.txt >&2
  exit "$((status == 0 ? 1 : status))"
fi
echo
cat _output/bench-scale.md
for p in startup resyncs reloads heap; do
  f=_output/scale/$p.pprof
  [[ -s $f ]] || continue
  echo >&2
  echo ">> top of the speaker's $p profile ($f)" >&2
  go tool pprof -top -nodecount=20 _output/scale.test "$f" 2>/dev/null | sed -n '1,28p' >&2 || true
done
if [[ -s _output/scale/heap.pprof && -s _output/scale/end-heap.pprof ]]; then
  echo >&2
  echo ">> what the speaker allocated after it settled (scrapes, resyncs, reloads): end-heap.pprof over heap.pprof" >&2
  go tool pprof -sample_index=alloc_space -top -nodecount=20 -base _output/scale/heap.pprof _output/scale.test _output/scale/end-heap.pprof 2>/dev/null | sed -n '1,28p' >&2 || true
fi
exit "$status"
