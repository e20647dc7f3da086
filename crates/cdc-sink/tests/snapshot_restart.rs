//! An incremental snapshot survives a restart of the connector in its
//! middle, while the table is written.
//!
//! A capture of the test's own (its PostgreSQL, connector and sink,
//! `test_support::own`): the connector streams from its start
//! (`snapshot.mode=no_data`), so the table's existing rows can reach the
//! lake only through the incremental snapshot the test signals, as the
//! backfill of a newly captured table and the slot guard's re-snapshot
//! do. A writer updates existing rows and inserts new ones throughout.
//! Once the snapshot is under way (its topic holds at least 5% of the
//! rows, and fewer than all: the test checks that the restart lands in the
//! middle), the connector and its task are restarted. Debezium keeps the
//! snapshot's progress in its offsets and carries on after the restart,
//! reading again at most the chunks after the last committed offset. The
//! test passes when the current-state table equals PostgreSQL, every key
//! and column, and the topic holds at least every row once.
#![cfg(feature = "stack-tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use test_support::own::{OwnConnector, OwnPostgres, OwnSink, mirror_diff};
use test_support::wait_until;

/// Rows in the table when the snapshot is signalled: enough for the
/// snapshot (about 75,000 rows/s on the stack's Debezium) to take seconds.
const ROWS: i64 = 400_000;

/// The events in the connector's topic.
fn published(c: &OwnConnector) -> i64 {
    let consumer = test_support::kafka::consumer(&c.name);
    test_support::kafka::watermarks(&consumer, &[&c.topic()])
        .values()
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incremental_snapshot_survives_a_connector_restart_in_its_middle() {
    let c = OwnConnector::new("snap_restart");
    let own = OwnPostgres::start("-1");
    let pg = own.superuser().await;
    c.create_objects(&pg, ROWS).await;
    c.register(&c.config(own.port, "no_data"));
    let sink = OwnSink::spawn(env!("CARGO_BIN_EXE_cdc-sink"), &c);

    let stop = Arc::new(AtomicBool::new(false));
    let body = async {
        c.wait("RUNNING").await;
        // The writer: every 20 ms an existing row updated and a new one
        // inserted, from before the signal until after the restart.
        let writer = {
            let (stop, writer_pg, t) = (stop.clone(), own.superuser().await, c.table.clone());
            tokio::spawn(async move {
                let mut i: i64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    writer_pg
                        .batch_execute(&format!(
                            "UPDATE {t} SET n = n + 1, name = 'written {i}' WHERE id = {k};
                             INSERT INTO {t} VALUES ({new}, 'new {i}', {i});",
                            k = 1 + (i * 7919) % ROWS,
                            new = ROWS + i
                        ))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                i
            })
        };
        pg.batch_execute(&format!(
            "INSERT INTO {} (id, type, data) VALUES ('snapshot-test', 'execute-snapshot',
               '{{\"data-collections\": [\"public.{}\"], \"type\": \"incremental\"}}')",
            c.signal, c.table
        ))
        .await
        .unwrap();

        let at = wait_until(
            "the incremental snapshot to be under way (5% of the rows published)",
            Duration::from_secs(120),
            async || match published(&c) {
                n if n >= ROWS / 20 => Ok(n),
                n => Err(format!("{n} events")),
            },
        )
        .await;
        c.act("restart");
        assert!(
            at < ROWS,
            "the snapshot was over ({at} events for {ROWS} rows) before the restart: \
             the restart must land in its middle"
        );
        eprintln!("connector restarted with {at} of {ROWS} rows published");
        c.wait("RUNNING").await;

        wait_until(
            "the snapshot to go on after the restart: every row published at least once",
            Duration::from_secs(300),
            async || match published(&c) {
                n if n >= ROWS => Ok(()),
                n => Err(format!("{n} events")),
            },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        let rounds = writer.await.unwrap();
        wait_until(
            "the current-state table to equal PostgreSQL",
            Duration::from_secs(600),
            async || mirror_diff(&pg, &c).await,
        )
        .await;
        eprintln!(
            "{} events for {ROWS} rows and {rounds} writer rounds; the current-state table equals PostgreSQL",
            published(&c)
        );
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;
    stop.store(true, Ordering::Relaxed);
    c.delete().await;
    drop(sink);
    drop(own);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
