#!/usr/bin/env bash
# Make PostgreSQL 15 + pgvector and Redis available on Debian/Ubuntu, idempotently.
#
# - When TMWS_TEST_DATABASE_URL and TMWS_TEST_REDIS_URL are both already set, does nothing:
#   the caller brings its own services.
# - Otherwise: installs PostgreSQL 15 and Redis from the distribution if missing, builds and
#   installs pgvector from Debian's trixie source package when the `vector` extension is not
#   available, starts the cluster and redis-server when they are not running, and prints the
#   URLs to export.
#
# Safe to run repeatedly; every step checks before it acts.
set -euo pipefail

log() { printf 'dev-services: %s\n' "$*" >&2; }

if [[ -n "${TMWS_TEST_DATABASE_URL:-}" && -n "${TMWS_TEST_REDIS_URL:-}" ]]; then
  log "TMWS_TEST_DATABASE_URL and TMWS_TEST_REDIS_URL are set; using the given services"
  exit 0
fi

PG_MAJOR="${PG_MAJOR:-15}"
PG_CONFIG="/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
REDIS_PORT="${REDIS_PORT:-6379}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
}
apt_install() {
  apt_update_once
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- PostgreSQL --------------------------------------------------------------------------
if [[ ! -x "/usr/lib/postgresql/${PG_MAJOR}/bin/postgres" ]]; then
  log "installing postgresql-${PG_MAJOR}"
  apt_install "postgresql-${PG_MAJOR}" postgresql-client
fi

pg_running() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }
start_pg() {
  if ! pg_running; then
    log "starting PostgreSQL ${PG_MAJOR}"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "${PG_MAJOR}" main start || true
    for _ in $(seq 1 30); do pg_running && break; sleep 1; done
    pg_running || { log "PostgreSQL did not become ready on ${PG_HOST}:${PG_PORT}"; exit 1; }
  fi
}
start_pg

psql_admin() { psql -X -q -t -A -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@"; }

vector_available() {
  [[ "$(psql_admin -c "select count(*) from pg_available_extensions where name = 'vector'")" == "1" ]]
}

# --- pgvector ----------------------------------------------------------------------------
if ! vector_available; then
  log "pgvector is not installed; building it from Debian's trixie source for PostgreSQL ${PG_MAJOR}"
  apt_install "postgresql-server-dev-${PG_MAJOR}" build-essential dpkg-dev ca-certificates
  # Installing the dev package may upgrade the server's minor version and stop the cluster.
  start_pg
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/src"
  echo "deb-src http://deb.debian.org/debian trixie main" > "$work/trixie.list"
  APT_OPTS=(-o "Dir::Etc::SourceList=$work/trixie.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
  $SUDO apt-get "${APT_OPTS[@]}" update -qq
  (cd "$work/src" && $SUDO apt-get "${APT_OPTS[@]}" source -qq --download-only pgvector >/dev/null \
     && dpkg-source -x --no-check ./*.dsc pgvector >/dev/null)
  make -s -C "$work/src/pgvector" PG_CONFIG="$PG_CONFIG" OPTFLAGS="" >/dev/null
  $SUDO make -s -C "$work/src/pgvector" PG_CONFIG="$PG_CONFIG" install >/dev/null
  vector_available || { log "pgvector build finished but the extension is still unavailable"; exit 1; }
  log "pgvector installed"
fi

# --- Redis -------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  apt_install redis-server redis-tools
fi
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:${REDIS_PORT}"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.5; done
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 || { log "Redis did not start"; exit 1; }
fi

log "ready: postgres://postgres@${PG_HOST}:${PG_PORT}/postgres (pgvector), redis://127.0.0.1:${REDIS_PORT}"
echo "TMWS_TEST_DATABASE_URL=postgres://postgres@${PG_HOST}:${PG_PORT}/postgres"
echo "TMWS_TEST_REDIS_URL=redis://127.0.0.1:${REDIS_PORT}"
