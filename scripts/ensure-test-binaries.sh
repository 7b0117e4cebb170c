#!/usr/bin/env bash
# Builds (once) and provides the real binaries the integration tests run:
#   etcd, kube-apiserver   from tools/envtest (Go module pinning k8s.io/kubernetes + etcd)
#   gitea                  from tools/gitea   (Go module pinning code.gitea.io/gitea)
#   helm                   from tools/helm    (Go module pinning helm.sh/helm/v3; renders the chart)
#   flux-crds              Flux's CRDs (config/crd/bases/*.yaml of github.com/fluxcd/source-,
#                          kustomize-, helm- and notification-controller, pinned below)
#   flux                   Flux's four controllers (source-, kustomize-, helm-, notification-
#                          controller), each from its own tools/flux-* module (their
#                          dependencies clash: k8s 0.33 vs 0.34); implies flux-crds
#
# Everything comes from the Go module proxy; nothing is downloaded from release pages.
# Binaries are cached OUTSIDE the checkout, keyed by version:
#   ${PIPELINE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipeline-controller/tools}/<name>-<version>-r<RECIPE>/
# Builds go to a temp dir inside the cache and are renamed into place, under an
# flock on <cache>/.lock, so parallel callers are safe and a killed build leaves
# nothing half-written behind. The shared GOCACHE/GOMODCACHE are used as they are.
#
# Usage:
#   scripts/ensure-test-binaries.sh [--print-env] [all|kube|etcd|kube-apiserver|gitea|helm|flux-crds|flux ...]
#
#   (no component)   same as "all"
#   kube             etcd + kube-apiserver
#   --print-env      print only `export NAME=value` lines on stdout (logs go to stderr), e.g.
#                      eval "$(scripts/ensure-test-binaries.sh --print-env)"
#
# Variables provided (also written to <cache>/env.sh for every binary present):
#   PIPELINE_ETCD_BIN, PIPELINE_KUBE_APISERVER_BIN, PIPELINE_GITEA_BIN,
#   PIPELINE_GITEA_STATIC_ROOT (dir holding Gitea's options/ templates/ public/; put it in
#   app.ini as [server] STATIC_ROOT_PATH), PIPELINE_ETCD_VERSION, PIPELINE_KUBE_VERSION,
#   PIPELINE_GITEA_VERSION, PIPELINE_HELM_BIN, PIPELINE_HELM_VERSION, PIPELINE_TOOLS_CACHE,
#   PIPELINE_FLUX_CRDS_DIR (dir holding the Flux CRD YAML files), PIPELINE_FLUX_SOURCE_BIN,
#   PIPELINE_FLUX_KUSTOMIZE_BIN, PIPELINE_FLUX_HELM_BIN, PIPELINE_FLUX_NOTIFICATION_BIN.
set -euo pipefail

# Bump when the way binaries are built changes (flags, layout) to force a rebuild.
RECIPE=1

# Flux controllers whose CRDs the tests install (their config/crd/bases/*.yaml, taken from
# the Go module proxy like everything else).
FLUX_SOURCE_CONTROLLER_VERSION=v1.7.0
FLUX_KUSTOMIZE_CONTROLLER_VERSION=v1.6.0
FLUX_HELM_CONTROLLER_VERSION=v1.4.0
FLUX_NOTIFICATION_CONTROLLER_VERSION=v1.6.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PIPELINE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipeline-controller/tools}"

log() { printf 'ensure-test-binaries: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

print_env=0
want_etcd=0 want_kas=0 want_gitea=0 want_helm=0 want_flux=0 want_fluxbin=0
for arg in "$@"; do
  case "$arg" in
    --print-env) print_env=1 ;;
    all) want_etcd=1 want_kas=1 want_gitea=1 want_helm=1 want_flux=1 want_fluxbin=1 ;;
    kube | envtest) want_etcd=1 want_kas=1 ;;
    etcd) want_etcd=1 ;;
    kube-apiserver) want_kas=1 ;;
    gitea) want_gitea=1 ;;
    helm) want_helm=1 ;;
    flux-crds) want_flux=1 ;;
    flux) want_flux=1 want_fluxbin=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $arg" ;;
  esac
done
if ((want_etcd + want_kas + want_gitea + want_helm + want_flux == 0)); then
  want_etcd=1 want_kas=1 want_gitea=1 want_helm=1 want_flux=1 want_fluxbin=1
fi


# The tools modules are standalone; never let a go.work above them interfere.
export GOWORK=off

# Version of MODULE as pinned in the require block of DIR/go.mod.
pinned_version() {
  local dir=$1 mod=$2 v
  v=$(awk -v m="$mod" '!/=>/ && !/^[[:space:]]*\/\// { for (i = 1; i < NF; i++) if ($i == m) { print $(i + 1); exit } }' "$dir/go.mod")
  [[ -n "$v" ]] || die "$mod is not pinned in $dir/go.mod"
  printf '%s' "$v"
}

ENVTEST_DIR="$ROOT/tools/envtest"
GITEA_DIR="$ROOT/tools/gitea"
HELM_DIR="$ROOT/tools/helm"
ETCD_VERSION=$(pinned_version "$ENVTEST_DIR" go.etcd.io/etcd/server/v3)
KUBE_VERSION=$(pinned_version "$ENVTEST_DIR" k8s.io/kubernetes)
GITEA_VERSION=$(pinned_version "$GITEA_DIR" code.gitea.io/gitea)
HELM_VERSION=$(pinned_version "$HELM_DIR" helm.sh/helm/v3)

ETCD_HOME="$CACHE/etcd-$ETCD_VERSION-r$RECIPE"
KAS_HOME="$CACHE/kube-apiserver-$KUBE_VERSION-r$RECIPE"
GITEA_HOME="$CACHE/gitea-$GITEA_VERSION-r$RECIPE"
HELM_HOME="$CACHE/helm-$HELM_VERSION-r$RECIPE"
ETCD_BIN="$ETCD_HOME/etcd"
KAS_BIN="$KAS_HOME/kube-apiserver"
GITEA_BIN="$GITEA_HOME/gitea"
HELM_BIN="$HELM_HOME/helm"
FLUX_CRDS_HOME="$CACHE/flux-crds-sc${FLUX_SOURCE_CONTROLLER_VERSION#v}-kc${FLUX_KUSTOMIZE_CONTROLLER_VERSION#v}-hc${FLUX_HELM_CONTROLLER_VERSION#v}-nc${FLUX_NOTIFICATION_CONTROLLER_VERSION#v}-r$RECIPE"
# Written last into the staging dir, so its presence in the published dir means complete.
FLUX_CRDS_STAMP="$FLUX_CRDS_HOME/MODULES"
# The controllers themselves: "<short name> <tools dir> <module>" (version read from go.mod).
FLUX_CONTROLLERS=(
  "source $ROOT/tools/flux-source github.com/fluxcd/source-controller"
  "kustomize $ROOT/tools/flux-kustomize github.com/fluxcd/kustomize-controller"
  "helm $ROOT/tools/flux-helm github.com/fluxcd/helm-controller"
  "notification $ROOT/tools/flux-notification github.com/fluxcd/notification-controller"
)
# flux_bin NAME: path of that controller's binary in the cache.
flux_bin() {
  local c name dir mod
  for c in "${FLUX_CONTROLLERS[@]}"; do
    read -r name dir mod <<<"$c"
    if [[ "$name" == "$1" ]]; then
      printf '%s/flux-%s-controller-%s-r%s/%s-controller' "$CACHE" "$name" "$(pinned_version "$dir" "$mod")" "$RECIPE" "$name"
      return
    fi
  done
  die "unknown Flux controller $1"
}
flux_bins_missing() {
  local c name dir mod
  for c in "${FLUX_CONTROLLERS[@]}"; do
    read -r name dir mod <<<"$c"
    [[ -x "$(flux_bin "$name")" ]] || return 0
  done
  return 1
}

missing() {
  local need=0
  ((want_etcd)) && [[ ! -x "$ETCD_BIN" ]] && need=1
  ((want_kas)) && [[ ! -x "$KAS_BIN" ]] && need=1
  ((want_gitea)) && [[ ! -x "$GITEA_BIN" ]] && need=1
  ((want_helm)) && [[ ! -x "$HELM_BIN" ]] && need=1
  ((want_flux)) && [[ ! -f "$FLUX_CRDS_STAMP" ]] && need=1
  ((want_fluxbin)) && flux_bins_missing && need=1
  ((need))
}

TMPDIRS=()
cleanup() { local d; for d in "${TMPDIRS[@]+"${TMPDIRS[@]}"}"; do rm -rf "$d"; done; }
trap cleanup EXIT

# new_tmp NAME VAR: sets VAR to a fresh temp dir inside the cache (same filesystem, so mv
# is atomic), removed on exit unless published. Not `$(new_tmp ...)`: in a subshell the
# dir would never reach TMPDIRS, and a failed build would leave it behind.
new_tmp() {
  local d
  d=$(mktemp -d "$CACHE/.tmp-$1.XXXXXX")
  TMPDIRS+=("$d")
  printf -v "$2" '%s' "$d"
}

# publish TMP FINAL: atomically move a finished build into place.
publish() {
  local tmp=$1 final=$2
  chmod 755 "$tmp" # mktemp -d makes it 0700
  rm -rf "$final" # only a leftover without its binary can be here (we hold the lock)
  mv -T "$tmp" "$final"
}

# go_build MODULE_DIR OUT PKG LDFLAGS [extra go build args...]
go_build() {
  local dir=$1 out=$2 pkg=$3 ldflags=$4
  shift 4
  (cd "$dir" && go build -mod=readonly -buildvcs=false -trimpath -ldflags "$ldflags" "$@" -o "$out" "$pkg")
}

build_etcd() {
  local tmp start
  new_tmp etcd tmp
  start=$SECONDS
  log "building etcd $ETCD_VERSION (go.etcd.io/etcd/server/v3) ..."
  CGO_ENABLED=0 go_build "$ENVTEST_DIR" "$tmp/etcd" go.etcd.io/etcd/server/v3 "-s -w"
  publish "$tmp" "$ETCD_HOME"
  log "built $ETCD_BIN in $((SECONDS - start))s"
}

build_kas() {
  local tmp start v=${KUBE_VERSION#v} pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  # The version stamping hack/lib/version.sh does; otherwise --version and /version say v0.0.0-master.
  local ldflags="-s -w"
  local p
  for p in "$pkg" "$cpkg"; do
    ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  new_tmp kube-apiserver tmp
  start=$SECONDS
  log "building kube-apiserver $KUBE_VERSION (k8s.io/kubernetes/cmd/kube-apiserver); this takes a while ..."
  CGO_ENABLED=0 go_build "$ENVTEST_DIR" "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$ldflags"
  publish "$tmp" "$KAS_HOME"
  log "built $KAS_BIN in $((SECONDS - start))s"
}

build_gitea() {
  local tmp start src tags="sqlite sqlite_unlock_notify"
  command -v "${CC:-gcc}" >/dev/null 2>&1 || die "Gitea's SQLite driver needs cgo: install gcc (apt-get install gcc)"
  new_tmp gitea tmp
  start=$SECONDS
  log "building gitea $GITEA_VERSION (code.gitea.io/gitea, tags: $tags); this takes a while ..."
  CGO_ENABLED=1 go_build "$GITEA_DIR" "$tmp/gitea" code.gitea.io/gitea \
    "-s -w -X main.Version=${GITEA_VERSION#v} -X 'main.Tags=$tags'" -tags "$tags"
  # Built without the `bindata` tag (its generated assets are not in the module), Gitea
  # reads options/, templates/ and public/ from [server] STATIC_ROOT_PATH: ship them
  # next to the binary.
  src=$(cd "$GITEA_DIR" && go list -mod=readonly -m -f '{{.Dir}}' code.gitea.io/gitea)
  [[ -d "$src/options" && -d "$src/templates" ]] || die "unexpected layout of $src"
  cp -R "$src/options" "$src/templates" "$tmp/"
  if [[ -d "$src/public" ]]; then cp -R "$src/public" "$tmp/"; else mkdir -p "$tmp/public"; fi
  chmod -R u+w "$tmp" # module cache files are read-only; keep the cache removable
  publish "$tmp" "$GITEA_HOME"
  log "built $GITEA_BIN in $((SECONDS - start))s"
}

build_helm() {
  local tmp start pkg=helm.sh/helm/v3/internal/version
  new_tmp helm tmp
  start=$SECONDS
  log "building helm $HELM_VERSION (helm.sh/helm/v3/cmd/helm) ..."
  CGO_ENABLED=0 go_build "$HELM_DIR" "$tmp/helm" helm.sh/helm/v3/cmd/helm \
    "-s -w -X $pkg.version=$HELM_VERSION -X $pkg.gitTreeState=clean"
  publish "$tmp" "$HELM_HOME"
  log "built $HELM_BIN in $((SECONDS - start))s"
}

# build_flux NAME: one Flux controller, from its tools module (same flags as upstream's
# Dockerfile: static, trimmed; the module's build list is exactly upstream's go.mod).
build_flux() {
  local c name dir mod tmp start out final
  for c in "${FLUX_CONTROLLERS[@]}"; do
    read -r name dir mod <<<"$c"
    [[ "$name" == "$1" ]] && break
  done
  final=$(flux_bin "$name")
  new_tmp "flux-$name" tmp
  start=$SECONDS
  log "building $mod $(pinned_version "$dir" "$mod") ..."
  # A build cache of their own, shared by the four and removed on exit: they share
  # nothing with our other tools (other k8s.io versions), and the gigabytes it takes
  # would otherwise stay behind in GOCACHE (CI's disk is tight).
  if [[ -z "${FLUX_GOCACHE:-}" ]]; then new_tmp flux-gocache FLUX_GOCACHE; fi
  GOCACHE="$FLUX_GOCACHE" CGO_ENABLED=0 go_build "$dir" "$tmp/$name-controller" "$mod" "-s -w"
  publish "$tmp" "$(dirname "$final")"
  log "built $final in $((SECONDS - start))s"
}

# "module@version" of each Flux controller whose CRDs we install.
flux_modules() {
  printf '%s\n' \
    "github.com/fluxcd/source-controller@$FLUX_SOURCE_CONTROLLER_VERSION" \
    "github.com/fluxcd/kustomize-controller@$FLUX_KUSTOMIZE_CONTROLLER_VERSION" \
    "github.com/fluxcd/helm-controller@$FLUX_HELM_CONTROLLER_VERSION" \
    "github.com/fluxcd/notification-controller@$FLUX_NOTIFICATION_CONTROLLER_VERSION"
}

fetch_flux_crds() {
  local tmp start work out dirs mod dir n=0 f
  local -a mods
  mapfile -t mods < <(flux_modules)
  new_tmp flux-crds tmp
  start=$SECONDS
  log "fetching Flux CRDs (${mods[*]}) ..."
  # Outside any module (an empty dir; GOWORK=off above): `go mod download` then fetches
  # exactly the named module versions into the shared module cache.
  new_tmp flux-crds-work work
  [[ "$(cd "$work" && go env GOMOD)" == /dev/null ]] ||
    die "$work is inside a Go module; cannot fetch the Flux CRDs there"
  out=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "${mods[@]}") ||
    die "go mod download of the Flux controllers failed: $out"
  # Top-level keys are indented by one tab; "Origin" nests its own by two.
  if grep -q $'^\t"Error":' <<<"$out"; then die "go mod download: $out"; fi
  dirs=$(awk -F'"' '/^\t"Path":/ { p = $4 } /^\t"Dir":/ { print p "\t" $4 }' <<<"$out")
  for mod in "${mods[@]}"; do
    dir=$(awk -F'\t' -v m="${mod%@*}" '$1 == m { print $2 }' <<<"$dirs")
    [[ -n "$dir" && -d "$dir/config/crd/bases" ]] || die "no config/crd/bases in $mod (${dir:-not downloaded})"
    for f in "$dir"/config/crd/bases/*.yaml; do
      [[ -e "$f" ]] || die "no CRD files in $dir/config/crd/bases"
      cp "$f" "$tmp/"
      n=$((n + 1))
    done
  done
  chmod 644 "$tmp"/*.yaml # module cache files are read-only
  printf '%s\n' "${mods[@]}" >"$tmp/MODULES"
  publish "$tmp" "$FLUX_CRDS_HOME"
  log "fetched $n Flux CRD files into $FLUX_CRDS_HOME in $((SECONDS - start))s"
}

write_env_file() {
  local tmp
  tmp=$(mktemp "$CACHE/.env.sh.XXXXXX")
  {
    echo "# Written by scripts/ensure-test-binaries.sh; source it to find the test binaries."
    printf 'export PIPELINE_TOOLS_CACHE=%q\n' "$CACHE"
    env_lines 1 1 1 1 1 1
  } >"$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$CACHE/env.sh"
}

# env_lines ETCD KAS GITEA HELM FLUX FLUXBIN: export lines for the selected components that exist.
env_lines() {
  if (($1)) && [[ -x "$ETCD_BIN" ]]; then
    printf 'export PIPELINE_ETCD_BIN=%q\n' "$ETCD_BIN"
    printf 'export PIPELINE_ETCD_VERSION=%q\n' "$ETCD_VERSION"
  fi
  if (($2)) && [[ -x "$KAS_BIN" ]]; then
    printf 'export PIPELINE_KUBE_APISERVER_BIN=%q\n' "$KAS_BIN"
    printf 'export PIPELINE_KUBE_VERSION=%q\n' "$KUBE_VERSION"
  fi
  if (($3)) && [[ -x "$GITEA_BIN" ]]; then
    printf 'export PIPELINE_GITEA_BIN=%q\n' "$GITEA_BIN"
    printf 'export PIPELINE_GITEA_STATIC_ROOT=%q\n' "$GITEA_HOME"
    printf 'export PIPELINE_GITEA_VERSION=%q\n' "$GITEA_VERSION"
  fi
  if (($4)) && [[ -x "$HELM_BIN" ]]; then
    printf 'export PIPELINE_HELM_BIN=%q\n' "$HELM_BIN"
    printf 'export PIPELINE_HELM_VERSION=%q\n' "$HELM_VERSION"
  fi
  if (($5)) && [[ -f "$FLUX_CRDS_STAMP" ]]; then
    printf 'export PIPELINE_FLUX_CRDS_DIR=%q\n' "$FLUX_CRDS_HOME"
  fi
  local n b
  if (($6)); then
    for n in source kustomize helm notification; do
      b=$(flux_bin "$n")
      [[ -x "$b" ]] && printf 'export PIPELINE_FLUX_%s_BIN=%q\n' "${n^^}" "$b"
    done
  fi
  return 0
}

mkdir -p "$CACHE"
if missing; then
  # Only building needs these; cached binaries are served without Go installed.
  command -v go >/dev/null 2>&1 || die "go is not on PATH (Go >= 1.26.2 is needed to build the test binaries)"
  command -v flock >/dev/null 2>&1 || die "flock is not on PATH (util-linux)"
  exec 9>"$CACHE/.lock"
  if ! flock -n 9; then
    log "waiting for another build holding $CACHE/.lock ..."
    flock 9
  fi
  # Re-check under the lock: a parallel caller may have built them meanwhile.
  if ((want_etcd)) && [[ ! -x "$ETCD_BIN" ]]; then build_etcd; fi
  if ((want_kas)) && [[ ! -x "$KAS_BIN" ]]; then build_kas; fi
  if ((want_gitea)) && [[ ! -x "$GITEA_BIN" ]]; then build_gitea; fi
  if ((want_helm)) && [[ ! -x "$HELM_BIN" ]]; then build_helm; fi
  if ((want_flux)) && [[ ! -f "$FLUX_CRDS_STAMP" ]]; then fetch_flux_crds; fi
  if ((want_fluxbin)); then
    for n in source kustomize helm notification; do
      [[ -x "$(flux_bin "$n")" ]] || build_flux "$n"
    done
  fi
  write_env_file
  flock -u 9
  exec 9>&-
elif [[ ! -f "$CACHE/env.sh" ]]; then
  write_env_file # atomic rename; no lock needed
fi

if ((print_env)); then
  printf 'export PIPELINE_TOOLS_CACHE=%q\n' "$CACHE"
  env_lines "$want_etcd" "$want_kas" "$want_gitea" "$want_helm" "$want_flux" "$want_fluxbin"
else
  ((want_etcd)) && echo "etcd            $ETCD_VERSION  $ETCD_BIN"
  ((want_kas)) && echo "kube-apiserver  $KUBE_VERSION  $KAS_BIN"
  ((want_gitea)) && echo "gitea           $GITEA_VERSION  $GITEA_BIN  (STATIC_ROOT_PATH=$GITEA_HOME)"
  ((want_helm)) && echo "helm            $HELM_VERSION  $HELM_BIN"
  ((want_flux)) && echo "flux-crds       $(flux_modules | tr '\n' ' ') $FLUX_CRDS_HOME"
  if ((want_fluxbin)); then
    for n in source kustomize helm notification; do echo "flux $n  $(flux_bin "$n")"; done
  fi
  echo "env file: $CACHE/env.sh"
fi
