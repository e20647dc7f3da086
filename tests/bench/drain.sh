#!/usr/bin/env bash
# Benchmark: drain a pre-filled topic of change events into MinIO.
#
#   tests/bench/drain.sh [EVENTS]   (default 1,000,000)
#
# Fills twitter.tweets through the real path (tweetgen load mode ->
# PostgreSQL -> Debezium -> Kafka) until the topic holds EVENTS more
# events, then starts cdc-sink with a fresh consumer group (so it reads the
# whole topic) and a fresh prefix, and measures the time until every
# partition is committed (the sink commits Kafka only after the lake), the
# sink's CPU time (user + sys) and its peak RSS (VmHWM).
#
# DRAIN_SINK_BIN runs another build of the sink (to measure an older commit on
# the same topic). The lake it wrote is dropped at the end (DRAIN_KEEP=1
# keeps it). With current-state tables on (CDC_SINK_MIRROR__ENABLED,
# default true) it also reports when the table's mirror caught up, and the
# sink's CPU and RSS include that work; set it to false for the
# changelog alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-1000000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
# Benchmarks measure the release build (tests/stack.sh pipeline runs the
# quicker unoptimised one): the first time, this compiles for a while.
echo "building the release binaries (cargo build --release; about 14 minutes the first time on 2 cores)"
cargo build --release --locked -q
eval "$(bash tests/stack.sh env)"
# A running pipeline (tests/stack.sh pipeline) would write and read while
# this measures, and its tweetgen holds the metrics port.
if bash tests/stack.sh status 2>/dev/null | grep -Eq '^(tweetgen|cdc-sink) +(up|start)'; then
  echo "stopping the stack's tweetgen and cdc-sink for the benchmark (tests/stack.sh pipeline starts them again)"
  bash tests/stack.sh stop-pipeline
fi
# DRAIN_TOPIC drains another topic of tweets' events (one a benchmark's
# connector configuration routed elsewhere, say).
topic=${DRAIN_TOPIC:-twitter.tweets}
total() { # sum of high watermarks of $topic
  for p in 0 1 2; do
    # A topic not created yet (a brand-new stack) holds 0 events.
    { kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q -t "$topic:$p:-1" 2>/dev/null || true; } | awk '{print $NF}'
  done | awk '{s += $1} END {print s + 0}'
}
before=$(total)
if [ "$before" -lt "$events" ]; then
  need=$((events - before))
  echo "filling $topic with $need more events (now $before)"
  start=$(date +%s)
  # Load mode spreads its rows over every table, so fill in rounds until
  # this topic holds enough, waiting for Debezium to catch up in between.
  while [ "$(total)" -lt "$events" ]; do
    need=$((events - $(total)))
    TWEETGEN_METRICS__LISTEN= "$CARGO_TARGET_DIR/release/tweetgen" --rate 0 --load-method copy \
      --batches $(((need + 2499) / 2500)) >/tmp/drain-fill.log 2>&1 \
      || { echo "the fill's tweetgen failed (full log: /tmp/drain-fill.log):"; tail -20 /tmp/drain-fill.log; exit 1; }
    last=-1
    while [ "$(total)" -ne "$last" ]; do last=$(total); sleep 5; done
  done
  echo "filled in $(( $(date +%s) - start ))s (PostgreSQL + Debezium)"
fi
target=$(total)
# Events present: from each partition's log start (retention or
# DeleteRecords may have moved it) to its end.
low=$(for p in 0 1 2; do
  kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q -t "$topic:$p:-2" 2>/dev/null | awk '{print $NF}'
done | awk '{s += $1} END {print s + 0}')
events=$((target - low))
echo "draining $events events from $topic"

run=drain-$(date +%s)
export CDC_SINK_KAFKA__TOPICS="[\"$topic\"]" CDC_SINK_KAFKA__GROUP_ID=$run CDC_SINK_OUTPUT__PREFIX=$run
export CDC_SINK_FLUSH__MAX_AGE_MS=${DRAIN_MAX_AGE_MS:-1000}
# One debug line per Delta commit: where the end is read from.
export RUST_LOG=info,cdc_sink::pipeline=debug NO_COLOR=1
start=$(date +%s.%N)
"${DRAIN_SINK_BIN:-$CARGO_TARGET_DIR/release/cdc-sink}" >"/tmp/$run.log" 2>&1 &
pid=$!
peak=0
while :; do
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
  committed=$("$CARGO_TARGET_DIR/release/committed" "$CDC_SINK_KAFKA__BROKERS" "$run" "$topic" 2>/dev/null || echo 0)
  [ "$committed" -ge "$target" ] && break
  kill -0 $pid 2>/dev/null || { echo "sink died:"; tail -20 "/tmp/$run.log"; exit 1; }
  sleep 1
done
polled=$(date +%s.%N)
# With current-state tables on (the default), the drain ends when the
# table's mirror reflects the changelog's last version too.
mirror_line=
if [ "${CDC_SINK_MIRROR__ENABLED:-true}" = true ]; then
  metrics=http://${CDC_SINK_METRICS__LISTEN:-127.0.0.1:9464}/metrics
  table=${topic##*.}
  while :; do
    m=$(curl -fsS "$metrics" 2>/dev/null || true)
    cv=$(echo "$m" | awk -v t="cdc_sink_changelog_version{table=\"$table\"}" '$1 == t {print $2}')
    mv=$(echo "$m" | awk -v t="cdc_sink_mirror_changelog_version{table=\"$table\"}" '$1 == t {print $2}')
    [ -n "$cv" ] && [ "$cv" = "$mv" ] && break
    kill -0 $pid 2>/dev/null || { echo "sink died:"; tail -20 "/tmp/$run.log"; exit 1; }
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "${hwm:-0}" -gt "$peak" ] && peak=$hwm
    sleep 1
  done
  mirror_line=$(sed 's/\x1b\[[0-9;]*m//g' "/tmp/$run.log" | grep -E 'current-state table (synced|built)' | tail -1 | awk '{print $1}')
fi
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
[ "$hwm" -gt "$peak" ] && peak=$hwm
# utime + stime, in clock ticks (fields 14 and 15 of /proc/PID/stat).
ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
cpu=$(echo "$ticks / $(getconf CLK_TCK)" | bc -l)
kill -TERM $pid; wait $pid || true
last_commit=$(sed 's/\x1b\[[0-9;]*m//g' "/tmp/$run.log" | grep ' committed ' | tail -1 | awk '{print $1}')
end=$(date -d "$last_commit" +%s.%N)
secs=$(echo "$end - $start" | bc)
if [ -n "$mirror_line" ]; then
  mirror_end=$(date -d "$mirror_line" +%s.%N)
  printf 'current-state table caught up %.2fs after start (%.0f rows/s through the mirror)\n' \
    "$(echo "$mirror_end - $start" | bc)" "$(echo "$events / ($mirror_end - $start)" | bc -l)"
fi
printf 'drained %d events in %.2fs (start to last commit; the 1 s poll saw it %.1fs later) = %.0f rows/s; sink CPU %.1fs = %.0f rows per CPU-second; peak RSS %d MiB\n' \
  "$events" "$secs" "$(echo "$polled - $end" | bc)" "$(echo "$events / $secs" | bc -l)" "$cpu" "$(echo "$events / $cpu" | bc -l)" $((peak / 1024))
# The drained lake (up to a GB) goes, unless DRAIN_KEEP=1.
if [ "${DRAIN_KEEP:-0}" != 1 ]; then
  "$(bash tests/readers.sh)" tests/bench/drop_prefix.py "$run"
fi
