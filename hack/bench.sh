#!/usr/bin/env bash
# bench.sh runs every measurement of docs/benchmarks.md, each against a
# baseline measured in the same run: the VIP allocator against a naive one
# that scans the pool from its start on every allocation, the speaker's
# sync, one endpoint change through the dataplane, the controller against
# the API server's raw rate, keepalived's reloads and failover, VIP moves
# per event, IPVS in the VM, streams across VIP moves, and one speaker at
# scale. Raw output is kept in _output/; markdown
# tables, ready for docs/benchmarks.md, go to stdout.
#
#   hack/bench.sh                 run the benchmarks (about an hour), then the tables
#   hack/bench.sh --table FILE    only turn saved go test -bench output into the table
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# table reads go test -bench output and prints markdown. It pairs
# Benchmark<Name>/keeplb/<case> with Benchmark<Name>/naive/<case>, and lists
# BenchmarkFill on its own, since it has no naive twin. Values are found by
# their unit rather than by column, because -benchmem adds B/op and
# allocs/op columns.
table() {
  awk '
    function unit(u,   i) { for (i = 3; i < NF; i++) if ($(i + 1) == u) return $i; return "" }
    /^goos:/ { goos = $2 }
    /^goarch:/ { goarch = $2 }
    /^cpu:/ { cpu = $0; sub(/^cpu: */, "", cpu) }
    !/^Benchmark/ { next }
    {
      name = $1
      sub(/-[0-9]+$/, "", name)                # the -GOMAXPROCS suffix
      ns = unit("ns/op")
      if (ns == "") next
      n = split(name, part, "/")
      if (n >= 3 && (part[2] == "keeplb" || part[2] == "naive")) {
        bench = part[1]; sub(/^Benchmark/, "", bench)
        fill = part[3]; for (i = 4; i <= n; i++) fill = fill "/" part[i]
        sub(/^full=/, "", fill)
        key = bench SUBSEP fill
        if (!(key in seen)) { seen[key] = 1; order[++rows] = key; rbench[rows] = bench; rfill[rows] = fill }
        val[key, part[2]] = ns
      } else if (name == "BenchmarkFill") {
        fillns = ns; fillalloc = unit("ns/alloc")
      }
    }
    function ratio(naive, keeplb,   r) {
      if (naive == "" || keeplb == "" || keeplb + 0 == 0) return "n/a"
      r = naive / keeplb
      return sprintf(r >= 10 ? "%.0fx" : "%.1fx", r)
    }
    END {
      if (goos != "") printf "Measured on %s/%s%s.\n\n", goos, goarch, (cpu == "" ? "" : ", " cpu)
      if (rows) {
        print "| benchmark | fill | ns/op keeplb | ns/op naive | ratio (naive/keeplb) |"
        print "| --- | ---: | ---: | ---: | ---: |"
        for (r = 1; r <= rows; r++) {
          k = val[order[r], "keeplb"]; v = val[order[r], "naive"]
          printf "| %s | %s | %s | %s | %s |\n", rbench[r], rfill[r], (k == "" ? "-" : k), (v == "" ? "-" : v), ratio(v, k)
        }
      }
      if (fillns != "") {
        if (rows) print ""
        print "| benchmark | ns/op (whole pool) | ns/alloc |"
        print "| --- | ---: | ---: |"
        printf "| Fill | %s | %s |\n", fillns, (fillalloc == "" ? "-" : fillalloc)
      }
      if (!rows && fillns == "") { print "no allocator benchmark results found" > "/dev/stderr"; exit 1 }
    }
  ' "$@"
}

if [[ ${1:-} == --table ]]; then
  table "${2:--}"
  exit
fi

mkdir -p _output
echo ">> go test -bench ./pkg/allocator/; raw output in _output/bench.txt" >&2
go test -run '^$' -bench . -benchmem -count 1 ./pkg/allocator/ | tee _output/bench.txt >&2
echo >&2
table _output/bench.txt

# The speaker: one sync's pure work (plan and keepalived.conf) for 1,000
# VIPs over 3 pools, and the plan alone.
echo >&2
echo ">> go test -bench ./pkg/speaker/ ./pkg/vrrp/" >&2
go test -run '^$' -bench 'BenchmarkRender|BenchmarkCompute' -benchmem -count 1 ./pkg/speaker/ ./pkg/vrrp/ | tee _output/bench-speaker.txt >&2
echo
echo "| benchmark | ns/op | B/op | allocs/op |"
echo "| --- | ---: | ---: | ---: |"
awk '/^Benchmark/ { n = $1; sub(/-[0-9]+$/, "", n); for (i = 3; i < NF; i++) { if ($(i+1) == "ns/op") ns = $i; if ($(i+1) == "B/op") b = $i; if ($(i+1) == "allocs/op") a = $i }
  printf "| %s | %s | %s | %s |\n", n, ns, b, a }' _output/bench-speaker.txt

echo >&2
echo ">> go test -bench ./pkg/dataplane/ ./pkg/speaker/ (one endpoint change at 1,000 and 10,000 Services x 10 endpoints; diff)" >&2
go test -run '^$' -bench 'BenchmarkEndpointChange|BenchmarkDiff1000x10|BenchmarkNaivePerService' -benchmem -count 1 ./pkg/dataplane/ | tee _output/bench-dataplane.txt >&2
go test -run '^$' -bench 'BenchmarkSyncEndpointChange' -benchmem -count 1 ./pkg/speaker/ | tee -a _output/bench-dataplane.txt >&2
echo
# One row per size and benchmark, each against its baseline of the same
# run: dataplane's full rebuild (with Cache.Compute given every object,
# the sync before Update, between), the speaker's sync computing
# everything.
awk '/^Benchmark/ { n = $1; sub(/-[0-9]+$/, "", n); for (i = 3; i < NF; i++) { if ($(i+1) == "ns/op") ns[n] = $i; if ($(i+1) == "B/op") b[n] = $i; if ($(i+1) == "allocs/op") a[n] = $i } }
  function row(what, size, base, mid, new,   p) {
    if (!(base && new)) return
    printf "| %s | %s Services x 10 | %.1f ms | %s | %.1f us | %d B, %d | %.0fx |\n", what, size, ns[base] / 1e6, (mid ? sprintf("%.2f ms", ns[mid] / 1e6) : "-"), ns[new] / 1e3, b[new], a[new], ns[base] / ns[new]
  }
  END {
    print "| one endpoint change | size | baseline | Cache.Compute, every object | what changed only | B/op, allocs/op | baseline / changed |"
    print "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    split("1000 10000", sizes, " ")
    for (i = 1; i <= 2; i++) {
      p = "BenchmarkEndpointChange/" sizes[i] "x10/"
      row("dataplane, desired state to IPVS diff (baseline: full rebuild)", sizes[i], p "full", p "cache", p "delta")
    }
    for (i = 1; i <= 2; i++) {
      p = "BenchmarkSyncEndpointChange/" sizes[i] "x10/"
      row("speaker, handler to desired state (baseline: a sync reading every object)", sizes[i], p "everything", "", p "changed")
    }
    for (k = 1; k <= 2; k++) {
      w = (k == 1 ? "BenchmarkEndpointChange/%sx10/delta" : "BenchmarkSyncEndpointChange/%sx10/changed")
      d1 = ns[sprintf(w, 1000)]; d2 = ns[sprintf(w, 10000)]
      if (d1 && d2) printf "%s%s at 10,000 Services / at 1,000: %.2fx (the baseline: %.1fx).\n", (k == 1 ? "\n" : ""), (k == 1 ? "dataplane" : "speaker"), d2 / d1,
        (k == 1 ? ns["BenchmarkEndpointChange/10000x10/full"] / ns["BenchmarkEndpointChange/1000x10/full"] : ns["BenchmarkSyncEndpointChange/10000x10/everything"] / ns["BenchmarkSyncEndpointChange/1000x10/everything"])
    }
    a1 = ns["BenchmarkEndpointChange/1000x10/delta-add-remove"]; a2 = ns["BenchmarkEndpointChange/10000x10/delta-add-remove"]
    if (a1 && a2) printf "An endpoint added or removed (the masquerading changes too; the SNAT entries after it move): %.1f us at 1,000 Services, %.1f us at 10,000.\n", a1 / 1e3, a2 / 1e3
    d = ns["BenchmarkDiff1000x10"]; v = ns["BenchmarkNaivePerService1000x10"]
    if (d && v) printf "Diff of 1,000 virtual servers: %.0fx faster than a per-Service lookup.\n", v / d
  }' _output/bench-dataplane.txt

# keeplb's nftables table: one masqueraded real server changed among
# 100,000, written whole (the baseline) and as an update of the elements
# that differ; with the real nft in a namespace when root. And one scrape
# of the IPVS counters at 10,000 virtual servers: as the collector they
# were (the baselines), and as text, read at every scrape and kept.
echo >&2
echo ">> go test -bench ./pkg/nft/ ./pkg/metrics/ (nftables writes, /metrics scrapes)" >&2
go test -run '^$' -bench 'BenchmarkWrite|BenchmarkKernelWrite|BenchmarkIPVSStatsScrape' -benchtime 10x -benchmem -count 1 ./pkg/nft/ ./pkg/metrics/ | tee _output/bench-nft.txt >&2
echo
echo "| benchmark | ms/op | MB/op | other |"
echo "| --- | ---: | ---: | --- |"
awk '/^Benchmark/ { n = $1; sub(/-[0-9]+$/, "", n); ns = ""; b = ""; other = ""
    for (i = 3; i < NF; i++) { u = $(i+1)
      if (u == "ns/op") ns = $i; else if (u == "B/op") b = $i
      else if (u == "nft-ops" || u == "script-bytes") other = other (other == "" ? "" : ", ") $i " " u }
    printf "| %s | %.2f | %s | %s |\n", n, ns / 1e6, (b == "" ? "-" : sprintf("%.1f", b / 1e6)), other }' _output/bench-nft.txt

# The controller against a real API server: 1,000 Services against the raw
# rate of 1,000 status patches in the same run (about 8 minutes).
echo >&2
echo ">> the controller: bursts and backlogs of 1,000 Services against the raw status-patch rate (hack/bench-controller.sh)" >&2
hack/bench-controller.sh

# Everything from here on needs root: network namespaces, or the VM.
if [[ $(id -u) -ne 0 ]]; then
  echo ">> skipping keepalived, IPVS and the speaker at scale: they need root" >&2
  exit 0
fi

# Real keepalived, in network namespaces. Reload-to-visible for 1,000 VIPs
# and, natively, for one VIP added to the scale harness's shape (128
# instances, 10,000 VIPs; e2e/scale measures it under the VM's TCG), and
# failover measured from a client next to the theoretical
# Master_Down_Interval (3 x advert + skew). Without keepalived on the host
# only this part is skipped: the VM has its own.
if ! command -v keepalived >/dev/null; then
  echo ">> skipping the keepalived measurements: they need keepalived on the host" >&2
else
  echo >&2
  echo ">> keepalived reload with 1,000 VIPs, and failover at 1s, 100ms, 20ms adverts (about 2 minutes)" >&2
  go test -count=1 -v -run 'TestE2EReload1000VIPs|TestE2EReloadAtScale' ./pkg/keepalived/ 2>&1 | grep -E 'reload to|reload at scale|graceful takeover of' | sed 's/^ *[a-z_0-9]*\.go:[0-9]*: /  /' || true
  hack/e2e-vrrp.sh -run 'TestVRRP' > _output/failover.txt 2>&1 || { cat _output/failover.txt >&2; exit 1; }
  echo
  echo "| advert | failover | measured from the client | bound | Master_Down_Interval (priority 252) |"
  echo "| ---: | --- | ---: | ---: | ---: |"
  awk '/failover at advert/ {
    for (i = 1; i <= NF; i++) { if ($i == "advert") adv = $(i+1); if ($i == "saw") m = $(i+1); if ($i == "(bound") b = $(i+1) }
    sub(/:$/, "", adv); sub(/\)[;]?$/, "", b); kind = $2
    if (adv ~ /ms$/) { a = adv; sub(/ms$/, "", a); a = a / 1000 } else { a = adv; sub(/s$/, "", a) }
    md = 3 * a + (256 - 252) * a / 256
    printf "| %s | %s | %s | %s | %.3fs |\n", adv, kind, m, b, md }' _output/failover.txt

  # VIP moves no failure caused: a creation burst, churn while a node
  # that came back is held, a rolling restart with the hand-off, and
  # the graceful handovers of the failover runs above (about 2 minutes).
  echo >&2
  echo ">> VIP moves per event: creation burst, churn, rollout, handover (e2e/vrrp)" >&2
  hack/e2e-vrrp.sh -run 'TestCreationBurst|TestFailbackDelayedUnderChurn|TestHandOff' > _output/moves.txt 2>&1 || { cat _output/moves.txt >&2; exit 1; }
  echo
  echo "| event (3 nodes, real keepalived) | VIP moves |"
  echo "| --- | --- |"
  cat _output/moves.txt _output/failover.txt | grep -o 'moves row: .*' | sed 's/^moves row: //' || echo "(no rows: see _output/moves.txt)"
fi

# A real IPVS kernel: programming 10,000 real servers and the cost of a
# request through a VIP, on the host if its kernel has IPVS, else in the VM.
echo >&2
echo ">> IPVS: 10,000 real servers through netlink and through ipvsadm, requests through a VIP and direct (in the VM where the host lacks IPVS: several minutes under TCG)" >&2
go test -c -o _output/ipvsbench.test ./e2e/ipvsbench/
# Programming once is the measurement; requests are many, each cheap.
runs=("-test.bench=Apply -test.benchtime=1x" "-test.bench=Request -test.benchtime=1000x")
: > _output/bench-ipvs.txt
for r in "${runs[@]}"; do
  # shellcheck disable=SC2086 # two flags per run
  if [[ -e /proc/net/ip_vs ]]; then
    _output/ipvsbench.test -test.run '^$' $r -test.benchmem >> _output/bench-ipvs.txt 2>&1
  else
    KEEPLB_VM_TIMEOUT=3600 KEEPLB_VM_MEM=1G hack/vm/run.sh "$root" -- "$root/_output/ipvsbench.test" -test.run '^$' $r -test.benchmem >> _output/bench-ipvs.txt 2>&1
  fi
done
grep -E '^(Benchmark|ok|FAIL|--- )' _output/bench-ipvs.txt >&2 || true
echo
awk '/^Benchmark/ { n = $1; sub(/-[0-9]+$/, "", n); for (i = 3; i < NF; i++) { if ($(i+1) == "ns/op") ns[n] = $i; if ($(i+1) == "req/s") rps[n] = $i } }
  END {
    a = ns["BenchmarkApply10000/netlink"]; b = ns["BenchmarkApply10000/ipvsadm"]
    print "| IPVS | netlink (keeplb) | baseline | ratio |"; print "| --- | ---: | ---: | ---: |"
    if (a && b) printf "| apply 10,000 real servers | %.2f s | %.2f s (one ipvsadm per server) | %.0fx |\n", a / 1e9, b / 1e9, b / a
    v = ns["BenchmarkRequest/vip"]; d = ns["BenchmarkRequest/direct"]
    if (v && d) printf "| one request, new connection | %.2f ms through the VIP | %.2f ms direct to the pod | %.2fx |\n", v / 1e6, d / 1e6, v / d
    v = rps["BenchmarkRequest/vip-parallel"]; d = rps["BenchmarkRequest/direct-parallel"]
    if (v && d) printf "| throughput, 4 clients per CPU, a new connection per request | %.0f req/s through the VIP | %.0f req/s direct to the pod | %.2fx |\n", v, d, v / d
  }' _output/bench-ipvs.txt

# Connections across a VIP move: 50 TCP streams and 4 UDP gap probes
# through the VIP of real speakers in the VM, through nothing (the lab's
# own stall), a graceful handover, failback, a holder crash, a rolling
# update with the hand-off and a rolling restart without it, in every
# forwarding mode, with --conn-sync and without (the baseline) in the same
# run (about 15 minutes under TCG).
echo >&2
echo ">> streams across VIP moves, every mode, --conn-sync on and off (e2e/ipvs TestStreams -streams.table)" >&2
KEEPLB_VM=1 KEEPLB_TOOLS_DIR=$(hack/tools.sh) go test -count=1 -timeout 40m -run 'TestStreams' -v ./e2e/ipvs/ -streams.table > _output/streams.txt 2>&1 || true
echo
echo "| mode | event | --conn-sync | streams that survived (of those whose backend runs) | longest stall | forwarding gap (UDP), datagrams lost | VIP moves | new connections |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"
grep -o 'stream row: .*' _output/streams.txt | sed 's/^stream row: //' || echo "(no rows: see _output/streams.txt)"

# One real speaker at 1,000 Nodes, 10,000 Services and 100,000 endpoints,
# with keepalived and IPVS in the VM (about 10 minutes; needs root).
echo >&2
echo ">> the speaker at scale (hack/bench-scale.sh)" >&2
hack/bench-scale.sh
