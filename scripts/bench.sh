#!/usr/bin/env bash
# Load benchmark (not a test): pipeline-controller's webhook beside a bare HMAC-verifying
# HTTP server, both on loopback. Prints throughput, p50/p99/max latency for new,
# duplicate and bad-signature events, and both processes' memory. Arguments are passed
# to pipeline-bench (see `target/release/pipeline-bench --help`), e.g. --requests 2000.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: this project needs a Rust toolchain (rustup) on PATH" >&2
  exit 1
fi
cargo build --release --locked -p pipeline-controller -p pipeline-bench
exec ./target/release/pipeline-bench "$@"
