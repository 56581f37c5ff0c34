#!/usr/bin/env bash
# Benchmarks TMWS on this machine: builds `tmws` and `tmws-bench` in release mode, starts the
# server on loopback with its own fresh database, runs tmws-bench against it (the direct-SQL
# baselines use the same database), and stops the server. See docs/BENCHMARKS.md.
#
#   scripts/bench.sh                       # the full run: 100k x 384, concurrency 1 and 8
#   scripts/bench.sh --quick               # seconds; proves the tool works (CI)
#   scripts/bench.sh --json out.json --scenarios dataset,search
#   TMWS_BENCH_BACKEND=sqlite scripts/bench.sh --quick   # the server on its embedded store
#
# With TMWS_BENCH_BACKEND=sqlite the server runs on the embedded store, in a fresh file
# (TMWS_DATABASE_URL=sqlite://<new temp dir>/tmws.db), and tmws-bench gets `--database-url none`:
# it opens no database, so the direct-SQL baselines are not run (the bare tonic baseline is), and
# neither PostgreSQL nor psql is needed.
#
# Every argument goes to tmws-bench (`tmws-bench --help`). Environment:
#   TMWS_BENCH_BACKEND     postgres (default) or sqlite
#   TMWS_BENCH_ADMIN_URL   PostgreSQL URL able to create databases (default: TMWS_TEST_DATABASE_URL,
#                          else what scripts/dev-services.sh provides)
#   TMWS_BENCH_DB          database for the run (default tmws_bench; dropped and recreated first)
#   TMWS_BENCH_KEEP_DB=1   keep the database (with --reuse, a loaded data set is used again); on
#                          sqlite, keep the temp dir (it is removed otherwise; --reuse is refused)
#   TMWS_BENCH_SQLITE_DIR  sqlite: where the temp dir is made (default: TMPDIR, else /tmp; mind
#                          that /tmp may be in memory)
#   TMWS_BENCH_PORT        gRPC port of the server (default 50651)
#   TMWS_*                 any server setting, e.g. TMWS_HNSW_EF_SEARCH=64 (tmws-bench reads the same
#                          TMWS_HNSW_EF_SEARCH for its baselines), TMWS_DB_MAX_CONNECTIONS
#   TMWS_BENCH_NO_BUILD=1  use the release binaries already built
#   TMWS_BENCH_SERVER_BIN, TMWS_BENCH_BIN   run these binaries instead (A/B comparisons of builds)
#   CARGO_TARGET_DIR       honoured
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bench: %s\n' "$*" >&2; }

BACKEND="${TMWS_BENCH_BACKEND:-postgres}"
PORT="${TMWS_BENCH_PORT:-50651}"
TARGET="${CARGO_TARGET_DIR:-target}"
SQLITE_DIR=""

case "$BACKEND" in
  postgres)
    ADMIN_URL="${TMWS_BENCH_ADMIN_URL:-${TMWS_TEST_DATABASE_URL:-}}"
    if [[ -z "$ADMIN_URL" ]]; then
      while IFS='=' read -r key value; do
        [[ "$key" == TMWS_TEST_DATABASE_URL ]] && ADMIN_URL="$value"
      done < <(scripts/dev-services.sh)
    fi
    : "${ADMIN_URL:?no PostgreSQL URL: set TMWS_BENCH_ADMIN_URL}"
    DB="${TMWS_BENCH_DB:-tmws_bench}"

    # postgres://user@host:port/admin?opts -> postgres://user@host:port/$DB?opts
    base="${ADMIN_URL%%\?*}"
    query=""
    [[ "$ADMIN_URL" == *\?* ]] && query="?${ADMIN_URL#*\?}"
    rest="${base#*://}"
    if [[ "$rest" == */* ]]; then base="${base%/*}"; fi
    DB_URL="${base}/${DB}${query}"
    # What tmws-bench connects to for its baselines: the server's database.
    BENCH_DB_URL="$DB_URL"
    ;;
  sqlite)
    # The embedded store is the server's alone: no baselines against it.
    BENCH_DB_URL=none
    ;;
  *)
    say "TMWS_BENCH_BACKEND must be postgres or sqlite (got '$BACKEND')"
    exit 1
    ;;
esac

if [[ "${TMWS_BENCH_NO_BUILD:-0}" != 1 ]]; then
  say "building release binaries (target: $TARGET)"
  cargo build --release --locked --bin tmws --bin tmws-bench >&2
fi

if [[ "$BACKEND" == postgres ]]; then
  command -v psql >/dev/null || { say "psql (postgresql-client) is needed"; exit 1; }
  if [[ "${TMWS_BENCH_KEEP_DB:-0}" != 1 ]]; then
    say "recreating database $DB"
    psql -X -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >&2
  fi
  if [[ "$(psql -X -q -t -A "$ADMIN_URL" -c "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" != 1 ]]; then
    psql -X -q "$ADMIN_URL" -c "CREATE DATABASE \"$DB\"" >&2
  fi
else
  SQLITE_DIR="$(mktemp -d "${TMWS_BENCH_SQLITE_DIR:-${TMPDIR:-/tmp}}/tmws-bench-sqlite.XXXXXX")"
  DB_URL="sqlite://$SQLITE_DIR/tmws.db"
  say "embedded store: $DB_URL"
fi

LOG="$(mktemp /tmp/tmws-bench-server.XXXXXX.log)"
say "starting tmws on 127.0.0.1:$PORT (log: $LOG)"
TMWS_ENVIRONMENT="${TMWS_ENVIRONMENT:-development}" \
TMWS_GRPC_ADDR="127.0.0.1:$PORT" \
TMWS_DATABASE_URL="$DB_URL" \
TMWS_LOG_FORMAT=json \
RUST_LOG="${RUST_LOG:-warn}" \
  "${TMWS_BENCH_SERVER_BIN:-$TARGET/release/tmws}" serve >"$LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ -n "$SQLITE_DIR" ]]; then
    if [[ "${TMWS_BENCH_KEEP_DB:-0}" == 1 ]]; then
      say "kept the embedded store in $SQLITE_DIR"
    else
      rm -rf -- "$SQLITE_DIR"
    fi
  fi
}
trap stop_server EXIT

for _ in $(seq 1 300); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { say "server exited during start-up:"; cat "$LOG" >&2; exit 1; }
  sleep 0.1
done

"${TMWS_BENCH_BIN:-$TARGET/release/tmws-bench}" \
  --addr "http://127.0.0.1:$PORT" \
  --database-url "$BENCH_DB_URL" \
  --server-pid "$SERVER_PID" \
  "$@"
