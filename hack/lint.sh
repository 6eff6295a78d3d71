#!/usr/bin/env bash
# lint.sh runs golangci-lint over the keeplb module with .golangci.yml:
# the linters, and goimports as the formatter. Arguments go to
# `golangci-lint run` (default ./...), e.g. hack/lint.sh ./pkg/allocator/...
#
# The linter is the version pinned by tools/golangci-lint, built from the Go
# module proxy on the first run and cached outside git (like hack/tools.sh),
# keyed by that module's go.mod and go.sum and by the Go version: a linter
# built by an older Go refuses a module that needs a newer one.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mod=$root/tools/golangci-lint
cache=${KEEPLB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keeplb/tools}
key=$({ cat "$mod/go.mod" "$mod/go.sum"; go env GOVERSION; } | sha256sum | cut -c1-16)
dir="$cache/$key"
bin="$dir/golangci-lint"

if [[ ! -x "$bin" ]]; then
  ver=$(sed -n 's/^require github.com\/golangci\/golangci-lint\/v2 v\([^ ]*\)$/\1/p' "$mod/go.mod")
  mkdir -p "$cache"
  # A directory of this run's own, renamed into place: two runs building
  # at once each finish with a whole binary.
  tmp=$(mktemp -d "$dir.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$SECONDS
  echo ">> building golangci-lint $ver (first run: about 2 minutes on 2 cores; cached afterwards in $dir)" >&2
  # main.date set makes golangci-lint --version print main.version rather
  # than the version of the module it was built in (this tools module).
  (cd "$mod" && CGO_ENABLED=0 go build -trimpath -buildvcs=false \
    -ldflags "-s -w -X main.version=$ver -X main.commit=module-proxy -X main.date=unknown" \
    -o "$tmp/golangci-lint" github.com/golangci/golangci-lint/v2/cmd/golangci-lint)
  mkdir -p "$dir"
  mv "$tmp/golangci-lint" "$bin"
  rm -rf "$tmp"
  trap - EXIT
  echo ">> golangci-lint built in $((SECONDS - start))s" >&2
fi

if (($# == 0)); then
  set -- ./...
fi
exec "$bin" run "$@"
