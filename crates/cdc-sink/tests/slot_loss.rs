//! A lost replication slot, recovered with no manual step.
//!
//! The test runs a PostgreSQL of its own (its own `max_slot_wal_keep_size`
//! of 64 MB, so the stack's slot is never at risk) and registers a
//! Debezium connector of its own for it on the stack's Kafka Connect, with
//! its own slot, publication, signal table and topics, read by a sink of
//! its own. Then the fault, as it happened in the sustained benchmark: the
//! connector stops reading (it is stopped) while rows change and WAL grows
//! past the limit, until PostgreSQL reports the slot `lost` (the test
//! checks that it did). The connector is resumed, as it would be running,
//! and only then the guard (`slot_guard::guard::run`, the service's loop)
//! starts: the test asserts the connector streams on a new slot and the
//! current-state table equals PostgreSQL again, every column, within a
//! stated time, with the changes of the gap (inserts and updates) in it.
//! Then the same fault again, the guard still running: a second recovery
//! (its metric counts two). Then a recovery cut off after the slot was
//! dropped (the connector stopped and marked pending, offsets deleted, no
//! slot), finished by a guard started afterwards. Each recovery must leave
//! `snapshot.mode=no_data`, no pending mark and one more snapshot signal;
//! the changelog holds the initial snapshot and the three re-snapshots as
//! `r` rows and no streamed change of a gap.
//! Deletes of a gap are not tested: the mirror does not reconcile yet
//! (issue 20, step 3), so the test deletes nothing in a gap.
#![cfg(feature = "stack-tests")]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::Watchdog;
use figment::providers::Serialized;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as ObjPath;
use serde_json::Value;
use test_support::connect::rest;
use test_support::{env, repo_root, unique, wait_until};

/// Rows in the table before the slot is lost.
const ROWS: i64 = 2_000;
/// The test PostgreSQL's `max_slot_wal_keep_size`.
const KEEP: &str = "64MB";
/// From the guard's start to the current-state table equal to PostgreSQL.
const RECOVER_WITHIN: Duration = Duration::from_secs(240);
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL 15 of the test's own, on a free port, its socket in its
/// data directory. Stopped and removed on drop.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
}

fn as_postgres(cmd: &str) -> Command {
    // PostgreSQL refuses to run as root, which the CI runner is.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", cmd]);
        c
    } else {
        Command::new(cmd)
    };
    c.stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OwnPostgres {
    fn start() -> OwnPostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("slot-loss-pg-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        let mut init = as_postgres(&format!("{PG_BIN}/initdb"));
        init.args(["-D", data.to_str().unwrap(), "-U", "postgres"])
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ]);
        run_ok(init, "initdb");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n\
             max_slot_wal_keep_size = '{KEEP}'\nmax_wal_size = '256MB'\nfsync = off\n",
            dir.display()
        );
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&conf);
        std::fs::write(&auto, text).unwrap();
        let mut start = as_postgres(&format!("{PG_BIN}/pg_ctl"));
        start
            .args(["-D", data.to_str().unwrap(), "-w", "-t", "60", "-l"])
            .arg(dir.join("log").to_str().unwrap())
            .arg("start");
        run_ok(start, "pg_ctl start");
        OwnPostgres { dir, port }
    }

    async fn superuser(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host={} port={} dbname=postgres user=postgres",
                self.dir.display(),
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("the test's own PostgreSQL");
        tokio::spawn(conn);
        client
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let mut stop = as_postgres(&format!("{PG_BIN}/pg_ctl"));
        stop.args(["-D", self.dir.join("data").to_str().unwrap()])
            .args(["-m", "immediate", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The names of everything the test creates.
struct Names {
    table: String,
    signal: String,
    slot: String,
    connector: String,
    topic_prefix: String,
    lake_prefix: String,
}

impl Names {
    fn new() -> Names {
        let run = unique();
        Names {
            table: "slot_loss".into(),
            signal: "slot_loss_signal".into(),
            slot: format!("slot_loss_{run}"),
            connector: format!("slot-loss-{run}"),
            topic_prefix: format!("slotloss{run}"),
            lake_prefix: format!("slot-loss-{run}"),
        }
    }

    fn topic(&self) -> String {
        format!("{}.{}", self.topic_prefix, self.table)
    }
}

/// The repository's connector configuration, pointed at the test's
/// PostgreSQL, slot, publication, signal table and topics.
fn connector_config(n: &Names, port: u16) -> Value {
    let text = std::fs::read_to_string(repo_root().join("debezium/twitter-postgres.json")).unwrap();
    let mut c: Value = serde_json::from_str(&text).unwrap();
    let p = &n.topic_prefix;
    for (k, v) in [
        ("database.port", port.to_string()),
        ("database.dbname", "postgres".to_string()),
        ("slot.name", n.slot.clone()),
        ("publication.name", n.slot.clone()),
        ("topic.prefix", p.clone()),
        ("table.include.list", format!("public.{}", n.table)),
        ("signal.data.collection", format!("public.{}", n.signal)),
        ("transforms.route.regex", format!("{p}\\.public\\.(.*)")),
        ("transforms.route.replacement", format!("{p}.$1")),
        (
            "predicates.isSignal.pattern",
            format!("{p}\\.public\\.{}", n.signal),
        ),
        (
            "value.converter.schema.bootstrap.servers",
            env("CDC_SINK_KAFKA__BROKERS"),
        ),
        ("heartbeat.interval.ms", "1000".to_string()),
    ] {
        c[k] = Value::String(v);
    }
    c
}

/// The connector's state and its tasks' states.
fn connector_state(name: &str) -> (String, Vec<String>) {
    let out = rest("GET", &format!("/connectors/{name}/status"), None);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let tasks = v["tasks"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| t["state"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    (
        v["connector"]["state"].as_str().unwrap_or("").to_string(),
        tasks,
    )
}

/// RUNNING: the connector and every task run. STOPPED: the connector is
/// stopped and has no task left, so nothing reads the slot.
async fn wait_connector(name: &str, want: &str) {
    wait_until(
        &format!("connector {name} to be {want}"),
        Duration::from_secs(120),
        async || {
            let (connector, tasks) = connector_state(name);
            let ok = connector == want
                && match want {
                    "STOPPED" => tasks.is_empty(),
                    _ => !tasks.is_empty() && tasks.iter().all(|t| t == want),
                };
            if ok {
                Ok(())
            } else {
                Err(format!("connector {connector}, tasks {tasks:?}"))
            }
        },
    )
    .await;
}

/// The connector's configuration as Connect has it now.
fn current_config(n: &Names) -> Value {
    let out = rest("GET", &format!("/connectors/{}/config", n.connector), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// After recovery `round`: the connector streams from now
/// (`snapshot.mode=no_data`), no recovery is marked pending, and the
/// signal table has one incremental-snapshot signal per recovery.
async fn assert_recovered(pg: &tokio_postgres::Client, n: &Names, round: i64) {
    let c = current_config(n);
    assert_eq!(c["snapshot.mode"], "no_data", "{c}");
    assert!(c.get(slot_guard::recovery::PENDING).is_none(), "{c}");
    let signals: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE type = 'execute-snapshot' AND data LIKE '%incremental%'",
                n.signal
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        signals, round,
        "execute-snapshot signals after recovery {round}"
    );
}

async fn wal_status(pg: &tokio_postgres::Client, slot: &str) -> Option<String> {
    pg.query_opt(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

/// The sink on the test's one topic, killed if the test leaves it behind.
struct Sink(Option<std::process::Child>);

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_is_recovered_with_no_manual_step() {
    let n = Names::new();
    let own = OwnPostgres::start();
    let pg = own.superuser().await;
    let (t, sig) = (&n.table, &n.signal);
    pg.batch_execute(&format!(
        "CREATE ROLE debezium LOGIN REPLICATION PASSWORD '{pw}';
         CREATE TABLE {t} (id bigint PRIMARY KEY, name text NOT NULL, n integer NOT NULL);
         INSERT INTO {t} SELECT g, 'row ' || g, 0 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE {sig} (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data text);
         GRANT SELECT ON {t} TO debezium;
         GRANT SELECT, INSERT, DELETE ON {sig} TO debezium;
         CREATE PUBLICATION {slot} FOR TABLE {t}, {sig};
         CREATE TABLE filler (id bigserial PRIMARY KEY, pad text);",
        pw = env("CDC_SLOT_GUARD_DATABASE__PASSWORD"),
        slot = n.slot,
    ))
    .await
    .unwrap();

    let put = rest(
        "PUT",
        &format!("/connectors/{}/config", n.connector),
        Some(&connector_config(&n, own.port)),
    );
    assert!(
        put.status.success(),
        "registering the test's connector: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let s3 =
        cdc_sink::config::SinkConfig::from_figment(cdc_sink::config::SinkConfig::figment(None))
            .unwrap()
            .s3;
    let store = cdc_sink::lake::storage::s3_store(&s3).unwrap();
    let mut sink = Sink(Some(
        Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .env("CDC_SINK_OUTPUT__PREFIX", &n.lake_prefix)
            .env("CDC_SINK_KAFKA__GROUP_ID", &n.connector)
            .env("CDC_SINK_KAFKA__TOPICS", format!("[\"{}\"]", n.topic()))
            .env("CDC_SINK_FLUSH__MAX_AGE_MS", "2000")
            .env("CDC_SINK_METRICS__LISTEN", "")
            .stdin(Stdio::null())
            .spawn()
            .expect("start cdc-sink"),
    ));

    let body = async {
        wait_connector(&n.connector, "RUNNING").await;
        let mirror = format!("{}/_current/{}", n.lake_prefix, n.table);
        let equal = async || {
            let log = ObjPath::from(format!("{mirror}/_delta_log"));
            if store.list(Some(&log)).next().await.is_none() {
                return Err("no current-state table yet".to_string());
            }
            mirror_diff_own(&pg, &n).await
        };
        wait_until(
            "the current-state table to hold the initial snapshot",
            Duration::from_secs(120),
            equal,
        )
        .await;

        // The guard, with the stack's settings (tests/stack.sh env) and
        // the test's connector and PostgreSQL, its metrics on a port of
        // its own; started only once the first loss is seen.
        let config = slot_guard::config::Config::from_figment(
            slot_guard::config::Config::figment(None)
                .merge(Serialized::default("connect.connector", &n.connector))
                .merge(Serialized::default("database.port", own.port))
                .merge(Serialized::default("database.dbname", "postgres"))
                .merge(Serialized::default("guard.interval_ms", 1000))
                .merge(Serialized::default("metrics.listen", "127.0.0.1:0")),
        )
        .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut guard = None;
        let mut ops = None;
        let recoveries = async |ops: &Option<cdc_telemetry::server::OpsServer>| match ops {
            Some(o) => test_support::prom::scrape(o.local_addr())
                .await
                .value("cdc_slot_guard_recoveries_total", &[("outcome", "ok")]),
            None => 0.0,
        };

        // Twice: the second loss meets a guard that already recovered once.
        for round in 1..=2 {
            // The fault: the connector stops reading, rows change, WAL grows.
            let stop = rest("PUT", &format!("/connectors/{}/stop", n.connector), None);
            assert!(stop.status.success());
            wait_connector(&n.connector, "STOPPED").await;
            let (first, last) = (ROWS + 100 * round - 99, ROWS + 100 * round);
            pg.batch_execute(&format!(
                "UPDATE {t} SET n = n + 1, name = name || ' (gap {round})' WHERE id % 3 = {m};
                 INSERT INTO {t} SELECT g, 'gap ' || g, {round} FROM generate_series({first}, {last}) g;",
                m = round - 1
            ))
            .await
            .unwrap();
            let before = recoveries(&ops).await;
            let mut pushed_mb = 0;
            // Until PostgreSQL reports the slot lost, or (a guard running)
            // the guard has already seen it lost and counted a recovery.
            while wal_status(&pg, &n.slot).await.as_deref() != Some("lost")
                && recoveries(&ops).await == before
            {
                assert!(
                    pushed_mb < 1024,
                    "round {round}: slot {} not lost after {pushed_mb} MB of WAL (status {:?})",
                    n.slot,
                    wal_status(&pg, &n.slot).await
                );
                pg.batch_execute(
                    "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 16000) g;
                     SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .await
                .unwrap();
                pushed_mb += 16;
            }
            eprintln!(
                "round {round}: slot {} lost after about {pushed_mb} MB of WAL (max_slot_wal_keep_size {KEEP})",
                n.slot
            );
            if guard.is_none() {
                // As it would be: the connector running on its lost slot.
                // (Not while a guard runs: it may be recovering already.)
                let resume = rest("PUT", &format!("/connectors/{}/resume", n.connector), None);
                assert!(resume.status.success());
                let readiness = Readiness::new("test");
                ops = slot_guard::guard::serve(&config.metrics, readiness.clone())
                    .await
                    .unwrap();
                let (config, stop_rx) = (config.clone(), stop_rx.clone());
                guard = Some(tokio::spawn(async move {
                    slot_guard::guard::run(&config, readiness, Watchdog::disabled(), stop_rx).await
                }));
            }
            let started = Instant::now();
            let running = guard.as_ref().unwrap();
            wait_until(
                &format!(
                    "round {round}: the guard to recover slot {} and the current-state table to equal PostgreSQL",
                    n.slot
                ),
                RECOVER_WITHIN,
                async || {
                    if running.is_finished() {
                        return Err("the guard stopped".to_string());
                    }
                    let done = recoveries(&ops).await;
                    if done < round as f64 {
                        return Err(format!("{done} recoveries"));
                    }
                    match wal_status(&pg, &n.slot).await.as_deref() {
                        Some("reserved") => {}
                        other => return Err(format!("slot status {other:?}")),
                    }
                    equal().await
                },
            )
            .await;
            // How it recovered: streaming from now (no_data) with an
            // incremental snapshot signalled once per recovery, and no
            // recovery left marked pending.
            assert_recovered(&pg, &n, round).await;
            eprintln!(
                "round {round}: recovered and equal {:.1}s after the loss was seen",
                started.elapsed().as_secs_f64()
            );
        }
        stop_tx.send(true).unwrap();
        guard
            .unwrap()
            .await
            .unwrap()
            .expect("the guard ends cleanly");
        assert_eq!(
            recoveries(&ops).await,
            2.0,
            "recoveries counted by the guard"
        );

        // Round 3: a recovery cut off after the slot was dropped (the guard
        // killed there), as the guard leaves it: the connector stopped and
        // marked, its offsets deleted, no slot. Rows change meanwhile. A
        // guard started afterwards must see the mark and finish the job.
        let stop = rest("PUT", &format!("/connectors/{}/stop", n.connector), None);
        assert!(stop.status.success());
        wait_connector(&n.connector, "STOPPED").await;
        let mut marked = current_config(&n);
        marked["snapshot.mode"] = "no_data".into();
        marked[slot_guard::recovery::PENDING] = "test: cut off after the slot was dropped".into();
        assert!(
            rest(
                "PUT",
                &format!("/connectors/{}/config", n.connector),
                Some(&marked)
            )
            .status
            .success()
        );
        assert!(
            rest(
                "DELETE",
                &format!("/connectors/{}/offsets", n.connector),
                None
            )
            .status
            .success()
        );
        pg.execute("SELECT pg_drop_replication_slot($1)", &[&n.slot])
            .await
            .unwrap();
        pg.batch_execute(&format!(
            "UPDATE {t} SET n = n + 1, name = name || ' (gap 3)' WHERE id % 3 = 2;
             INSERT INTO {t} SELECT g, 'gap ' || g, 3 FROM generate_series({ROWS} + 201, {ROWS} + 300) g;"
        ))
        .await
        .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let guard = {
            let config = config.clone();
            tokio::spawn(async move {
                slot_guard::guard::run(
                    &config,
                    Readiness::new("test"),
                    Watchdog::disabled(),
                    stop_rx,
                )
                .await
            })
        };
        let started = Instant::now();
        wait_until(
            "round 3: the guard to finish the pending recovery and the current-state table to equal PostgreSQL",
            RECOVER_WITHIN,
            async || {
                if guard.is_finished() {
                    return Err("the guard stopped".to_string());
                }
                if current_config(&n).get(slot_guard::recovery::PENDING).is_some() {
                    return Err("still marked pending".to_string());
                }
                match wal_status(&pg, &n.slot).await.as_deref() {
                    Some("reserved") => {}
                    other => return Err(format!("slot status {other:?}")),
                }
                equal().await
            },
        )
        .await;
        assert_recovered(&pg, &n, 3).await;
        eprintln!(
            "round 3: the pending recovery finished and equal {:.1}s after the guard started",
            started.elapsed().as_secs_f64()
        );
        stop_tx.send(true).unwrap();
        guard.await.unwrap().expect("the guard ends cleanly");

        // The changelog holds the four snapshots: the initial one and every
        // row of the table read again after each gap.
        let want = ROWS + (ROWS + 100) + (ROWS + 200) + (ROWS + 300);
        let reads = wait_until(
            &format!("the changelog to hold {want} `r` rows"),
            Duration::from_secs(120),
            async || {
                let rows = test_support::lake::lake_rows("deltalake", &n.lake_prefix, &[&n.table]);
                let streamed = rows.iter().filter(|r| r.op != "r").count();
                let reads = rows.len() - streamed;
                // The gaps' changes reached the lake only through the
                // snapshots: nothing read the slot while they were made.
                assert_eq!(streamed, 0, "changes of a gap were streamed");
                if reads as i64 >= want {
                    Ok(reads)
                } else {
                    Err(format!("{reads} `r` rows"))
                }
            },
        )
        .await;
        eprintln!("{reads} `r` rows in all: the initial snapshot and three re-snapshots");
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;

    // Clean-up, whatever happened: the connector, the sink, the topic, and
    // (if it passed) the lake prefix. The PostgreSQL goes with `own`.
    let _ = rest("DELETE", &format!("/connectors/{}", n.connector), None);
    let heartbeats = format!("__debezium-heartbeat.{}", n.topic_prefix);
    if let Some(mut c) = sink.0.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let admin = test_support::kafka::admin();
    let _ = admin
        .delete_topics(
            &[&n.topic(), &heartbeats],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await;
    if outcome.is_ok() {
        let keys = store
            .list(Some(&ObjPath::from(n.lake_prefix.as_str())))
            .map_ok(|m| m.location)
            .boxed();
        let _ = store.delete_stream(keys).collect::<Vec<_>>().await;
    }
    drop(own);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The current-state table against the test PostgreSQL's rows: same keys,
/// every column equal (the table's columns are all plain text here).
async fn mirror_diff_own(pg: &tokio_postgres::Client, n: &Names) -> Result<(), String> {
    let want: std::collections::BTreeMap<String, (String, String)> = pg
        .query(
            &format!("SELECT id::text, name, n::text FROM {}", n.table),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut got = std::collections::BTreeMap::new();
    for r in test_support::lake::mirror_rows("deltalake", &n.lake_prefix, &n.table) {
        let v = |c: &str| r.values[c].clone().unwrap_or_default();
        if got.insert(v("id"), (v("name"), v("n"))).is_some() {
            return Err(format!("key {} twice", v("id")));
        }
    }
    if got == want {
        return Ok(());
    }
    let differ = want
        .iter()
        .find(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("key {k}: PostgreSQL {v:?}, mirror {:?}", got.get(k)));
    Err(format!(
        "{} rows in the mirror, {} in PostgreSQL; first difference: {differ:?}",
        got.len(),
        want.len()
    ))
}
