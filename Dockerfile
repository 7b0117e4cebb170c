# syntax=docker/dockerfile:1
# pipeline-controller image: a static-enough release build on Debian, run as a non-root
# user on debian-slim with git (the pull-request strategy shells out to git), an SSH
# client (ssh:// repository URLs) and CA certificates (TLS to forges and the API server).
#
#   docker build -t pipeline-controller .
#   docker run --rm pipeline-controller --help

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The registry and target dir are build caches (BuildKit), so rebuilds are incremental.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pipeline-controller --bin pipeline-controller \
 && install -D -m 0755 target/release/pipeline-controller /out/pipeline-controller

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
      --shell /usr/sbin/nologin nonroot
COPY --from=builder /out/pipeline-controller /usr/local/bin/pipeline-controller
# Writable places for a read-only root file system: mount an emptyDir on /tmp (the
# Deployment does); git's HOME and pull-request clones go there.
ENV HOME=/tmp \
    PIPELINE_CONTROLLER_PR_WORK_DIR=/tmp/pull-requests \
    PIPELINE_CONTROLLER_LISTEN=0.0.0.0:8080
USER 65532:65532
EXPOSE 8080
# tini reaps the git and ssh children and forwards SIGTERM for a graceful shutdown.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pipeline-controller"]
CMD ["serve"]
