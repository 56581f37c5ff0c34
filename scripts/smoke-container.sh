#!/usr/bin/env bash
# Container-like smoke test of the release binary, for machines without a container engine.
#
# What the image does, done by hand: build `cargo build --release --locked`, install the binary
# mode 0755 into a scratch directory (as /usr/local/bin/tmws in the image), and run it as the
# unprivileged user `tmws` (UID/GID 10001, no capabilities, no_new_privs, empty environment plus
# the service's env) - then:
#   1. `tmws migrate` exits 0 (the one-shot migration job),
#   2. `tmws serve` starts; a standard gRPC health client (grpcio-health-checking) sees ""
#      (process up) and tmws.v1.MemoryService / tmws.v1.WorkflowService (dependencies up) SERVING,
#   3. its logs are JSON lines,
#   4. after SIGTERM it exits 0 within TMWS_SHUTDOWN_GRACE.
#
# Needs root (to create the user and drop to it), TMWS_TEST_DATABASE_URL (PostgreSQL with pgvector
# available) and TMWS_TEST_REDIS_URL; `scripts/dev-services.sh` prints both. The database used is
# `tmws_smoke` on that server (dropped first when psql is available). Honours CARGO_TARGET_DIR.
# The Python client is installed into the same tools venv as scripts/validate-deploy.sh uses
# (${TMWS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tmws-tools}; PyPI: grpcio-health-checking, PyYAML).
set -euo pipefail
cd "$(dirname "$0")/.."

# The environment is the `tmws` service's from the PRODUCTION compose file (environment and
# env_file, with ${VAR} interpolation: authentication on, TLS, JSON logs), with its addresses
# pointed at this machine. The server secret is generated here when the caller gives none, and
# the TLS pair the file asks for is a throw-away self-signed one (the health client speaks TLS).
ENV_SOURCE="${SMOKE_ENV_SOURCE:-docker-compose.prod.yml}"

SMOKE_UID=10001
SMOKE_USER=tmws
SMOKE_DB=tmws_smoke
READY_TIMEOUT_SECS="${SMOKE_READY_TIMEOUT_SECS:-90}"
TOOLS_DIR="${TMWS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tmws-tools}"
VENV="$TOOLS_DIR/venv"
PY_PACKAGES=("grpcio-health-checking==1.85.1" "PyYAML==6.0.3")

say() { printf 'smoke: %s\n' "$*"; }
die() { printf 'smoke: FAIL: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (it creates the user ${SMOKE_USER} and drops to UID ${SMOKE_UID})"
: "${TMWS_TEST_DATABASE_URL:?set TMWS_TEST_DATABASE_URL (scripts/dev-services.sh prints it)}"
: "${TMWS_TEST_REDIS_URL:?set TMWS_TEST_REDIS_URL (scripts/dev-services.sh prints it)}"
command -v setpriv >/dev/null || die "setpriv (util-linux) is required"

WORK="$(mktemp -d /tmp/tmws-smoke.XXXXXX)"
chmod 0755 "$WORK"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- tools -------------------------------------------------------------------------------------
stamp="$VENV/.installed-$(printf '%s\n' "${PY_PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  mkdir -p "$TOOLS_DIR"
  (
    flock 9
    [[ -f "$stamp" ]] && exit 0
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" \
      >"$TOOLS_DIR/pip-smoke.log" 2>&1 || { cat "$TOOLS_DIR/pip-smoke.log" >&2; exit 1; }
    touch "$stamp"
  ) 9>"$TOOLS_DIR/.lock" || die "cannot install ${PY_PACKAGES[*]}"
fi
PY="$VENV/bin/python"
say "ok   tools: ${PY_PACKAGES[*]} in $VENV"

# --- 1. build ------------------------------------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if ! cargo build --release --locked >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" >&2
  die "cargo build --release --locked"
fi
install -m 0755 "$TARGET_DIR/release/tmws" "$WORK/tmws"
say "ok   cargo build --release --locked -> $TARGET_DIR/release/tmws (installed 0755 as $WORK/tmws)"

# --- 2. user -------------------------------------------------------------------------------------
if ! getent passwd "$SMOKE_UID" >/dev/null; then
  getent group "$SMOKE_UID" >/dev/null || groupadd --gid "$SMOKE_UID" "$SMOKE_USER"
  useradd --uid "$SMOKE_UID" --gid "$SMOKE_UID" --no-log-init --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$SMOKE_USER"
  say "ok   created user $SMOKE_USER (UID/GID $SMOKE_UID)"
else
  say "ok   user $(getent passwd "$SMOKE_UID" | cut -d: -f1) has UID $SMOKE_UID"
fi

# --- 3. environment ------------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC_PORT="$(free_port)"
CLOSED_PORT="$(free_port)"
METRICS_PORT="$(free_port)"
SMOKE_DATABASE_URL="$("$PY" - "$TMWS_TEST_DATABASE_URL" "$SMOKE_DB" <<'PY'
import sys
from urllib.parse import urlsplit, urlunsplit
u = urlsplit(sys.argv[1])
print(urlunsplit((u.scheme, u.netloc, "/" + sys.argv[2], u.query, "")))
PY
)"

if [[ -z "${TMWS_SECRET_KEY:-}" ]]; then
  command -v openssl >/dev/null || die "openssl is needed to generate TMWS_SECRET_KEY"
  TMWS_SECRET_KEY="$(openssl rand -hex 32)"
  export TMWS_SECRET_KEY
fi

# Prints the service's environment as NUL-separated KEY=VALUE, after the overrides below.
"$PY" - "$ENV_SOURCE" tmws \
  "TMWS_GRPC_ADDR=127.0.0.1:$GRPC_PORT" \
  "TMWS_DATABASE_URL=$SMOKE_DATABASE_URL" \
  "TMWS_REDIS_URL=$TMWS_TEST_REDIS_URL" \
  "TMWS_METRICS_ADDR=127.0.0.1:$METRICS_PORT" \
  "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$CLOSED_PORT" >"$WORK/env" <<'PY'
import os
import re
import sys

import yaml

compose_file, service, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
doc = yaml.safe_load(open(compose_file, encoding="utf-8"))
svc = doc["services"][service]


def interpolate(value):
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $$."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        val = os.environ.get(name)
        if op in (":-", ":?") and not val:
            val = None
        if val is None:
            if op in (":-", "-"):
                return interpolate(arg)
            if op in (":?", "?"):
                sys.exit(f"{compose_file}: {name}: {arg or 'required'}")
            return ""
        return val
    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}", sub, str(value))


env = {}
env_files = svc.get("env_file", [])
for item in [env_files] if isinstance(env_files, (str, dict)) else env_files:
    path = item if isinstance(item, str) else item["path"]
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip().strip('"').strip("'")
raw = svc.get("environment", {})
if isinstance(raw, list):
    raw = dict(str(i).partition("=")[::2] for i in raw)
for k, v in raw.items():
    env[k] = "" if v is None else interpolate(v)
for o in overrides:
    k, _, v = o.partition("=")
    env[k] = v
# Nothing may still point at another compose service by name: it would not resolve here.
names = "|".join(re.escape(n) for n in doc["services"])
for k, v in env.items():
    if re.search(rf"//(?:[^@/]*@)?({names})(?::|/|$)", v):
        sys.exit(f"{compose_file}: {k}={v} points at a compose service; add an override in smoke-container.sh")
sys.stdout.write("".join(f"{k}={v}\0" for k, v in sorted(env.items())))
PY
mapfile -d '' SERVICE_ENV <"$WORK/env"
# TLS, when the service's env asks for it: a throw-away self-signed pair readable by the server.
TLS_CA=""
if printf '%s\n' "${SERVICE_ENV[@]}" | grep -q '^TMWS_TLS_CERT=.'; then
  command -v openssl >/dev/null || die "openssl is needed to generate the TLS pair $ENV_SOURCE asks for"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1 || die "cannot generate a TLS pair"
  chown "$SMOKE_UID:$SMOKE_UID" "$WORK/tls.key" "$WORK/tls.crt"
  chmod 0400 "$WORK/tls.key"
  for i in "${!SERVICE_ENV[@]}"; do
    case "${SERVICE_ENV[$i]}" in
      TMWS_TLS_CERT=*) SERVICE_ENV[i]="TMWS_TLS_CERT=$WORK/tls.crt" ;;
      TMWS_TLS_KEY=*) SERVICE_ENV[i]="TMWS_TLS_KEY=$WORK/tls.key" ;;
      TMWS_TLS_CLIENT_CA=*) die "mTLS (TMWS_TLS_CLIENT_CA) is not supported by this smoke test" ;;
    esac
  done
  TLS_CA="$WORK/tls.crt"
fi
RUN_ENV=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "HOME=/nonexistent" "${SERVICE_ENV[@]}")
env_value() {
  local kv
  for kv in "${RUN_ENV[@]}"; do
    if [[ "${kv%%=*}" == "$1" ]]; then printf '%s' "${kv#*=}"; fi
  done
}
GRACE_RAW="$(env_value TMWS_SHUTDOWN_GRACE)"
GRACE_SECS="$("$PY" -c '
import re, sys
m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", sys.argv[1] or "25s")
print(float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"])' "$GRACE_RAW")"
say "ok   env: ${#SERVICE_ENV[@]} variables from $ENV_SOURCE service tmws (TMWS_ENVIRONMENT=$(env_value TMWS_ENVIRONMENT), addr 127.0.0.1:$GRPC_PORT${TLS_CA:+ over TLS}, database $SMOKE_DB, grace ${GRACE_RAW:-25s})"

# The container's process model: UID/GID 10001, no supplementary groups, no capabilities,
# no_new_privs, and only the service's environment. setpriv and env exec, so the PID started in
# the background is the server's own.
AS_TMWS=(setpriv --reuid="$SMOKE_UID" --regid="$SMOKE_UID" --clear-groups --no-new-privs
  --inh-caps=-all --bounding-set=-all env -i "${RUN_ENV[@]}")

# --- 4. migrate (the one-shot job) ---------------------------------------------------------------
if command -v psql >/dev/null 2>&1; then
  psql -X -q -v ON_ERROR_STOP=1 "$TMWS_TEST_DATABASE_URL" \
    -c "DROP DATABASE IF EXISTS ${SMOKE_DB} WITH (FORCE)" >/dev/null 2>&1 \
    || die "cannot drop the previous $SMOKE_DB database"
fi
if ! "${AS_TMWS[@]}" "$WORK/tmws" migrate >"$WORK/migrate.log" 2>&1; then
  cat "$WORK/migrate.log" >&2
  die "tmws migrate (as UID $SMOKE_UID)"
fi
say "ok   tmws migrate exited 0 as UID $SMOKE_UID (database $SMOKE_DB created and migrated)"

# --- 5. serve ------------------------------------------------------------------------------------
"${AS_TMWS[@]}" "$WORK/tmws" serve >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
# Wait until setpriv and env have exec'd into the server.
for _ in $(seq 1 50); do
  [[ "$(readlink "/proc/$SERVER_PID/exe" 2>/dev/null)" == "$WORK/tmws" ]] && break
  sleep 0.1
done
[[ -r "/proc/$SERVER_PID/status" ]] || { cat "$WORK/serve.log" >&2; die "tmws serve exited at once"; }
uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$SERVER_PID/status")"
capeff="$(awk '/^CapEff:/ {print $2}' "/proc/$SERVER_PID/status")"
[[ "$uids" == "$SMOKE_UID $SMOKE_UID $SMOKE_UID $SMOKE_UID" ]] || die "server runs with UIDs '$uids', expected $SMOKE_UID"
[[ "$capeff" =~ ^0+$ ]] || die "server has effective capabilities $capeff"
say "ok   tmws serve started as pid $SERVER_PID, UID $SMOKE_UID, no capabilities"

cat >"$WORK/probe.py" <<'PY'
"""Polls grpc.health.v1.Health/Check until every named service is SERVING."""
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

addr, pid, timeout, ca, services = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5:]
Status = health_pb2.HealthCheckResponse.ServingStatus
deadline = time.monotonic() + timeout
last = {}
if ca:
    with open(ca, "rb") as f:
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=f.read()))
else:
    channel = grpc.insecure_channel(addr)
with channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                last[service] = Status.Name(reply.status)
            except grpc.RpcError as e:
                last[service] = f"{e.code().name}: {e.details()}"
        if all(v == "SERVING" for v in last.values()):
            print(", ".join(f"{s if s else repr('')}={v}" for s, v in last.items()))
            sys.exit(0)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    raise FileNotFoundError
        except FileNotFoundError:
            sys.exit(f"server exited; last health: {last}")
        if time.monotonic() > deadline:
            sys.exit(f"not SERVING after {timeout:.0f}s: {last}")
        time.sleep(0.5)
PY
if ! health="$("$PY" "$WORK/probe.py" "127.0.0.1:$GRPC_PORT" "$SERVER_PID" "$READY_TIMEOUT_SECS" "$TLS_CA" \
    "" tmws.v1.MemoryService tmws.v1.WorkflowService 2>&1)"; then
  tail -n 40 "$WORK/serve.log" >&2
  die "health: $health"
fi
say "ok   grpc.health.v1 Check: $health"

# --- 6. logs -------------------------------------------------------------------------------------
if ! logcheck="$("$PY" - "$WORK/serve.log" <<'PY' 2>&1
import json, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
if not lines:
    sys.exit("no log lines")
for n, line in enumerate(lines, 1):
    try:
        json.loads(line)
    except ValueError:
        sys.exit(f"line {n} is not JSON: {line.strip()[:200]}")
print(len(lines))
PY
)"; then
  die "logs: $logcheck"
fi
say "ok   logs: $logcheck JSON lines on stdout/stderr"

# --- 6b. metrics ----------------------------------------------------------------------------------
if ! metrics="$("$PY" - "$METRICS_PORT" <<'PY' 2>&1
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
if "# TYPE tmws_rpc_requests_total counter" not in body:
    sys.exit("no tmws_rpc_requests_total in /metrics")
print(len(body.splitlines()))
PY
)"; then
  die "metrics: $metrics"
fi
say "ok   metrics: GET /metrics answered $metrics lines of Prometheus text"

# --- 7. SIGTERM drain ----------------------------------------------------------------------------
start_ns="$(date +%s%N)"
kill -TERM "$SERVER_PID"
# Watchdog: SIGKILL at the grace deadline, as a container runtime would after its stop timeout.
( sleep "$GRACE_SECS"; kill -KILL "$SERVER_PID" 2>/dev/null ) &
watchdog=$!
rc=0
wait "$SERVER_PID" || rc=$?
end_ns="$(date +%s%N)"
kill "$watchdog" 2>/dev/null || true
wait "$watchdog" 2>/dev/null || true
SERVER_PID=""
elapsed="$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')"
if [[ $rc -ne 0 ]]; then
  tail -n 40 "$WORK/serve.log" >&2
  die "after SIGTERM: exit code $rc after ${elapsed}s (grace ${GRACE_SECS}s; 137 = killed at the deadline)"
fi
say "ok   SIGTERM: exit 0 after ${elapsed}s (grace ${GRACE_SECS}s)"
say "PASS"
