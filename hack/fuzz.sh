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
results=()
failed=0
for t in "${targets[@]}"; do
  dir=${t% *} name=${t##* }
  [[ $dir == ./* || $dir == /* ]] || dir=./$dir
  echo ">> $name in $dir for $fuzztime" >&2
  start=$SECONDS
  if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" "${parallel[@]}" "$dir"; then
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
