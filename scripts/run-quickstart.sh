#!/usr/bin/env bash
# Runs the service in embedded mode on examples/quickstart, with the example
# notification receiver, both on loopback. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: this project needs a Rust toolchain (rustup) on PATH" >&2
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3
fi
cargo build --release --locked -p pipeline-controller
state_dir="${PIPELINE_QUICKSTART_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/pipeline-controller}"
mkdir -p "$state_dir"
python3 examples/quickstart/receiver.py 9099 &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
exec_args=(serve --manifests examples/quickstart --state "$state_dir/quickstart.redb"
  --listen 127.0.0.1:8080 --notify-url http://127.0.0.1:9099/events "$@")
./target/release/pipeline-controller "${exec_args[@]}"
