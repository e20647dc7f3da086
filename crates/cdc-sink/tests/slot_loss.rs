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
//! stated time, with the changes of the gap in it: inserts, updates and
//! deletes, the deleted rows gone (no ghosts: the guard's recovery markers
//! let the mirror remove what the snapshot did not deliver).
//! Then the same fault again, the guard still running: a second recovery
//! (its metric counts two). Then a recovery cut off after the slot was
//! dropped (the connector stopped and marked pending, offsets deleted, no
//! slot), finished by a guard started afterwards. Each recovery must leave
//! `snapshot.mode=no_data`, no pending mark and one more snapshot signal;
//! the changelog holds the initial snapshot and the three re-snapshots as
//! `r` rows, one recovery marker per partition per recovery, and no
//! streamed change of a gap.
#![cfg(feature = "stack-tests")]

use std::time::{Duration, Instant};

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::Watchdog;
use figment::providers::Serialized;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as ObjPath;
use test_support::connect::rest;
use test_support::own::{OwnConnector, OwnPostgres, OwnSink, mirror_diff};
use test_support::wait_until;

/// Rows in the table before the slot is lost: 2,000, or `SLOT_LOSS_ROWS`
/// to time the recovery of a big table (docs/benchmarks.md).
fn rows() -> i64 {
    std::env::var("SLOT_LOSS_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}
/// The test PostgreSQL's `max_slot_wal_keep_size`.
const KEEP: &str = "64MB";
/// From the guard's start to the current-state table equal to PostgreSQL.
const RECOVER_WITHIN: Duration = Duration::from_secs(240);
/// After recovery `round`: the connector streams from now
/// (`snapshot.mode=no_data`), no recovery is marked pending, and the
/// signal table has one incremental-snapshot signal per recovery.
async fn assert_recovered(pg: &tokio_postgres::Client, c: &OwnConnector, round: i64) {
    let config = c.current_config();
    assert_eq!(config["snapshot.mode"], "no_data", "{config}");
    assert!(
        config.get(slot_guard::recovery::PENDING).is_none(),
        "{config}"
    );
    let signals: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE type = 'execute-snapshot' AND data LIKE '%incremental%'",
                c.signal
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

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_is_recovered_with_no_manual_step() {
    let n = OwnConnector::new("slot_loss");
    let own = OwnPostgres::start(KEEP);
    let pg = own.superuser().await;
    let t = &n.table;
    let rows_before = rows();
    n.create_objects(&pg, rows_before).await;
    pg.batch_execute("CREATE TABLE filler (id bigserial PRIMARY KEY, pad text)")
        .await
        .unwrap();
    n.register(&n.config(own.port, "initial"));
    let sink = OwnSink::spawn(env!("CARGO_BIN_EXE_cdc-sink"), &n);
    let s3 =
        cdc_sink::config::SinkConfig::from_figment(cdc_sink::config::SinkConfig::figment(None))
            .unwrap()
            .s3;
    let store = cdc_sink::lake::storage::s3_store(&s3).unwrap();

    let body = async {
        n.wait("RUNNING").await;
        let equal = async || mirror_diff(&pg, &n).await;
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
                .merge(Serialized::default("connect.connector", &n.name))
                .merge(Serialized::default("database.port", own.port))
                .merge(Serialized::default("database.dbname", "postgres"))
                .merge(Serialized::default("guard.interval_ms", 1000))
                .merge(Serialized::default("kafka.topics", [n.topic()]))
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

        // Rows each re-snapshot reads: the table as the gap left it.
        let mut snapshot_rows = Vec::new();
        let count = async || -> i64 {
            pg.query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .unwrap()
                .get(0)
        };
        // Twice: the second loss meets a guard that already recovered once.
        for round in 1..=2 {
            // The fault: the connector stops reading, rows change, WAL grows.
            n.act("stop");
            n.wait("STOPPED").await;
            let (first, last) = (rows_before + 100 * round - 99, rows_before + 100 * round);
            pg.batch_execute(&format!(
                "UPDATE {t} SET n = n + 1, name = name || ' (gap {round})' WHERE id % 3 = {m};
                 INSERT INTO {t} SELECT g, 'gap ' || g, {round} FROM generate_series({first}, {last}) g;
                 DELETE FROM {t} WHERE id % 11 = {round} OR id = {first};",
                m = round - 1
            ))
            .await
            .unwrap();
            snapshot_rows.push(count().await);
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
                n.act("resume");
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
        n.act("stop");
        n.wait("STOPPED").await;
        let mut marked = n.current_config();
        marked["snapshot.mode"] = "no_data".into();
        let start = slot_guard::slot::position(&pg).await.unwrap();
        marked[slot_guard::recovery::PENDING] = serde_json::json!({
            "slot": n.slot, "startedAtUnix": 0,
            "slotStartLsn": start.lsn, "slotStartMs": start.at_ms
        })
        .to_string()
        .into();
        n.register(&marked);
        let deleted = rest("DELETE", &format!("/connectors/{}/offsets", n.name), None);
        assert!(deleted.status.success());
        pg.execute("SELECT pg_drop_replication_slot($1)", &[&n.slot])
            .await
            .unwrap();
        pg.batch_execute(&format!(
            "UPDATE {t} SET n = n + 1, name = name || ' (gap 3)' WHERE id % 3 = 2;
             INSERT INTO {t} SELECT g, 'gap ' || g, 3 FROM generate_series({rows_before} + 201, {rows_before} + 300) g;
             DELETE FROM {t} WHERE id % 13 = 3;"
        ))
        .await
        .unwrap();
        snapshot_rows.push(count().await);
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
                if n.try_current_config()?.get(slot_guard::recovery::PENDING).is_some() {
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

        // The changelog holds the four snapshots (the initial one and the
        // table as each gap left it) and each recovery's marker in each
        // partition of the topic.
        let partitions = 3;
        let want = rows_before + snapshot_rows.iter().sum::<i64>();
        let reads = wait_until(
            &format!("the changelog to hold {want} `r` rows and 3 recoveries' markers"),
            Duration::from_secs(120),
            async || {
                let rows = test_support::lake::lake_rows("deltalake", &n.lake_prefix, &[&n.table]);
                let markers: Vec<_> = rows.iter().filter(|r| r.op == "recovery").collect();
                let reads = rows.iter().filter(|r| r.op == "r").count();
                let streamed = rows.len() - reads - markers.len();
                // The gaps' changes reached the lake only through the
                // snapshots: nothing read the slot while they were made.
                assert_eq!(streamed, 0, "changes of a gap were streamed");
                assert!(
                    markers
                        .iter()
                        .all(|m| m.values.values().all(Option::is_none)),
                    "a marker row holds no table values"
                );
                if reads as i64 >= want && markers.len() >= 3 * partitions {
                    assert_eq!(reads as i64, want, "`r` rows");
                    assert_eq!(markers.len(), 3 * partitions, "markers");
                    Ok(reads)
                } else {
                    Err(format!("{reads} `r` rows, {} markers", markers.len()))
                }
            },
        )
        .await;
        eprintln!(
            "{reads} `r` rows in all: the initial snapshot and three re-snapshots; 9 markers"
        );
        // And the current-state table still equals PostgreSQL: the
        // deleted rows are gone.
        assert_eq!(equal().await, Ok(()));
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;

    // Clean-up, whatever happened: the connector and its topics, the sink,
    // and (if it passed) the lake prefix. The PostgreSQL goes with `own`.
    n.delete().await;
    drop(sink);
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
