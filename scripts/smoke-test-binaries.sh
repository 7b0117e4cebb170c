#!/usr/bin/env bash
# Smoke test of the binaries provided by scripts/ensure-test-binaries.sh, and the
# executable form of the startup recipes in tools/README.md:
#   etcd on loopback -> kube-apiserver (RBAC, client-cert auth) -> GET /readyz as system:masters
#   gitea on loopback (sqlite3, offline) -> admin user -> token -> GET /api/v1/user
# Everything listens on 127.0.0.1 on free ports and is stopped on exit.
#
# Usage: scripts/smoke-test-binaries.sh [all|kube|gitea]   (builds missing binaries first)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
what=${1:-all}
case "$what" in
  all) kube=1 gitea=1 ;;
  kube) kube=1 gitea=0 ;;
  gitea) kube=0 gitea=1 ;;
  *) echo "usage: $0 [all|kube|gitea]" >&2; exit 2 ;;
esac
comps=()
((kube)) && comps+=(kube)
((gitea)) && comps+=(gitea)
eval "$("$ROOT/scripts/ensure-test-binaries.sh" --print-env "${comps[@]}")"

for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pipeline-smoke.XXXXXX")
PIDS=()
# Stop in reverse start order (kube-apiserver before etcd: with etcd gone its graceful
# shutdown hangs on lease updates for minutes). SIGTERM, then SIGKILL after 10s.
stop_pid() {
  local p=$1 i
  kill "$p" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.2
  done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_for SECONDS LOGFILE CMD...: retry CMD every 0.2s until it succeeds.
wait_for() {
  local secs=$1 logf=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "timed out waiting for: $*; last log lines of $logf:" >&2
      tail -n 40 "$logf" >&2
      return 1
    fi
    sleep 0.2
  done
}

if ((kube)); then
  K="$WORK/kube"
  mkdir -p "$K/etcd-data"
  chmod 700 "$K/etcd-data"
  ETCD_CLIENT_PORT=$(free_port)
  ETCD_PEER_PORT=$(free_port)
  KAS_PORT=$(free_port)

  # --- PKI: one CA for serving + client certs, and a service-account key pair ---
  (
    cd "$K"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 \
      -keyout ca.key -out ca.crt -subj "/CN=pipeline-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' \
      'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' >serving.ext
    openssl x509 -req -sha256 -days 2 -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -extfile serving.ext -out serving.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=pipeline-admin" 2>/dev/null
    printf '%s\n' 'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=clientAuth' >admin.ext
    openssl x509 -req -sha256 -days 2 -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -extfile admin.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )

  # --- etcd ---
  "$PIPELINE_ETCD_BIN" \
    --name=pipeline-test \
    --data-dir="$K/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="pipeline-test=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level=warn \
    >"$K/etcd.log" 2>&1 &
  PIDS+=($!)
  t0=$SECONDS
  wait_for 30 "$K/etcd.log" curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
  echo "etcd healthy on 127.0.0.1:$ETCD_CLIENT_PORT after $((SECONDS - t0))s"

  # --- kube-apiserver ---
  "$PIPELINE_KUBE_APISERVER_BIN" \
    --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$KAS_PORT" \
    --tls-cert-file="$K/serving.crt" \
    --tls-private-key-file="$K/serving.key" \
    --client-ca-file="$K/ca.crt" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$K/sa.pub" \
    --service-account-signing-key-file="$K/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --disable-admission-plugins=ServiceAccount \
    --allow-privileged=true \
    >"$K/kube-apiserver.log" 2>&1 &
  PIDS+=($!)
  CURL_K=(curl -fsS --cacert "$K/ca.crt" --cert "$K/admin.crt" --key "$K/admin.key")
  t0=$SECONDS
  wait_for 120 "$K/kube-apiserver.log" "${CURL_K[@]}" "https://127.0.0.1:$KAS_PORT/readyz"
  echo "kube-apiserver ready on https://127.0.0.1:$KAS_PORT after $((SECONDS - t0))s"
  "${CURL_K[@]}" "https://127.0.0.1:$KAS_PORT/version"
  echo
  # A write through RBAC as system:masters, and an anonymous request that RBAC must refuse.
  "${CURL_K[@]}" -X POST -H 'Content-Type: application/json' \
    -d '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"smoke"}}' \
    "https://127.0.0.1:$KAS_PORT/api/v1/namespaces" >/dev/null
  "${CURL_K[@]}" "https://127.0.0.1:$KAS_PORT/api/v1/namespaces/smoke" | grep -q '"name": "smoke"'
  code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$K/ca.crt" "https://127.0.0.1:$KAS_PORT/api/v1/namespaces")
  [[ "$code" == 403 || "$code" == 401 ]] || { echo "anonymous list namespaces returned $code" >&2; exit 1; }
  echo "kube: created namespace 'smoke' as admin; anonymous got HTTP $code: OK"
fi

if ((gitea)); then
  G="$WORK/gitea"
  mkdir -p "$G/custom/conf" "$G/data" "$G/repos" "$G/log"
  GITEA_PORT=$(free_port)
  run_as_root=false
  [[ "$(id -u)" == 0 ]] && run_as_root=true
  cat >"$G/custom/conf/app.ini" <<EOF
APP_NAME = pipeline-controller test gitea
RUN_MODE = prod
RUN_USER = $(id -un)
WORK_PATH = $G
I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = $run_as_root

[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = $GITEA_PORT
DOMAIN = 127.0.0.1
ROOT_URL = http://127.0.0.1:$GITEA_PORT/
STATIC_ROOT_PATH = $PIPELINE_GITEA_STATIC_ROOT
APP_DATA_PATH = $G/data
OFFLINE_MODE = true
DISABLE_SSH = true
START_SSH_SERVER = false
LFS_START_SERVER = false

[database]
DB_TYPE = sqlite3
PATH = $G/data/gitea.db
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT = $G/repos

[security]
INSTALL_LOCK = true
SECRET_KEY = $(openssl rand -hex 32)
INTERNAL_TOKEN = $(openssl rand -hex 32)

[oauth2]
ENABLED = false

[service]
DISABLE_REGISTRATION = true
REQUIRE_SIGNIN_VIEW = false
DEFAULT_KEEP_EMAIL_PRIVATE = true
NO_REPLY_ADDRESS = noreply.invalid

[webhook]
ALLOWED_HOST_LIST = loopback
SKIP_TLS_VERIFY = true
DELIVER_TIMEOUT = 10

[migrations]
ALLOW_LOCALNETWORKS = true

[mailer]
ENABLED = false

[session]
PROVIDER = memory

[cache]
ADAPTER = memory

[queue]
TYPE = channel

[indexer]
ISSUE_INDEXER_TYPE = db

[actions]
ENABLED = false

[cron]
ENABLED = false

[cron.update_checker]
ENABLED = false

[log]
MODE = console
LEVEL = warn
ROOT_PATH = $G/log
EOF
  GITEA=("$PIPELINE_GITEA_BIN" --config "$G/custom/conf/app.ini" --work-path "$G")
  (cd "$G" && exec "${GITEA[@]}" web) >"$G/gitea.log" 2>&1 &
  PIDS+=($!)
  t0=$SECONDS
  wait_for 120 "$G/gitea.log" curl -fsS "http://127.0.0.1:$GITEA_PORT/api/v1/version"
  echo "gitea up on http://127.0.0.1:$GITEA_PORT after $((SECONDS - t0))s: $(curl -fsS "http://127.0.0.1:$GITEA_PORT/api/v1/version")"

  (cd "$G" && "${GITEA[@]}" admin user create --admin --username pipeline-admin \
    --password 'pipeline-admin-pw-1' --email pipeline-admin@example.invalid \
    --must-change-password=false) >"$G/create-user.log" 2>&1 || { cat "$G/create-user.log" >&2; exit 1; }
  # --raw prints the token on the last stdout line; Gitea's startup logs (e.g. the
  # running-as-root warning) go to stdout before it, so take the last line only.
  TOKEN=$(cd "$G" && "${GITEA[@]}" admin user generate-access-token --username pipeline-admin \
    --token-name smoke --scopes all --raw 2>"$G/token.log" | tail -n 1)
  [[ "$TOKEN" =~ ^[0-9a-f]{40}$ ]] || { echo "bad token: $TOKEN" >&2; cat "$G/token.log" >&2; exit 1; }
  curl -fsS -H "Authorization: token $TOKEN" "http://127.0.0.1:$GITEA_PORT/api/v1/user" | grep -q '"login":"pipeline-admin"'
  echo "gitea: GET /api/v1/user with token: OK"
  # Exercise git on the server side too: create an auto-initialised repo and read a file back.
  curl -fsS -H "Authorization: token $TOKEN" -H 'Content-Type: application/json' \
    -d '{"name":"smoke","auto_init":true,"default_branch":"main","readme":"Default"}' \
    "http://127.0.0.1:$GITEA_PORT/api/v1/user/repos" >/dev/null
  curl -fsS -H "Authorization: token $TOKEN" \
    "http://127.0.0.1:$GITEA_PORT/api/v1/repos/pipeline-admin/smoke/raw/README.md?ref=main" | grep -q smoke
  git clone -q "http://pipeline-admin:$TOKEN@127.0.0.1:$GITEA_PORT/pipeline-admin/smoke.git" "$G/clone"
  [[ -f "$G/clone/README.md" ]]
  # A push runs Gitea's server-side hooks (gitea hook ... -> internal API with INTERNAL_TOKEN).
  (
    cd "$G/clone"
    echo pushed >pushed.txt
    git add pushed.txt
    git -c user.name=smoke -c user.email=smoke@example.invalid commit -qm "smoke push"
    git push -q origin HEAD:main 2>&1
  ) >"$G/push.log" 2>&1 || { cat "$G/push.log" >&2; exit 1; }
  curl -fsS -H "Authorization: token $TOKEN" \
    "http://127.0.0.1:$GITEA_PORT/api/v1/repos/pipeline-admin/smoke/raw/pushed.txt?ref=main" | grep -q pushed
  echo "gitea: created repo pipeline-admin/smoke, cloned and pushed over HTTP: OK"
fi

echo "smoke test passed"
