#!/usr/bin/env bash
# verify.sh checks what review should not have to: gofmt, go vet, that the
# keeplb module and the tool modules (tools/k8s, tools/etcd, tools/helm,
# tools/golangci-lint) are tidy, and then golangci-lint (hack/lint.sh, the
# linters of .golangci.yml). It changes no file. Every check runs even after
# one fails, so that a single run lists every problem; the exit status is 1
# if any failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
failed=()

echo ">> gofmt"
unformatted=$(gofmt -l .)
if [[ -n "$unformatted" ]]; then
  echo "these files need gofmt -w:" >&2
  echo "$unformatted" >&2
  failed+=(gofmt)
fi

echo ">> go vet ./..."
go vet ./... || failed+=("go vet")

# go mod tidy -diff prints what tidy would change and fails, without
# writing go.mod or go.sum: nothing to restore, and no clash with someone
# editing them at the same time.
for mod in . tools/k8s tools/etcd tools/helm tools/golangci-lint; do
  echo ">> go mod tidy ($mod)"
  if ! (cd "$mod" && go mod tidy -diff); then
    echo "$mod/go.mod or go.sum is not tidy: run go mod tidy in $mod" >&2
    failed+=("tidy $mod")
  fi
done

# Last: the first run builds the linter (see hack/lint.sh), and what it
# reports is easier to read once the checks above pass.
echo ">> golangci-lint (hack/lint.sh)"
hack/lint.sh || failed+=(golangci-lint)

if ((${#failed[@]})); then
  printf 'verify failed: %s\n' "$(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')" >&2
  exit 1
fi
echo "verify: ok"
