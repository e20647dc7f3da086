#!/usr/bin/env bash
# Benchmark: what one batch of changed keys costs a current-state table, by
# the table's size.
#
#   tests/bench/mirror.sh [ROWS...]   (default: 1000000 10000000 100000000)
#
# For each size, crates/cdc-sink/examples/mirror_cost.rs seeds a changelog
# `likes_<ROWS>` under the prefix `bench-mirror` in MinIO (once; later runs
# reuse it) and its mirror, through the sink's own writers; then commits
# three batches of 1,000 changed keys (tweetgen's mix for likes: 15 inserts
# to 1 delete) and syncs the mirror after each. Batch 0 runs in a fresh
# process, so it reads the key range of every mirror file from its footer;
# batches 1 and 2 are the steady state of a running sink. Each prints one
# JSON line: S3 GET/PUT/LIST requests and bytes (counted by a wrapper
# around the store), wall time, peak RSS of the sync, files and rows
# rewritten. Only MinIO is needed (tests/stack.sh up). MIRROR_BENCH_PREFIX
# (default bench-mirror) names the lake prefix, for a fresh seed;
# MIRROR_BENCH_UNLIKES=anywhere draws unlikes from every like rather than
# the newest 100,000 (tweetgen's); CDC_SINK_MIRROR__CLUSTERING=key seeds
# mirrors sorted in the primary key's own order rather than by time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1000000 10000000 100000000)
cargo build --release --locked -q --example mirror_cost
bin=$CARGO_TARGET_DIR/release/examples/mirror_cost
eval "$(bash tests/stack.sh env)"
for rows in "${sizes[@]}"; do
  echo "== likes_$rows: seeding (skipped if already there)" >&2
  start=$(date +%s)
  RUST_LOG=warn "$bin" --prefix "${MIRROR_BENCH_PREFIX:-bench-mirror}" seed --rows "$rows"
  echo "   seeded in $(( $(date +%s) - start )) s" >&2
  RUST_LOG=warn "$bin" --prefix "${MIRROR_BENCH_PREFIX:-bench-mirror}" apply --rows "$rows" --keys 1000 --batches 3 \
    --unlikes "${MIRROR_BENCH_UNLIKES:-recent}"
done
