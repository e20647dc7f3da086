//! Integration tests against the real local stack (`tests/stack.sh up`):
//! PostgreSQL, Debezium on Kafka Connect, Kafka and MinIO. Nothing is
//! mocked; with the stack down these tests fail with a message saying so.
//!
//! The lake is always read back through the Delta log by independent
//! readers (the `deltalake` Python package and DuckDB's delta extension,
//! `tests/lake_read.py`), never by the sink's own code.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_sink::config::SinkConfig;
use cdc_sink::lake::quarantine::{QuarantineRecord, quarantine_key};
use cdc_sink::lake::storage::s3_store;
use cdc_sink::source::position::Tp;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use test_support::compare::{assert_mirror_equals_pg, fold_text_siblings, mirror_diff, pg_state};
use test_support::kafka::{
    Offsets, PublishedSchemas, RawMessage, SCHEMA_HEADER, admin, commit_offsets, committed,
    consumer as kafka_consumer, create_topic, json_with_schema, producer, read_range, schema_id,
    send, send_with_headers, wait_committed, watermarks,
};
use test_support::lake::{
    LakeRow, lake_rows, lake_schema, latest_by_query, mirror_rows, primary_key, table_exists,
    table_state,
};
use test_support::prom::{Scrape, scrape};
use test_support::wait::{try_wait_until, try_wait_until_blocking};
use test_support::{env, http, unique, wait_until};
use tokio::sync::watch;

/// Tests that write to PostgreSQL hold this, so that one test's writes
/// never land between another's barrier and its comparison.
static PG_WRITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPICS: [&str; 4] = [
    "twitter.users",
    "twitter.tweets",
    "twitter.likes",
    "twitter.follows",
];
const TABLES: [&str; 4] = ["users", "tweets", "likes", "follows"];

async fn pg() -> tokio_postgres::Client {
    test_support::pg::tweetgen().await
}

fn sink_config(prefix: &str, group: &str) -> SinkConfig {
    let mut cfg = SinkConfig::from_figment(SinkConfig::figment(None)).unwrap();
    cfg.output.prefix = prefix.to_string();
    cfg.kafka.group_id = group.to_string();
    cfg
}

fn store() -> Arc<dyn ObjectStore> {
    s3_store(&sink_config("", "x").s3).unwrap()
}

/// A running sink, killed if a failing test leaves it behind. Its log goes
/// to a file, so that fault tests can see which path a kill interrupted.
struct SinkProcess {
    child: Option<Child>,
    log: PathBuf,
    /// Where it serves /metrics, /healthz and /readyz.
    ops: std::net::SocketAddr,
}

impl SinkProcess {
    fn take(mut self) -> Child {
        self.child.take().expect("running")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log that contain `needle`.
    fn count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill_9(self) {
        let mut c = self.take();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the real sink binary with its own group and prefix.
fn spawn_sink(prefix: &str, group: &str, extra: &[(&str, &str)]) -> SinkProcess {
    // A counter, not the clock: two sinks started in the same millisecond
    // must not share (and truncate) one log.
    static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::env::temp_dir().join(format!("cdc-sink-{group}-{n}-{}.log", unique()));
    let file = std::fs::File::create(&log).unwrap();
    // Tests run sinks side by side: each serves on a port of its own.
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-sink"));
    cmd.env("CDC_SINK_METRICS__LISTEN", ops.to_string())
        .env("CDC_SINK_OUTPUT__PREFIX", prefix)
        .env("CDC_SINK_KAFKA__GROUP_ID", group)
        .env("CDC_SINK_FLUSH__MAX_AGE_MS", "1000")
        .env("RUST_LOG", "info,cdc_sink=debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    SinkProcess {
        child: Some(cmd.spawn().expect("start cdc-sink")),
        log,
        ops,
    }
}

fn terminate(sink: SinkProcess) {
    let log = sink.log.clone();
    let mut child = sink.take();
    signal(child.id(), "-TERM");
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "sink exited with {status} after SIGTERM:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A test of the sink on a topic of its own (`<kind>.<kind-initial><run>`),
/// with its own consumer group and lake prefix; the table is the topic's
/// last part.
struct Scenario {
    topic: String,
    prefix: String,
    group: String,
    table: String,
    /// `kafka.topics` for the sink, as its environment variable wants it.
    topics: String,
}

impl Scenario {
    async fn new(kind: &str, partitions: i32) -> Scenario {
        let run = unique();
        let table = format!("{}{run}", &kind[..1]);
        let topic = format!("{kind}.{table}");
        create_topic(&topic, partitions).await;
        Scenario {
            topics: format!("[\"{topic}\"]"),
            prefix: format!("{kind}-{run}"),
            group: format!("{kind}-{run}"),
            topic,
            table,
        }
    }

    fn spawn(&self, extra: &[(&str, &str)]) -> SinkProcess {
        let mut env = vec![("CDC_SINK_KAFKA__TOPICS", self.topics.as_str())];
        env.extend_from_slice(extra);
        spawn_sink(&self.prefix, &self.group, &env)
    }

    fn until(&self, partition: i32, end: i64) -> Offsets {
        [((self.topic.clone(), partition), end)].into()
    }

    fn rows(&self, reader: &str) -> Vec<LakeRow> {
        lake_rows(reader, &self.prefix, &[&self.table])
    }
}

/// A real Debezium change event of `twitter.users`, made to carry `id` (and
/// the op `c`), so that tests can produce as many distinct rows as they
/// need into topics of their own.
struct EventTemplate(Value);

impl EventTemplate {
    async fn new() -> EventTemplate {
        ensure_user_events().await;
        // The latest events are enough (the topic may hold millions).
        let until = watermarks(&kafka_consumer("tpl"), &["twitter.users"]);
        let from = until
            .iter()
            .map(|(tp, h)| (tp.clone(), (h - 500).max(0)))
            .collect();
        let all = read_range(&from, &until);
        let v = all
            .iter()
            .rev()
            .filter_map(|m| m.value.as_ref())
            .map(|v| serde_json::from_slice::<Value>(v).unwrap())
            .find(|v| v["payload"]["op"] == "c")
            .expect("twitter.users holds an insert");
        EventTemplate(v)
    }

    fn event(&self, id: i64) -> Vec<u8> {
        let mut v = self.0.clone();
        v["payload"]["after"]["id"] = id.into();
        v["payload"]["after"]["username"] = format!("row{id}").into();
        v["payload"]["source"]["lsn"] = id.into();
        serde_json::to_vec(&v).unwrap()
    }
}

/// Parquet objects under a table's directory, as s3:// URIs.
async fn parquet_objects(prefix: &str, table: &str) -> BTreeSet<String> {
    let bucket = env("CDC_SINK_S3__BUCKET");
    store()
        .list(Some(&Path::from(format!("{prefix}/{table}"))))
        .map_ok(|m| format!("s3://{bucket}/{}", m.location))
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .collect()
}

/// (partition, offset) of every row of one topic; asserts none appears
/// twice. Rows of several tables are checked table by table.
fn offsets_once(rows: &[LakeRow]) -> BTreeSet<(i32, i64)> {
    let mut seen = BTreeSet::new();
    for r in rows {
        assert!(
            seen.insert((r.table.clone(), r.partition, r.offset)),
            "{} offset {}/{} is in the lake twice",
            r.table,
            r.partition,
            r.offset
        );
    }
    seen.into_iter().map(|(_, p, o)| (p, o)).collect()
}

/// (table, key, op, lsn) of every change event Debezium published.
fn published(raw: &[RawMessage]) -> Vec<(String, String, String, i64)> {
    let mut out = Vec::new();
    for m in raw {
        let Some(value) = &m.value else { continue };
        let v: Value = serde_json::from_slice(value).unwrap();
        let k: Value = serde_json::from_slice(m.key.as_ref().unwrap()).unwrap();
        let table = m.topic.rsplit('.').next().unwrap();
        let key = primary_key(table)
            .iter()
            .map(|c| k["payload"][c].to_string())
            .collect::<Vec<_>>()
            .join(",");
        out.push((
            table.to_string(),
            key,
            v["payload"]["op"].as_str().unwrap().to_string(),
            v["payload"]["source"]["lsn"].as_i64().unwrap(),
        ));
    }
    out.sort();
    out
}

/// Latest state per key from the lake's change history; `None` for a key
/// whose last change is a delete. An unchanged-TOAST column whose earlier
/// value lies before the window is dropped from the row (it cannot be
/// known).
fn latest_state(
    rows: &mut [LakeRow],
) -> BTreeMap<String, Option<BTreeMap<String, Option<String>>>> {
    // One key always lands in one partition, so offset order is change order.
    rows.sort_by_key(|r| (r.partition, r.offset));
    let mut state: BTreeMap<String, Option<BTreeMap<String, Option<String>>>> = BTreeMap::new();
    for r in rows.iter() {
        let key = r.key();
        if r.op == "d" {
            state.insert(key, None);
            continue;
        }
        let mut values = r.values.clone();
        for c in &r.unchanged {
            match state
                .get(&key)
                .and_then(|p| p.as_ref())
                .and_then(|p| p.get(c))
            {
                Some(prev) => values.insert(c.clone(), prev.clone()),
                None => values.remove(c),
            };
        }
        state.insert(key, Some(values));
    }
    state
}

/// Asserts the lake's latest state of every key it holds equals
/// PostgreSQL's, column by column (a deleted key is gone from both).
async fn assert_latest_state_matches(
    pg: &tokio_postgres::Client,
    table: &str,
    rows: &mut [LakeRow],
) {
    let lake_state = latest_state(rows);
    assert!(!lake_state.is_empty(), "{table}: no changes in the lake");
    let keys: Vec<&String> = lake_state.keys().collect();
    let pg_state = pg_state(pg, table, &keys).await;
    for (key, row) in &lake_state {
        match (row, pg_state.get(key)) {
            (None, None) => {}
            (Some(lake_row), Some(pg_row)) => {
                // Carried whole (unchanged TOAST lists both), then folded.
                let lake_row = fold_text_siblings(lake_row);
                for (col, v) in &lake_row {
                    assert_eq!(Some(v), pg_row.get(col), "{table} key {key} column {col}");
                }
            }
            (l, p) => panic!("{table} key {key}: lake {l:?}, PostgreSQL {p:?}"),
        }
    }
}

async fn run_generator(batches: u64) -> tweetgen::workload::Summary {
    let mut config =
        tweetgen::config::Config::from_figment(tweetgen::config::Config::figment(None)).unwrap();
    config.workload.interval_ms = 150;
    config.workload.long_bio_ratio = 0.3;
    config.workload.profile_edits = 6;
    let limits = tweetgen::workload::Limits {
        batches: Some(batches),
        duration: None,
    };
    let (_tx, rx) = watch::channel(false);
    tweetgen::workload::run(&config, limits, None, rx)
        .await
        .unwrap()
}

/// Inserts users until partition 0 of twitter.users holds events, so that
/// tests reading existing events also work on a brand-new stack.
async fn ensure_user_events() {
    let _lock = PG_WRITERS.lock().await;
    let pg = pg().await;
    let c = kafka_consumer("ensure");
    // Debezium may not stream yet on a brand-new stack: another insert now
    // and then, not one per probe.
    let mut last_insert: Option<Instant> = None;
    wait_until(
        "events in twitter.users partition 0",
        Duration::from_secs(90),
        async || {
            // Present events: retention or DeleteRecords may have emptied it.
            let (start, end) = c
                .fetch_watermarks("twitter.users", 0, Duration::from_secs(10))
                .unwrap_or((0, 0));
            if end > start {
                return Ok(());
            }
            if last_insert.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                pg.execute(
                    "INSERT INTO users (username, display_name) VALUES ($1, 'Seed')",
                    &[&format!("seed_{}", unique())],
                )
                .await
                .unwrap();
                last_insert = Some(Instant::now());
            }
            Err(format!("watermarks {start}..{end}"))
        },
    )
    .await;
}

/// Waits until Debezium has published a row committed now, so that every
/// earlier transaction is in Kafka too (Debezium publishes in commit
/// order), and until Kafka has acknowledged everything before it on every
/// partition; returns the watermarks of the demo topics then.
async fn published_barrier(pg: &tokio_postgres::Client) -> Offsets {
    let name = format!("barrier_{}", unique());
    let c = kafka_consumer(&format!("barrier-{}", unique()));
    // Assigned from the ends before the insert, not subscribed: a group
    // subscription would reset to the latest offset and could miss the
    // barrier, and the beginning may be millions of events back (a
    // benchmark's).
    let before = watermarks(&c, &["twitter.users"]);
    pg.execute(
        "INSERT INTO users (username, display_name) VALUES ($1, 'Barrier')",
        &[&name],
    )
    .await
    .unwrap();
    let mut tpl = TopicPartitionList::new();
    for ((t, p), high) in before {
        tpl.add_partition_offset(&t, p, Offset::Offset(high))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut schemas = PublishedSchemas::default();
    let barrier_lsn = loop {
        assert!(
            Instant::now() < deadline,
            "Debezium did not publish {name} within 60s"
        );
        // The poll itself waits for the next message. A string is its
        // UTF-8 bytes in JSON and in Avro alike.
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500))
            && m.payload()
                .is_some_and(|p| String::from_utf8_lossy(p).contains(&name))
        {
            let v: Value =
                serde_json::from_slice(&json_with_schema(&m, &mut schemas).unwrap()).unwrap();
            break v["payload"]["source"]["lsn"].as_i64().expect("source.lsn");
        }
    };
    // The barrier is in Kafka, but the acknowledgements of earlier events
    // on other partitions may trail it. Connect commits a source offset
    // only once every record before it is acknowledged: an offset at or
    // past the barrier's means all earlier events are in the topics.
    let connector = test_support::connect::CONNECTOR;
    wait_until(
        &format!("{connector} to commit a source offset at or past the barrier {name}"),
        Duration::from_secs(60),
        async || {
            let offset = test_support::connect::committed_source_offset(connector);
            match offset.as_ref().and_then(|o| o["lsn"].as_i64()) {
                Some(lsn) if lsn >= barrier_lsn => Ok(()),
                _ => Err(format!("{offset:?}, barrier at lsn {barrier_lsn}")),
            }
        },
    )
    .await;
    watermarks(&c, &TOPICS)
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_insert_shows_up_as_debezium_event() {
    let _lock = PG_WRITERS.lock().await;
    let pg = pg().await;
    let before = watermarks(&kafka_consumer("smoke"), &["twitter.tweets"]);
    let user: i64 = pg
        .query_one(
            "INSERT INTO users (username, display_name) VALUES ($1, 'Smoke') RETURNING id",
            &[&format!("smoke_{}", unique())],
        )
        .await
        .unwrap()
        .get(0);
    let body = format!("smoke test {}", unique());
    pg.execute(
        "INSERT INTO tweets (user_id, body, lang) VALUES ($1, $2, 'en')",
        &[&user, &body],
    )
    .await
    .unwrap();
    // The topic appears with Debezium's first event on a brand-new stack.
    let c = kafka_consumer(&format!("smoke-{}", unique()));
    let now = wait_until(
        "twitter.tweets to appear",
        Duration::from_secs(60),
        async || {
            let now = watermarks(&c, &["twitter.tweets"]);
            if now.is_empty() {
                Err("no such topic")
            } else {
                Ok(now)
            }
        },
    )
    .await;
    let mut tpl = TopicPartitionList::new();
    for tp in now.keys() {
        let from = before.get(tp).copied().unwrap_or(0);
        tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(from))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no change event for the new tweet within 60s"
        );
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        let Some(payload) = m.payload() else { continue };
        // The schema-id format with the stack's `value.converter.format`
        // avro: the value is the payload in Avro, framed with the
        // fingerprint of a schema published on the schema topic, and an
        // insert's record has no header at all.
        let frame = cdc_wire::Frame::parse(payload).expect("an Avro value in its frame");
        assert!(!frame.has_headers, "an insert's record has no headers");
        assert_eq!(m.headers().map_or(0, |h| h.iter().count()), 0);
        let id = schema_id(&m).expect("a schema named by the value's frame");
        let mut schemas = PublishedSchemas::default();
        let v: Value =
            serde_json::from_slice(&json_with_schema(&m, &mut schemas).unwrap()).unwrap();
        let v = &v["payload"];
        if v["after"]["body"] == body.as_str() {
            assert_eq!(v["op"], "c");
            assert_eq!(v["source"]["table"], "tweets");
            let schema: Value = serde_json::from_str(schemas.get(&id)).unwrap();
            assert!(
                schema["fields"].is_array(),
                "the published schema: {schema}"
            );
            break;
        }
    }
}

/// Waits until the sink's log has `n` lines containing `needle`.
async fn wait_log(sink: &SinkProcess, needle: &str, n: usize, limit: Duration) {
    try_wait_until(
        &format!("the sink to log {needle:?} {n} times"),
        limit,
        async || match sink.count(needle) {
            seen if seen >= n => Ok(()),
            seen => Err(format!("{seen} times")),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; its log:\n{}", sink.log_text()));
}

/// Waits until the sink has admitted `n` Kafka messages of `table` (its
/// `cdc_sink_messages_total`): they are in its buffer.
async fn wait_admitted(sink: &SinkProcess, table: &str, n: f64) {
    try_wait_until(
        &format!("the sink to admit {n} messages of {table}"),
        Duration::from_secs(60),
        async || {
            let m = scrape(sink.ops).await;
            match m.sample("cdc_sink_messages_total", &[("table", table)]) {
                Some(seen) if seen >= n => Ok(()),
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; its log:\n{}", sink.log_text()));
}

const UPLOADED: &str = "files uploaded; committing";
const MIRROR_PUT: &str = "mirror files put; committing";
const ASSIGNED: &str = "partitions assigned";

/// Lines of the sink's log saying one of its commits was fenced.
fn fenced_lines(sink: &SinkProcess) -> usize {
    sink.count("another writer advanced this partition")
        + sink.count("commit lost to a concurrent writer")
}

/// Waits until the sink holds a partition: it has read a position.
async fn wait_started(sink: &SinkProcess) {
    wait_log(
        sink,
        "position read from the lake",
        1,
        Duration::from_secs(60),
    )
    .await;
}

/// The generator writes while the sink is SIGKILLed five times, each time
/// right after it logged that a flush's files are uploaded and before the
/// commit (a fault hook holds that window open for 1.5 s). Then: the
/// abandoned files exist in S3 but not in the Delta log; both independent
/// readers see exactly the published changes, no Kafka offset twice, and the
/// latest state of every key equals PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features cdc-sink/failpoints (tests/run.sh)"
)]
async fn end_to_end_exactly_once_across_kills_between_write_and_commit() {
    let run = unique();
    let prefix = format!("e2e-{run}");
    let group = format!("e2e-{run}");
    let _lock = PG_WRITERS.lock().await;
    let pg = pg().await;

    // The test covers the changes it causes: the group starts at today's
    // end of each topic, however much history the stack already holds. On
    // a brand-new stack the topics may not exist yet: then the group starts
    // at the beginning, which is the start of the window too.
    let start = watermarks(&kafka_consumer("e2e"), &TOPICS);
    commit_offsets(&group, &start).await;

    let fault = [(
        "FAILPOINTS",
        "lake::before-commit=return(1500);mirror::before-commit=return(1500)",
    )];
    let mut sink = spawn_sink(&prefix, &group, &fault);
    let mut batches = 0;
    for round in 0..10i64 {
        // Each round writes its own changes (6 generator batches), so a
        // restarted sink, which gets its partitions only once the killed
        // one's session expires, always has something to flush: some kills
        // land in the first flush after a restart, some later.
        let generator = tokio::spawn(run_generator(6));
        // Five kills between a changelog flush's upload and its commit,
        // five between a current-state table's rewrite and its commit.
        let window = if round % 2 == 0 { UPLOADED } else { MIRROR_PUT };
        let before = sink.count(window);
        wait_log(&sink, window, before + 1, Duration::from_secs(60)).await;
        // Within the 1.5 s the fault hook holds between upload and commit.
        sink.kill_9();
        sink = spawn_sink(&prefix, &group, &fault);
        batches += generator.await.unwrap().batches;
    }
    assert_eq!(batches, 60);

    let until = published_barrier(&pg).await;
    wait_committed(&group, &until).await;
    terminate(sink);

    // The kills left files behind that no commit references: the Delta log
    // is what keeps them out of every reader's view.
    let mut orphans = 0;
    for table in TABLES {
        let live = table_state(&prefix, table, &[]).files;
        let all = parquet_objects(&prefix, table).await;
        assert!(live.is_subset(&all), "{table}: the log names missing files");
        orphans += all.difference(&live).count();
    }
    assert!(
        orphans >= 1,
        "5 kills between upload and commit, but no uncommitted file in S3"
    );
    let mut mirror_orphans = 0;
    for table in TABLES {
        let mirror = format!("_current/{table}");
        let live = table_state(&prefix, &mirror, &[]).files;
        let all = parquet_objects(&prefix, &mirror).await;
        assert!(
            live.is_subset(&all),
            "{mirror}: the log names missing files"
        );
        mirror_orphans += all.difference(&live).count();
    }
    assert!(
        mirror_orphans >= 1,
        "5 kills between a mirror rewrite and its commit, but no uncommitted mirror file"
    );

    // Exactly the published changes, by both readers.
    let expected = published(&read_range(&start, &until));
    let mut by_reader = Vec::new();
    for reader in ["deltalake", "duckdb"] {
        let rows = lake_rows(reader, &prefix, &TABLES);
        offsets_once(&rows);
        let mut got: Vec<(String, String, String, i64)> = rows
            .iter()
            .map(|r| (r.table.clone(), r.key(), r.op.clone(), r.lsn.unwrap()))
            .collect();
        got.sort();
        assert_eq!(
            got.len(),
            expected.len(),
            "{reader}: row count differs from Kafka"
        );
        assert!(
            got == expected,
            "{reader}: lake rows differ from the published events"
        );
        by_reader.push(rows);
    }

    // Latest state per key equals PostgreSQL, column by column; and the
    // shipped latest-state query gives that same state (a column it cannot
    // know, an unchanged TOASTed value from before the window, aside).
    let mut rows = by_reader.remove(0);
    for table in TABLES {
        let mut of_table: Vec<LakeRow> =
            rows.iter().filter(|r| r.table == table).cloned().collect();
        assert_latest_state_matches(&pg, table, &mut of_table).await;
        let expected: BTreeMap<String, BTreeMap<String, Option<String>>> =
            latest_state(&mut of_table)
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect();
        let by_query = latest_by_query(&prefix, table);
        assert_eq!(
            by_query.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{table}: the latest-state query keeps other keys"
        );
        for (key, row) in &expected {
            for (col, v) in row {
                assert_eq!(
                    Some(v),
                    by_query[key].get(col),
                    "{table} key {key} column {col} by the query"
                );
            }
        }
        // The current-state table, synced after each changelog commit
        // through the same kills, holds that state exactly: every key once,
        // no deleted one.
        let mut mirror: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
        for r in mirror_rows("deltalake", &prefix, table) {
            let key = r.key();
            assert!(
                mirror.insert(key.clone(), r.values).is_none(),
                "{table} key {key} twice in the current-state table"
            );
        }
        assert_eq!(
            mirror.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{table}: the current-state table's keys"
        );
        for (key, row) in &expected {
            for (col, v) in row {
                assert_eq!(
                    Some(v),
                    mirror[key].get(col),
                    "{table} key {key} column {col} in the current-state table"
                );
            }
        }
    }
    rows.clear();

    // Nothing was quarantined.
    let quarantined: Vec<_> = store()
        .list(Some(&Path::from(format!("{prefix}/_quarantine"))))
        .try_collect()
        .await
        .unwrap();
    assert!(
        quarantined.is_empty(),
        "unexpected quarantine: {quarantined:?}"
    );
}

/// Messages that are not Debezium envelopes, valid JSON or not, are
/// quarantined with their raw bytes and the reason; a true tombstone (a
/// null value) is skipped; the valid events around them land.
#[tokio::test(flavor = "multi_thread")]
async fn non_envelopes_are_quarantined_and_tombstones_skipped() {
    let tpl = EventTemplate::new().await;
    let sc = Scenario::new("quarantine", 1).await;
    let p = producer();
    let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(900_000));
    let bad: Vec<(&[u8], &str)> = vec![
        (b"{this is not json", "not valid JSON"),
        (b"{}", "not a Debezium envelope"),
        (b"[]", "not a Debezium envelope"),
        (br#"{"payload":null}"#, "not a Debezium envelope"),
        (big.as_bytes(), "not a Debezium envelope"),
        (
            br#"{"schema":{"type":"struct","fields":[{"type":"struct","field":"after","fields":[{"type":"int64","field":"id"}]}]},"payload":{"op":"c","after":{"id":"not a number"},"source":{"ts_ms":1}}}"#,
            "does not match its declared schema",
        ),
    ];
    send(&p, &sc.topic, 0, Some(&tpl.event(1))).await;
    for (b, _) in &bad {
        send(&p, &sc.topic, 0, Some(b)).await;
    }
    let tombstone = send(&p, &sc.topic, 0, None).await;
    let last = send(&p, &sc.topic, 0, Some(&tpl.event(2))).await;

    let sink = sc.spawn(&[]);
    wait_committed(&sc.group, &sc.until(0, last + 1)).await;
    terminate(sink);

    let s = store();
    let tp = Tp::new(sc.topic.as_str(), 0);
    let prefix = Path::from(sc.prefix.as_str());
    for (i, (raw, says)) in bad.iter().enumerate() {
        let offset = i as i64 + 1;
        let rec = quarantined(&s, &prefix, &tp, offset).await;
        use base64::Engine;
        let kept = base64::engine::general_purpose::STANDARD
            .decode(rec.value_base64.unwrap())
            .unwrap();
        assert_eq!(&kept, raw, "raw payload kept");
        assert_eq!(rec.offset, offset);
        assert!(rec.error.contains(says), "offset {offset}: {}", rec.error);
    }
    let tomb_key = quarantine_key(&prefix, &tp, tombstone);
    assert!(
        s.head(&tomb_key).await.is_err(),
        "a tombstone is not quarantined"
    );
    let ids: Vec<_> = sc
        .rows("deltalake")
        .iter()
        .map(|r| r.values["id"].clone().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["1", "2"],
        "the valid events around the bad ones landed"
    );
}

/// The quarantine record the sink wrote for one offset (panics when there is
/// none).
async fn quarantined(s: &dyn ObjectStore, prefix: &Path, tp: &Tp, offset: i64) -> QuarantineRecord {
    let body = s
        .get(&quarantine_key(prefix, tp, offset))
        .await
        .unwrap_or_else(|e| panic!("no quarantine object for offset {offset}: {e}"))
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The schema-id format: a value that is the payload alone lands under the
/// schema its `cdclake.schema` header names on the schema topic (here the
/// test's own topic, through `kafka.schema_topic`), beside messages in
/// JSON with schemas; a header naming a schema the topic does not hold,
/// and a schema that is not a Connect schema, are quarantined with the
/// reason, and the messages after them land.
#[tokio::test(flavor = "multi_thread")]
async fn schema_id_messages_land_and_unknown_schemas_are_quarantined() {
    let tpl = EventTemplate::new().await;
    let sc = Scenario::new("schemaid", 1).await;
    let schema_topic = format!("{}.schemas", sc.topic);
    create_topic(&schema_topic, 1).await;
    let p = producer();
    let by_id = |id: i64| {
        let v: Value = serde_json::from_slice(&tpl.event(id)).unwrap();
        serde_json::to_vec(&v["payload"]).unwrap()
    };
    let schema = tpl.0["schema"].to_string();
    send_with_headers(&p, &schema_topic, 0, Some(b"good"), schema.as_bytes(), &[]).await;
    send_with_headers(
        &p,
        &schema_topic,
        0,
        Some(b"bad"),
        br#"{"type":"string"}"#,
        &[],
    )
    .await;

    let h = |id: &'static [u8]| [(SCHEMA_HEADER, id)];
    send_with_headers(&p, &sc.topic, 0, None, &by_id(1), &h(b"good")).await;
    let unknown = send_with_headers(&p, &sc.topic, 0, None, &by_id(2), &h(b"nowhere")).await;
    let bad = send_with_headers(&p, &sc.topic, 0, None, &by_id(3), &h(b"bad")).await;
    send(&p, &sc.topic, 0, Some(&tpl.event(4))).await;
    let last = send_with_headers(&p, &sc.topic, 0, None, &by_id(5), &h(b"good")).await;

    let sink = sc.spawn(&[("CDC_SINK_KAFKA__SCHEMA_TOPIC", &schema_topic)]);
    wait_committed(&sc.group, &sc.until(0, last + 1)).await;
    terminate(sink);

    let s = store();
    let tp = Tp::new(sc.topic.as_str(), 0);
    let prefix = Path::from(sc.prefix.as_str());
    for (offset, says) in [(unknown, "not on the schema topic"), (bad, "is not usable")] {
        let rec = quarantined(&s, &prefix, &tp, offset).await;
        assert!(rec.error.contains(says), "offset {offset}: {}", rec.error);
        // Kept with the record: the value cannot be read again without it.
        assert!(rec.headers.contains_key(SCHEMA_HEADER), "{:?}", rec.headers);
    }
    // Read back by an independent reader, every column compared with the
    // same events landed from JSON with schemas.
    let rows = sc.rows("deltalake");
    let ids: Vec<_> = rows
        .iter()
        .map(|r| r.values["id"].clone().unwrap())
        .collect();
    assert_eq!(ids, ["1", "4", "5"]);
    // The same event in both formats: every column equal but the two the
    // template varies.
    let rest = |r: &LakeRow| {
        let mut v = r.values.clone();
        assert_eq!(
            v.remove("username").flatten(),
            Some(format!("row{}", r.values["id"].clone().unwrap()))
        );
        v.remove("id");
        (v, r.op.clone())
    };
    assert_eq!(
        rest(&rows[0]),
        rest(&rows[1]),
        "schema-id and JSON with schemas"
    );
    assert_eq!(rest(&rows[2]), rest(&rows[1]));
}

/// Replays can never duplicate, because where a partition resumes comes
/// from the lake's own log, whatever Kafka's committed offsets say:
/// - a sink killed with a whole segment buffered, then a second sink
///   stopped with SIGTERM while it replays that segment, then a third;
/// - a tombstone-only segment whose Kafka commit is lost (the group's
///   offsets are rewound to 0), then a kill with rows written but not
///   committed.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features cdc-sink/failpoints (tests/run.sh)"
)]
async fn replays_after_sigterm_and_lost_kafka_commits_never_duplicate() {
    let tpl = EventTemplate::new().await;
    let sc = Scenario::new("replay", 1).await;
    let p = producer();
    let slow = [("CDC_SINK_FLUSH__MAX_AGE_MS", "600000")];
    let mut id = 0;
    let mut produce = async |n: usize, tombstones: bool| {
        let mut last = 0;
        for _ in 0..n {
            id += 1;
            let value = (!tombstones).then(|| tpl.event(id));
            last = send(&p, &sc.topic, 0, value.as_deref()).await;
        }
        last
    };

    // 1. Ten rows buffered, never flushed: SIGKILL.
    produce(10, false).await;
    let a = sc.spawn(&slow);
    wait_started(&a).await;
    wait_admitted(&a, &sc.table, 10.0).await;
    a.kill_9();
    // 2. The replay is stopped by SIGTERM half-way through the stream:
    // with the replayed ten and five new rows read, none flushed.
    let b = sc.spawn(&slow);
    wait_started(&b).await;
    let last = produce(5, false).await;
    wait_admitted(&b, &sc.table, 15.0).await;
    terminate(b);
    // 3. Tombstones only: their segment commits to Kafka alone...
    let c = sc.spawn(&[]);
    let after_tombstones = produce(5, true).await;
    wait_committed(&sc.group, &sc.until(0, after_tombstones + 1)).await;
    terminate(c);
    // ... and that commit is lost: the group's offsets go back to 0.
    commit_offsets(&sc.group, &sc.until(0, 0)).await;
    // 4. More rows, written but not committed when the sink dies.
    let d = sc.spawn(&[("FAILPOINTS", "lake::before-commit=return(5000)")]);
    let before = d.count(UPLOADED);
    let end = produce(5, false).await;
    wait_log(&d, UPLOADED, before + 1, Duration::from_secs(60)).await;
    d.kill_9();
    let e = sc.spawn(&[]);
    wait_committed(&sc.group, &sc.until(0, end + 1)).await;
    terminate(e);

    let offsets = offsets_once(&sc.rows("deltalake"));
    let want: BTreeSet<(i32, i64)> = (0..=last)
        .chain(after_tombstones + 1..=end)
        .map(|o| (0, o))
        .collect();
    assert_eq!(offsets, want, "every row exactly once");
    let app_id = format!("cdc-sink:{}:{}:0", sc.group, sc.topic);
    let state = table_state(&sc.prefix, &sc.table, std::slice::from_ref(&app_id));
    assert_eq!(state.txn[&app_id], Some(end), "the lake's position");
}

/// The log start moves past rows that were read but never committed
/// (DeleteRecords while the sink is down): the restarted sink resumes at
/// the new log start; the rows before it that had landed stay once, and
/// nothing lands twice.
#[tokio::test(flavor = "multi_thread")]
async fn log_start_moved_past_uncommitted_rows() {
    let tpl = EventTemplate::new().await;
    let sc = Scenario::new("deleted", 1).await;
    let p = producer();
    for id in 0..10 {
        send(&p, &sc.topic, 0, Some(&tpl.event(id))).await;
    }
    let a = sc.spawn(&[]);
    wait_committed(&sc.group, &sc.until(0, 10)).await;
    terminate(a);
    // Ten more, buffered and then lost with the sink.
    for id in 10..20 {
        send(&p, &sc.topic, 0, Some(&tpl.event(id))).await;
    }
    let b = sc.spawn(&[("CDC_SINK_FLUSH__MAX_AGE_MS", "600000")]);
    wait_started(&b).await;
    wait_admitted(&b, &sc.table, 10.0).await;
    b.kill_9();
    // Retention (here DeleteRecords) removes offsets 0..15.
    let mut delete = TopicPartitionList::new();
    delete
        .add_partition_offset(&sc.topic, 0, Offset::Offset(15))
        .unwrap();
    admin()
        .delete_records(&delete, &AdminOptions::new())
        .await
        .unwrap();
    let c = sc.spawn(&[]);
    wait_committed(&sc.group, &sc.until(0, 20)).await;
    terminate(c);

    let offsets = offsets_once(&sc.rows("duckdb"));
    let want: BTreeSet<(i32, i64)> = (0..10).chain(15..20).map(|o| (0, o)).collect();
    assert_eq!(
        offsets, want,
        "deleted offsets 10..15 never reached the lake; the rest once"
    );
}

/// Two sinks share a group; one is frozen with SIGSTOP past its session
/// timeout in the middle of a flush (its files uploaded, the commit not yet
/// made: a fault hook holds it there, so the freeze lands on that path and
/// not before a flush, where a revoke would simply drop the buffer). Its
/// partitions move to the other, and when it wakes its commit finds the
/// partition's `txn` version advanced and is dropped. No offset lands
/// twice, none is lost.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features cdc-sink/failpoints (tests/run.sh)"
)]
async fn a_frozen_sink_is_fenced_when_it_wakes() {
    let tpl = Arc::new(EventTemplate::new().await);
    let sc = Scenario::new("fence", 2).await;
    let cfg = [("CDC_SINK_FLUSH__MAX_AGE_MS", "4000")];
    let a = sc.spawn(&[
        ("CDC_SINK_FLUSH__MAX_AGE_MS", "4000"),
        ("FAILPOINTS", "lake::before-commit=return(3000)"),
    ]);
    let b = sc.spawn(&cfg);
    let (stop_tx, stop_rx) = watch::channel(false);
    let producing = {
        let topic = sc.topic.clone();
        let tpl = tpl.clone();
        tokio::spawn(async move {
            let p = producer();
            let mut id = 0i64;
            let mut last = BTreeMap::new();
            // Until told to stop, or the test is gone (a failed assertion
            // drops the sender; the runtime would wait on this loop).
            while stop_rx.has_changed().is_ok() && !*stop_rx.borrow() {
                for part in 0..2 {
                    id += 1;
                    let o = send(&p, &topic, part, Some(&tpl.event(id))).await;
                    last.insert((topic.clone(), part), o + 1);
                }
                // Paces the load (a steady trickle for the whole test);
                // not synchronisation.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last
        })
    };
    // Both members hold partitions once each has read a position.
    wait_started(&a).await;
    wait_started(&b).await;
    // Freeze it between upload and commit.
    let before = a.count(UPLOADED);
    wait_log(&a, UPLOADED, before + 1, Duration::from_secs(60)).await;
    let b_assigned = b.count(ASSIGNED);
    signal(a.pid(), "-STOP");
    // Past the 10 s session timeout the group takes the frozen sink's
    // partition away and gives it to the other...
    wait_log(&b, ASSIGNED, b_assigned + 1, Duration::from_secs(90)).await;
    // ... which commits it: with the frozen sink unable to commit anything,
    // every partition's committed offset moving on is the other sink's
    // doing (the lake first, then Kafka).
    let partitions: Offsets = (0..2).map(|p| ((sc.topic.clone(), p), 0)).collect();
    let taken_over = committed(&sc.group, &partitions);
    wait_until(
        "the other sink to commit every partition past where it took over",
        Duration::from_secs(60),
        async || {
            let now = committed(&sc.group, &partitions);
            if now.iter().all(|(tp, o)| *o > taken_over[tp]) {
                Ok(())
            } else {
                Err(format!("{now:?}, at the take-over {taken_over:?}"))
            }
        },
    )
    .await;
    signal(a.pid(), "-CONT");
    // Woken, it finishes the commit it was frozen in, and is fenced.
    try_wait_until(
        "the woken sink to be fenced",
        Duration::from_secs(60),
        async || match fenced_lines(&a) {
            0 => Err("not yet"),
            n => Ok(n),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; its log:\n{}", a.log_text()));
    stop_tx.send(true).unwrap();
    let until = producing.await.unwrap();
    wait_committed(&sc.group, &until).await;
    let fenced = fenced_lines(&a);
    terminate(a);
    terminate(b);
    assert!(fenced >= 1, "the woken sink was never fenced");
    // Both sinks found the table missing and created it at once: exactly
    // one create may land (a retried one would become version 1 and give
    // the table a second identity).
    let log = Path::from(format!(
        "{}/{}/_delta_log/{:020}.json",
        sc.prefix, sc.table, 1
    ));
    let v1 = store().get(&log).await.unwrap().bytes().await.unwrap();
    assert!(
        !String::from_utf8_lossy(&v1).contains("\"metaData\""),
        "version 1 is a second create"
    );

    let offsets = offsets_once(&sc.rows("deltalake"));
    for ((_, part), end) in &until {
        for o in 0..*end {
            assert!(offsets.contains(&(*part, o)), "offset {part}/{o} lost");
        }
    }
}

/// A database of a test's own, captured by a connector of its own (the
/// project's connector JSON with this database's names): what a test of
/// value types needs without touching the demo tables.
struct OwnCapture {
    db: String,
    connector: String,
    config: Value,
    /// The sink's lake prefix and consumer group for this capture.
    prefix: String,
    group: String,
}

impl OwnCapture {
    /// Creates a database `<kind><run>` with `ddl` (which must create
    /// `table`), a publication for it, and registers the connector, leaving
    /// out the connector keys in `without`. Returns once the replication
    /// slot exists: every later change reaches Kafka.
    async fn start(kind: &str, table: &str, ddl: &str, without: &[&str]) -> OwnCapture {
        OwnCapture::start_with(kind, table, ddl, without, &[]).await
    }

    /// [`OwnCapture::start`], with connector keys set to other values.
    async fn start_with(
        kind: &str,
        table: &str,
        ddl: &str,
        without: &[&str],
        set: &[(&str, &str)],
    ) -> OwnCapture {
        let run = unique();
        let db = format!("{kind}{run}");
        let db = db.as_str();
        OwnCapture::sql("postgres", &format!("CREATE DATABASE {db}"));
        OwnCapture::sql(
            db,
            &format!(
                "{ddl}; GRANT SELECT ON {table} TO debezium; CREATE PUBLICATION {db}_pub FOR TABLE {table};"
            ),
        );
        OwnCapture::sql(
            "postgres",
            &format!("GRANT CONNECT ON DATABASE {db} TO debezium"),
        );
        let mut config: Value =
            serde_json::from_str(include_str!("../../../debezium/twitter-postgres.json")).unwrap();
        for (k, v) in [
            ("database.dbname", db),
            ("database.port", &env("PGPORT")),
            (
                "value.converter.schema.bootstrap.servers",
                &env("CDC_SINK_KAFKA__BROKERS"),
            ),
            ("topic.prefix", db),
            ("table.include.list", &format!("public.{table}")),
            ("publication.name", &format!("{db}_pub")),
            ("slot.name", db),
            ("snapshot.mode", "initial"),
            ("transforms.route.regex", &format!("{db}\\.public\\.(.*)")),
            ("transforms.route.replacement", &format!("{db}.$1")),
        ] {
            config[k] = v.into();
        }
        for k in without {
            config.as_object_mut().unwrap().remove(*k);
        }
        for (k, v) in set {
            config[*k] = (*v).into();
        }
        let capture = OwnCapture {
            db: db.to_string(),
            connector: format!("{db}-postgres"),
            config,
            prefix: format!("{kind}-{run}"),
            group: format!("{kind}-{run}"),
        };
        capture.put_config();
        capture.wait_state("RUNNING").await;
        wait_until(
            &format!("replication slot {db} to appear"),
            Duration::from_secs(60),
            async || match capture.slot_count() {
                0 => Err("no slot"),
                _ => Ok(()),
            },
        )
        .await;
        capture
    }

    /// Runs `sql` as the superuser in database `db`.
    fn sql(db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(env("STACK_PG_SUPERUSER_SOCKET"))
            .args(["-p", &env("PGPORT"), "-U", "postgres", "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The sink, reading this capture's topics into its own prefix.
    fn spawn_sink(&self) -> SinkProcess {
        let topics = format!("[\"^{}\\\\..*\"]", self.db);
        spawn_sink(
            &self.prefix,
            &self.group,
            &[("CDC_SINK_KAFKA__TOPICS", &topics)],
        )
    }

    fn slot_count(&self) -> usize {
        OwnCapture::sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                self.db
            ),
        )
        .parse()
        .unwrap()
    }

    fn put_config(&self) {
        let out = test_support::connect::rest(
            "PUT",
            &format!("/connectors/{}/config", self.connector),
            Some(&self.config),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the connector and all its tasks are in `state` (no task
    /// at all for STOPPED).
    async fn wait_state(&self, state: &str) {
        wait_until(
            &format!("connector {} to be {state}", self.connector),
            Duration::from_secs(90),
            async || {
                let out = test_support::connect::rest(
                    "GET",
                    &format!("/connectors/{}/status", self.connector),
                    None,
                );
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
                let done = v["connector"]["state"] == state
                    && if state == "STOPPED" {
                        tasks.is_empty()
                    } else {
                        !tasks.is_empty() && tasks.iter().all(|t| t["state"] == state)
                    };
                if done { Ok(()) } else { Err(v) }
            },
        )
        .await;
    }

    /// Stops the connector (no task runs; changes wait in the slot).
    async fn stop(&self) {
        let path = format!("/connectors/{}/stop", self.connector);
        assert!(
            test_support::connect::rest("PUT", &path, None)
                .status
                .success()
        );
        self.wait_state("STOPPED").await;
    }

    /// Puts the configuration as it now is and resumes a stopped connector.
    async fn reconfigure_and_resume(&self) {
        self.put_config();
        let path = format!("/connectors/{}/resume", self.connector);
        assert!(
            test_support::connect::rest("PUT", &path, None)
                .status
                .success()
        );
        self.wait_state("RUNNING").await;
    }

    async fn client(&self) -> tokio_postgres::Client {
        let client = test_support::pg::superuser(&self.db).await;
        client
            .batch_execute("SET intervalstyle = iso_8601")
            .await
            .unwrap();
        client
    }
}

/// Removes the connector, its slot (it would hold WAL for ever) and the
/// database, also when the test panicked.
impl Drop for OwnCapture {
    fn drop(&mut self) {
        let _ =
            test_support::connect::rest("DELETE", &format!("/connectors/{}", self.connector), None);
        // The slot can be dropped once the task has let go of it.
        let drop_slot = format!(
            "SELECT pg_drop_replication_slot('{0}') FROM pg_replication_slots \
             WHERE slot_name = '{0}' AND NOT active",
            self.db
        );
        let dropped = try_wait_until_blocking(
            &format!("slot {} to be dropped", self.db),
            Duration::from_secs(30),
            || {
                if self.slot_count() == 0 {
                    return Ok(());
                }
                OwnCapture::sql("postgres", &drop_slot);
                match self.slot_count() {
                    0 => Ok(()),
                    _ => Err("still there (its task still holds it)"),
                }
            },
        );
        // No panic in a drop, which may run while a failed test unwinds.
        if let Err(e) = dropped {
            eprintln!("{e}");
            return;
        }
        OwnCapture::sql(
            "postgres",
            &format!("DROP DATABASE {} WITH (FORCE)", self.db),
        );
    }
}

/// Waits until the current-state table of `table` holds `n` rows.
async fn wait_mirror_rows(prefix: &str, table: &str, n: usize) {
    wait_until(
        &format!("the current-state table of {table} to hold {n} rows"),
        Duration::from_secs(60),
        async || match mirror_rows("deltalake", prefix, table).len() {
            m if m == n => Ok(()),
            m => Err(format!("{m} rows")),
        },
    )
    .await;
}

/// Polls the lake (the `deltalake` reader) until `table` holds `n` change
/// rows; panics with the sink's log past the deadline.
async fn wait_lake_rows(sink: &SinkProcess, prefix: &str, table: &str, n: usize) -> Vec<LakeRow> {
    try_wait_until(
        &format!("{table}: {n} changes to land"),
        Duration::from_secs(90),
        async || {
            if parquet_objects(prefix, table).await.is_empty() {
                return Err("no table yet".to_string());
            }
            let rows = lake_rows("deltalake", prefix, &[table]);
            if rows.len() >= n {
                Ok(rows)
            } else {
                Err(format!("{} changes", rows.len()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; the sink's log:\n{}", sink.log_text()))
}

/// A table captured afresh, as docs/operations.md says (the sink
/// stopped, its changelog deleted, the sink's group sent back to the
/// topic's start), gets a new changelog written from the topic, and its
/// current-state table, which reflected the old changelog, is built anew
/// from the new one: equal to PostgreSQL, the changes made while the sink
/// was down included. Before the mirror named its changelog, it took the
/// new changelog's versions for the old one's and stayed as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_captured_afresh_gets_its_current_state_table_built_anew() {
    let capture = OwnCapture::start(
        "afresh",
        "t",
        "CREATE TABLE t (id bigint PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 30) g",
        &[],
    )
    .await;
    let prefix = capture.prefix.clone();
    let sink = capture.spawn_sink();
    wait_lake_rows(&sink, &prefix, "t", 30).await;
    OwnCapture::sql(
        &capture.db,
        "UPDATE t SET a = 'b' WHERE id <= 10; DELETE FROM t WHERE id > 25;",
    );
    // 30 snapshot reads, 10 updates, 5 deletes.
    wait_lake_rows(&sink, &prefix, "t", 45).await;
    wait_mirror_rows(&prefix, "t", 25).await;
    terminate(sink);

    // Captured afresh: the changelog goes, and the group starts the topic
    // over (the lake, which the sink resumes from, has no position left).
    let store = store();
    let objects: Vec<Path> = store
        .list(Some(&Path::from(format!("{prefix}/t"))))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    assert!(!objects.is_empty(), "the changelog's objects");
    for o in &objects {
        store.delete(o).await.unwrap();
    }
    let topic = format!("{}.t", capture.db);
    let start: Offsets = watermarks(&kafka_consumer(&capture.group), &[&topic])
        .into_keys()
        .map(|tp| (tp, 0))
        .collect();
    commit_offsets(&capture.group, &start).await;
    // Changes while the sink is down, which the old current-state table
    // lacks: one update, one delete, two inserts.
    OwnCapture::sql(
        &capture.db,
        "UPDATE t SET a = 'c' WHERE id = 1; DELETE FROM t WHERE id = 2;
         INSERT INTO t VALUES (100, 'new'), (101, 'newer');",
    );

    let sink = capture.spawn_sink();
    wait_lake_rows(&sink, &prefix, "t", 49).await;
    wait_log(&sink, "building the table anew", 1, Duration::from_secs(60)).await;
    wait_mirror_rows(&prefix, "t", 26).await;
    terminate(sink);
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "t").await;
    drop(pg);
    drop(capture);
}

/// A PostgreSQL table with every kind of value (NaN and ±Infinity in floats
/// and numerics, scalars, arrays and a domain; numeric wider than 38
/// digits; bit strings with leading zeros; timetz with an offset; money,
/// an enum, a range; infinite timestamps, intervals, arrays, json, bytea,
/// uuid) is captured by its own connector; rows with special values are
/// updated and one is deleted. The lake's latest state equals PostgreSQL,
/// column by column, read by both readers: the deleted row is gone, the
/// others match exactly. With JSON values (`value.converter.format=json`),
/// which users who do not run Avro keep.
#[tokio::test(flavor = "multi_thread")]
async fn special_values_round_trip_and_their_deletes_land() {
    let capture = OwnCapture::start_with(
        "zoo",
        "zoo",
        CREATE_SQL,
        &[],
        &[("value.converter.format", "json")],
    )
    .await;
    assert_zoo_lands(&capture).await;
}

/// The same types, special values and TOASTed columns with the converter's
/// Avro values (`value.converter.format=avro`, the default): the sink reads them by
/// their frame into the same changelog rows and current-state table.
#[tokio::test(flavor = "multi_thread")]
async fn avro_values_land_every_type_exactly() {
    let capture = OwnCapture::start_with(
        "zooavro",
        "zoo",
        CREATE_SQL,
        &[],
        &[("value.converter.format", "avro")],
    )
    .await;
    assert_zoo_lands(&capture).await;
    // Every event was Avro in its frame, none fell back to JSON, and none
    // carries a header: none is a key update.
    let seen = test_support::kafka::values_seen(&format!("{}.zoo", capture.db));
    drop(capture);
    assert_eq!(seen.len(), 10, "{seen:?}");
    for v in &seen {
        assert_eq!(
            v.frame,
            Some(false),
            "an event that is not framed Avro: {v:?}"
        );
        assert!(v.headers.is_empty(), "{v:?}");
    }
}

/// A table the Avro rules do not cover (a `point` column: a Connect struct
/// that is not Debezium's VariableScaleDecimal) stays JSON, message by
/// message, under the stack's default Avro configuration: no event of its
/// topic is a framed Avro value, and every change lands, the point as the
/// JSON text of its struct.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_avro_does_not_cover_falls_back_to_json_and_lands() {
    let capture = OwnCapture::start(
        "pointy",
        "t",
        "CREATE TABLE t (id bigint PRIMARY KEY, pos point, note text);
         INSERT INTO t SELECT g, point(g, -g / 2.0), 'n' || g FROM generate_series(1, 5) g",
        &[],
    )
    .await;
    assert_eq!(capture.config["value.converter.format"], "avro");
    OwnCapture::sql(
        &capture.db,
        "UPDATE t SET pos = point(0.25, 1e10), note = 'moved' WHERE id = 2;
         UPDATE t SET pos = NULL WHERE id = 3;
         DELETE FROM t WHERE id = 4;",
    );
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    // 5 reads, 2 updates, 1 delete.
    let rows = wait_lake_rows(&sink, &prefix, "t", 8).await;
    terminate(sink);
    assert_eq!(rows.len(), 8, "{rows:?}");
    let seen = test_support::kafka::values_seen(&format!("{}.t", capture.db));
    assert_eq!(seen.len(), 8, "{seen:?}");
    for v in &seen {
        assert!(
            v.headers.iter().any(|(k, _)| k == "cdclake.schema"),
            "{v:?}"
        );
        assert_eq!(
            v.frame, None,
            "an event of a table with a point went as Avro: {v:?}"
        );
    }
    // The current-state table: PostgreSQL's rows, the point's x and y in
    // the JSON text of Debezium's struct.
    let pg = capture.client().await;
    let expected: BTreeMap<String, (Option<(f64, f64)>, String)> = pg
        .query("SELECT id, pos[0], pos[1], note FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let pos = r.get::<_, Option<f64>>(1).zip(r.get::<_, Option<f64>>(2));
            (id.to_string(), (pos, r.get(3)))
        })
        .collect();
    drop(pg);
    for reader in ["deltalake", "duckdb", "polars"] {
        let got: BTreeMap<String, (Option<(f64, f64)>, String)> = mirror_rows(reader, &prefix, "t")
            .into_iter()
            .map(|r| {
                let pos = r.values["pos"].as_ref().map(|text| {
                    let v: Value = serde_json::from_str(text).unwrap();
                    (v["x"].as_f64().unwrap(), v["y"].as_f64().unwrap())
                });
                let note = r.values["note"].clone().unwrap();
                (r.values["id"].clone().unwrap(), (pos, note))
            })
            .collect();
        assert_eq!(got, expected, "{reader}");
    }
    drop(capture);
}

/// Inserts the zoo's rows into `capture`'s table and checks what lands.
async fn assert_zoo_lands(capture: &OwnCapture) {
    OwnCapture::sql(&capture.db, INSERT_SQL);
    let sink = capture.spawn_sink();
    let prefix = &capture.prefix;
    let mut rows = wait_lake_rows(&sink, prefix, "zoo", 10).await;
    terminate(sink);
    assert_eq!(rows.len(), 10, "3 inserts, 6 updates, 1 delete");
    // The last update left the TOASTed columns alone: they arrived as
    // Debezium's placeholder, each with its text sibling carried too.
    let last = rows.iter().max_by_key(|r| (r.key() == "3", r.lsn)).unwrap();
    assert_eq!(
        last.unchanged,
        [
            "nums",
            "free_arr",
            "amounts",
            "amounts__string",
            "long_bits"
        ],
        "{last:?}"
    );
    offsets_once(&rows);
    let zoo_pg = capture.client().await;
    let state = latest_state(&mut rows);
    assert_eq!(
        state.get("2"),
        Some(&None),
        "the deleted NaN row is gone from the latest state"
    );
    assert_latest_state_matches(&zoo_pg, "zoo", &mut rows).await;
    let mut duck = lake_rows("duckdb", prefix, &["zoo"]);
    assert_eq!(duck.len(), 10, "the same rows through DuckDB");
    assert_latest_state_matches(&zoo_pg, "zoo", &mut duck).await;
    // The current-state table is the table itself: every type, NaN and the
    // carried TOASTed values included, through three readers.
    assert_mirror_equals_pg(&zoo_pg, prefix, "zoo").await;
}

/// The current-state table follows a table through a column added
/// mid-stream, a primary-key update (a delete of the old key and a create
/// of the new one), deletes, and a row re-inserted after its delete: it
/// equals PostgreSQL through every reader.
#[tokio::test(flavor = "multi_thread")]
async fn a_current_state_table_follows_new_columns_and_key_updates() {
    let capture = OwnCapture::start(
        "cur",
        "t",
        "CREATE TABLE t (id bigint PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 50) g",
        &[],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "t", 50).await;
    OwnCapture::sql(
        &capture.db,
        "ALTER TABLE t ADD COLUMN b integer;
         UPDATE t SET b = id * 10 WHERE id <= 10;
         INSERT INTO t VALUES (51, 'new', 510);
         UPDATE t SET id = 1000 WHERE id = 7;
         DELETE FROM t WHERE id IN (3, 4);
         INSERT INTO t VALUES (3, 'again', 30);",
    );
    // 50 reads, 10 updates, 1 insert, a delete and a create for the key
    // update, 2 deletes, 1 insert.
    wait_lake_rows(&sink, &prefix, "t", 66).await;
    terminate(sink);
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "t").await;
    drop(pg);
    drop(capture);
}

/// A primary-key update of a row with a TOASTed value: Debezium's create
/// of the new key has the value as its placeholder (PostgreSQL did not
/// send it), and the current-state table takes it from the old key's
/// image: its row in the table (the old key written by an earlier sync),
/// a change just before (an update of the old key), through a chain of
/// key updates and an update of the new key. Equal to PostgreSQL after.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_update_carries_its_unchanged_toasted_value_to_the_new_key() {
    let capture = OwnCapture::start(
        "keytoast",
        "t",
        // EXTERNAL: kept out of line uncompressed, so every value is TOASTed.
        "CREATE TABLE t (id bigint PRIMARY KEY, big text, n integer);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO t SELECT g, repeat(chr(65 + g % 26), 3000 + g), g
           FROM generate_series(1, 20) g",
        &[],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "t", 20).await;
    wait_mirror_rows(&prefix, "t", 20).await;
    OwnCapture::sql(
        &capture.db,
        "UPDATE t SET id = 1000 WHERE id = 7;
         UPDATE t SET n = -8 WHERE id = 8;
         UPDATE t SET id = 2000 WHERE id = 8;
         UPDATE t SET id = 3000 WHERE id = 9;
         UPDATE t SET id = 3001 WHERE id = 3000;
         UPDATE t SET n = 99 WHERE id = 3001;",
    );
    // Four key updates (a delete and a create each) and two updates.
    let rows = wait_lake_rows(&sink, &prefix, "t", 30).await;
    terminate(sink);
    // The path this test is for: the new key's create lacks the value.
    let create = rows
        .iter()
        .find(|r| r.op == "c" && r.values["id"].as_deref() == Some("1000"))
        .unwrap_or_else(|| panic!("no create of key 1000: {rows:?}"));
    assert_eq!(create.unchanged, ["big"], "{create:?}");
    // Each half names the other's key, from Debezium's headers.
    assert_eq!(
        create.key_update.as_deref(),
        Some(r#"{"id":7}"#),
        "{create:?}"
    );
    let delete = rows
        .iter()
        .find(|r| r.op == "d" && r.values["id"].as_deref() == Some("7"))
        .unwrap_or_else(|| panic!("no delete of key 7: {rows:?}"));
    assert_eq!(
        delete.key_update.as_deref(),
        Some(r#"{"id":1000}"#),
        "{delete:?}"
    );
    // The frames say which records have headers: the sink reads the
    // headers of those alone.
    let seen = test_support::kafka::values_seen(&format!("{}.t", capture.db));
    let flagged = seen.iter().filter(|v| v.frame == Some(true)).count();
    assert_eq!(flagged, 8, "the halves of four key updates: {seen:?}");
    for v in &seen {
        assert_eq!(v.frame, Some(!v.headers.is_empty()), "{v:?}");
    }
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "t").await;
    drop(pg);
    drop(capture);
}

/// A TRUNCATE mid-stream (the connector sends it: `skipped.operations` is
/// `none`): the changelog gets a `t` row, and the current-state table
/// loses every row changed before it and keeps what came after, equal to
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn a_truncate_empties_the_current_state_table_of_what_came_before() {
    let capture = OwnCapture::start(
        "trunc",
        "t",
        "CREATE TABLE t (id bigint PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 30) g",
        &[],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "t", 30).await;
    wait_mirror_rows(&prefix, "t", 30).await;
    OwnCapture::sql(
        &capture.db,
        "UPDATE t SET a = 'x' WHERE id = 1;
         TRUNCATE t;
         INSERT INTO t VALUES (5, 'five'), (40, 'forty');
         UPDATE t SET a = 'y' WHERE id = 40;",
    );
    // An update, the TRUNCATE, two inserts and an update.
    let rows = wait_lake_rows(&sink, &prefix, "t", 35).await;
    terminate(sink);
    assert_eq!(
        rows.iter().filter(|r| r.op == "t").count(),
        1,
        "one TRUNCATE row: {rows:?}"
    );
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "t").await;
    // The shipped latest-state query over the changelog agrees.
    let latest = latest_by_query(&prefix, "t");
    let a = |id: &str| latest.get(id).and_then(|r| r["a"].clone());
    assert_eq!(latest.len(), 2, "{latest:?}");
    assert_eq!(
        (a("5").as_deref(), a("40").as_deref()),
        (Some("five"), Some("y"))
    );
    drop(pg);
    drop(capture);
}

/// Keys written without their schema (`key.converter.schemas.enable=false`,
/// a common JsonConverter setting): the sink takes the primary key's
/// columns from the key's field names, in order, so a table with a
/// composite key still gets its current-state table, equal to PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn keys_without_their_schema_still_key_the_current_state_table() {
    let capture = OwnCapture::start_with(
        "barekey",
        "likes",
        // The key's order (user_id, tweet_id) is not its names' sorted one.
        "CREATE TABLE likes (user_id bigint, tweet_id bigint, n integer,
                             PRIMARY KEY (user_id, tweet_id));
         INSERT INTO likes SELECT g % 7, g, g FROM generate_series(1, 30) g",
        &[],
        &[("key.converter.schemas.enable", "false")],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "likes", 30).await;
    OwnCapture::sql(
        &capture.db,
        "UPDATE likes SET n = -n WHERE user_id = 3;
         DELETE FROM likes WHERE user_id = 4;
         UPDATE likes SET user_id = 100 WHERE tweet_id = 1;",
    );
    // 30 reads, 4 updates, 4 deletes, a delete and a create.
    wait_lake_rows(&sink, &prefix, "likes", 40).await;
    terminate(sink);
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "likes").await;
    drop(pg);
    drop(capture);
}

/// A composite key whose second column grows with time (`likes`: new
/// likes go to new tweets, by users from anywhere). Its current-state
/// table, created from a snapshot of 10 rows (too few to tell), keeps its
/// order pending; once 2,000 likes have streamed in, it sorts its files by
/// `tweet_id` first, and stays equal to PostgreSQL through updates,
/// deletes, new likes and a key update. `cdc-sink mirror --rebuild` with
/// `mirror.clustering = "key"` sorts it in the key's own order, and it is
/// equal still.
#[tokio::test(flavor = "multi_thread")]
async fn a_current_state_table_sorts_a_composite_key_by_time_until_rebuilt_by_key() {
    // Like `g` is of one of the 20 newest tweets (`g / 10` is the newest),
    // by one of 500 users; a user's likes are 50 tweets apart.
    let likes = |from: i32, to: i32| {
        format!(
            "INSERT INTO likes SELECT (g * 7919) % 500, g / 10 + (g * 13) % 20, g \
             FROM generate_series({from}, {to}) g"
        )
    };
    let capture = OwnCapture::start(
        "clustered",
        "likes",
        &format!(
            "CREATE TABLE likes (user_id bigint, tweet_id bigint, n integer,
                                 PRIMARY KEY (user_id, tweet_id));
             {}",
            likes(1, 10)
        ),
        &[],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    let pg = capture.client().await;
    let equal = async || {
        if !table_exists(&prefix, "likes", true) {
            return Err("no current-state table yet".to_string());
        }
        mirror_diff(&pg, "deltalake", &prefix, "likes").await
    };
    let state = |prefix: &str| table_state(prefix, "_current/likes", &[]).configuration;
    let order = |prefix: &str| -> Vec<String> {
        serde_json::from_str(&state(prefix)["cdc.clusterBy"]).unwrap()
    };
    wait_until(
        "the snapshot in the current-state table",
        Duration::from_secs(90),
        equal,
    )
    .await;
    assert_eq!(order(&prefix), ["user_id", "tweet_id"]);
    assert!(state(&prefix).contains_key("cdc.clusterByPending"));
    OwnCapture::sql(&capture.db, &likes(11, 2000));
    wait_until(
        "the likes in the current-state table",
        Duration::from_secs(90),
        equal,
    )
    .await;
    assert_eq!(order(&prefix), ["tweet_id", "user_id"]);
    assert!(!state(&prefix).contains_key("cdc.clusterByPending"));
    OwnCapture::sql(
        &capture.db,
        &format!(
            "UPDATE likes SET n = -n WHERE user_id = 3;
             DELETE FROM likes WHERE tweet_id BETWEEN 150 AND 160;
             {};
             UPDATE likes SET user_id = 1000 WHERE tweet_id = 190 AND user_id < 100;",
            likes(2001, 2500)
        ),
    );
    wait_until(
        "the changes in the current-state table",
        Duration::from_secs(90),
        equal,
    )
    .await;
    terminate(sink);
    assert_eq!(order(&prefix), ["tweet_id", "user_id"]);
    assert_mirror_equals_pg(&pg, &prefix, "likes").await;

    let rebuilt = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["mirror", "--table", "likes", "--rebuild"])
        .env("CDC_SINK_OUTPUT__PREFIX", &prefix)
        .env("CDC_SINK_KAFKA__GROUP_ID", &capture.group)
        .env("CDC_SINK_MIRROR__CLUSTERING", "key")
        .status()
        .expect("run cdc-sink mirror");
    assert!(rebuilt.success(), "{rebuilt}");
    assert_eq!(order(&prefix), ["user_id", "tweet_id"]);
    assert_mirror_equals_pg(&pg, &prefix, "likes").await;

    // Rebuilt again in a budget that its 2,500 rows outgrow: range by
    // range of `tweet_id`, committed at once.
    let rebuilt = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["mirror", "--table", "likes", "--rebuild"])
        .env("CDC_SINK_OUTPUT__PREFIX", &prefix)
        .env("CDC_SINK_KAFKA__GROUP_ID", &capture.group)
        .env("CDC_SINK_MIRROR__BUILD_MEMORY_BYTES", "65536")
        .output()
        .expect("run cdc-sink mirror");
    let said = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(rebuilt.status.success(), "{}: {said}", rebuilt.status);
    assert!(said.contains("ranges of its order"), "{said}");
    assert_eq!(order(&prefix), ["tweet_id", "user_id"]);
    assert_mirror_equals_pg(&pg, &prefix, "likes").await;
    drop(pg);
    drop(capture);
}

/// A primary key whose type changes (`integer` to `bigint`, as a table
/// whose ids run out is mended) goes on in the changelog in a sibling
/// column (`id__long`, the lossless rule for any changed type), so new
/// changes leave `id` empty. The current-state table follows: rebuilt once
/// with `id` as `bigint`, an update and a delete of keys written before
/// the change find their rows, a new key past `integer`'s range and a
/// primary-key update land, and it equals PostgreSQL through every reader.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_type_change_is_followed_by_the_current_state_table() {
    let capture = OwnCapture::start(
        "keytype",
        "t",
        "CREATE TABLE t (id integer PRIMARY KEY, a text);
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 20) g",
        &[],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "t", 20).await;
    wait_mirror_rows(&prefix, "t", 20).await;
    OwnCapture::sql(
        &capture.db,
        "ALTER TABLE t ALTER COLUMN id TYPE bigint;
         INSERT INTO t VALUES (3000000000, 'big');
         UPDATE t SET a = 'b5' WHERE id = 5;
         DELETE FROM t WHERE id = 6;
         UPDATE t SET id = 4000000000 WHERE id = 7;",
    );
    // 20 reads, an insert, an update, a delete, and a key update's delete
    // and create.
    wait_lake_rows(&sink, &prefix, "t", 25).await;
    wait_log(
        &sink,
        "a primary-key column changed type",
        1,
        Duration::from_secs(60),
    )
    .await;
    // The mirror has caught up once it holds the new key.
    wait_until(
        "the key update in the current-state table",
        Duration::from_secs(60),
        async || {
            let rows = mirror_rows("deltalake", &prefix, "t");
            match rows
                .iter()
                .any(|r| r.values.get("id") == Some(&Some("4000000000".to_string())))
            {
                true => Ok(()),
                false => Err(format!("{} rows", rows.len())),
            }
        },
    )
    .await;
    terminate(sink);

    // The changelog has the new changes' keys in the sibling column.
    let rows = lake_rows("deltalake", &prefix, &["t"]);
    let big = rows
        .iter()
        .find(|r| r.values.get("id__long") == Some(&Some("3000000000".to_string())))
        .unwrap_or_else(|| panic!("no row with id__long 3000000000: {rows:?}"));
    assert_eq!(big.values["id"], None);
    // The current-state table has one `id`, of the new type.
    let mirror = mirror_rows("deltalake", &prefix, "t");
    assert!(
        mirror.iter().all(|r| !r.values.contains_key("id__long")),
        "{mirror:?}"
    );
    let pg = capture.client().await;
    assert_mirror_equals_pg(&pg, &prefix, "t").await;
    drop(pg);
    drop(capture);
}

/// Two sinks of one consumer group share a table's partitions, so both
/// rewrite its current-state table and race each other's commits; meanwhile
/// `cdc-sink upkeep` runs again and again, compacting the changelog and
/// checkpointing the mirror. Inserts, updates, deletes and primary-key
/// updates of rows with a TOASTed value go on throughout (the halves of a
/// key update often committed by different sinks). Afterwards the mirror
/// equals PostgreSQL
/// through every reader, and both sinks and upkeep are shown to have done
/// their part while the writes went on.
#[tokio::test(flavor = "multi_thread")]
async fn current_state_tables_stay_equal_with_two_sinks_and_upkeep_running() {
    let capture = OwnCapture::start(
        "duo",
        "t",
        // `big` is TOASTed (EXTERNAL: out of line) in the rows whose key
        // the rounds update: the create of each new key lacks it, and its
        // two halves are often in partitions of different sinks.
        "CREATE TABLE t (id bigint PRIMARY KEY, a text, n integer, big text);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO t SELECT g, 'a' || g, g,
                CASE WHEN g <= 100 THEN repeat(md5(g::text), 100) END
           FROM generate_series(1, 2000) g",
        &[],
    )
    .await;
    // The sinks subscribe by pattern, which sees a topic created later
    // only at a metadata refresh: start them once the snapshot is in.
    let topic = format!("{}.t", capture.db);
    wait_until(
        "the snapshot of t in Kafka",
        Duration::from_secs(120),
        async || {
            let n: i64 = watermarks(&kafka_consumer("duo"), &[&topic]).values().sum();
            if n >= 2000 {
                Ok(())
            } else {
                Err(format!("{n} events"))
            }
        },
    )
    .await;
    // The topic of `t` has three partitions (the stack's default): each
    // sink gets at least one once both have joined.
    let a = capture.spawn_sink();
    let b = capture.spawn_sink();
    // Both have joined (the first to join may have read the snapshot
    // already, so the other may see no message before the writes).
    wait_log(&a, ASSIGNED, 1, Duration::from_secs(60)).await;
    wait_log(&b, ASSIGNED, 1, Duration::from_secs(60)).await;
    let prefix = capture.prefix.clone();

    let (stop_tx, stop_rx) = watch::channel(false);
    let upkeep = {
        let (prefix, group) = (prefix.clone(), capture.group.clone());
        tokio::task::spawn_blocking(move || {
            let mut logs = Vec::new();
            // Until told to stop, or the test is gone (a failed assertion
            // drops the sender; the runtime would wait on this loop).
            while stop_rx.has_changed().is_ok() && !*stop_rx.borrow() {
                let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
                    .arg("upkeep")
                    .env("CDC_SINK_OUTPUT__PREFIX", &prefix)
                    .env("CDC_SINK_KAFKA__GROUP_ID", &group)
                    .env("CDC_SINK_LAKE__COMPACT_MIN_FILES", "2")
                    .env("RUST_LOG", "info")
                    .output()
                    .unwrap();
                let text = strip_ansi(
                    &(String::from_utf8_lossy(&out.stdout).to_string()
                        + &String::from_utf8_lossy(&out.stderr)),
                );
                assert!(out.status.success(), "upkeep failed:\n{text}");
                logs.push(text);
            }
            logs
        })
    };

    let writes_began_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    for round in 0..30i64 {
        let base = 10_000 + round * 50;
        OwnCapture::sql(
            &capture.db,
            &format!(
                "INSERT INTO t SELECT g, 'r{round}-' || g, g FROM generate_series({base}, {}) g;
                 UPDATE t SET a = a || '+', n = n + 1 WHERE id % 9 = {};
                 DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY md5(id::text || '{round}') LIMIT 7);
                 UPDATE t SET id = id + 1000000 WHERE id = (SELECT min(id) FROM t WHERE id < 10000);",
                base + 49,
                round % 9
            ),
        );
        // Paces the writes over several flushes of both sinks (1 s each);
        // not synchronisation.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    let pg = capture.client().await;
    wait_until(
        "the current-state table to equal PostgreSQL",
        Duration::from_secs(120),
        async || mirror_diff(&pg, "deltalake", &prefix, "t").await,
    )
    .await;
    stop_tx.send(true).unwrap();
    let upkeep_logs = upkeep.await.unwrap();
    let (sa, sb) = (scrape(a.ops).await, scrape(b.ops).await);
    terminate(a);
    terminate(b);
    assert_mirror_equals_pg(&pg, &prefix, "t").await;

    // Both sinks rewrote the mirror.
    for (name, s) in [("first", &sa), ("second", &sb)] {
        let commits = s.value("cdc_sink_mirror_commits_total", &[("table", "t")]);
        assert!(commits > 0.0, "the {name} sink committed no mirror rewrite");
        assert_eq!(
            s.sample("cdc_sink_mirror_errors_total", &[("table", "t")]),
            None,
            "the {name} sink failed a mirror sync"
        );
        assert_eq!(
            s.sample(
                "cdc_sink_mirror_unavailable_values_total",
                &[("table", "t")]
            ),
            None,
            "the {name} sink applied half of a key update alone"
        );
    }
    // How current each commit says the mirror is never goes back, though
    // two writers commit batches of different partitions; at the end every
    // partition is through a change made after the writes began.
    let mut marks = Vec::new();
    let log: Vec<_> = store()
        .list(Some(&Path::from(format!("{prefix}/_current/t/_delta_log"))))
        .try_collect()
        .await
        .unwrap();
    for meta in log
        .iter()
        .filter(|m| m.location.as_ref().ends_with(".json"))
    {
        let bytes = store()
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(action) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if let Some(info) = action.get("commitInfo")
                && let Some(v) = info.get("cdc.changelogVersion")
            {
                marks.push((
                    v.as_i64().unwrap(),
                    info["cdc.sourceCommitTsMicros"].as_i64(),
                    info["cdc.partitions"].as_object().map_or(0, |p| p.len()),
                ));
            }
        }
    }
    marks.sort();
    assert!(marks.len() > 2, "{marks:?}");
    assert!(
        marks.windows(2).all(|w| w[0].1 <= w[1].1),
        "a mirror commit says it is less current than the one before: {marks:?}"
    );
    let last = marks.last().unwrap();
    assert_eq!(last.2, 3, "every partition's position in {last:?}");
    assert!(
        last.1.unwrap() >= writes_began_us,
        "{last:?}: every partition through a change after {writes_began_us}"
    );

    // Upkeep compacted the changelog and checkpointed the mirror while
    // the sinks wrote.
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    let lines: Vec<&str> = upkeep_logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains(" upkeep"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| field(l, "table").as_deref() == Some("t")
                && field(l, "compacted").is_some_and(|c| c != "0")),
        "upkeep never compacted the changelog in {} runs:\n{}",
        upkeep_logs.len(),
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| field(l, "table").as_deref() == Some("_current/t")
                && field(l, "checkpoint").is_some_and(|c| c.starts_with("Some"))),
        "upkeep never checkpointed the mirror:\n{}",
        lines.join("\n")
    );
    drop(pg);
    drop(capture);
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A table whose lake was written before the value converter (Debezium's
/// own `Decimal` and `Bits`) keeps working when the connector gains it:
/// the decimal column keeps its type, a NaN lands in `<name>__string`
/// beside it, a bit string lands as text beside the old binary column, and
/// the latest state equals PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn a_lake_written_before_the_converter_keeps_its_column_types() {
    let mut capture = OwnCapture::start(
        "mig",
        "t",
        "CREATE TABLE t (id bigint PRIMARY KEY, n numeric(10,3), b4 bit(4), amounts numeric(6,2)[]);
         INSERT INTO t VALUES (1, 12.5, B'0101', '{1.25}')",
        &["converters", "exact.type"],
    )
    .await;
    let sink = capture.spawn_sink();
    let prefix = capture.prefix.clone();
    wait_lake_rows(&sink, &prefix, "t", 1).await;
    let before = lake_schema(&prefix, "t");
    assert_eq!(before["n"], "decimal128(10, 3)");
    assert_eq!(before["b4"], "binary", "Debezium's Bits bytes");

    // Changes made while the connector is stopped are read by the
    // reconfigured one: every one of them through the converter.
    capture.stop().await;
    OwnCapture::sql(
        &capture.db,
        "INSERT INTO t VALUES (2, 'NaN', B'0011', '{NaN,2}');
         UPDATE t SET n = 7.25 WHERE id = 1;",
    );
    capture.config["converters"] = "exact".into();
    capture.config["exact.type"] = "io.cdclake.debezium.ExactValueConverter".into();
    capture.reconfigure_and_resume().await;
    let mut rows = wait_lake_rows(&sink, &prefix, "t", 3).await;
    terminate(sink);
    assert_eq!(rows.len(), 3, "a snapshot read, an insert, an update");

    let after = lake_schema(&prefix, "t");
    assert_eq!(after["n"], "decimal128(10, 3)", "the column keeps its type");
    assert_eq!(after["n__string"], "string");
    assert_eq!(after["b4"], "binary");
    assert_eq!(after["b4__string"], "string");
    assert_eq!(after["amounts"], "list<element: decimal128(6, 2)>");
    assert_eq!(after["amounts__string"], "list<element: string>");
    let pg = capture.client().await;
    assert_latest_state_matches(&pg, "t", &mut rows).await;
    let nan = rows.iter().find(|r| r.key() == "2").unwrap();
    assert_eq!(nan.values["n"], None, "the decimal is NULL for a NaN");
    assert_eq!(nan.values["n__string"].as_deref(), Some("NaN"));
    drop(pg);
    drop(capture);
}

const CREATE_SQL: &str =
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); CREATE DOMAIN price AS numeric(12,2);
         CREATE TABLE zoo (id bigint PRIMARY KEY, r real, d double precision, n numeric(10,3), \
         t text, ts timestamptz, lts timestamp, dur interval, j jsonb, u uuid, b bytea, \
         tags text[], nums integer[], wide numeric(40,5), free numeric, free_arr numeric[], \
         amounts numeric(6,2)[], vb bit varying(16), b4 bit(4), tz timetz, cash money, \
         feeling mood, cost price, span int4range, long_bits bit varying, \
         dflt text DEFAULT 'abc', dnum numeric(5,2) DEFAULT 1.5);
         -- Out of line and uncompressed: an update that leaves them alone
         -- sends Debezium's unchanged-TOAST placeholder (REPLICA IDENTITY DEFAULT).
         ALTER TABLE zoo ALTER COLUMN free_arr SET STORAGE EXTERNAL, ALTER COLUMN nums SET STORAGE EXTERNAL,
           ALTER COLUMN amounts SET STORAGE EXTERNAL, ALTER COLUMN long_bits SET STORAGE EXTERNAL";
const INSERT_SQL: &str = "INSERT INTO zoo VALUES
           (1, 1.5, -2.25e5, 12345.678, 'héllo', '2024-02-29 13:14:15.654321+02', '2024-02-29 13:14:15.654321',
            '1 year 2 months 3 days 04:05:06.789', '{\"k\": [1, {\"x\": null}]}', '6f1c2a8e-2b1d-4f6e-9a51-0c7d3e5b9f10',
            '\\xdeadbeef', '{\"a\",\"b,c\",\"日本\"}', '{1,2,3}',
            12345678901234567890123456789012345.12345, 3.14159265358979, '{1.5,NaN,NULL}', '{1.25,-3.50,NULL}',
            B'00001011', B'0101', '12:34:56.789+05:30', 12.34, 'happy', 3.5, '[1,5)', NULL, NULL, NULL),
           (2, 'NaN', 'Infinity', -0.001, NULL, 'infinity', '-infinity', NULL, NULL, NULL, NULL, '{}', NULL,
            'NaN', 'Infinity', '{NaN,Infinity,-Infinity}', '{NaN}', B'1011', B'0000', '23:59:59.999999-08', -5.5,
            'sad', 'NaN', 'empty', NULL, 'x', 2.25),
           (3, '-Infinity', 'NaN', 'NaN', '', '-infinity', 'infinity', NULL, '[]', NULL, '\\x', NULL, '{}',
            'NaN', '-Infinity', '{}', '{NaN,1}', B'', B'1111', '00:00:00+00', 0, 'ok', 'NaN', NULL, NULL,
            DEFAULT, DEFAULT);
         UPDATE zoo SET r = 'Infinity', d = '-Infinity' WHERE id = 2;
         UPDATE zoo SET r = 'NaN' WHERE id = 3;
         UPDATE zoo SET n = 'NaN', amounts = '{NaN,2}', vb = B'0', wide = 'NaN', free = 'Infinity',
                        tz = '01:02:03-03:30', cost = 'NaN' WHERE id = 1;
         UPDATE zoo SET n = 7.5, amounts = '{0.01}', cost = 99.99, wide = 0.00001 WHERE id = 3;
         DELETE FROM zoo WHERE id = 2;
         UPDATE zoo SET
           free_arr = (SELECT array_agg(g * 1.5) FROM generate_series(1, 3000) g),
           nums = (SELECT array_agg(g) FROM generate_series(1, 1000) g),
           amounts = (SELECT array_agg(CASE WHEN g = 500 THEN 'NaN'::numeric ELSE g END) FROM generate_series(1, 1000) g),
           long_bits = repeat('01', 10000)::varbit WHERE id = 3;
         UPDATE zoo SET r = 2.5 WHERE id = 3;";

/// An insert whose NOT NULL column arrives NULL (a value the connector
/// lost) lands as it came, and the sink says so: one WARN per table and
/// column, and the metric counts every such row. A NULL in a nullable
/// column, and a delete's key-only image, are no loss.
#[tokio::test(flavor = "multi_thread")]
async fn a_null_in_a_not_null_column_is_logged_once_and_counted() {
    let tpl = EventTemplate::new().await;
    let sc = Scenario::new("lostvalue", 1).await;
    let p = producer();
    let lost = |id: i64| {
        let mut v: Value = serde_json::from_slice(&tpl.event(id)).unwrap();
        // users.display_name is NOT NULL; users.bio is nullable.
        v["payload"]["after"]["display_name"] = Value::Null;
        v["payload"]["after"]["bio"] = Value::Null;
        serde_json::to_vec(&v).unwrap()
    };
    let required: Vec<String> = tpl.0["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "after")
        .unwrap()["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["optional"] == false)
        .map(|f| f["field"].as_str().unwrap().to_string())
        .collect();
    assert!(
        required.contains(&"display_name".to_string()),
        "{required:?}"
    );
    send(&p, &sc.topic, 0, Some(&tpl.event(1))).await;
    send(&p, &sc.topic, 0, Some(&lost(2))).await;
    let last = send(&p, &sc.topic, 0, Some(&lost(3))).await;

    let sink = sc.spawn(&[]);
    wait_committed(&sc.group, &sc.until(0, last + 1)).await;
    let samples = scrape(sink.ops).await;
    let warned = sink.count("a NOT NULL column arrived NULL");
    terminate(sink);

    let counted = samples.sample(
        "cdc_sink_null_in_not_null_column_total",
        &[("table", sc.table.as_str()), ("column", "display_name")],
    );
    assert_eq!(counted, Some(2.0), "every such row is counted");
    assert_eq!(
        samples.sample(
            "cdc_sink_null_in_not_null_column_total",
            &[("table", sc.table.as_str()), ("column", "bio")],
        ),
        None,
        "a nullable column's NULL is no loss"
    );
    assert_eq!(warned, 1, "said once per table and column");
    let rows = sc.rows("deltalake");
    assert_eq!(rows.len(), 3, "the rows land as they came");
    let nulls = rows
        .iter()
        .filter(|r| r.values["display_name"].is_none())
        .count();
    assert_eq!(nulls, 2);
}

/// Every Delta commit is a conditional put of `_delta_log/<version>.json`
/// (cdc-sink's `storage`, without the AWS SDK): of two creates of one key
/// on MinIO, exactly one succeeds.
#[tokio::test]
async fn s3_conditional_put_lets_one_writer_win() {
    use object_store::{PutMode, PutOptions};
    let s3 = store();
    let key = Path::from(format!(
        "cput-{}/_delta_log/00000000000000000000.json",
        unique()
    ));
    let create = || PutOptions::from(PutMode::Create);
    s3.put_opts(&key, "first".into(), create()).await.unwrap();
    let second = s3.put_opts(&key, "second".into(), create()).await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "{second:?}"
    );
    let kept = s3.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(&kept[..], b"first");
}

/// Runs the sink until it exits on its own; panics if it is still running
/// after `limit`.
fn exit_within(sink: SinkProcess, limit: Duration) -> std::process::ExitStatus {
    let mut child = sink.take();
    let exited = try_wait_until_blocking("the sink to exit", limit, || {
        child.try_wait().unwrap().ok_or("still running")
    });
    exited.unwrap_or_else(|e| {
        child.kill().unwrap();
        panic!("sink still running after {limit:?}: {e}");
    })
}

/// Without a reachable broker the sink retries for `give_up_after_secs`,
/// then exits non-zero so that systemd restarts it.
#[test]
fn kafka_unreachable_exits_non_zero_after_the_deadline() {
    let run = unique();
    let sink = spawn_sink(
        &format!("down-{run}"),
        &format!("down-{run}"),
        &[
            ("CDC_SINK_KAFKA__BROKERS", "127.0.0.1:1"),
            ("CDC_SINK_GIVE_UP_AFTER_SECS", "4"),
        ],
    );
    let started = Instant::now();
    let status = exit_within(sink, Duration::from_secs(60));
    assert!(!status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "gave up too early"
    );
}

/// With S3 unreachable the first lake request is retried until the
/// deadline, then the sink exits non-zero without committing anything.
#[test]
fn s3_unreachable_exits_non_zero_without_committing() {
    let run = unique();
    let group = format!("s3down-{run}");
    let sink = spawn_sink(
        &format!("s3down-{run}"),
        &group,
        &[
            ("CDC_SINK_KAFKA__TOPICS", "[\"twitter.users\"]"),
            ("CDC_SINK_S3__ENDPOINT", "http://127.0.0.1:1"),
            ("CDC_SINK_GIVE_UP_AFTER_SECS", "4"),
        ],
    );
    let log = sink.log.clone();
    let status = exit_within(sink, Duration::from_secs(90));
    assert!(!status.success(), "{status}");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("the lake failed"), "{text}");
    let c = kafka_consumer(&group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("twitter.users", p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for e in committed.elements() {
        assert!(
            !matches!(e.offset(), Offset::Offset(o) if o > 0),
            "committed {:?} although nothing was written",
            e.offset()
        );
    }
}

/// The sink's metrics agree with what the lake and Kafka hold, read
/// independently: messages per table with Kafka, rows written with the
/// lake's rows (deltalake reader), files with the Delta log, freshness with
/// the newest source time published; consumer lag falls to 0 once the input
/// stops; /healthz and /readyz answer 200.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_the_lake_and_lag_drops_to_zero() {
    let run = unique();
    let prefix = format!("metrics-{run}");
    let group = format!("metrics-{run}");
    let _lock = PG_WRITERS.lock().await;
    let pg = pg().await;
    let start = watermarks(&kafka_consumer("metrics"), &TOPICS);
    commit_offsets(&group, &start).await;
    let sink = spawn_sink(&prefix, &group, &[]);
    wait_log(&sink, ASSIGNED, 1, Duration::from_secs(60)).await;
    assert_eq!(http::get(sink.ops, "/healthz").await.status, 200);

    run_generator(20).await;
    let until = published_barrier(&pg).await;
    wait_committed(&group, &until).await;

    // The input has stopped and everything is committed: every assigned
    // partition's lag reaches 0 within a few statistics intervals (5 s).
    let partitions = until
        .keys()
        .filter(|(t, _)| TOPICS.contains(&t.as_str()))
        .count();
    let samples: Scrape = wait_until(
        &format!("consumer lag to drop to 0 for all {partitions} partitions"),
        Duration::from_secs(30),
        async || {
            let samples = scrape(sink.ops).await;
            let lags = samples.values("cdc_sink_consumer_lag");
            if lags.len() >= partitions && lags.iter().all(|l| *l == 0.0) {
                Ok(samples)
            } else {
                Err(format!("{lags:?}"))
            }
        },
    )
    .await;
    let ready = http::get(sink.ops, "/readyz").await;
    let (status, why) = (ready.status, ready.body);
    assert_eq!(status, 200, "/readyz: {why}");
    assert_eq!(samples.sample("cdc_sink_ready", &[]), Some(1.0));

    let messages = read_range(&start, &until);
    let rows = lake_rows("deltalake", &prefix, &TABLES);
    for (topic, table) in TOPICS.iter().zip(TABLES) {
        let labels = [("table", table)];
        let published: Vec<&RawMessage> = messages.iter().filter(|m| m.topic == *topic).collect();
        assert_eq!(
            samples.sample("cdc_sink_messages_total", &labels),
            Some(published.len() as f64),
            "{table}: messages consumed vs Kafka"
        );
        let in_lake = rows.iter().filter(|r| r.table == table).count();
        assert!(in_lake > 0, "{table}: nothing landed");
        assert_eq!(
            samples.sample("cdc_sink_rows_written_total", &labels),
            Some(in_lake as f64),
            "{table}: rows written vs the lake"
        );
        let files = table_state(&prefix, table, &[]).files.len();
        assert_eq!(
            samples.sample("cdc_sink_files_written_total", &labels),
            Some(files as f64),
            "{table}: files written vs the Delta log"
        );
        let commits = samples.sample("cdc_sink_commits_total", &labels).unwrap();
        assert_eq!(
            samples.sample("cdc_sink_commit_duration_seconds_count", &labels),
            Some(commits),
            "{table}: one latency sample per commit"
        );
        // Freshness: the newest PostgreSQL commit time among the rows.
        let newest_ms = published
            .iter()
            .filter_map(|m| m.value.as_ref())
            .map(|v| {
                let v: Value = serde_json::from_slice(v).unwrap();
                v["payload"]["source"]["ts_ms"].as_i64().unwrap()
            })
            .max()
            .unwrap();
        let gauge = samples
            .sample("cdc_sink_lake_source_timestamp_seconds", &labels)
            .unwrap();
        assert!(
            (gauge * 1000.0 - newest_ms as f64).abs() < 1.0,
            "{table}: freshness gauge {gauge} vs newest source time {newest_ms} ms"
        );
    }
    assert_eq!(
        samples.sample("cdc_sink_oldest_unflushed_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(samples.sample("cdc_sink_buffered_bytes", &[]), Some(0.0));
    terminate(sink);
}
