#!/usr/bin/env bash
# Benchmark: Debezium alone, on the local stack. For each run it stops the
# connector, lets tweetgen's load mode (binary COPY, flat out) put ROWS row
# changes into the replication slot, resumes the connector with the sink and
# the generator off, and times until the twitter.* topics' end offsets stop
# moving. Nothing else runs, so the figure is what PostgreSQL's walsender,
# Kafka Connect with Debezium, and the broker manage on this machine.
#
#   tests/bench/debezium.sh [ROWS] [RUNS]          (defaults: 3000000, 3)
#   DEBEZIUM_BENCH_SET='{"producer.override.linger.ms": "50"}' tests/bench/debezium.sh
#   DEBEZIUM_BENCH_JFR=/tmp/jfr tests/bench/debezium.sh 1000000 1
#
# DEBEZIUM_BENCH_JFR=DIR records each run of Connect with Java Flight
# Recorder (settings=profile, from the first new event to the end of the
# run) into DIR/runN.jfr and prints where its CPU samples were
# (tests/bench/jfr_top.py): by thread, by the frame that ran, and by
# library anywhere on the stack.
#
# DEBEZIUM_BENCH_SET is merged into the running connector's configuration
# for the runs (one change at a time, to compare it with the plain one),
# and the configuration before the runs is put back at the end.
#
# Per run it prints: events published and events/s (from the resume, and
# from the first new event, which leaves out the task's start), CPU seconds
# per 1,000 events of Connect, the broker and PostgreSQL, Kafka bytes per
# event (the topics' log segments, after compression), and from Connect's
# JMX the producer's batch-size-avg, records-per-request-avg,
# compression-rate-avg and Debezium's
# QueueRemainingCapacity (mean and lowest), averaged over the run.
#
# Load mode inserts tweets, likes and follows; the likes and follows
# triggers update tweets and users, so the events are creates and updates.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-3000000}
runs=${2:-3}
set_json=${DEBEZIUM_BENCH_SET:-'{}'}
jq -e 'type == "object"' <<<"$set_json" >/dev/null || { echo "DEBEZIUM_BENCH_SET is not a JSON object: $set_json" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
# Only tweetgen: the sink is not part of this benchmark.
echo "building tweetgen (cargo build --release --bin tweetgen)"
cargo build --release --locked -q --bin tweetgen
eval "$(bash tests/stack.sh env)"
export PGPASSWORD=$TWEETGEN_DATABASE__PASSWORD PGUSER=tweetgen
export TWEETGEN_METRICS__LISTEN=
state=$STACK_STATE
connector=twitter-postgres
url=$STACK_CONNECT_URL/connectors/$connector
slot=$(jq -r '."slot.name"' debezium/$connector.json)
topic_prefix=$(jq -r '."topic.prefix"' debezium/$connector.json)
hz=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/debezium-bench.XXXXXX)

now_ms() { date +%s%3N; }
superuser_sql() { psql -X -At -h "$STACK_PG_SUPERUSER_SOCKET" -p "$PG_PORT" -U postgres -d twitter -c "$1"; }
pg_rows() {
  psql -X -At -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables \
    WHERE relname IN ('users', 'tweets', 'likes', 'follows')"
}
retained_wal() { # bytes of WAL the slot holds
  superuser_sql "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint \
    FROM pg_replication_slots WHERE slot_name = '$slot'"
}
topic_args=()
for t in $(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' db/captured-tables); do
  for p in $(kcat -b "$CDC_SINK_KAFKA__BROKERS" -L -t "$topic_prefix.$t" -J | jq -r '.topics[0].partitions[].partition'); do
    topic_args+=(-t "$topic_prefix.$t:$p:-1")
  done
done
published() { kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q "${topic_args[@]}" | awk '{s += $NF} END {printf "%.0f\n", s}'; }
log_bytes() { # bytes in the topics' log segments (what the broker keeps, compressed or not)
  find "$state/kafka/data" -path "*/$topic_prefix.*-[0-9]*/*.log" -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}'
}
ticks() { # utime + stime of a process tree (the main pid and its live children), in clock ticks
  local main=$1
  { echo "$main"; pgrep -P "$main" || true; } | while read -r pid; do
    awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0
  done | awk '{s += $1} END {printf "%.0f\n", s}'
}
pg_main() { head -1 "$state/postgres/postmaster.pid"; }
state_of() { curl -fsS "$url/status" | jq -r '[.connector.state] + [.tasks[].state] | unique | join(",")'; }
wait_state() { # wait_state STATE: up to 120 s
  local i
  for ((i = 0; i < 240; i++)); do [ "$(state_of)" = "$1" ] && return 0; sleep 0.5; done
  echo "the connector is not $1 after 120 s: $(state_of)" >&2
  return 1
}
wait_quiet() { # until the end offsets have not moved for $1 seconds; prints the time of the last move
  local quiet=$1 last cur t_last
  last=$(published); t_last=$(now_ms)
  while (($(now_ms) - t_last < quiet * 1000)); do
    sleep 1
    cur=$(published)
    if [ "$cur" != "$last" ]; then last=$cur; t_last=$(now_ms); fi
  done
  echo "$t_last"
}
jmx() {
  java -cp "$STACK_KAFKA_HOME/libs/*" org.apache.kafka.tools.JmxTool \
    --jmx-url "service:jmx:rmi:///jndi/rmi://$STACK_CONNECT_JMX/jmxrmi" "$@"
}

original=$(curl -fsS "$url/config")
restore() {
  if [ "$set_json" != '{}' ]; then
    curl -fsS -X PUT -H 'Content-Type: application/json' --data "$original" "$url/config" >/dev/null || true
    curl -fsS -X PUT "$url/resume" >/dev/null || true
    echo "connector configuration restored"
  else
    curl -fsS -X PUT "$url/resume" >/dev/null || true
  fi
  [ -z "${jmx_pid:-}" ] || kill "$jmx_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap restore EXIT
if [ "$set_json" != '{}' ]; then
  jq -s '.[0] + .[1]' <(echo "$original") <(echo "$set_json") >"$work/config.json"
  curl -fsS -X PUT -H 'Content-Type: application/json' --data @"$work/config.json" "$url/config" >/dev/null
  curl -fsS -X PUT "$url/resume" >/dev/null
  sleep 2 # Connect restarts the task after a config PUT; the state below is the new task's
fi
wait_state RUNNING
echo "connector $connector with: $set_json"
echo "max_slot_wal_keep_size: $(superuser_sql 'SHOW max_slot_wal_keep_size')"

printf '%-4s %9s %8s %9s %9s %8s %8s %8s %9s %9s %9s %9s %8s %8s\n' \
  run events wal_MB 'ev/s' 'ev/s-1st' connect kafka pg 'B/event' batchavg 'rec/req' compress 'q_mean' 'q_min'
for ((r = 1; r <= runs; r++)); do
  # Anything still coming from before the run goes first.
  wait_quiet 5 >/dev/null
  curl -fsS -X PUT "$url/stop" >/dev/null
  wait_state STOPPED
  e0=$(published); b0=$(log_bytes)
  p0=$(pg_rows)
  "$CARGO_TARGET_DIR/release/tweetgen" --rate 0 --load-method copy >"$work/tweetgen.log" 2>&1 &
  gen=$!
  while [ "$(pg_rows)" -lt $((p0 + rows)) ]; do
    kill -0 "$gen" 2>/dev/null || { cat "$work/tweetgen.log" >&2; echo "tweetgen stopped early" >&2; exit 1; }
    sleep 1
  done
  kill -TERM "$gen"; wait "$gen" || true
  wal=$(retained_wal)

  c0=$(ticks "$(cat "$state/run/connect.pid")"); k0=$(ticks "$(cat "$state/run/kafka.pid")"); g0=$(ticks "$(pg_main)")
  t0=$(now_ms)
  curl -fsS -X PUT "$url/resume" >/dev/null
  # Sample until the offsets have been still for 10 s; keep the CPU ticks
  # and time of the last move, so the idle tail does not count.
  last=$e0; t_first=; t_last=$t0; c1=$c0; k1=$k0; g1=$g0
  while (($(now_ms) - t_last < 10000)); do
    sleep 1
    cur=$(published)
    if [ "$cur" != "$last" ]; then
      if [ -z "$t_first" ]; then
        t_first=$(now_ms)
        # JMX every 2 s, from now: the task's objects exist once it publishes.
        # Every attribute: JmxTool prints nothing when an --attributes name
        # is missing from one of the objects.
        jmx --report-format csv --reporting-interval 2000 \
          --object-name "kafka.producer:type=producer-metrics,client-id=connector-producer-$connector-0" \
          --object-name "debezium.postgres:type=connector-metrics,context=streaming,server=$topic_prefix" \
          >"$work/jmx.csv" 2>/dev/null &
        jmx_pid=$!
        if [ -n "${DEBEZIUM_BENCH_JFR:-}" ]; then
          mkdir -p "$DEBEZIUM_BENCH_JFR"
          jcmd "$(cat "$state/run/connect.pid")" JFR.start name=bench settings=profile \
            filename="$DEBEZIUM_BENCH_JFR/run$r.jfr" >/dev/null
        fi
      fi
      last=$cur; t_last=$(now_ms)
      c1=$(ticks "$(cat "$state/run/connect.pid")"); k1=$(ticks "$(cat "$state/run/kafka.pid")"); g1=$(ticks "$(pg_main)")
    fi
  done
  kill "$jmx_pid" 2>/dev/null || true; wait "$jmx_pid" 2>/dev/null || true; jmx_pid=
  if [ -n "${DEBEZIUM_BENCH_JFR:-}" ]; then
    jcmd "$(cat "$state/run/connect.pid")" JFR.stop name=bench >/dev/null
    python3 tests/bench/jfr_top.py "$DEBEZIUM_BENCH_JFR/run$r.jfr" >"$DEBEZIUM_BENCH_JFR/run$r.txt"
    echo "run $r: JFR profile in $DEBEZIUM_BENCH_JFR/run$r.jfr, summary in $DEBEZIUM_BENCH_JFR/run$r.txt"
  fi
  events=$((last - e0))
  [ "$events" -gt 0 ] || { echo "no events published after the resume" >&2; exit 1; }
  bytes=$(($(log_bytes) - b0))
  # JmxTool's CSV: a `time,"MS"` line per sample, then `object:attribute,"VALUE"`
  # lines. Averages over the samples taken while events flowed.
  read -r bavg rpr comp qmean qmin < <(awk -F, -v t2="$t_last" '
    { gsub(/"/, "") }
    $1 == "time" { t = $2; next }
    t > t2 + 2000 { next }
    # Object names hold commas: the attribute is what follows the last ":"
    # before the value.
    { v = $NF; n = split(substr($0, 1, length($0) - length($NF) - 1), a, ":"); attr = a[n] }
    attr == "batch-size-avg" && v ~ /^[0-9.]+$/ { b += v; nb++ }
    attr == "records-per-request-avg" && v ~ /^[0-9.]+$/ { rr += v; nr++ }
    attr == "compression-rate-avg" && v ~ /^[0-9.]+$/ { c += v; nc++ }
    attr == "QueueRemainingCapacity" && v ~ /^[0-9]+$/ { qs += v; nq++; if (qm == "" || v + 0 < qm) qm = v + 0 }
    END { printf "%.0f %.1f %.2f %.0f %s\n", nb ? b / nb : -1, nr ? rr / nr : -1, nc ? c / nc : -1, nq ? qs / nq : -1, qm == "" ? -1 : qm }
  ' "$work/jmx.csv")
  awk -v r="$r" -v ev="$events" -v wal="$wal" -v t0="$t0" -v tf="$t_first" -v tl="$t_last" -v hz="$hz" \
    -v c="$((c1 - c0))" -v k="$((k1 - k0))" -v g="$((g1 - g0))" -v bytes="$bytes" \
    -v bavg="$bavg" -v rpr="$rpr" -v comp="$comp" -v qmean="$qmean" -v qmin="$qmin" 'BEGIN {
      printf "%-4s %9d %8.0f %9.0f %9.0f %8.3f %8.3f %8.3f %9.0f %9s %9s %9s %8s %8s\n", r, ev, wal / 1048576,
        ev / ((tl - t0) / 1000), ev / ((tl - tf) / 1000 + 1), c / hz / ev * 1000, k / hz / ev * 1000, g / hz / ev * 1000,
        bytes / ev, bavg, rpr, comp, qmean, qmin }'
done
echo "columns: wal_MB = WAL the slot held at the resume; ev/s from the resume and from the first new event;"
echo "connect, kafka, pg = CPU seconds per 1,000 events; B/event = Kafka log bytes per event;"
echo "batchavg, rec/req, compress = the producer's batch-size-avg, records-per-request-avg, compression-rate-avg;"
echo "q_mean, q_min = Debezium's QueueRemainingCapacity over the run (0 = the queue is full: Kafka is the brake)"
