#!/usr/bin/env bash
# Benchmark: sustained rows/s of tweetgen's load mode on this machine,
# binary COPY against multi-row INSERT, against the local stack's
# PostgreSQL (with Debezium attached, as in production).
#
#   tests/bench/generator.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-30}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
cargo build --release --locked -q -p tweetgen
eval "$(bash tests/stack.sh env)"
for method in copy insert; do
  line=$("$CARGO_TARGET_DIR/release/tweetgen" --rate 0 --load-method "$method" --duration "${secs}s" 2>&1 \
    | grep -F 'finished' | sed 's/\x1b\[[0-9;]*m//g')
  rate=$(grep -oE 'rows_per_sec=[0-9]+' <<<"$line" | cut -d= -f2)
  rows=$(grep -oE ' rows=[0-9]+' <<<"$line" | cut -d= -f2)
  printf '%-7s %9s rows in %ss  = %7s rows/s\n' "$method" "$rows" "$secs" "$rate"
done
