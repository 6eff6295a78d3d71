#!/usr/bin/env bash
# test.sh is `make test`, and what CI runs: verify, then the unit tests, a
# few seconds of every fuzz target, then the integration tests against a
# real kube-apiserver and etcd, then the tests that need IPVS (hack/e2e.sh:
# in a VM where the host kernel has none), then keeplb from its image on a
# real cluster in that VM (hack/e2e-cluster.sh). It stops at the first stage
# that fails and reports how long each stage took.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

timings=()
start_all=$SECONDS

summary() {
  echo
  printf '  %s\n' "${timings[@]}"
  printf '  %-12s %5ds\n' total $((SECONDS - start_all))
}

# digest LOG: what a reader of a failed run's last lines needs. Packages
# that run in parallel print their output only when they end, so a data
# race's report can sit thousands of lines above the summary; CI shows the
# tail. The whole output stays in _output/test-NAME.log.
digest() {
  echo
  echo "==> what failed (from $1)"
  grep -E '^(--- FAIL|FAIL|panic:|fatal error:)' "$1" | head -40 || true
  # The first reports of the race detector, each with its stacks.
  awk '/^WARNING: DATA RACE/ {n++; on = (n <= 3)} on {print} /^==================$/ {on = 0}' "$1" | head -300 || true
}

# stage NAME CMD...: runs CMD under a header and records its duration.
stage() {
  local name=$1 start=$SECONDS status=0
  shift
  echo
  echo "==> $name"
  mkdir -p _output
  local log=_output/test-$name.log
  "$@" 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
  if ((status != 0)); then
    timings+=("$(printf '%-12s %5ds  FAILED' "$name" $((SECONDS - start)))")
    digest "$log"
    summary
    echo "==> $name failed" >&2
    exit "$status"
  fi
  timings+=("$(printf '%-12s %5ds' "$name" $((SECONDS - start)))")
}

unit() {
  local pkgs
  # e2e/ needs the control-plane binaries; test-integration.sh runs it.
  # (errexit does not apply inside a function called from ||, hence the
  # explicit return.)
  pkgs=$(go list ./... | grep -v /e2e/) || return
  # shellcheck disable=SC2086 # one word per package
  go test -race -count=1 $pkgs
}

# Every fuzz target for a few seconds (make fuzz runs them longer): new
# inputs each run, on top of the seeds that plain go test replays.
fuzz() { FUZZTIME=${FUZZTIME:-3s} hack/fuzz.sh; }

stage verify hack/verify.sh
stage unit unit
stage fuzz fuzz
stage integration hack/test-integration.sh
stage e2e hack/e2e.sh
stage cluster hack/e2e-cluster.sh

summary
echo "==> all passed"
