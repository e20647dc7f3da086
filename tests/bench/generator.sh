#!/usr/bin/env bash
# Benchmark: rows/s per table that tweetgen writes on this machine, against
# the local stack's PostgreSQL (with Debezium attached, as in production):
# the normal mode at its default pace (one batch every 5 s), the normal mode
# flat out (no pause between batches), and load mode with binary COPY and
# with multi-row INSERT. Rates come from PostgreSQL's own statistics
# (pg_stat_user_tables), so cascades and trigger updates count too.
#
#   tests/bench/generator.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-30}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
# The whole workspace, as the other benchmarks build it: building one
# package alone unifies features differently and recompiles dependencies.
# Benchmarks measure the release build (tests/stack.sh pipeline runs the
# quicker unoptimised one): the first time, this compiles for a while.
echo "building the release binaries (cargo build --release; about 14 minutes the first time on 2 cores)"
cargo build --release --locked -q
eval "$(bash tests/stack.sh env)"
# psql reads the (demo) password from the environment, not its command line.
export PGPASSWORD=$TWEETGEN_DATABASE__PASSWORD PGUSER=tweetgen
# No metrics endpoint: a running pipeline's generator may hold its port.
export TWEETGEN_METRICS__LISTEN=

stats() {
  # Statistics reach the view asynchronously; the generator has exited.
  sleep 2
  psql -X -At -F ' ' -c "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables \
    WHERE relname IN ('users', 'tweets', 'likes', 'follows') ORDER BY relname"
}

bench() { # bench LABEL ARGS...
  local label=$1 before after
  shift
  before=$(stats)
  "$CARGO_TARGET_DIR/release/tweetgen" --duration "${secs}s" "$@" >/dev/null 2>&1
  after=$(stats)
  printf '%s (%ss): tweetgen %s\n' "$label" "$secs" "$*"
  printf '  %-8s %10s %10s %10s\n' table 'insert/s' 'update/s' 'delete/s'
  join <(echo "$before") <(echo "$after") | awk -v s="$secs" \
    '{ printf "  %-8s %10.1f %10.1f %10.1f\n", $1, ($5-$2)/s, ($6-$3)/s, ($7-$4)/s; ins += $5-$2 }
     END { printf "  %-8s %10.1f\n", "all", ins/s }'
}

bench "normal mode, default pace"
bench "normal mode, flat out" --interval 1ms
bench "load mode, binary COPY" --rate 0 --load-method copy
bench "load mode, multi-row INSERT" --rate 0 --load-method insert
