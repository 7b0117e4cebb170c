#!/usr/bin/env bash
# Runs the service in embedded mode on examples/quickstart, with the example
# notification receiver, both on loopback. Ctrl-C stops both.
#
#   scripts/run-quickstart.sh [--reset] [serve flags...]
#
# The promotion records are kept in examples/quickstart/.state/ (git-ignored), so they
# survive a restart; --reset deletes them first, to run the walkthrough again from scratch.
# PIPELINE_QUICKSTART_STATE=DIR keeps them elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

reset=false
serve_args=()
for arg in "$@"; do
  case "$arg" in
    --reset) reset=true ;;
    *) serve_args+=("$arg") ;;
  esac
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: this project needs a Rust toolchain (rustup) on PATH" >&2
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3
fi
cargo build --release --locked -p pipeline-controller
state_dir="${PIPELINE_QUICKSTART_STATE:-examples/quickstart/.state}"
state="$state_dir/quickstart.redb"
if $reset; then
  rm -f "$state"
  echo "quickstart: removed $state; starting from an empty store" >&2
elif [ -e "$state" ]; then
  echo "quickstart: keeping the records in $state (events already sent answer 200 with" \
    "their record); run with --reset to start from scratch" >&2
fi
mkdir -p "$state_dir"
python3 examples/quickstart/receiver.py 9099 &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
exec_args=(serve --manifests examples/quickstart --state "$state"
  --listen 127.0.0.1:8080 --internal-listen 127.0.0.1:8081
  --notify-url http://127.0.0.1:9099/events)
./target/release/pipeline-controller "${exec_args[@]}" ${serve_args[@]+"${serve_args[@]}"}
