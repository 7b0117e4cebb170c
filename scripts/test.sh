#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: this project needs a Rust toolchain (rustup) on PATH" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
if ! command -v git >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq git
fi

echo "== test binaries (etcd, kube-apiserver, gitea, helm, Flux's controllers; built from the Go module proxy, cached)"
eval "$(scripts/ensure-test-binaries.sh --print-env)"

# crates/git/tests/ssh.rs runs a real OpenSSH server (/usr/sbin/sshd, plus ssh and
# ssh-keygen from openssh-client, a dependency) on loopback for git over SSH.
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server)

# crates/cli/tests/dashboard_browser.rs drives Debian's chromium through chromedriver
# (WebDriver on loopback).
command -v chromedriver >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver)

# A clean CI clone gains nothing from incremental state; it only costs disk.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
