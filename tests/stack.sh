#!/usr/bin/env bash
# The local stack: PostgreSQL 15, Kafka 4.1 (KRaft, one combined node), Kafka
# Connect with the Debezium PostgreSQL connector, and MinIO, each a plain
# process on 127.0.0.1. No Docker, no mocks: the tests talk to these servers.
#
#   tests/stack.sh install   fetch everything into the cache (idempotent)
#   tests/stack.sh up        install, start what is not running, wait until ready
#   tests/stack.sh down      stop exactly what `up` started, by pid
#   tests/stack.sh status    one line per component
#   tests/stack.sh env       print the variables the tests and services read,
#                            and this script's own, so a later call in the
#                            same shell (`capture`, say) finds the same stack
#   tests/stack.sh capture   apply db/captured-tables to the running stack:
#                            publication, grants and the connector's tables
#   tests/stack.sh snapshot TABLE...  re-snapshot captured tables while
#                            streaming goes on (an incremental snapshot)
#   tests/stack.sh pipeline  `up`, then build and start tweetgen, cdc-sink and
#                            cdc-slot-guard (recovers a lost replication slot)
#   tests/stack.sh stop-pipeline  stop those three, leave the servers up
#
# Supervision is hand-written (pid files and readiness probes) rather than
# process-compose: four processes with strict start order and real readiness
# checks are a hundred lines of bash, and it saves building another Go tool.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

KAFKA_VERSION=4.1.1
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
# The Go module proxy here serves this MinIO commit (2026-02-12); the pinned
# RELEASE.2025-10-15T17-29-55Z pseudo-version is refused by it. See docs/design.md.
MINIO_MODULE=github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c

CACHE=${CDC_LAKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-lake}
if [ "$(id -u)" = 0 ]; then
  # PostgreSQL refuses to run as root, and its user cannot enter /root.
  STATE=${CDC_LAKE_STATE:-/var/lib/cdc-lake-stack}
else
  STATE=${CDC_LAKE_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/cdc-lake}
fi

PG_PORT=${PG_PORT:-5432}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
CONNECT_PORT=${CONNECT_PORT:-8083}
# JMX of Connect, for tests/bench/debezium.sh (producer and Debezium metrics),
# bound to 127.0.0.1 without authentication, as everything else here.
CONNECT_JMX_PORT=${CONNECT_JMX_PORT:-9404}
MINIO_PORT=${MINIO_PORT:-9000}
MINIO_CONSOLE_PORT=${MINIO_CONSOLE_PORT:-9001}

# Demo-only credentials for a stack bound to 127.0.0.1. Never reuse them.
TWEETGEN_PASSWORD=tweetgen-demo-password
DEBEZIUM_PASSWORD=debezium-demo-password
MINIO_USER=cdclake
MINIO_PASSWORD=cdclake-demo-password
BUCKET=${LAKE_BUCKET:-lake}
CONNECTOR=twitter-postgres

# The one list of captured tables (docs/operations.md, "Capture another table"). The
# override lets a test capture a table of its own without editing the repo.
CAPTURED_TABLES=${CDC_LAKE_CAPTURED_TABLES_FILE:-$ROOT/db/captured-tables}

KAFKA_HOME=$CACHE/kafka-$KAFKA_VERSION
PLUGIN_DIR=$CACHE/connect-plugins
MINIO=$CACHE/bin/minio

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# Stages that took a second or more, for the summary at the end.
STAGES=()
timed() { # timed LABEL COMMAND...: runs it; a line when it took time
  local label=$1 t0 took
  shift
  t0=$(date +%s)
  "$@"
  took=$(($(date +%s) - t0))
  if [ "$took" -gt 0 ]; then
    log "$label: ${took}s"
    STAGES+=("$(printf '%-34s %5ss' "$label" "$took")")
  fi
}
summary() {
  [ ${#STAGES[@]} -gt 0 ] || return 0
  log "stage times:"
  printf '[stack]   %s\n' "${STAGES[@]}" >&2
}

check_prereqs() {
  # Installs missing Debian packages when root, otherwise names them.
  bash "$ROOT/tests/prereqs.sh" || die "prerequisites missing (see above)"
  local jv
  jv=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ "${jv:-0}" -ge 17 ] || die "Kafka 4.1 needs Java 17 or newer, found '$jv': install openjdk-17-jre-headless"
}

# ---------------------------------------------------------------- install ---

install_kafka() {
  [ -f "$KAFKA_HOME/.complete" ] && return
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central"
  rm -rf "$KAFKA_HOME"
  # -C: fail on a checksum mismatch instead of warning.
  mvn -q -B -C -f "$ROOT/tests/stack/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
    -Dkafka.version="$KAFKA_VERSION" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_HOME/libs" >"$CACHE/mvn-kafka.log" 2>&1 \
    || { tail -n 30 "$CACHE/mvn-kafka.log" >&2; die "Maven could not fetch Kafka"; }
  touch "$KAFKA_HOME/.complete"
}

install_debezium() {
  local spec version file sha
  spec=$ROOT/debezium/plugin.json
  version=$(jq -r .version "$spec")
  sha=$(jq -r .sha256 "$spec")
  file=$CACHE/downloads/debezium-connector-postgres-$version-plugin.tar.gz
  if [ ! -f "$PLUGIN_DIR/.complete-$version" ]; then
    if [ ! -f "$file" ]; then
      log "fetching Debezium PostgreSQL connector $version from Maven Central"
      mvn -q -B -C -Dmaven.repo.local="$CACHE/m2" dependency:copy \
        -Dartifact="$(jq -r '"\(.groupId):\(.artifactId):\(.version):\(.type):\(.classifier)"' "$spec")" \
        -DoutputDirectory="$CACHE/downloads" >"$CACHE/mvn-debezium.log" 2>&1 \
        || { tail -n 30 "$CACHE/mvn-debezium.log" >&2; die "Maven could not fetch the Debezium plugin"; }
    fi
    echo "$sha  $file" | sha256sum -c --quiet - \
      || { rm -f "$file"; die "sha256 of $file does not match debezium/plugin.json"; }
    rm -rf "$PLUGIN_DIR" && mkdir -p "$PLUGIN_DIR"
    tar -xzf "$file" -C "$PLUGIN_DIR"
    touch "$PLUGIN_DIR/.complete-$version"
  fi
}

# The project's Debezium converter (debezium/converter): compiled with javac
# against the connector's own jars and Kafka's connect-api, into the
# connector's plugin directory, so Connect's plugin loader gives it the
# connector's classes. Rebuilt when its source changes; a running Connect
# loads the new jar only when restarted.
install_converter() {
  local src dir sum classes
  src=$ROOT/debezium/converter/src
  dir=$PLUGIN_DIR/debezium-connector-postgres
  sum=$(find "$src" -name '*.java' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  [ -f "$dir/.converter-$sum" ] && return
  log "building the value converter (debezium/converter)"
  classes=$(mktemp -d)
  javac --release 17 -nowarn -d "$classes" \
    -cp "$(ls "$dir"/debezium-api-*.jar "$dir"/debezium-core-*.jar "$KAFKA_HOME"/libs/{connect-api,connect-json,kafka-clients,jackson-core,jackson-databind,jackson-annotations}-[0-9]*.jar | paste -sd:)" \
    $(find "$src" -name '*.java') || die "javac failed on debezium/converter"
  jar cf "$dir/cdc-lake-converter.jar" -C "$classes" . || die "jar failed"
  rm -rf "$classes" "$dir"/.converter-*
  touch "$dir/.converter-$sum"
  if running connect 2>/dev/null; then
    log "the converter changed: restart Connect to load it (tests/stack.sh down; tests/stack.sh up)"
  fi
}

install_minio() {
  [ -x "$MINIO" ] && return
  log "building MinIO with go install (first run only, a few minutes)"
  GOBIN=$CACHE/bin GOFLAGS=-trimpath go install "$MINIO_MODULE" >"$CACHE/go-minio.log" 2>&1 \
    || { tail -n 30 "$CACHE/go-minio.log" >&2; die "go install of MinIO failed"; }
}

cmd_install() {
  timed "prerequisites (apt)" check_prereqs
  install_servers
}

install_servers() {
  mkdir -p "$CACHE/downloads" "$CACHE/bin"
  timed "Kafka jars (Maven Central)" install_kafka
  timed "Debezium plugin (Maven Central)" install_debezium
  timed "value converter (javac)" install_converter
  timed "MinIO (go install)" install_minio
}

# -------------------------------------------------------------- lifecycle ---

pidfile() { echo "$STATE/run/$1.pid"; }

running() { # running NAME: its recorded pid is alive
  local f pid
  f=$(pidfile "$1")
  # PostgreSQL may have been restarted by pg_ctl (the tests do): trust its
  # own postmaster.pid over ours.
  if [ "$1" = postgres ] && [ -f "$STATE/postgres/postmaster.pid" ] && [ -d "$STATE/run" ]; then
    head -n1 "$STATE/postgres/postmaster.pid" >"$f"
  fi
  [ -f "$f" ] && pid=$(cat "$f") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_port_free() { # ensure_port_free PORT COMPONENT
  if port_busy "$1"; then
    die "port $1 for $2 is already in use by another process (set the matching *_PORT variable to move it)"
  fi
}

fail_with_log() { # fail_with_log COMPONENT LOGFILE MESSAGE
  log "$1 failed to start; last lines of $2:"
  tail -n 40 "$2" >&2 || true
  die "$3"
}

wait_for() { # wait_for COMPONENT LOGFILE SECONDS COMMAND...
  local name=$1 logf=$2 secs=$3
  shift 3
  local i
  for ((i = 0; i < secs * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -f "$(pidfile "$name")" ] && ! running "$name"; then
      fail_with_log "$name" "$logf" "$name exited during start-up"
    fi
    sleep 0.5
  done
  fail_with_log "$name" "$logf" "$name not ready after ${secs}s"
}

spawn() { # spawn NAME LOGFILE COMMAND...: start in its own session, record the pid
  local name=$1 logf=$2
  shift 2
  setsid "$@" >>"$logf" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_super() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h "$STATE/run" -p "$PG_PORT" -U postgres "$@"; }

start_postgres() {
  local data=$STATE/postgres logf=$STATE/logs/postgres.log
  if [ -f "$data/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "postgres already running"
  else
    ensure_port_free "$PG_PORT" postgres
    if [ ! -f "$data/PG_VERSION" ]; then
      log "initialising PostgreSQL data dir $data"
      mkdir -p "$data"
      [ "$(id -u)" = 0 ] && chown postgres: "$data" "$STATE/run" "$STATE/logs"
      # Superuser over the private unix socket only; TCP needs a password.
      as_postgres "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$STATE/logs/initdb.log" 2>&1 \
        || fail_with_log postgres "$STATE/logs/initdb.log" "initdb failed"
    fi
    touch "$logf"
    [ "$(id -u)" = 0 ] && chown postgres: "$logf"
    # Settings live in an included file that `up` rewrites every time,
    # leaving the rest of postgresql.conf as initdb wrote it.
    grep -q "include_if_exists = 'stack.conf'" "$data/postgresql.conf" \
      || echo "include_if_exists = 'stack.conf'" >>"$data/postgresql.conf"
    cat >"$data/stack.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$STATE/run'
wal_level = logical
max_replication_slots = 8
max_wal_senders = 8
max_slot_wal_keep_size = '2GB'
CONF
    # The server inherits pg_ctl's stderr: keep it off our caller's pipe.
    as_postgres "$PG_BIN/pg_ctl" -D "$data" -l "$logf" -w -t 60 start >"$STATE/logs/pg_ctl.log" 2>&1 \
      || fail_with_log postgres "$logf" "pg_ctl start failed"
  fi
  head -n1 "$data/postmaster.pid" >"$(pidfile postgres)"
  wait_for postgres "$logf" 30 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
  provision_postgres
}

provision_postgres() {
  psql_super -d postgres <<SQL
SELECT 'CREATE DATABASE twitter' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'twitter') \gexec
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tweetgen') THEN CREATE ROLE tweetgen LOGIN; END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'debezium') THEN CREATE ROLE debezium LOGIN REPLICATION; END IF;
END
\$\$;
ALTER ROLE tweetgen PASSWORD '$TWEETGEN_PASSWORD';
ALTER ROLE debezium PASSWORD '$DEBEZIUM_PASSWORD';
SQL
  local f
  for f in "$ROOT"/db/*.sql; do
    psql_super -d twitter -f "$f" >/dev/null
  done
  capture_sql before-connector
}

# db/capture.sh against our PostgreSQL, with the names the connector uses.
capture_sql() {
  PGHOST=$STATE/run PGPORT=$PG_PORT PGUSER=postgres PGDATABASE=twitter \
    CDC_PUBLICATION=$(jq -r '."publication.name"' "$ROOT/debezium/$CONNECTOR.json") \
    CDC_SLOT=$(jq -r '."slot.name"' "$ROOT/debezium/$CONNECTOR.json") \
    CDC_SIGNAL_TABLE=$(jq -r '."signal.data.collection" // "public.cdc_signal"' "$ROOT/debezium/$CONNECTOR.json") \
    bash "$ROOT/db/capture.sh" "$1" "$CAPTURED_TABLES" "${@:2}" || die "applying $CAPTURED_TABLES failed (see above)"
}

start_kafka() {
  local dir=$STATE/kafka logf=$STATE/logs/kafka.log
  if running kafka; then log "kafka already running"; else
    ensure_port_free "$KAFKA_PORT" kafka
    ensure_port_free "$KAFKA_CONTROLLER_PORT" "kafka controller"
    mkdir -p "$dir/data"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
    write_log4j "$dir/log4j2.properties"
    # Format once: a second `up` must never reformat existing data.
    if [ ! -f "$dir/data/meta.properties" ]; then
      [ -f "$dir/cluster-id" ] || kafka_java kafka.tools.StorageTool random-uuid >"$dir/cluster-id"
      kafka_java kafka.tools.StorageTool format --ignore-formatted -t "$(cat "$dir/cluster-id")" \
        -c "$dir/server.properties" >"$STATE/logs/kafka-format.log" 2>&1 \
        || fail_with_log kafka "$STATE/logs/kafka-format.log" "formatting the Kafka log dir failed"
    fi
    spawn kafka "$logf" java -Xms256m -Xmx512m -Dlog4j2.configurationFile="$dir/log4j2.properties" \
      -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties"
  fi
  wait_for kafka "$logf" 90 kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 3
}

kafka_java() { java -Xmx256m -Dlog4j2.configurationFile="$STATE/kafka/log4j2.properties" -cp "$KAFKA_HOME/libs/*" "$@"; }

write_log4j() {
  cat >"$1" <<'EOF'
rootLogger.level=INFO
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=WARN
logger.reflections.name=org.reflections
logger.reflections.level=ERROR
EOF
}

start_connect() {
  local dir=$STATE/connect logf=$STATE/logs/connect.log
  if running connect; then log "connect already running"; else
    ensure_port_free "$CONNECT_PORT" "kafka connect"
    mkdir -p "$dir"
    cat >"$dir/worker.properties" <<EOF
bootstrap.servers=127.0.0.1:$KAFKA_PORT
group.id=cdc-lake-connect
listeners=http://127.0.0.1:$CONNECT_PORT
rest.advertised.host.name=127.0.0.1
rest.advertised.port=$CONNECT_PORT
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
config.storage.topic=connect-configs
offset.storage.topic=connect-offsets
status.storage.topic=connect-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.flush.interval.ms=5000
plugin.path=$PLUGIN_DIR
config.providers=env
config.providers.env.class=org.apache.kafka.common.config.provider.EnvVarConfigProvider
EOF
    write_log4j "$dir/log4j2.properties"
    ensure_port_free "$CONNECT_JMX_PORT" "kafka connect jmx"
    DEBEZIUM_DB_PASSWORD=$DEBEZIUM_PASSWORD spawn connect "$logf" java -Xms256m -Xmx768m \
      -Dcom.sun.management.jmxremote.port="$CONNECT_JMX_PORT" -Dcom.sun.management.jmxremote.rmi.port="$CONNECT_JMX_PORT" \
      -Dcom.sun.management.jmxremote.host=127.0.0.1 -Djava.rmi.server.hostname=127.0.0.1 \
      -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false \
      -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$KAFKA_HOME/libs/*" \
      org.apache.kafka.connect.cli.ConnectDistributed "$dir/worker.properties"
  fi
  wait_for connect "$logf" 120 curl -fsS "http://127.0.0.1:$CONNECT_PORT/connectors"
  register_connector
  capture_sql after-connector
}

wait_connector_running() {
  local logf=$STATE/logs/connect.log i state= restarted=
  for ((i = 0; i < 240; i++)); do
    state=$(connector_state)
    case $state in
      RUNNING) return 0 ;;
      FAILED)
        if [ -z "$restarted" ]; then
          # A task that failed in an earlier run (PostgreSQL down, say) stays
          # FAILED until restarted: give it one restart before giving up.
          restarted=1
          log "connector FAILED, restarting it once"
          curl -fsS -X POST "http://127.0.0.1:$CONNECT_PORT/connectors/$CONNECTOR/restart?includeTasks=true&onlyFailed=true" >/dev/null || true
          sleep 2
          continue
        fi
        log "the Debezium connector failed:"
        curl -fsS "http://127.0.0.1:$CONNECT_PORT/connectors/$CONNECTOR/status" \
          | jq -r '[.connector.trace, .tasks[].trace] | map(select(.)) | .[0]' | head -n 12 >&2
        die "the Debezium connector is FAILED" ;;
    esac
    sleep 0.5
  done
  fail_with_log connect "$logf" "the Debezium connector is not RUNNING after 120s (state: $state)"
}

# Registers the connector with the ports of this stack and the tables of
# the list, and returns once its tasks run with that configuration.
register_connector() {
  local url=http://127.0.0.1:$CONNECT_PORT/connectors/$CONNECTOR body include current stopped=
  include=$(bash "$ROOT/db/capture.sh" include-list "$CAPTURED_TABLES") || die "reading $CAPTURED_TABLES failed (see above)"
  body=$(jq --arg port "$PG_PORT" --arg tables "$include" --arg kafka "127.0.0.1:$KAFKA_PORT" \
    '. + {"database.port": $port, "table.include.list": $tables,
          "value.converter.schema.bootstrap.servers": $kafka}' "$ROOT/debezium/$CONNECTOR.json")
  current=$(curl -fsS "$url/config" 2>/dev/null | jq -r '."table.include.list" // empty') || current=
  if [ -n "$current" ] && [ "$current" != "$include" ]; then
    # The tables change: stop the connector first, so that once tasks run
    # again they are new ones with the new list. Right after a plain PUT
    # the old task may still be RUNNING, and `capture.sh after-connector`
    # would publish a table that task still drops (see db/capture.sh).
    log "connector tables change: $current -> $include"
    curl -fsS -X PUT "$url/stop" >/dev/null || die "stopping the Debezium connector failed"
    local i
    for ((i = 0; i < 120; i++)); do
      [ "$(connector_state)" = STOPPED ] && break
      sleep 0.5
    done
    [ "$(connector_state)" = STOPPED ] || die "the Debezium connector did not stop in 60s (state: $(connector_state))"
    stopped=1
  fi
  # PUT is create-or-update, so a second `up` is a no-op.
  curl -fsS -X PUT -H 'Content-Type: application/json' --data "$body" \
    "$url/config" >"$STATE/logs/connector-put.json" \
    || die "registering the Debezium connector failed: $(cat "$STATE/logs/connector-put.json" 2>/dev/null)"
  # A PUT leaves a stopped connector stopped, and for a moment its status
  # may not say so: resume by what we did, not only by what it reports.
  if [ -n "$stopped" ] || [ "$(connector_state)" = STOPPED ]; then
    curl -fsS -X PUT "$url/resume" >/dev/null || die "resuming the Debezium connector failed"
  fi
  wait_connector_running
}

# RUNNING when the connector and all its tasks run, FAILED when any failed,
# STOPPED when stopped (PUT .../stop), otherwise "waiting:" and the states
# seen so far ("" while Connect does not answer). A connector that has no
# task yet is not RUNNING: right after a PUT or resume it has none.
connector_state() {
  curl -fsS "http://127.0.0.1:$CONNECT_PORT/connectors/$CONNECTOR/status" 2>/dev/null | jq -r '
    ([.connector.state] + [.tasks[].state]) as $s
    | if ($s | index("FAILED")) then "FAILED"
      elif .connector.state == "STOPPED" and (.tasks | length) == 0 then "STOPPED"
      elif (.tasks | length) > 0 and ($s | all(. == "RUNNING")) then "RUNNING"
      else "waiting:" + ($s | join(",")) end' 2>/dev/null || true
}

connector_running() { [ "$(connector_state)" = RUNNING ]; }

start_minio() {
  local logf=$STATE/logs/minio.log
  if running minio; then log "minio already running"; else
    ensure_port_free "$MINIO_PORT" "minio api"
    ensure_port_free "$MINIO_CONSOLE_PORT" "minio console"
    mkdir -p "$STATE/minio"
    MINIO_ROOT_USER=$MINIO_USER MINIO_ROOT_PASSWORD=$MINIO_PASSWORD MINIO_BROWSER_REDIRECT=off \
      spawn minio "$logf" "$MINIO" server --quiet --address "127.0.0.1:$MINIO_PORT" \
      --console-address "127.0.0.1:$MINIO_CONSOLE_PORT" "$STATE/minio"
  fi
  wait_for minio "$logf" 60 curl -fsS "http://127.0.0.1:$MINIO_PORT/minio/health/live"
  # Create the bucket with a SigV4-signed PUT; 409 means it already exists.
  local code
  # Credentials go to curl on stdin (-K -), never on its command line.
  code=$(printf 'user = "%s:%s"\n' "$MINIO_USER" "$MINIO_PASSWORD" | curl -s -K - \
    -o "$STATE/logs/bucket.xml" -w '%{http_code}' -X PUT \
    --aws-sigv4 "aws:amz:us-east-1:s3" "http://127.0.0.1:$MINIO_PORT/$BUCKET")
  case $code in
    200 | 409) ;;
    *) die "creating bucket $BUCKET failed (HTTP $code): $(cat "$STATE/logs/bucket.xml")" ;;
  esac
}

cmd_up() {
  cmd_install
  start_servers
}

start_servers() {
  mkdir -p "$STATE/run" "$STATE/logs"
  timed "PostgreSQL start" start_postgres
  timed "MinIO start" start_minio
  timed "Kafka start" start_kafka
  timed "Connect start and connector" start_connect
  log "stack is up (state in $STATE)"
  cmd_status
}

# What a user runs after editing the list: the servers must be up already.
cmd_capture() {
  running postgres || die "postgres is not running: tests/stack.sh up"
  curl -fsS "http://127.0.0.1:$CONNECT_PORT/connectors" >/dev/null 2>&1 \
    || die "Kafka Connect does not answer on port $CONNECT_PORT: tests/stack.sh up"
  capture_sql before-connector
  register_connector
  capture_sql after-connector
  log "capturing: $(bash "$ROOT/db/capture.sh" include-list "$CAPTURED_TABLES")"
}

# Re-snapshots captured tables on demand (db/capture.sh snapshot).
cmd_snapshot() {
  running postgres || die "postgres is not running: tests/stack.sh up"
  connector_running || die "the Debezium connector is not RUNNING ($(connector_state)): it reads the signal"
  capture_sql snapshot "$@"
}

cmd_pipeline() {
  local target=${CARGO_TARGET_DIR:-$CACHE/target} build_log=$CACHE/pipeline-build.log
  # The `quickstart` profile (Cargo.toml): unoptimised, a sixth of the
  # release build's CPU, plenty for the demo's rates. CDC_LAKE_PROFILE=release
  # runs the optimised build the benchmarks measure.
  local profile=${CDC_LAKE_PROFILE:-quickstart}
  local started build_pid
  started=$(date +%s)
  # The build needs the prerequisites (headers, cmake) and then
  # only crates.io and the CPU: it runs while the servers are fetched,
  # built and started, instead of after them.
  timed "prerequisites (apt)" check_prereqs
  mkdir -p "$CACHE"
  log "building tweetgen, cdc-sink and cdc-slot-guard (profile $profile) in the background: $build_log"
  (cd "$ROOT" && CARGO_TARGET_DIR=$target cargo build --profile "$profile" --locked) >"$build_log" 2>&1 &
  build_pid=$!
  install_servers
  start_servers
  local waited=$(date +%s) last=0 n
  while kill -0 "$build_pid" 2>/dev/null; do
    n=$(grep -c '^ *Compiling' "$build_log" || true)
    if [ $(($(date +%s) - last)) -ge 30 ]; then
      log "waiting for the $profile build: $n crates compiled so far"
      last=$(date +%s)
    fi
    sleep 2
  done
  wait "$build_pid" || { tail -n 30 "$build_log" >&2; die "cargo build failed (log: $build_log)"; }
  STAGES+=("$(printf '%-34s %5ss' "$profile build (after the stack)" "$(($(date +%s) - waited))")")
  eval "$(cmd_env)"
  local name
  for name in tweetgen cdc-sink cdc-slot-guard; do
    if running "$name"; then
      log "$name already running"
    else
      spawn "$name" "$STATE/logs/$name.log" "$target/$profile/$name"
      sleep 1
      running "$name" || fail_with_log "$name" "$STATE/logs/$name.log" "$name exited at start"
    fi
  done
  log "pipeline running: rows flow from PostgreSQL to s3://$BUCKET (logs in $STATE/logs)"
  STAGES+=("$(printf '%-34s %5ss' "pipeline, in all" "$(($(date +%s) - started))")")
  summary
  cmd_status
}

stop_pid() { # stop_pid NAME
  local f pid i
  f=$(pidfile "$1")
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "$1 did not stop in 30s, killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

cmd_down() {
  # Reverse start order, each by its own pid, so a half-started stack stops too.
  stop_pid tweetgen
  stop_pid cdc-sink
  stop_pid cdc-slot-guard
  stop_pid connect
  stop_pid kafka
  stop_pid minio
  if [ -f "$STATE/postgres/postmaster.pid" ]; then
    log "stopping postgres"
    as_postgres "$PG_BIN/pg_ctl" -D "$STATE/postgres" -m fast -w stop >/dev/null 2>&1 || stop_pid postgres
  fi
  rm -f "$(pidfile postgres)"
}

cmd_status() {
  local rc=0
  report() { # report NAME DETAIL PROBE...
    local name=$1 detail=$2
    shift 2
    if running "$name" && "$@" >/dev/null 2>&1; then
      printf '%-9s up    pid %-7s %s\n' "$name" "$(cat "$(pidfile "$name")")" "$detail"
    elif running "$name"; then
      printf '%-9s start pid %-7s %s (not ready)\n' "$name" "$(cat "$(pidfile "$name")")" "$detail"; rc=1
    else
      printf '%-9s down\n' "$name"; rc=1
    fi
  }
  report postgres "postgresql://127.0.0.1:$PG_PORT/twitter" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
  report kafka "127.0.0.1:$KAFKA_PORT" kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 3
  report connect "http://127.0.0.1:$CONNECT_PORT (connector $CONNECTOR)" connector_running
  if [ -f "$(pidfile tweetgen)" ] || [ -f "$(pidfile cdc-sink)" ]; then
    report tweetgen "writing to twitter" true
    report cdc-sink "Kafka -> s3://$BUCKET" true
    report cdc-slot-guard "slot of $CONNECTOR, http://127.0.0.1:9466/metrics" curl -fsS http://127.0.0.1:9466/readyz
  fi
  report minio "http://127.0.0.1:$MINIO_PORT, console http://127.0.0.1:$MINIO_CONSOLE_PORT, bucket $BUCKET" \
    curl -fsS "http://127.0.0.1:$MINIO_PORT/minio/health/live"
  return $rc
}

cmd_env() {
  cat <<EOF
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGDATABASE=twitter
export TWEETGEN_DATABASE__HOST=127.0.0.1 TWEETGEN_DATABASE__PORT=$PG_PORT TWEETGEN_DATABASE__USER=tweetgen TWEETGEN_DATABASE__PASSWORD=$TWEETGEN_PASSWORD
export CDC_SINK_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT
export CDC_SLOT_GUARD_DATABASE__HOST=127.0.0.1 CDC_SLOT_GUARD_DATABASE__PORT=$PG_PORT CDC_SLOT_GUARD_DATABASE__PASSWORD=$DEBEZIUM_PASSWORD CDC_SLOT_GUARD_CONNECT__URL=http://127.0.0.1:$CONNECT_PORT CDC_SLOT_GUARD_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export CDC_SINK_S3__ENDPOINT=http://127.0.0.1:$MINIO_PORT CDC_SINK_S3__BUCKET=$BUCKET CDC_SINK_S3__ACCESS_KEY_ID=$MINIO_USER CDC_SINK_S3__SECRET_ACCESS_KEY=$MINIO_PASSWORD
export STACK_PG_SUPERUSER_SOCKET=$STATE/run STACK_CONNECT_URL=http://127.0.0.1:$CONNECT_PORT STACK_CONNECT_JMX=127.0.0.1:$CONNECT_JMX_PORT STACK_STATE=$STATE STACK_KAFKA_HOME=$KAFKA_HOME
export CDC_LAKE_STATE=$STATE PG_PORT=$PG_PORT KAFKA_PORT=$KAFKA_PORT KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT CONNECT_PORT=$CONNECT_PORT CONNECT_JMX_PORT=$CONNECT_JMX_PORT MINIO_PORT=$MINIO_PORT MINIO_CONSOLE_PORT=$MINIO_CONSOLE_PORT
EOF
}

case ${1:-} in
  install) cmd_install; summary ;;
  up) cmd_up; summary ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  capture) cmd_capture ;;
  snapshot) shift; cmd_snapshot "$@" ;;
  pipeline) cmd_pipeline ;;
  stop-pipeline) stop_pid tweetgen; stop_pid cdc-sink; stop_pid cdc-slot-guard ;;
  *) echo "usage: $0 {install|up|down|status|env|capture|snapshot TABLE...|pipeline|stop-pipeline}" >&2; exit 2 ;;
esac
