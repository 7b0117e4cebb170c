# syntax=docker/dockerfile:1
# pipeline-controller images. The binary is the static (musl) release build of
# scripts/build-release.sh, either compiled here (BINARY_SOURCE=build, the default) or
# taken from dist/linux-<arch>/ in the build context (BINARY_SOURCE=prebuilt: the release
# workflow builds the binaries natively per architecture first, so buildx needs QEMU only
# for apt-get in the runtime stage).
#
# Targets:
#   runtime (the last stage, the default): debian-slim with git (the pull-request
#       strategy runs the git CLI), an SSH client (ssh:// repository URLs), CA
#       certificates and tini. The published image.
#   static: FROM scratch: the binary and a CA bundle, nothing else. No git, so the
#       pull-request strategy is unavailable; the notification strategy, the webhook and
#       Kubernetes mode work. Published with the suffix -static.
#
#   docker build -t pipeline-controller .
#   docker build --target static -t pipeline-controller:static .
#   scripts/build-release.sh && docker build --build-arg BINARY_SOURCE=prebuilt .
#   docker run --rm pipeline-controller --help
#
# buildah (1.28, Debian 12) resolves `FROM ${BINARY_SOURCE}` only from --build-arg, not
# from the ARG's default: pass --build-arg BINARY_SOURCE=build (or prebuilt) explicitly.
# scripts/build-image.sh builds with buildah from dist/, without a Docker daemon.
#
# Both run as 65532:65532 with HOME=/tmp and pull-request clones in /tmp/pull-requests:
# with a read-only root file system mount a writable /tmp (the chart and deploy/ mount an
# emptyDir; `docker run --read-only --tmpfs /tmp ...`).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG BINARY_SOURCE=build

# --- the binary, compiled from this repository --------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools file ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# No .git in the build context's copy: `--version` names the commit passed here
# (docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) ...).
ARG GIT_COMMIT=unknown
ENV PIPELINE_CONTROLLER_GIT_COMMIT=${GIT_COMMIT}
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY crates ./crates
COPY scripts/build-release.sh ./scripts/build-release.sh
# The registry and the target dir are BuildKit caches: rebuilds are incremental.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache/release-target \
    scripts/build-release.sh --target-dir /cache/release-target --out /dist \
 && mkdir -p /out \
 && cp /dist/linux-*/pipeline-controller /dist/linux-*/ca-certificates.crt /out/

# --- or the binary built before, by scripts/build-release.sh --------------------------
FROM scratch AS prebuilt
ARG TARGETARCH
COPY dist/linux-${TARGETARCH}/pipeline-controller dist/linux-${TARGETARCH}/ca-certificates.crt /out/

FROM ${BINARY_SOURCE} AS binary

# --- static: FROM scratch -------------------------------------------------------------
FROM scratch AS static
COPY --from=binary /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binary /out/pipeline-controller /usr/local/bin/pipeline-controller
ENV HOME=/tmp \
    PIPELINE_CONTROLLER_PR_WORK_DIR=/tmp/pull-requests \
    PIPELINE_CONTROLLER_LISTEN=0.0.0.0:8080 \
    PIPELINE_CONTROLLER_INTERNAL_LISTEN=0.0.0.0:8081 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
# 8080: webhook and approvals (public). 8081: API, dashboard, metrics, health (internal).
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/pipeline-controller"]
CMD ["serve"]

# --- runtime: debian-slim with git (the published image) -----------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
      --shell /usr/sbin/nologin nonroot
COPY --from=binary /out/pipeline-controller /usr/local/bin/pipeline-controller
ENV HOME=/tmp \
    PIPELINE_CONTROLLER_PR_WORK_DIR=/tmp/pull-requests \
    PIPELINE_CONTROLLER_LISTEN=0.0.0.0:8080 \
    PIPELINE_CONTROLLER_INTERNAL_LISTEN=0.0.0.0:8081
USER 65532:65532
# 8080: webhook and approvals (public). 8081: API, dashboard, metrics, health (internal).
EXPOSE 8080 8081
# tini reaps the git and ssh children and forwards SIGTERM for a graceful shutdown.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pipeline-controller"]
CMD ["serve"]
