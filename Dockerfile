# syntax=docker/dockerfile:1
#
# One image for both keeplb components: the controller (Deployment, runs as
# the non-root user below) and the speaker (DaemonSet, runs keepalived and
# IPVS; manifests/speaker runs it as root with only NET_ADMIN and NET_RAW).
#
#   docker build --build-arg VERSION=v0.1.0 \
#     --build-arg COMMIT=$(git rev-parse HEAD) \
#     --build-arg DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t keeplb .

FROM golang:1.26-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not invalidate this layer.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
ARG DATE=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w \
        -X github.com/keeplb/keeplb/pkg/version.version=${VERSION} \
        -X github.com/keeplb/keeplb/pkg/version.commit=${COMMIT} \
        -X github.com/keeplb/keeplb/pkg/version.date=${DATE}" \
      -o /out/keeplb ./cmd/keeplb

FROM debian:bookworm-slim
# keepalived and nft (keeplb's nftables table: masquerading for IPVS,
# loadBalancerSourceRanges) are only used by the speaker, and modprobe
# (kmod) only by its init container, keeplb prepare-node, to load ip_vs on
# kernels older than 5.16; the controller ignores all three.
RUN apt-get update \
 && apt-get install -y --no-install-recommends keepalived nftables kmod \
 && rm -rf /var/lib/apt/lists/*
# The build's details come after the packages: a RUN step after an ARG
# runs again whenever the argument changes (DATE does at every build).
ARG VERSION=dev
ARG COMMIT=unknown
ARG DATE=unknown
LABEL org.opencontainers.image.title="keeplb" \
      org.opencontainers.image.description="Bare-metal Kubernetes LoadBalancer: VIP allocation from IPPools, announced with keepalived (VRRP) and forwarded with IPVS" \
      org.opencontainers.image.source="https://github.com/keeplb/keeplb" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.created="${DATE}"
COPY --from=build /out/keeplb /usr/local/bin/keeplb
# Non-root by default, for the controller (its Deployment also sets
# runAsNonRoot). The speaker DaemonSet overrides this with runAsUser 0 and
# the NET_ADMIN and NET_RAW capabilities that keepalived and IPVS need.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keeplb"]
