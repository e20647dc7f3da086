#!/usr/bin/env bash
# Applies the list of captured tables (db/captured-tables) to PostgreSQL.
# Used by tests/stack.sh and by the NixOS module, so both do the same thing.
#
#   capture.sh list FILE              the validated table names, one a line
#   capture.sh include-list FILE      Debezium's table.include.list for them
#   capture.sh before-connector FILE  checks, grants, and the publication on
#                                     first start (before the slot exists)
#   capture.sh after-connector FILE   adds the tables the publication lacks,
#                                     and asks the connector to backfill them
#   capture.sh snapshot FILE TABLE... asks the connector to snapshot listed
#                                     tables again (an incremental snapshot)
#
# Run `before-connector`, then update the connector's table.include.list
# and wait until its tasks run with it, then `after-connector`. The order is
# what keeps a new table's first changes: a change pgoutput sends for a table
# the running task does not include is dropped by Debezium, and the task's
# next offset commit (a heartbeat is enough) moves past it for good. Only on
# first start, when the replication slot does not exist yet, may the
# publication get its tables before the connector: the connector's snapshot
# and its slot then start at the same point, so nothing can be skipped.
#
# Backfill: a table published by `after-connector` already has rows the
# change stream will never carry. In the transaction that publishes it, an
# `execute-snapshot` signal row goes into the signal table (db/004_signal.sql)
# and the connector, reading that row from the stream, starts an incremental
# snapshot of the table: its rows in chunks, as `r` events, while streaming
# goes on. Debezium's watermarks around each chunk drop a chunk row whose key
# changed while it was read, so per key the snapshot row and the streamed
# changes arrive in Kafka in the order they happened. On first start there
# is no signal: the initial snapshot (snapshot.mode=initial) covers every
# table published before the slot exists.
#
# Tables are only ever added to the publication, never dropped: a table
# taken off the list stops being captured because the connector's include
# list no longer names it, and `after-connector` warns that it is still
# published, with the statement that removes it. Dropping it automatically
# is what `ALTER PUBLICATION ... SET TABLE` did on every `up`, and it
# silently ended the capture of any table added outside the list.
#
# PostgreSQL is reached through the usual PG* variables, as a superuser (the
# publication and the grants need one). CDC_PUBLICATION, CDC_SLOT and
# CDC_DEBEZIUM_ROLE override the names in debezium/twitter-postgres.json.
set -euo pipefail

PUBLICATION=${CDC_PUBLICATION:-twitter_cdc}
SLOT=${CDC_SLOT:-twitter_cdc}
ROLE=${CDC_DEBEZIUM_ROLE:-debezium}
# The connector's signal.data.collection, schema-qualified.
SIGNAL=${CDC_SIGNAL_TABLE:-public.cdc_signal}

die() { printf '[capture] error: %s\n' "$*" >&2; exit 1; }
warn() { printf '[capture] warning: %s\n' "$*" >&2; }
q() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

# One table a line; `#` starts a comment. Names are plain lower-case
# identifiers of schema `public`, so they need no quoting anywhere (SQL,
# the connector's regex list, topic and S3 names) and map 1:1 to topics.
read_list() {
  local file=$1 line name n=0
  local -A seen=()
  [ -r "$file" ] || die "cannot read the captured-tables list $file"
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    name=${line%%#*}
    name=${name//[[:space:]]/}
    [ -n "$name" ] || continue
    [[ $name =~ ^[a-z_][a-z0-9_]{0,62}$ ]] \
      || die "$file line $n: '$name' is not a table name of schema public (lower-case letters, digits and _, as PostgreSQL folds unquoted names)"
    [ -z "${seen[$name]:-}" ] || die "$file line $n: '$name' is listed twice"
    seen[$name]=1
    echo "$name"
  done <"$file"
  [ ${#seen[@]} -gt 0 ] || die "$file lists no table"
}

load() {
  mapfile -t TABLES < <(read_list "$1")
  # read_list ran in a subshell: an error there left TABLES empty.
  [ ${#TABLES[@]} -gt 0 ] || exit 1
  local t
  SQL_ARRAY=ARRAY[$(printf "'%s'," "${TABLES[@]}" | sed 's/,$//')]::text[]
  QUALIFIED=$(for t in "${TABLES[@]}"; do printf 'public.%s, ' "$t"; done | sed 's/, $//')
}

publication_exists() {
  [ "$(q -c "SELECT count(*) FROM pg_publication WHERE pubname = '$PUBLICATION'")" = 1 ]
}

# Listed tables the publication does not have yet, comma-separated.
unpublished() {
  q -c "SELECT string_agg('public.' || t, ', ' ORDER BY o) FROM unnest($SQL_ARRAY) WITH ORDINALITY AS l(t, o)
        WHERE NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                          WHERE p.pubname = '$PUBLICATION' AND p.schemaname = 'public' AND p.tablename = l.t)"
}

# The statement that asks the connector for an incremental snapshot of the
# tables named (comma-separated, schema-qualified).
snapshot_signal() {
  local names=${1//[[:space:]]/}
  printf "INSERT INTO %s (id, type, data) SELECT gen_random_uuid()::text, 'execute-snapshot',
            json_build_object('data-collections', string_to_array('%s', ','), 'type', 'incremental')::text;" \
    "$SIGNAL" "$names"
}

# Publishes the listed tables the publication lacks. With `backfill`, the
# same transaction signals the connector to snapshot them (see above).
add_unpublished() {
  local missing sql
  missing=$(unpublished)
  [ -n "$missing" ] || return 0
  printf '[capture] adding to publication %s: %s\n' "$PUBLICATION" "$missing" >&2
  sql="ALTER PUBLICATION $PUBLICATION ADD TABLE $missing;"
  if [ "${1:-}" = backfill ]; then
    printf '[capture] backfilling their rows: incremental snapshot signalled in %s\n' "$SIGNAL" >&2
    sql="$sql $(snapshot_signal "$missing")"
  fi
  q -1 -c "$sql"
}

# The signal table is always published: signals reach the connector
# through the change stream. The connector drops its events before Kafka.
publish_signal_table() {
  local schema=${SIGNAL%%.*} table=${SIGNAL#*.}
  [ "$(q -c "SELECT count(*) FROM pg_tables WHERE schemaname = '$schema' AND tablename = '$table'")" = 1 ] \
    || die "the signal table $SIGNAL does not exist: apply db/004_signal.sql first"
  if [ "$(q -c "SELECT count(*) FROM pg_publication_tables WHERE pubname = '$PUBLICATION' AND schemaname = '$schema' AND tablename = '$table'")" = 0 ]; then
    q -c "ALTER PUBLICATION $PUBLICATION ADD TABLE $SIGNAL"
  fi
}

cmd_before_connector() {
  local file=$1 bad
  load "$file"
  bad=$(q -c "SELECT string_agg(t, ', ') FROM unnest($SQL_ARRAY) t
              WHERE NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = 'public' AND c.relname = t AND c.relkind IN ('r', 'p'))")
  [ -z "$bad" ] || die "$file lists $bad, not a table of schema public in database $(q -c 'SELECT current_database()'): create it first (its DDL and grants in a db/*.sql file), then list it"
  # A published table without a replica identity makes PostgreSQL refuse
  # every UPDATE and DELETE on it: refuse to publish it instead.
  bad=$(q -c "SELECT string_agg(c.relname, ', ') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relname = ANY($SQL_ARRAY)
                AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS
                     (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))")
  [ -z "$bad" ] || die "$file lists $bad without a replica identity: once published, its UPDATEs and DELETEs would fail. Give it a primary key or ALTER TABLE ... REPLICA IDENTITY FULL"
  # SELECT is what the connector's snapshots need; streaming needs only
  # REPLICATION. Granted per listed table, not by default privileges, so
  # the role never reads a table nobody chose to capture.
  q -c "GRANT SELECT ON $QUALIFIED TO $ROLE"
  if ! publication_exists; then
    q -c "CREATE PUBLICATION $PUBLICATION"
  fi
  publish_signal_table
  if [ "$(q -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$SLOT'")" = 0 ]; then
    add_unpublished
  fi
}

cmd_after_connector() {
  local file=$1 extra
  load "$file"
  publication_exists || die "publication $PUBLICATION does not exist: run '$0 before-connector $file' first"
  add_unpublished backfill
  extra=$(q -c "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ' ORDER BY tablename)
                FROM pg_publication_tables WHERE pubname = '$PUBLICATION'
                  AND NOT (schemaname = 'public' AND tablename = ANY($SQL_ARRAY))
                  AND format('%s.%s', schemaname, tablename) <> '$SIGNAL'")
  if [ -n "$extra" ]; then
    warn "publication $PUBLICATION also has $extra, not in $file: the connector does not capture them, but PostgreSQL still decodes their changes for its slot. If the list is right, stop that with: ALTER PUBLICATION $PUBLICATION DROP TABLE $extra;"
  fi
}

# Asks the connector to snapshot listed, published tables again: their
# rows arrive as `r` events after what the lake has, and the current-state
# tables converge on them. Rows deleted while a table was not streamed are
# not removed by this (a snapshot reads only the rows that exist).
cmd_snapshot() {
  local file=$1 t l list=""
  shift
  load "$file"
  local listed
  for t in "$@"; do
    [[ $t =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "'$t' is not a table name of schema public"
    listed=
    for l in "${TABLES[@]}"; do [ "$l" = "$t" ] && listed=1; done
    [ -n "$listed" ] || die "$t is not in $file: only captured tables can be snapshotted"
    [ "$(q -c "SELECT count(*) FROM pg_publication_tables WHERE pubname = '$PUBLICATION' AND schemaname = 'public' AND tablename = '$t'")" = 1 ] \
      || die "$t is not in publication $PUBLICATION yet: run '$0 after-connector $file' first"
    list="$list${list:+, }public.$t"
  done
  [ -n "$list" ] || die "name at least one table to snapshot"
  q -c "$(snapshot_signal "$list")"
  printf '[capture] incremental snapshot signalled for %s\n' "$list" >&2
}

usage() { echo "usage: $0 {list|include-list|before-connector|after-connector} FILE | $0 snapshot FILE TABLE..." >&2; exit 2; }
[ $# -ge 2 ] || usage
[ "$1" = snapshot ] || [ $# = 2 ] || usage
case $1 in
  list) read_list "$2" ;;
  include-list) load "$2"; printf 'public.%s\n' "${TABLES[@]}" | paste -sd, - ;;
  before-connector) cmd_before_connector "$2" ;;
  after-connector) cmd_after_connector "$2" ;;
  snapshot) shift; cmd_snapshot "$@" ;;
  *) usage ;;
esac
