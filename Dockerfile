# syntax=docker/dockerfile:1.7
#
# TMWS container image.
#
#   docker build -t tmws:latest .                 # production image (the last stage, `runtime`)
#   docker build --target dev -t tmws:dev .       # development image used by docker-compose.dev.yml
#
# Stages:
#   chef         Rust toolchain + cargo-chef
#   planner      computes the dependency recipe (changes only when Cargo.toml/Cargo.lock change)
#   build-dev    debug build for the dev image
#   build        `--locked` release build (stripped by [profile.release] strip = true)
#   health-probe the official grpc_health_probe image, resolved for the target platform
#   dev          debug binary on the runtime base (docker-compose.dev.yml)
#   runtime      the production image: debian:bookworm-slim, non-root `tmws` (UID 10001)
#
# Multi-arch: every stage resolves for the platform being built (linux/amd64, linux/arm64 under
# Buildx), so the health-probe stage copies the binary matching TARGETARCH.
# No secret is passed as a build argument: configuration, including TMWS_SECRET_KEY, is read from
# the environment at run time.

ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm
ARG CARGO_CHEF_VERSION=0.1.78
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.40

# ---------------------------------------------------------------------------------------------
FROM ghcr.io/grpc-ecosystem/grpc-health-probe:${GRPC_HEALTH_PROBE_VERSION} AS health-probe

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_SUITE} AS chef
ARG CARGO_CHEF_VERSION
# protoc is vendored by build.rs (protoc-bin-vendored) and TLS is rustls, so the slim image's
# C toolchain is all the build needs.
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME}/registry"
WORKDIR /build

# ---------------------------------------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------------------------
FROM chef AS build-dev
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --locked --bin tmws --recipe-path recipe.json
COPY . .
RUN cargo build --locked --bin tmws \
    && install -D -m 0755 target/debug/tmws /out/tmws

# ---------------------------------------------------------------------------------------------
FROM chef AS build
COPY --from=planner /build/recipe.json recipe.json
# Dependencies only: this layer is reused until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --bin tmws --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin tmws \
    && install -D -m 0755 target/release/tmws /out/tmws

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_SUITE}-slim AS base
# Fixed IDs so that Kubernetes (runAsUser/runAsGroup 10001) and volume permissions are stable.
RUN groupadd --gid 10001 tmws \
    && useradd --uid 10001 --gid tmws --no-log-init --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tmws
COPY --from=health-probe /ko-app/grpc-health-probe /usr/local/bin/grpc_health_probe
# System trust roots (Debian's ca-certificates bundle from the build image), for TLS to managed
# PostgreSQL/Redis and HTTPS embedding providers; no package manager runs in the runtime image.
COPY --from=chef /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The image listens on every interface; the binary's own default is 127.0.0.1:50051.
# Logs are JSON lines on stdout, one event per line.
ENV TMWS_GRPC_ADDR=0.0.0.0:50051 \
    TMWS_LOG_FORMAT=json
EXPOSE 50051
# `tmws serve` turns NOT_SERVING and drains on SIGTERM for at most TMWS_SHUTDOWN_GRACE (25s by
# default): give it at least that long (`docker stop -t 30`, compose stop_grace_period: 30s).
STOPSIGNAL SIGTERM
# Liveness of the process: the server-wide health status "" (it does not follow PostgreSQL, so a
# database blip never marks the container unhealthy). Readiness per service is probed with
# `-service=tmws.v1.MemoryService` by orchestrators.
HEALTHCHECK --interval=15s --timeout=5s --start-period=40s --retries=3 \
    CMD ["grpc_health_probe", "-addr=127.0.0.1:50051"]
USER 10001:10001
ENTRYPOINT ["tmws"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM base AS dev
COPY --from=build-dev /out/tmws /usr/local/bin/tmws
ENV RUST_BACKTRACE=1
LABEL org.opencontainers.image.title="tmws (development build)"

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG DEBIAN_SUITE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
COPY --from=build /out/tmws /usr/local/bin/tmws
# CI (docker/metadata-action) overrides these and adds org.opencontainers.image.source/url.
LABEL org.opencontainers.image.title="tmws" \
      org.opencontainers.image.description="Trinitas Memory & Workflow Service: semantic memory and durable workflows over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:${DEBIAN_SUITE}-slim"
