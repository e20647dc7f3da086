#!/usr/bin/env bash
# Benchmark: how fresh the lake is. While tweetgen writes at a steady pace
# (normal mode, one transaction per batch), a sink with the given flush age
# lands the changes; for every row it measures the time from its PostgreSQL
# commit to the moment the Delta commit holding it became visible in S3, and
# prints p50, p95, p99, max and the row count.
#
#   tests/bench/freshness.sh [FLUSH_AGE] [SECONDS] [INTERVAL]
#
#   FLUSH_AGE  the sink's flush.max_age_ms, as 10s, 1s or 500ms (default 10s,
#              the sink's default)
#   SECONDS    length of the measured window (default 120)
#   INTERVAL   tweetgen --interval, the pause between batches (default 500ms:
#              about 140 row changes a second over the four tables here; 1s
#              gives about half that)
#   FRESHNESS_WARMUP  seconds at the start not measured (default 10)
#
# Runs against the stack `tests/stack.sh env` names (PG_PORT, KAFKA_PORT,
# MINIO_PORT, CDC_LAKE_STATE, ... as for stack.sh). It should be the only
# writer: it refuses to run while that stack's own tweetgen runs.
#
# What is measured, per row (tests/bench/freshness.py has the details):
# - commit time: `_cdc_commit_ts`, Debezium's source.ts_ms, PostgreSQL's
#   commit time of the row's transaction;
# - visible time: the S3 Last-Modified (ms) of the `_delta_log/<version>.json`
#   entry whose `add` names the row's file: a reader sees the row from then
#   on. It is preferred to commitInfo.timestamp, which delta-rs takes from
#   the writer's clock before the conditional PUT of that entry, so slightly
#   early; both are printed.
# Both times come from this one machine's clock (PostgreSQL, MinIO and the
# sink run here), so there is no clock skew between them.
#
# The measured sink is a fresh process with a fresh consumer group and a
# fresh S3 prefix (freshness-<time>), so nothing older is measured. Its
# group starts at the current end of every twitter.* topic (set before it
# joins; the sink resumes from Kafka's committed offsets when the lake has no
# position), so it does not drain the topics' history first. The first
# FRESHNESS_WARMUP seconds of tweetgen's run are not counted (the sink joins
# its group, creates the four tables, makes its first flush); the window
# ends when tweetgen stops. The script then waits, on conditions, until
# Debezium has published everything and the sink has committed all of it
# (its Kafka commits follow its Delta commits), so every row of the window
# is in the lake through a normal age-based flush, and only then stops it.
# Like drain.sh, each run leaves its prefix and consumer group behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
age=${1:-10s}
secs=${2:-120}
interval=${3:-500ms}
warmup=${FRESHNESS_WARMUP:-10}
case $age in
  *ms) age_ms=${age%ms} ;;
  *s) age_ms=$(echo "${age%s} * 1000 / 1" | bc) ;;
  *) echo "FLUSH_AGE needs a unit: 10s, 1s, 500ms" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
# Benchmarks measure the release build (tests/stack.sh pipeline runs the
# quicker unoptimised one): the first time, this compiles for a while.
echo "building the release binaries (cargo build --release; about 14 minutes the first time on 2 cores)"
cargo build --release --locked -q
py=$(bash tests/readers.sh)
eval "$(bash tests/stack.sh env)"
broker=$CDC_SINK_KAFKA__BROKERS
cache=${CDC_LAKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake}
kafka_libs=$cache/kafka-$(sed -n 's/^KAFKA_VERSION=//p' tests/stack.sh)/libs

if [ -f "$STACK_STATE/run/tweetgen.pid" ] && kill -0 "$(cat "$STACK_STATE/run/tweetgen.pid")" 2>/dev/null; then
  echo "this stack's own tweetgen is running (tests/stack.sh pipeline): stop it with tests/stack.sh stop-pipeline" >&2
  exit 1
fi

run=freshness-$(date +%s)
work=/tmp/$run
mkdir -p "$work"
sink_pid= gen_pid=
cleanup() {
  [ -n "$gen_pid" ] && kill -TERM "$gen_pid" 2>/dev/null || true
  [ -n "$sink_pid" ] && kill -TERM "$sink_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

topics() { kcat -b "$broker" -L 2>/dev/null | sed -n 's/^ *topic "\(twitter\.[^"]*\)" with.*/\1/p' | sort; }
partitions() { kcat -b "$broker" -L -t "$1" 2>/dev/null | sed -n 's/^ *partition \([0-9]*\),.*/\1/p'; }
end_offsets() { # topic,partition,high-watermark for every twitter.* partition
  local t p
  for t in $(topics); do
    for p in $(partitions "$t"); do
      echo "$t,$p,$(kcat -b "$broker" -Q -t "$t:$p:-1" 2>/dev/null | awk '{print $NF}')"
    done
  done
}

# The fresh group starts at today's end of each topic. A topic created later
# (a brand-new stack) has no offset and is read from its beginning, which
# holds only this run's events.
end_offsets >"$work/start.csv"
if [ -s "$work/start.csv" ]; then
  java -Xmx256m -cp "$kafka_libs/*" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$broker" --group "$run" --reset-offsets --from-file "$work/start.csv" --execute \
    >"$work/reset.log" 2>&1 || { cat "$work/reset.log" >&2; exit 1; }
fi

export CDC_SINK_KAFKA__GROUP_ID=$run CDC_SINK_OUTPUT__PREFIX=$run CDC_SINK_FLUSH__MAX_AGE_MS=$age_ms
"$CARGO_TARGET_DIR/release/cdc-sink" >"$work/sink.log" 2>&1 &
sink_pid=$!
echo "flush.max_age_ms=$age_ms; tweetgen --interval $interval for ${warmup}s warm-up + ${secs}s; prefix $run (logs in $work)"

start_ms=$(date +%s%3N)
"$CARGO_TARGET_DIR/release/tweetgen" --interval "$interval" --duration "$((warmup + secs))s" >"$work/tweetgen.log" 2>&1 &
gen_pid=$!
wait "$gen_pid" || { echo "tweetgen failed:" >&2; tail -20 "$work/tweetgen.log" >&2; exit 1; }
gen_pid=
end_ms=$(date +%s%3N)
kill -0 "$sink_pid" 2>/dev/null || { echo "sink died:" >&2; tail -20 "$work/sink.log" >&2; exit 1; }

# Debezium has published everything once the topics stop growing.
last= now=$(end_offsets)
while [ "$now" != "$last" ]; do last=$now; sleep 5; now=$(end_offsets); done
echo "$now" >"$work/end.csv"
# Then wait until the sink has committed every topic to its end.
deadline=$(($(date +%s) + age_ms / 1000 + 120))
for t in $(cut -d, -f1 "$work/end.csv" | sort -u); do
  want=$(awk -F, -v t="$t" '$1 == t {s += $3} END {print s + 0}' "$work/end.csv")
  until [ "$("$CARGO_TARGET_DIR/release/committed" "$broker" "$run" "$t" 2>/dev/null || echo 0)" -ge "$want" ]; do
    kill -0 "$sink_pid" 2>/dev/null || { echo "sink died:" >&2; tail -20 "$work/sink.log" >&2; exit 1; }
    [ "$(date +%s)" -lt "$deadline" ] || { echo "the sink did not commit $t up to $want in time" >&2; exit 1; }
    sleep 1
  done
done
kill -TERM "$sink_pid"
wait "$sink_pid" || true
sink_pid=

# Each event's Kafka timestamp (the Connect producer's send time), to split
# the latency into stages.
while IFS=, read -r t p end; do
  from=$(awk -F, -v t="$t" -v p="$p" '$1 == t && $2 == p {print $3}' "$work/start.csv")
  [ "${from:-0}" -lt "$end" ] || continue
  kcat -C -b "$broker" -t "$t" -p "$p" -o "${from:-0}" -c "$((end - ${from:-0}))" -e -q \
    -f "$t %p %o %T %S\n" 2>/dev/null
done <"$work/end.csv" >"$work/kafka.txt"

# The tables that had events in this run (other twitter.* topics stay quiet).
tables=$(awk '{print $1}' "$work/kafka.txt" | sort -u | sed 's/^twitter\.//')
echo "window: PostgreSQL commits from $(date -u -d "@$(((start_ms + warmup * 1000) / 1000))" +%T) to $(date -u -d "@$((end_ms / 1000))" +%T) UTC"
# shellcheck disable=SC2086
"$py" tests/bench/freshness.py --prefix "$run" --from-ms "$((start_ms + warmup * 1000))" --to-ms "$end_ms" \
  --kafka "$work/kafka.txt" $tables
