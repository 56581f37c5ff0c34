#!/usr/bin/env bash
# The test command. One suite, two backends:
#   1. the embedded SQLite store, with no services and no Redis (what `cargo test` alone runs);
#   2. PostgreSQL + pgvector and Redis (provisioned by scripts/dev-services.sh unless
#      TMWS_TEST_DATABASE_URL and TMWS_TEST_REDIS_URL are given), including the tests marked
#      `#[ignore = "needs PostgreSQL and Redis"]` (outages through a proxy, replicas on one
#      database, Redis-backed limits).
# Extra arguments go to both `cargo test` runs (e.g. `scripts/test.sh --test api health`).
# Set TMWS_TEST_PASSES=sqlite or =postgres to run one pass only.
set -euo pipefail
cd "$(dirname "$0")/.."
passes="${TMWS_TEST_PASSES:-sqlite postgres}"

if [[ " $passes " == *" sqlite "* ]]; then
  echo "== tests on the embedded SQLite store"
  env -u TMWS_TEST_DATABASE_URL -u TMWS_TEST_REDIS_URL cargo test --locked --all-targets "$@"
fi

if [[ " $passes " == *" postgres "* ]]; then
  if [[ -z "${TMWS_TEST_DATABASE_URL:-}" || -z "${TMWS_TEST_REDIS_URL:-}" ]]; then
    while IFS='=' read -r key value; do
      case "$key" in
        TMWS_TEST_DATABASE_URL|TMWS_TEST_REDIS_URL) export "$key=$value" ;;
      esac
    done < <(scripts/dev-services.sh)
  fi
  : "${TMWS_TEST_DATABASE_URL:?scripts/dev-services.sh did not provide a database}"
  : "${TMWS_TEST_REDIS_URL:?scripts/dev-services.sh did not provide Redis}"
  export TMWS_TEST_DATABASE_URL TMWS_TEST_REDIS_URL
  echo "== tests on PostgreSQL + pgvector and Redis"
  # The in-module micro-benchmark is not a test: it runs only when asked for by name.
  cargo test --locked --all-targets "$@" -- --include-ignored --skip bench_semantic_50k
fi
