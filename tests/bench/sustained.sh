#!/usr/bin/env bash
# Benchmark: the whole pipeline at once, sustained. tweetgen in load mode
# (binary COPY, as fast as PostgreSQL takes it, or --rate) writes into
# PostgreSQL while Debezium, Kafka and a cdc-sink of its own (fresh group
# starting at the topics' current end, fresh prefix) run on the same machine.
#
#   tests/bench/sustained.sh [SECONDS] [RATE]   (defaults: 300, 0 = flat out)
#
# Every 10 s it samples the rows PostgreSQL has taken (pg_stat_user_tables:
# inserts, updates, deletes of the four tables, cascades and trigger updates
# included), the events Debezium has published (the twitter.* topics' high
# watermarks) and the events the sink has committed to the lake (its group's
# committed offsets, which it moves only after the Delta commit), and prints
# each stage's rate and the sink's lag. At the end: the rate of each stage
# over the run, whether the lag grew, and the CPU seconds each process used,
# which shows where the machine's two cores went. After the generator stops
# it waits for the sink to catch up and reports how long that took. Each
# sample also reads the replication slot (`wal_status`, and the WAL it
# retains), and the end gives the retained WAL's least-squares slope: flat
# means Debezium keeps up. Last, it brings the run's current-state tables up
# to their changelogs and checks every row the run created against
# PostgreSQL (count and a hash of every column, tests/bench/touched_equal.py;
# it exits non-zero if they differ), and drops the run's lake unless
# SUSTAINED_KEEP=1. SUSTAINED_SINK_BIN runs another build of the sink (an
# older commit, in the same sitting).
#
# Flat out, PostgreSQL takes several times what Debezium publishes: the
# replication slot's WAL grows until `max_slot_wal_keep_size` (2 GB here)
# invalidates the slot and the connector stops (it refuses to skip the
# lost changes). Pass a RATE Debezium keeps up with for a sustained run.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-300}
rate=${2:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake/target}
# Benchmarks measure the release build (tests/stack.sh pipeline runs the
# quicker unoptimised one): the first time, this compiles for a while.
echo "building the release binaries (cargo build --release; about 14 minutes the first time on 2 cores)"
cargo build --release --locked -q
eval "$(bash tests/stack.sh env)"
export PGPASSWORD=$TWEETGEN_DATABASE__PASSWORD PGUSER=tweetgen
export TWEETGEN_METRICS__LISTEN=
state=$(bash tests/stack.sh env | sed -n 's/.*CDC_LAKE_STATE=\([^ ]*\).*/\1/p')
state=${state:-${CDC_LAKE_STATE:-/var/lib/cdc-lake-stack}}
topics=(twitter.users twitter.tweets twitter.likes twitter.follows)

pg_rows() {
  psql -X -At -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables \
    WHERE relname IN ('users', 'tweets', 'likes', 'follows')"
}
published() { # sum of the twitter.* topics' high watermarks
  for t in "${topics[@]}"; do for p in 0 1 2; do
    kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q -t "$t:$p:-1" 2>/dev/null | awk '{print $NF}'
  done; done | awk '{s += $1} END {print s + 0}'
}
committed() {
  for t in "${topics[@]}"; do
    "$CARGO_TARGET_DIR/release/committed" "$CDC_SINK_KAFKA__BROKERS" "$run" "$t" 2>/dev/null || echo 0
  done | awk '{s += $1} END {print s + 0}'
}
ticks() { # utime + stime of the given pids and of their exited children, in clock ticks
  for pid in "$@"; do awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0; done | awk '{s += $1} END {print s + 0}'
}
tree() { # a pid and its live children
  echo "$1"; pgrep -P "$1" || true
}
pids_of() { # a stack service's main pid and its children
  local main
  main=$(cat "$state/run/$1.pid" 2>/dev/null) || return 0
  echo "$main"; pgrep -P "$main" || true
}

run=sustained-$(date +%s)
# The group starts at the current end: only this run's events count.
for t in "${topics[@]}"; do
  "$CARGO_TARGET_DIR/release/committed" --to-end "$CDC_SINK_KAFKA__BROKERS" "$run" "$t" >/dev/null
done
export CDC_SINK_KAFKA__GROUP_ID=$run CDC_SINK_OUTPUT__PREFIX=$run CDC_SINK_METRICS__LISTEN=
"${SUSTAINED_SINK_BIN:-$CARGO_TARGET_DIR/release/cdc-sink}" >"/tmp/$run.sink.log" 2>&1 &
sink=$!
sleep 5
pg0=$(pg_rows); pub0=$(published); com0=$(committed)
# PostgreSQL's backends come and go: the postmaster's tree, sampled at
# the end too (an exited backend's time is in the postmaster's cutime).
pg_main=$(cat "$state/run/postgres.pid" 2>/dev/null || head -1 "$state/postgres/postmaster.pid")
pg_pids=$(tree "$pg_main" | tr '\n' ' ')
connect_pids=$(pids_of connect | tr '\n' ' ')
kafka_pids=$(pids_of kafka | tr '\n' ' ')
minio_pids=$(pids_of minio | tr '\n' ' ')
/usr/bin/time -f '%U %S' -o "/tmp/$run.gen.time" \
  "$CARGO_TARGET_DIR/release/tweetgen" --rate "$rate" --load-method copy --duration "${secs}s" \
  >"/tmp/$run.gen.log" 2>&1 &
gen=$!
declare -A cpu0
# shellcheck disable=SC2086
{
  cpu0[sink]=$(ticks $sink); cpu0[pg]=$(ticks $pg_pids); cpu0[connect]=$(ticks $connect_pids)
  cpu0[kafka]=$(ticks $kafka_pids); cpu0[minio]=$(ticks $minio_pids)
}
start=$(date +%s)
slot() { # wal_status and retained MB of the connector's slot
  psql -X -At -F ' ' -c "SELECT wal_status, round((pg_current_wal_lsn() - restart_lsn) / 1e6) \
    FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name LIMIT 1"
}
printf '%6s %12s %12s %12s %10s %12s %12s\n' t pg_rows/s kafka_ev/s lake_ev/s lag wal_status retained_MB
prev_pg=$pg0; prev_pub=$pub0; prev_com=$com0; lags=(); slot_samples=()
while kill -0 $gen 2>/dev/null; do
  sleep 10
  pg=$(pg_rows); pub=$(published); com=$(committed)
  lag=$((pub - com)); lags+=("$lag")
  read -r wal_status retained < <(slot || echo "none 0")
  t=$(( $(date +%s) - start ))
  slot_samples+=("$t $retained $wal_status")
  printf '%6d %12d %12d %12d %10d %12s %12s\n' "$t" $(( (pg - prev_pg) / 10 )) \
    $(( (pub - prev_pub) / 10 )) $(( (com - prev_com) / 10 )) "$lag" "$wal_status" "$retained"
  prev_pg=$pg; prev_pub=$pub; prev_com=$com
  kill -0 $sink 2>/dev/null || { echo "sink died:"; tail -20 "/tmp/$run.sink.log"; exit 1; }
done
wait $gen || true
elapsed=$(( $(date +%s) - start ))
pg1=$(pg_rows); pub1=$(published); com1=$(committed)
hz=$(getconf CLK_TCK)
# shellcheck disable=SC2086 # pid lists split on purpose
cpu() { local k=$1; shift; echo "scale=1; ($(ticks "$@") - ${cpu0[$k]}) / $hz" | bc; }
# shellcheck disable=SC2086
{
  c_sink=$(cpu sink $sink); c_pg=$(cpu pg $(tree "$pg_main")); c_connect=$(cpu connect $connect_pids)
  c_kafka=$(cpu kafka $kafka_pids); c_minio=$(cpu minio $minio_pids)
}
c_gen=$(awk '{print $1 + $2}' "/tmp/$run.gen.time")
# Catch up: Debezium first, then the sink.
caught=$(date +%s.%N)
last=-1
while :; do
  pub=$(published); com=$(committed)
  [ "$pub" -eq "$last" ] && [ "$com" -ge "$pub" ] && break
  last=$pub; sleep 2
done
tail_s=$(echo "$(date +%s.%N) - $caught" | bc)
kill -TERM $sink; wait $sink || true
# The current-state tables up to their changelogs (the sink syncs them
# behind its commits), then every row the run created checked against
# PostgreSQL: count and an order-independent hash of every column
# (tests/bench/touched_equal.py).
mirror_start=$(date +%s.%N)
"${SUSTAINED_SINK_BIN:-$CARGO_TARGET_DIR/release/cdc-sink}" mirror >"/tmp/$run.mirror.log" 2>&1 \
  || { echo "cdc-sink mirror failed:"; tail -20 "/tmp/$run.mirror.log"; exit 1; }
mirror_s=$(echo "$(date +%s.%N) - $mirror_start" | bc)
equal=0
"$(bash tests/readers.sh)" tests/bench/touched_equal.py --prefix "$run" >"/tmp/$run.equal.log" 2>&1 || equal=$?
half=$(( ${#lags[@]} / 2 ))
max_first=0; max_second=0
for i in "${!lags[@]}"; do
  l=${lags[$i]}
  if [ "$i" -lt "$half" ]; then [ "$l" -gt "$max_first" ] && max_first=$l; else [ "$l" -gt "$max_second" ] && max_second=$l; fi
done
echo
printf 'over %ds: PostgreSQL took %d rows/s; Debezium published %d events/s; the sink committed %d events/s\n' \
  "$elapsed" $(( (pg1 - pg0) / elapsed )) $(( (pub1 - pub0) / elapsed )) $(( (com1 - com0) / elapsed ))
printf 'sink lag: max %d events in the first half, %d in the second; all committed %.1fs after the generator stopped\n' \
  "$max_first" "$max_second" "$tail_s"
printf 'CPU seconds over the run (2 cores = %ds): tweetgen %s, PostgreSQL %s, Connect/Debezium %s, Kafka %s, MinIO %s, cdc-sink %s\n' \
  $((2 * elapsed)) "$c_gen" "$c_pg" "$c_connect" "$c_kafka" "$c_minio" "$c_sink"
printf '%s\n' "${slot_samples[@]}" | awk '
  { n++; x += $1; y += $2; xy += $1 * $2; xx += $1 * $1; if ($3 != "reserved") bad++ }
  END {
    slope = (n > 1) ? (n * xy - x * y) / (n * xx - x * x) : 0
    printf "the slot: wal_status reserved in %d of %d samples; retained WAL mean %.0f MB, slope %.2f MB/s\n", n - bad, n, y / n, slope
  }'
printf 'current-state tables caught up %.1fs after the sink stopped; the rows the run created against PostgreSQL:\n' "$mirror_s"
sed 's/^/  /' "/tmp/$run.equal.log"
if [ "$equal" -ne 0 ]; then
  echo "THE LAKE DIFFERS FROM POSTGRESQL (above; the sink's log: /tmp/$run.sink.log; the lake kept under $run/)"
  exit 1
fi
# One to two GB a run: dropped once checked, unless SUSTAINED_KEEP=1.
if [ "${SUSTAINED_KEEP:-0}" != 1 ]; then
  "$(bash tests/readers.sh)" tests/bench/drop_prefix.py "$run"
fi
