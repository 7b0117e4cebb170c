#!/usr/bin/env bash
# Builds a container image from the Dockerfile and the static binary that
# scripts/build-release.sh put in dist/linux-<arch>/ (BINARY_SOURCE=prebuilt), without a
# Docker daemon: buildah with vfs storage and chroot isolation, which works inside an
# unprivileged container too. Then runs the image's binary (and git, for runtime) as a
# smoke test.
#
# Usage: scripts/build-image.sh [--target static|runtime] [--tag NAME]
#                               [--debian-base-from-apt] [--oci-archive FILE]
#   --target static    FROM scratch: binary + CA bundle (default; needs no base image)
#   --target runtime   debian-slim + git + openssh-client + tini (the published image)
#   --debian-base-from-apt
#                      for runtime when no image registry is reachable: bootstrap the
#                      debian:<release>-slim base from Debian's package archive with
#                      mmdebstrap (minbase) and store it locally under that name, so the
#                      Dockerfile's FROM resolves without pulling
#   --tag NAME         default: localhost/pipeline-controller:<version>[-static]
#   --oci-archive FILE also write the image as an OCI archive (docker load / skopeo copy)
#
# Needs buildah (apt-get install buildah) and, for --debian-base-from-apt, mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

target=static
tag=""
bootstrap_base=0
archive=""
while (($#)); do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --debian-base-from-apt) bootstrap_base=1; shift ;;
    --oci-archive) archive=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
case "$target" in static|runtime) ;; *) echo "build-image.sh: --target static|runtime" >&2; exit 2 ;; esac
log() { printf '[build-image] %s\n' "$*" >&2; }

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
if [[ ! -x dist/linux-$arch/pipeline-controller ]]; then
  log "dist/linux-$arch/pipeline-controller missing: run scripts/build-release.sh first"
  exit 1
fi
command -v buildah >/dev/null || { log "buildah not found: apt-get install buildah"; exit 1; }
buildah() { command buildah --storage-driver "${STORAGE_DRIVER:-vfs}" "$@"; }

version=$(cargo pkgid --locked -p pipeline-controller)
version=${version##*[@#]}
if [[ -z $tag ]]; then
  tag="localhost/pipeline-controller:$version"
  [[ $target == static ]] && tag+="-static"
fi
debian_release=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' Dockerfile)

tmp="" ctr=""
cleanup() {
  [[ -n $ctr ]] && buildah rm "$ctr" >/dev/null 2>&1
  [[ -n $tmp ]] && rm -rf "$tmp"
  return 0
}
trap cleanup EXIT

pull=()
if [[ $target == runtime && $bootstrap_base == 1 ]]; then
  base="docker.io/library/debian:$debian_release-slim"
  if buildah inspect --type image "$base" >/dev/null 2>&1; then
    log "base $base already in local storage"
  else
    command -v mmdebstrap >/dev/null || { log "mmdebstrap not found: apt-get install mmdebstrap"; exit 1; }
    tmp=$(mktemp -d)
    log "bootstrapping $base from Debian's archive (mmdebstrap --variant=minbase $debian_release)"
    mmdebstrap --variant=minbase "$debian_release" "$tmp/rootfs.tar" >&2
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$tmp/rootfs.tar" / >/dev/null
    buildah config --cmd '["bash"]' \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit -q "$ctr" "$base" >/dev/null
    buildah rm "$ctr" >/dev/null
    ctr=""
  fi
  pull=(--pull=never)
fi

log "buildah build --target $target --build-arg BINARY_SOURCE=prebuilt -t $tag"
buildah build --isolation chroot "${pull[@]}" --target "$target" \
  --build-arg BINARY_SOURCE=prebuilt --build-arg TARGETARCH="$arch" \
  -t "$tag" . >&2

# Smoke test: the binary runs inside the image (and git is there in runtime).
ctr=$(buildah from --pull=never "$tag")
log "in the image: $(buildah run --isolation chroot "$ctr" -- /usr/local/bin/pipeline-controller --version)"
if [[ $target == runtime ]]; then
  log "in the image: $(buildah run --isolation chroot "$ctr" -- git --version)"
fi
log "size: $(buildah images --format '{{.Size}}' "$tag")"

if [[ -n $archive ]]; then
  buildah push "$tag" "oci-archive:$archive:$tag" >&2
  log "wrote $archive"
fi
echo "$tag"
