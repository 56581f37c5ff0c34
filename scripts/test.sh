#!/usr/bin/env bash
# The test command: provision PostgreSQL + pgvector and Redis (unless TMWS_TEST_DATABASE_URL and
# TMWS_TEST_REDIS_URL are given), then run every test against them. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh health`).
set -euo pipefail
cd "$(dirname "$0")/.."

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

cargo test --locked --all-targets "$@"
