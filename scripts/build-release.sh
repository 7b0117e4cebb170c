#!/usr/bin/env bash
# Builds the release binary of the `pipeline-controller` package (crates/cli) as a static
# executable: Rust's musl target (`<arch>-unknown-linux-musl`), C parts (aws-lc, ring)
# compiled with musl-gcc. Checks that the result is static and runs, then writes
#
#   dist/pipeline-controller-<version>-<target>            the binary
#   dist/pipeline-controller-<version>-<target>.sha256     its checksum (sha256sum format)
#   dist/linux-<amd64|arm64>/pipeline-controller           the same binary, where the
#                                                          Dockerfile's prebuilt stage
#                                                          (BINARY_SOURCE=prebuilt) takes it
#   dist/linux-<amd64|arm64>/ca-certificates.crt           Mozilla's CA set (the
#                                                          ca-certificates package's), for
#                                                          the FROM-scratch image
#
# Usage: scripts/build-release.sh [--target TRIPLE] [--glibc-static] [--out DIR]
#                                 [--target-dir DIR] [--install-deps]
#   --target TRIPLE   default: <this machine's arch>-unknown-linux-musl. Build each
#                     architecture on a machine of that architecture (the release workflow
#                     uses an arm64 runner for arm64): cross-compiling the C parts would
#                     need a cross musl-gcc, which Debian does not package.
#   --glibc-static    fallback when the musl std cannot be installed: the
#                     <arch>-unknown-linux-gnu target with -C target-feature=+crt-static.
#                     Also static, but glibc's getaddrinfo in a static binary wants the
#                     NSS modules of the same glibc at run time (DNS names in URLs may not
#                     resolve in a scratch image): prefer musl.
#   --out DIR         default: dist/
#   --target-dir DIR  default: ~/.cache/pipeline-controller/release-target (kept apart from
#                     target/, so a release build never invalidates or locks the debug
#                     builds; CARGO_TARGET_DIR also works)
#   --install-deps    apt-get install musl-tools when musl-gcc is missing (as root)
#
# Environment: CARGO_BUILD_JOBS (e.g. 1 on a shared machine; run it under `nice -n 19`).
# The release profile is Cargo.toml's, with debug info off and symbols kept
# (CARGO_PROFILE_RELEASE_DEBUG=0, CARGO_PROFILE_RELEASE_STRIP=debuginfo), unless set.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

arch=$(uname -m)
target=""
libc=musl
out="$ROOT/dist"
target_dir="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pipeline-controller/release-target}"
install_deps=0
while (($#)); do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --glibc-static) libc=gnu; shift ;;
    --out) out=$2; shift 2 ;;
    --target-dir) target_dir=$2; shift 2 ;;
    --install-deps) install_deps=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-release.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
target=${target:-$arch-unknown-linux-$libc}
case "$target" in
  *-linux-musl*) libc=musl ;;
  *-linux-gnu*) libc=gnu ;;
  *) echo "build-release.sh: only Linux musl/gnu targets are supported, not $target" >&2; exit 2 ;;
esac
case "$target" in
  x86_64-*) docker_arch=amd64 ;;
  aarch64-*) docker_arch=arm64 ;;
  *) docker_arch=${target%%-*} ;;
esac
log() { printf '[build-release] %s\n' "$*" >&2; }

# The Rust standard library for the target.
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx "$target"; then
    log "rustup target add $target"
    rustup target add "$target"
  fi
fi
sysroot=$(rustc --print sysroot)
if [[ ! -d "$sysroot/lib/rustlib/$target" ]]; then
  log "no Rust standard library for $target in $sysroot (rustup target add $target failed or no rustup)"
  log "fallback: scripts/build-release.sh --glibc-static"
  exit 1
fi

# A C compiler for the target (aws-lc-sys and ring compile C).
target_env=${target//-/_}
if [[ $libc == musl ]]; then
  if ! command -v musl-gcc >/dev/null 2>&1; then
    if ((install_deps)); then
      log "apt-get install musl-tools"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
    else
      log "musl-gcc not found: apt-get install musl-tools (or pass --install-deps)"
      exit 1
    fi
  fi
  if [[ $target != "$arch"-* ]]; then
    log "warning: $target is not this machine's architecture ($arch); musl-gcc compiles for $arch"
  fi
  export "CC_${target_env}=${CC_MUSL:-musl-gcc}"
  export "AR_${target_env}=${AR_MUSL:-ar}"
else
  # crt-static for the gnu target; musl targets are static by default. With --target,
  # RUSTFLAGS reaches the target only, not build scripts and proc macros.
  export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
fi
export CARGO_PROFILE_RELEASE_DEBUG="${CARGO_PROFILE_RELEASE_DEBUG:-0}"
export CARGO_PROFILE_RELEASE_STRIP="${CARGO_PROFILE_RELEASE_STRIP:-debuginfo}"

# pipeline-controller's version, e.g. "path+file:///src/crates/cli#pipeline-controller@0.1.0".
version=$(cargo pkgid --locked -p pipeline-controller)
version=${version##*[@#]}

log "cargo build --release --locked -p pipeline-controller --target $target (target dir $target_dir, jobs ${CARGO_BUILD_JOBS:-all})"
start=$SECONDS
cargo build --release --locked -p pipeline-controller --bin pipeline-controller \
  --target "$target" --target-dir "$target_dir"
log "built in $((SECONDS - start))s"
bin="$target_dir/$target/release/pipeline-controller"

# Static, or it is not a release.
description=$(file -b "$bin")
log "file: $description"
case "$description" in
  *"statically linked"*|*"static-pie linked"*) ;;
  *) log "not a static executable: $description"; exit 1 ;;
esac
if ldd_out=$(ldd "$bin" 2>&1); then
  case "$ldd_out" in
    *"statically linked"*|*"not a dynamic executable"*) ;;
    *) log "ldd lists shared libraries:"; printf '%s\n' "$ldd_out" >&2; exit 1 ;;
  esac
fi
log "ldd: $(printf '%s' "$ldd_out" | head -1 | sed 's/^[[:space:]]*//')"
if [[ $target == "$arch"-* ]]; then
  log "runs: $("$bin" --version)"
fi

mkdir -p "$out/linux-$docker_arch"
# dist/ ignores itself (nothing in it is ever committed).
[[ -e "$out/.gitignore" ]] || echo '*' >"$out/.gitignore"
name="pipeline-controller-$version-$target"
install -m 0755 "$bin" "$out/$name"
(cd "$out" && sha256sum "$name" >"$name.sha256")
install -m 0755 "$bin" "$out/linux-$docker_arch/pipeline-controller"
# The CA bundle for the FROM-scratch image: Mozilla's set as the ca-certificates package
# ships it (Debian, Ubuntu), not the host's /etc/ssl/certs bundle, which also holds any
# CA added locally (a corporate or sandbox proxy's) that must not end up in an image.
bundle="$out/linux-$docker_arch/ca-certificates.crt"
if compgen -G "/usr/share/ca-certificates/mozilla/*.crt" >/dev/null; then
  cat /usr/share/ca-certificates/mozilla/*.crt >"$bundle.tmp"
  mv "$bundle.tmp" "$bundle"
  log "CA bundle: $(grep -c 'BEGIN CERTIFICATE' "$bundle") certificates from /usr/share/ca-certificates/mozilla"
else
  log "no /usr/share/ca-certificates/mozilla (apt-get install ca-certificates): no CA bundle for the static image"
  exit 1
fi
log "wrote $out/$name ($(du -h "$out/$name" | cut -f1)), $out/$name.sha256, $out/linux-$docker_arch/"
echo "$out/$name"
