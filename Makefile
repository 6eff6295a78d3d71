# keeplb's entry points. Each target is one line of intent; the logic lives
# in hack/, so that CI and people run exactly the same steps.

# Stamped into the binary (pkg/version); override on the command line, e.g.
# make build VERSION=v0.1.0. Deferred (=) so that `make help` runs no git.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
DATE    ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS  = -s -w \
	-X github.com/keeplb/keeplb/pkg/version.version=$(VERSION) \
	-X github.com/keeplb/keeplb/pkg/version.commit=$(COMMIT) \
	-X github.com/keeplb/keeplb/pkg/version.date=$(DATE)
# The tag make image gives the image; e.g. make image IMAGE=registry.example/keeplb:v0.1.0.
IMAGE   ?= keeplb:$(VERSION)

.DEFAULT_GOAL := help
.PHONY: help build image test test-unit test-integration e2e-vrrp e2e e2e-cluster demo-cluster bench fuzz lint verify chart tools demo demo-down clean

help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build bin/keeplb, stamped with VERSION, COMMIT and DATE.
	CGO_ENABLED=0 go build -trimpath -ldflags "$(LDFLAGS)" -o bin/keeplb ./cmd/keeplb

image: ## Build IMAGE (keeplb:VERSION) from the Dockerfile (Docker, else buildah), check it, save _output/keeplb-image.tar.
	VERSION=$(VERSION) COMMIT=$(COMMIT) DATE=$(DATE) IMAGE=$(IMAGE) hack/image.sh

test: ## Run everything CI runs: verify, unit, integration and IPVS end-to-end tests.
	hack/test.sh

test-unit: ## Run the unit tests with the race detector (all but e2e/).
	go test -race -count=1 $$(go list ./... | grep -v /e2e/)

test-integration: ## Run the tests against a real kube-apiserver and etcd.
	hack/test-integration.sh

e2e-vrrp: ## Run the speaker end to end: real keepalived in network namespaces (needs root); prints failover times.
	hack/e2e-vrrp.sh

e2e: ## Run the tests that need IPVS (in a qemu VM where the host kernel lacks it), the demo's among them.
	hack/e2e.sh

demo-cluster: ## keeplb from its image on a real 3-node cluster in the VM, with the examples; stays up until Ctrl-C (needs root; minutes).
	hack/demo-cluster.sh

e2e-cluster: ## Run keeplb from its image on a real 3-node cluster in the VM (kubelet, containerd, kube-proxy; needs root).
	hack/e2e-cluster.sh

bench: ## Every measurement of docs/benchmarks.md, each against a baseline in the same run (about an hour); tables in the output, raw in _output/.
	hack/bench.sh

fuzz: ## Run every fuzz target for FUZZTIME each (default 60s).
	FUZZTIME=$${FUZZTIME:-60s} hack/fuzz.sh

lint: ## Run golangci-lint with .golangci.yml (version pinned in tools/golangci-lint; built once, cached).
	hack/lint.sh

verify: ## Check formatting, go vet, that go.mod files are tidy, and make lint.
	hack/verify.sh

chart: ## Regenerate the Helm chart's templates and CRD (manifests/charts/keeplb) from the kustomize base.
	go run ./hack/chartgen

tools: ## Build (once; cached) kube-apiserver, kubectl, etcd and helm, and print their directory.
	hack/tools.sh

demo: ## Run all of keeplb locally (control plane, controller, 3 nodes with speakers) and leave it up.
	hack/demo.sh

demo-down: ## Stop what make demo started.
	@if [ -x _output/bin/keeplb-demo ]; then _output/bin/keeplb-demo down; else echo "No demo is running."; fi

clean: ## Remove build and benchmark output.
	rm -rf bin/ _output/
