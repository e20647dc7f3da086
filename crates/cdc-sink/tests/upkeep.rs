//! `cdc-sink upkeep` against a real MinIO: S3 conditional puts, listings
//! and deletes, which the unit tests (local files) do not exercise. Needs
//! only MinIO with a bucket, configured the sink's way:
//! `CDC_SINK_S3__{ENDPOINT,BUCKET,ACCESS_KEY_ID,SECRET_ACCESS_KEY}` (as
//! `tests/stack.sh env` prints them). Each test works under its own prefix.
#![cfg(feature = "stack-tests")]

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema};
use cdc_sink::config::SinkConfig;
use cdc_sink::lake::changelog::{Changelog, DataFile, PartitionWrite};
use cdc_sink::lake::files::{FileWriter, encode, writer_properties};
use cdc_sink::lake::storage::s3_store;
use cdc_sink::lake::table::LakeRoot;
use cdc_sink::lake::upkeep::{Upkeep, UpkeepOptions};
use cdc_sink::source::position::{Claim, Tp};
use chrono::NaiveDate;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const TABLE: &str = "events";
const GROUP: &str = "upkeep-test";

fn config(prefix: &str) -> SinkConfig {
    // Only MinIO is needed, but without the stack's environment the
    // sink's configuration would name some other S3.
    test_support::env("CDC_SINK_S3__ENDPOINT");
    let mut cfg = SinkConfig::from_figment(SinkConfig::figment(None)).unwrap();
    cfg.output.prefix = prefix.to_string();
    cfg.lake.compact_min_files = 2;
    cfg
}

/// A prefix of the test's own: the two tests run at once, and one
/// millisecond clock reading could be shared.
fn prefix(test: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!("upkeep-{test}-{ms}")
}

fn rows(partition: i32, offsets: std::ops::Range<i64>) -> RecordBatch {
    let n = offsets.clone().count();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("_cdc_kafka_partition", DataType::Int32, false),
            Field::new("_cdc_kafka_offset", DataType::Int64, false),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(offsets.clone())),
            Arc::new(Int32Array::from(vec![partition; n])),
            Arc::new(Int64Array::from_iter_values(offsets)),
        ],
    )
    .unwrap()
}

/// A sink's flushes of Kafka partition 0, ten rows each, one date.
struct Writer {
    lake: Changelog,
    last: Option<i64>,
}

impl Writer {
    async fn flush(&mut self) {
        let first = self.last.map_or(0, |l| l + 1);
        let write = PartitionWrite {
            tp: Tp::new(format!("db.{TABLE}"), 0),
            claim: Claim {
                expected: self.last,
                last: first + 9,
            },
            files: vec![DataFile {
                date: NaiveDate::from_ymd_opt(2026, 11, 27).unwrap(),
                batch: rows(0, first..first + 10),
                key: None,
            }],
        };
        let outcome = self.lake.write(TABLE, &[write]).await.unwrap();
        assert!(outcome.fenced.is_empty(), "{outcome:?}");
        self.last = Some(first + 9);
    }
}

/// (live files, Kafka offsets of every row) read through the Delta log.
async fn read_table(lake: &Changelog) -> (usize, Vec<i64>) {
    let mut t = lake.root().handle(TABLE).unwrap();
    t.load().await.unwrap();
    let store = t.log_store().object_store(None);
    let mut offsets = Vec::new();
    let files: Vec<Path> = t
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| f.object_store_path())
        .collect();
    for path in &files {
        let bytes = store.get(path).await.unwrap().bytes().await.unwrap();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let p = batch.column_by_name("_cdc_kafka_partition").unwrap();
            assert!(
                p.as_primitive::<Int32Type>()
                    .values()
                    .iter()
                    .all(|&p| p == 0)
            );
            let o = batch.column_by_name("_cdc_kafka_offset").unwrap();
            offsets.extend(o.as_primitive::<Int64Type>().values().iter().copied());
        }
    }
    offsets.sort();
    (files.len(), offsets)
}

fn changelog(cfg: &SinkConfig, prefix: &str) -> Changelog {
    Changelog::new(
        LakeRoot::new(&cfg.s3, prefix).unwrap(),
        GROUP,
        FileWriter::new(writer_properties(&cfg.output)),
        &cfg.lake,
    )
}

// Multi-threaded like the binary: delta-rs' checkpoint writer and vacuum
// block a runtime thread on nested I/O, which on a current-thread runtime
// waits out object_store's 30 s request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upkeep_on_minio_while_the_sink_appends() {
    let prefix = prefix("appends");
    let cfg = config(&prefix);
    let lake = || changelog(&cfg, &prefix);
    let mut writer = Writer {
        lake: lake(),
        last: None,
    };
    for _ in 0..6 {
        writer.flush().await;
    }

    // A file of a flush attempt that never committed.
    let bucket: Arc<dyn ObjectStore> = s3_store(&cfg.s3).unwrap();
    let orphan = Path::from(format!(
        "{prefix}/{TABLE}/_cdc_date=2026-11-27/part-never-committed.parquet"
    ));
    let bytes = encode(&rows(0, 0..10), &writer_properties(&cfg.output)).unwrap();
    bucket.put(&orphan, PutPayload::from(bytes)).await.unwrap();

    let upkeep = |retention| {
        Upkeep::new(
            lake().root().clone(),
            FileWriter::new(writer_properties(&cfg.output)),
            &cfg.lake,
            UpkeepOptions {
                dry_run: false,
                vacuum_retention: retention,
                enforce_retention: false,
            },
        )
    };
    // Upkeep while the sink keeps committing: neither fails, nothing is
    // fenced (Writer::flush asserts that). The retention is what protects
    // the sink's uploads in flight from vacuum, so not zero here.
    let upkeep_live = upkeep(Duration::from_secs(3600));
    let (reports, ()) = tokio::join!(upkeep_live.run(), async {
        for _ in 0..4 {
            writer.flush().await;
        }
    });
    let reports = reports.unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].compacted >= 6, "{:?}", reports[0]);

    let all: Vec<i64> = (0..100).collect();
    let (_, offsets) = read_table(&writer.lake).await;
    assert_eq!(offsets, all, "a row lost or doubled");
    assert_eq!(
        writer
            .lake
            .positions(TABLE, &[Tp::new(format!("db.{TABLE}"), 0)])
            .await
            .unwrap(),
        vec![Some(99)]
    );

    assert!(
        bucket.head(&orphan).await.is_ok(),
        "vacuumed within the retention"
    );

    // A quiet run with no retention leaves one file, and no orphan.
    let reports = upkeep(Duration::ZERO).run().await.unwrap();
    let (files, offsets) = read_table(&writer.lake).await;
    assert_eq!(files, 1, "{reports:?}");
    assert_eq!(offsets, all);
    assert!(matches!(
        bucket.head(&orphan).await,
        Err(object_store::Error::NotFound { .. })
    ));
    let version = reports[0].checkpoint.expect("a checkpoint");
    bucket
        .head(&Path::from(format!(
            "{prefix}/{TABLE}/_delta_log/{version:020}.checkpoint.parquet"
        )))
        .await
        .expect("the checkpoint file");
}

/// The binary: `upkeep --dry-run` changes nothing and says what it would
/// do; a failure exits non-zero with the error chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subcommand() {
    let prefix = prefix("subcommand");
    let cfg = config(&prefix);
    let mut writer = Writer {
        lake: changelog(&cfg, &prefix),
        last: None,
    };
    for _ in 0..3 {
        writer.flush().await;
    }
    let env: HashMap<&str, String> = HashMap::from([
        ("CDC_SINK_OUTPUT__PREFIX", prefix.clone()),
        ("CDC_SINK_LAKE__COMPACT_MIN_FILES", "2".into()),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["upkeep", "--dry-run"])
        .envs(&env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("events: would compact 3 files"), "{stdout}");
    assert_eq!(read_table(&writer.lake).await.0, 3);

    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .arg("upkeep")
        .envs(&env)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let log =
        strip_ansi(&(String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)));
    eprintln!("{log}");
    assert!(
        log.contains("upkeep") && log.contains("files_after=1"),
        "{log}"
    );
    assert_eq!(read_table(&writer.lake).await.0, 1);
    // Nothing waits out a request timeout (see above).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["--bucket", "no-such-bucket", "upkeep"])
        .envs(&env)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("cdc-sink: listing the tables under s3://no-such-bucket/"),
        "{stderr}"
    );
}

/// The log without its colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
