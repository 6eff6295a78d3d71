#!/usr/bin/env bash
# bench-controller.sh measures whether keeplb's controller keeps pace with a
# real kube-apiserver (e2e/controllerbench): 1,000 LoadBalancer Services
# against the raw rate of 1,000 status patches, in the same run. The raw go
# test output is kept in _output/bench-controller.txt; a markdown table of
# it, ready for docs/benchmarks.md, goes to stdout.
#
#   hack/bench-controller.sh                 run it (about 2 minutes), then the table
#   hack/bench-controller.sh --table FILE    only turn saved output into the table
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# table reads go test -bench output of BenchmarkController and prints
# markdown; values are found by their unit, not their column.
table() {
  awk '
    function unit(u,   i) { for (i = 3; i < NF; i++) if ($(i + 1) == u) return $i; return "" }
    function or(v, d) { return v == "" ? d : v }
    /^goos:/ { goos = $2 }
    /^goarch:/ { goarch = $2 }
    /^cpu:/ { cpu = $0; sub(/^cpu: */, "", cpu) }
    /^BenchmarkController\// {
      name = $1; sub(/-[0-9]+$/, "", name); sub(/^BenchmarkController\//, "", name)
      rows[++n] = name
      t[name] = unit("ns/op"); r[name] = unit("svc/s"); x[name] = unit("x-raw")
      w[name] = unit("writes/svc"); e[name] = unit("events/svc")
      c[name] = unit("create-s"); st[name] = unit("start-s")
      l[name] = unit("lost-events"); li[name] = unit("lost-IPAllocated"); d[name] = unit("dropped-events")
      lag[name] = unit("lag-s"); xs[name] = unit("x-raw-after-start")
      if (name ~ /^raw\//) { rawt[name] = unit("ns/op") / 1e9; rawc[name] = c[name]; delete c[name] }
    }
    END {
      if (!n) { print "no controller benchmark results found" > "/dev/stderr"; exit 1 }
      if (goos != "") printf "Measured on %s/%s%s, 1,000 Services each.\n\n", goos, goarch, (cpu == "" ? "" : ", " cpu)
      print "| run | time | Services/s | vs the faster raw run | a burst: its creates; a backlog: the start | a burst: last address after the last create; a backlog: vs raw without the start | writes/Service | events/Service | events missing (of them IPAllocated) | events dropped (metric) |"
      print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
      for (i = 1; i <= n; i++) {
        k = rows[i]
        cs = (c[k] != "" ? sprintf("%.2f s", c[k]) : (st[k] != "" ? sprintf("%.2f s", st[k]) : "-"))
        after = (lag[k] != "" ? sprintf("%.0f ms", lag[k] * 1000) : (xs[k] != "" ? sprintf("%.3fx", xs[k]) : "-"))
        printf "| %s | %.2f s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n", k, t[k] / 1e9, r[k],
          (x[k] == "" ? "(baseline)" : sprintf("%.3fx", x[k])), cs, after, or(w[k], "-"), or(e[k], "-"), (l[k] == "" ? "-" : l[k] " (" li[k] ")"), or(d[k], "-")
      }
      # The ceiling of a burst on this machine: the API server creating
      # the Services, then taking the raw patches, with nothing else to do.
      best = ""
      for (k in rawt) if (best == "" || rawt[k] < rawt[best]) best = k
      if (best != "" && rawc[best] != "") {
        printf "\nA burst can be no faster than the API server creates its Services: in %s, with nothing else to do, creating them took %.2f s and the patches %.2f s, so a burst here can reach at most %.3fx: one API server, on the same cores, does both.\n", best, rawc[best], rawt[best], rawt[best] / (rawc[best] + rawt[best])
      }
    }
  ' "$@"
}

if [[ ${1:-} == --table ]]; then
  table "${2:--}"
  exit
fi

mkdir -p _output
dir=$(hack/tools.sh)
echo ">> go test -bench BenchmarkController ./e2e/controllerbench/; raw output in _output/bench-controller.txt" >&2
KEEPLB_TOOLS_DIR=$dir go test -run '^$' -bench BenchmarkController -benchtime 1x -count 1 -timeout 30m ./e2e/controllerbench/ | tee _output/bench-controller.txt >&2
echo >&2
table _output/bench-controller.txt
