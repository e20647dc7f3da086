#!/usr/bin/env bash
# Benchmark: the backfill of a newly captured table, on the local stack.
# Creates table `backfill_bench` with ROWS rows (tweets-shaped: a bigint key,
# a user id, a 100-character body, a timestamp), captures it the way a user
# does (`tests/stack.sh capture` with a copy of the list that names it),
# and times until its topic holds ROWS events: Debezium's incremental
# snapshot, signalled by db/capture.sh, read in chunks while streaming goes
# on. The sink is not part of it (it drains several times faster).
#
#   tests/bench/backfill.sh [ROWS]                    (default 1000000)
#   BACKFILL_CHUNK=1024 tests/bench/backfill.sh       (one run with another
#                         incremental.snapshot.chunk.size, put back after)
#
# Prints: rows, seconds from the capture command and from the first event,
# rows/s from the first event, and Connect's and PostgreSQL's CPU seconds
# per 1,000 rows. Everything it creates (table, topic) is removed after.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1000000}
eval "$(bash tests/stack.sh env)"
state=$STACK_STATE
connector=twitter-postgres
url=$STACK_CONNECT_URL/connectors/$connector
topic_prefix=$(jq -r '."topic.prefix"' debezium/$connector.json)
table=backfill_bench
topic=$topic_prefix.$table
hz=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/backfill-bench.XXXXXX)
list=$work/captured-tables

now_ms() { date +%s%3N; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -At -v ON_ERROR_STOP=1 -h "$STACK_PG_SUPERUSER_SOCKET" -p "$PG_PORT" -U postgres -d twitter -c "$1"; }
published() { # events in the table's topic, 0 while it does not exist
  local args=() p
  for p in $(kcat -b "$CDC_SINK_KAFKA__BROKERS" -L -t "$topic" -J 2>/dev/null | jq -r '.topics[0].partitions[]?.partition'); do
    args+=(-t "$topic:$p:-1")
  done
  [ ${#args[@]} -gt 0 ] || { echo 0; return; }
  kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q "${args[@]}" 2>/dev/null | awk '{s += $NF} END {printf "%.0f\n", s}'
}
ticks() { # utime + stime of a process tree (the main pid and its live children), in clock ticks
  local main=$1
  { echo "$main"; pgrep -P "$main" || true; } | while read -r pid; do
    awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0
  done | awk '{s += $1} END {printf "%.0f\n", s}'
}
delete_topic() {
  java -cp "$STACK_KAFKA_HOME/libs/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$CDC_SINK_KAFKA__BROKERS" --delete --if-exists --topic "$topic" >/dev/null 2>&1 || true
}
original=$(curl -fsS "$url/config")
clean_up() {
  sql "DO \$\$ BEGIN
         IF EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'twitter_cdc' AND tablename = '$table')
         THEN ALTER PUBLICATION twitter_cdc DROP TABLE public.$table; END IF;
       END \$\$; DROP TABLE IF EXISTS public.$table" || true
  # The repository's list again (and its configuration, if the chunk changed).
  if [ -n "${BACKFILL_CHUNK:-}" ]; then
    curl -fsS -X PUT -H 'Content-Type: application/json' --data "$original" "$url/config" >/dev/null || true
  fi
  bash tests/stack.sh capture >/dev/null 2>&1 || echo "re-applying db/captured-tables failed: run tests/stack.sh capture" >&2
  delete_topic
  rm -rf "$work"
}
trap clean_up EXIT

# A leftover of an interrupted run goes first.
clean_up; mkdir -p "$work"
if [ -n "${BACKFILL_CHUNK:-}" ]; then
  jq --arg c "$BACKFILL_CHUNK" '. + {"incremental.snapshot.chunk.size": $c}' <<<"$original" >"$work/config.json"
  curl -fsS -X PUT -H 'Content-Type: application/json' --data @"$work/config.json" "$url/config" >/dev/null
fi
echo "creating $table with $rows rows"
sql "CREATE TABLE public.$table (id bigint PRIMARY KEY, user_id bigint NOT NULL, body text NOT NULL, created_at timestamptz NOT NULL);
     INSERT INTO public.$table SELECT g, g % 50000, rpad('tweet ' || g || ' ', 100, 'lorem ipsum '), now() - g * interval '1 second'
       FROM generate_series(1, $rows) g"
sql "VACUUM ANALYZE public.$table"
{ sed -e 's/#.*//' -e '/^[[:space:]]*$/d' db/captured-tables; echo "$table"; } >"$list"
chunk=$(curl -fsS "$url/config" | jq -r '."incremental.snapshot.chunk.size" // "1024 (default)"')

c0=$(ticks "$(cat "$state/run/connect.pid")"); g0=$(ticks "$(head -1 "$state/postgres/postmaster.pid")")
t0=$(now_ms)
CDC_LAKE_CAPTURED_TABLES_FILE=$list bash tests/stack.sh capture 2>"$work/capture.log" \
  || { cat "$work/capture.log" >&2; exit 1; }
t_cap=$(now_ms)
t_first=
while :; do
  n=$(published)
  [ -n "$t_first" ] || [ "$n" = 0 ] || t_first=$(now_ms)
  [ "$n" -lt "$rows" ] || break
  (($(now_ms) - t0 < 1800000)) || { echo "only $n of $rows events after 30 min" >&2; exit 1; }
  sleep 0.5
done
t1=$(now_ms)
c1=$(ticks "$(cat "$state/run/connect.pid")"); g1=$(ticks "$(head -1 "$state/postgres/postmaster.pid")")
awk -v rows="$rows" -v n="$n" -v t0="$t0" -v tc="$t_cap" -v tf="$t_first" -v t1="$t1" \
    -v c="$((c1 - c0))" -v g="$((g1 - g0))" -v hz="$hz" -v chunk="$chunk" 'BEGIN {
  printf "chunk size %s: %d rows (%d events), capture command %.1f s, %.1f s from the capture, %.1f s from the first event: %.0f rows/s; CPU s per 1,000 rows: connect %.3f, postgres %.3f\n",
    chunk, rows, n, (tc - t0) / 1000, (t1 - t0) / 1000, (t1 - tf) / 1000, rows / ((t1 - tf) / 1000),
    c / hz / rows * 1000, g / hz / rows * 1000 }'
