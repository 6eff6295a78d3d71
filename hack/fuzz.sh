#!/usr/bin/env bash
# fuzz.sh runs every fuzz target of the repository, one after another, for
# FUZZTIME each (default 10s; `make fuzz` passes 60s). It finds the targets
# by grepping the test files for `func Fuzz`, so a target added to any
# package runs without being listed here. A target that fails leaves the
# input that broke it in its package's testdata/fuzz/<FuzzName>/ (keep it,
# once fixed, as a regression seed: plain go test replays it); the script
# goes on with the other targets and fails at the end.
#
#   hack/fuzz.sh                           every target
#   hack/fuzz.sh pkg/allocator pkg/pools   only the targets under these directories
#   FUZZTIME=5s hack/fuzz.sh               a few seconds each (also 1000x for runs)
#   FUZZPARALLEL=1 hack/fuzz.sh            fewer fuzzing workers (default: one per CPU)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
fuzztime=${FUZZTIME:-10s}
dirs=("$@")
[[ ${#dirs[@]} -gt 0 ]] || dirs=(.)

# One "directory name" line per target, sorted.
mapfile -t targets < <(
  grep -rHoE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' "${dirs[@]}" |
    grep -v -e '/vendor/' -e '/_output/' -e '/testdata/' |
    sed -E 's#^(.*)/[^/]+:func (Fuzz[A-Za-z0-9_]*)\($#\1 \2#' |
    sort -u
)
if [[ ${#targets[@]} -eq 0 ]]; then
  echo "no fuzz targets under ${dirs[*]}" >&2
  exit 1
fi

parallel=()
[[ -z ${FUZZPARALLEL:-} ]] || parallel=(-parallel "$FUZZPARALLEL")
# fuzz_one runs one target. Go 1.26's fuzzing coordinator can fail a target
# at the end of -fuzztime with a bare "context deadline exceeded" and no
# failing input (golang/go#75804, fixed in Go 1.27): the deadline races the
# code that should treat it as a normal stop, more often on a loaded 2-core
# runner. That failure says nothing about the code under test, so it is
# retried once; a failure that writes an input, any other failure, or the
# same race twice in a row still fails.
fuzz_one() {
  local dir=$1 name=$2 corpus="$1/testdata/fuzz/$2" before after out rc
  for attempt in 1 2; do
    before=$(ls "$corpus" 2>/dev/null | sort || true)
    out=$(mktemp)
    rc=0
    go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "${parallel[@]}" "$dir" 2>&1 | tee "$out" || rc=$?
    after=$(ls "$corpus" 2>/dev/null | sort || true)
    if [[ $rc -eq 0 ]]; then
      rm -f "$out"
      return 0
    fi
    if [[ $attempt -eq 1 && $before == "$after" ]] &&
      grep -qx '[[:space:]]*context deadline exceeded' "$out"; then
      echo ">> $name: Go's fuzzing coordinator hit its deadline race with no failing input (golang/go#75804); running it again" >&2
      rm -f "$out"
      continue
    fi
    rm -f "$out"
    return 1
  done
}

results=()
failed=0
for t in "${targets[@]}"; do
  dir=${t% *} name=${t##* }
  [[ $dir == ./* || $dir == /* ]] || dir=./$dir
  echo ">> $name in $dir for $fuzztime" >&2
  start=$SECONDS
  if fuzz_one "$dir" "$name"; then
    results+=("$(printf 'ok    %-24s %-28s %4ds' "$name" "$dir" $((SECONDS - start)))")
  else
    results+=("$(printf 'FAIL  %-24s %-28s %4ds  (input in %s/testdata/fuzz/%s/)' "$name" "$dir" $((SECONDS - start)) "$dir" "$name")")
    failed=$((failed + 1))
  fi
done

echo
printf '  %s\n' "${results[@]}"
if [[ $failed -gt 0 ]]; then
  echo "$failed of ${#targets[@]} fuzz targets failed" >&2
  exit 1
fi
