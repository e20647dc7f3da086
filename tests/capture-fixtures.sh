#!/usr/bin/env bash
# Captures real Debezium change events from the running local stack into
# crates/cdc-sink/tests/fixtures/, for the sink's decode unit tests.
#
#   type_zoo.jsonl  every column type the lake carries, inserts, updates,
#                   a delete and its tombstone, then an added column
#   twitter.jsonl   events of the demo tables, including an unchanged-TOAST
#                   placeholder and REPLICA IDENTITY FULL deletes
#
# `tests/capture-fixtures.sh exact` captures only
#   exact_zoo.jsonl the values Debezium's own converters lose, through the
#                   project's converter (debezium/converter): numeric NaN
#                   and ±Infinity in scalars, arrays and a domain, p > 38,
#                   bit strings, timetz, money, an enum, a range, and NULL
#                   in a NOT NULL column's delete; snapshot and streaming
#
# `tests/capture-fixtures.sh avro` captures only
#   twitter_avro.jsonl  the newest 1,000 events of the stack's own
#                   twitter.tweets topic as the stack writes them (Avro
#                   values, framed or with the earlier schema-id headers),
#                   for the decode benchmark: first a line per schema they
#                   name ({"fingerprint", "schema"}), then a line per event
#                   ({"fingerprint", "avro": the Avro body in base64},
#                   framed again by the bench). Fill the topic first
#                   (tweetgen's load mode, or tests/bench/drain.sh).
#
# Each line is one Kafka message value in Connect's JSON with schemas (the
# connector's schema-id format is switched off here: the decode tests derive
# schema-id messages from these); an empty line is a tombstone. The
# capture uses its own database, publication, slot and connector, removed
# afterwards. Run `tests/stack.sh up` first.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash tests/stack.sh env)"
out=crates/cdc-sink/tests/fixtures
mkdir -p "$out"
su() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h "$STACK_PG_SUPERUSER_SOCKET" -p "$PGPORT" -U postgres "$@"; }

# A fresh topic prefix per capture: topics of earlier captures stay behind.
prefix=fixtures$(date +%s)

# Each capture has its own database DB, publication DB_pub, slot DB_slot
# and connector DB-postgres (the project's connector JSON, renamed).
fresh_db() { # fresh_db DB: drop what an earlier capture left, create DB
  curl -s -X DELETE "$STACK_CONNECT_URL/connectors/$1-postgres" >/dev/null || true
  sleep 3
  su -d postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" \
    -c "SELECT pg_drop_replication_slot('$1_slot') FROM pg_replication_slots WHERE slot_name = '$1_slot'" \
    -c "CREATE DATABASE $1" >/dev/null
}
register() { # register DB TABLE SNAPSHOT_MODE
  local body
  body=$(jq --arg prefix "$prefix" --arg db "$1" --arg table "$2" --arg mode "$3" '. + {
    "database.dbname": $db, "topic.prefix": $prefix,
    "table.include.list": ("public." + $table), "publication.name": ($db + "_pub"),
    "slot.name": ($db + "_slot"), "snapshot.mode": $mode,
    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
    "value.converter.schemas.enable": "true"}' debezium/twitter-postgres.json)
  curl -fsS -X PUT -H 'Content-Type: application/json' --data "$body" \
    "$STACK_CONNECT_URL/connectors/$1-postgres/config" >/dev/null
}
remove() { # remove DB: the connector and its slot (the database stays, to look at)
  curl -fsS -X DELETE "$STACK_CONNECT_URL/connectors/$1-postgres" >/dev/null
  sleep 2
  su -d postgres -c "SELECT pg_drop_replication_slot('$1_slot') FROM pg_replication_slots WHERE slot_name = '$1_slot'" >/dev/null
}

if [ "${1:-}" = avro ]; then
  topic=twitter.tweets
  # %S the value's length, %h its headers, then the value's bytes as they
  # are: Avro is binary, so it is cut by length, never by line.
  for p in 0 1 2; do
    end=$(kcat -b "$CDC_SINK_KAFKA__BROKERS" -Q -t "$topic:$p:-1" | awk '{print $NF}')
    from=$(( end > 334 ? end - 334 : 0 ))
    kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$topic" -p "$p" -o "$from" -e -q -f '%S\n%h\n%s'
  done >/tmp/capture-avro.bin
  kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t _cdclake.schemas -o beginning -e -q -f '%k\t%s\n' \
    >/tmp/capture-schemas.tsv
  python3 - "$out/twitter_avro.jsonl" <<'PY'
import base64, json, re, sys
data = open("/tmp/capture-avro.bin", "rb").read()
events, pos = [], 0
while pos < len(data):
    nl = data.index(b"\n", pos)
    size = int(data[pos:nl])
    hl = data.index(b"\n", nl + 1)
    headers = data[nl + 1:hl].decode()
    value = data[hl + 1:hl + 1 + size]
    pos = hl + 1 + max(size, 0)  # a null value's length is -1
    if size <= 0:
        continue  # a tombstone
    if value[:2] == b"\xcd\x01":
        # A framed value (cdc_wire::Frame): flags, fingerprint, Avro body.
        events.append((value[3:35].decode(), value[35:]))
    elif "cdclake.encoding=avro" in headers:
        # The converter's earlier, unframed Avro values.
        fingerprint = re.search(r"cdclake\.schema=([^,]+)", headers).group(1)
        events.append((fingerprint, value))
schemas = dict(line.rstrip("\n").split("\t", 1) for line in open("/tmp/capture-schemas.tsv") if "\t" in line)
with open(sys.argv[1], "w") as out:
    for fp in sorted({fp for fp, _ in events}):
        out.write(json.dumps({"fingerprint": fp, "schema": schemas[fp]}) + "\n")
    for fp, value in events:
        out.write(json.dumps({"fingerprint": fp, "avro": base64.b64encode(value).decode()}) + "\n")
print(f"captured: {len(events)} Avro events of twitter.tweets")
PY
  exit 0
fi

if [ "${1:-}" = exact ]; then
  fresh_db exact
  su -d exact <<'SQL'
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN price AS numeric(12,2);
CREATE TABLE exact_zoo (
    id      bigint PRIMARY KEY,
    n       numeric(10,3),
    n_req   numeric(10,3) NOT NULL,
    free    numeric,
    wide    numeric(40,5),
    nums    numeric[],
    amounts numeric(6,2)[],
    vb      bit varying(16),
    b4      bit(4),
    b1      bit(1),
    tz      timetz,
    cash    money,
    feeling mood,
    cost    price,
    span    int4range
);
INSERT INTO exact_zoo VALUES
  (1, 'NaN', 1.5, 'Infinity', 'NaN', '{1.5,12345678901234567890.123456789,NaN,-Infinity,NULL}', '{1.25,NaN}',
   B'00001011', B'0101', B'1', '12:34:56.789+05:30', 12.34, 'happy', 'NaN', '[1,5)');
GRANT CONNECT ON DATABASE exact TO debezium;
GRANT SELECT ON exact_zoo TO debezium;
CREATE PUBLICATION exact_pub FOR TABLE exact_zoo;
SQL
  register exact exact_zoo initial
  topic="$prefix.public.exact_zoo"
  # The snapshot's one row is in Kafka once streaming can start.
  for _ in $(seq 90); do
    [ "$(kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$topic" -o beginning -e -q 2>/dev/null | wc -l)" -ge 1 ] && break
    sleep 1
  done
  sleep 3
  su -d exact <<'SQL'
INSERT INTO exact_zoo VALUES
  (2, 1.5, -2.125, '-Infinity', 12345678901234567890123456789012345.12345, '{}', '{1.25,NULL}',
   B'1011', B'0000', B'0', '23:59:59.999999-08', -5.5, 'ok', 3.5, 'empty');
UPDATE exact_zoo SET n = 2.5, amounts = '{3.50,NaN,NULL}', vb = B'0010', tz = '01:02:03-03:30' WHERE id = 1;
DELETE FROM exact_zoo WHERE id = 2;
SQL
  for _ in $(seq 60); do
    [ "$(kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$topic" -o beginning -e -q -f '%s\n' 2>/dev/null | wc -l)" -ge 5 ] && break
    sleep 1
  done
  kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$topic" -o beginning -e -q -f '%s\n' >"$out/exact_zoo.jsonl"
  remove exact
  echo "captured: $(wc -l <"$out/exact_zoo.jsonl") exact_zoo events"
  exit 0
fi
fresh_db fixtures
su -d fixtures <<'SQL'
CREATE TABLE type_zoo (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    small        smallint,
    medium       integer,
    real_num     real,
    double_num   double precision,
    flag         boolean,
    label        varchar(40),
    note         text,
    price        numeric(10,3),
    free_numeric numeric,
    day          date,
    at_time      time,
    local_ts     timestamp,
    zoned_ts     timestamptz,
    blob         bytea,
    tags         text[],
    scores       integer[],
    doc          jsonb,
    uid          uuid,
    -- values a lake must keep that plain JSON cannot spell
    special_real   real,
    special_double double precision,
    edge_ts      timestamptz,
    edge_local   timestamp,
    span         interval,
    addr         inet,
    plain_json   json,
    uids         uuid[],
    amounts      numeric(6,2)[],
    flags        boolean[],
    days         date[],
    moments      timestamptz[],
    blobs        bytea[],
    spot         point
);
GRANT CONNECT ON DATABASE fixtures TO debezium;
GRANT SELECT ON type_zoo TO debezium;
CREATE PUBLICATION fixtures_pub FOR TABLE type_zoo;
SQL

register fixtures type_zoo no_data
for _ in $(seq 60); do
  state=$(curl -fsS "$STACK_CONNECT_URL/connectors/fixtures-postgres/status" 2>/dev/null | jq -r '[.tasks[].state] | join(",")' || true)
  [ "$state" = RUNNING ] && break
  sleep 1
done
sleep 3

su -d fixtures <<'SQL'
INSERT INTO type_zoo (small, medium, real_num, double_num, flag, label, note, price, free_numeric,
                      day, at_time, local_ts, zoned_ts, blob, tags, scores, doc, uid)
VALUES (-7, 123456, 1.5, -2.25e10, true, 'héllo', 'multi
line', 12345.678, 3.14159265358979, '2024-02-29', '13:14:15.123456', '2024-02-29 13:14:15.654321',
        '2024-02-29 13:14:15.654321+02', '\xdeadbeef', '{"a","b,c","日本"}', '{1,2,3}',
        '{"k": [1, {"x": null}]}', '6f1c2a8e-2b1d-4f6e-9a51-0c7d3e5b9f10'),
       (NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0.001, -42, NULL, NULL, NULL, NULL, NULL, '{}', NULL, NULL, NULL);
UPDATE type_zoo SET price = 99999.999, flag = false WHERE id = 1;
UPDATE type_zoo SET special_real = 'NaN', special_double = 'Infinity', edge_ts = 'infinity',
       edge_local = '-infinity', span = '1 year 2 months 3 days 04:05:06.789', addr = '192.168.10.0/24',
       plain_json = '{"a": 1}', uids = '{6f1c2a8e-2b1d-4f6e-9a51-0c7d3e5b9f10}', amounts = '{1.25,-3.50,NULL}',
       flags = '{true,false}', days = '{2024-02-29}', moments = '{"2024-02-29 13:14:15+00"}',
       blobs = '{"\\x00ff"}', spot = '(1.5,-2.5)' WHERE id = 1;
UPDATE type_zoo SET special_real = '-Infinity', special_double = 'NaN', edge_ts = '-infinity',
       span = '-2 days 00:00:01' WHERE id = 1;
DELETE FROM type_zoo WHERE id = 2;
ALTER TABLE type_zoo ADD COLUMN added_later text DEFAULT 'new';
INSERT INTO type_zoo (small, label) VALUES (1, 'after the schema change');
SQL
sleep 5
kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$prefix.public.type_zoo" -o beginning -e -q -f '%s\n' >"$out/type_zoo.jsonl"

# Demo tables: a user with a TOASTed bio, an update that leaves the bio
# alone (placeholder), a tweet and its delete under REPLICA IDENTITY FULL.
psql -X -q -v ON_ERROR_STOP=1 "host=$PGHOST port=$PGPORT dbname=twitter user=tweetgen password=$TWEETGEN_DATABASE__PASSWORD" <<'SQL'
INSERT INTO users (username, display_name, bio, reputation)
VALUES ('fixture_user', 'Fixture User', repeat('A long bio that is stored out of line. ', 120), 87.25)
ON CONFLICT (username) DO UPDATE SET bio = EXCLUDED.bio;
UPDATE users SET followers_count = followers_count + 1 WHERE username = 'fixture_user';
INSERT INTO tweets (user_id, body, lang, hashtags, latitude, longitude)
SELECT id, 'fixture tweet #cdc', 'en', '{cdc}', 52.520008, 13.404954 FROM users WHERE username = 'fixture_user';
DELETE FROM tweets WHERE body = 'fixture tweet #cdc';
SQL
sleep 5
: >"$out/twitter.jsonl"
for t in twitter.users twitter.tweets; do
  kcat -b "$CDC_SINK_KAFKA__BROKERS" -C -t "$t" -o beginning -e -q -f '%s\n' \
    | grep -e fixture_user -e 'fixture tweet' -e '^$' | grep -v '^$' >>"$out/twitter.jsonl" || true
done

remove fixtures
echo "captured: $(wc -l <"$out/type_zoo.jsonl") type_zoo events, $(wc -l <"$out/twitter.jsonl") twitter events"
