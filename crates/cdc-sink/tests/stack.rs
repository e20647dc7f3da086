//! Integration tests against the real local stack (`tests/stack.sh up`):
//! PostgreSQL, Debezium on Kafka Connect, Kafka and MinIO. Nothing is
//! mocked; with the stack down these tests fail with a message saying so.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use arrow::util::display::array_value_to_string;
use cdc_sink::config::SinkConfig;
use cdc_sink::pipeline::s3_store;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::watch;

/// Tests that write to PostgreSQL hold this, so that one test's writes
/// never land between another's barrier and its comparison.
static PG_WRITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPICS: [&str; 3] = ["twitter.users", "twitter.tweets", "twitter.likes"];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. These tests need the local stack: run `tests/run.sh`, \
             or `tests/stack.sh up && eval \"$(tests/stack.sh env)\"` first"
        )
    })
}

fn unique() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

async fn pg() -> tokio_postgres::Client {
    let conn = format!(
        "host={} port={} dbname=twitter user=tweetgen password={} connect_timeout=5",
        env("TWEETGEN_DATABASE__HOST"),
        env("TWEETGEN_DATABASE__PORT"),
        env("TWEETGEN_DATABASE__PASSWORD")
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL of the local stack is not reachable (tests/stack.sh up)");
    tokio::spawn(connection);
    client
}

fn kafka_consumer(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", env("CDC_SINK_KAFKA__BROKERS"))
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer")
}

/// High watermarks of every partition of `topics`.
fn watermarks(c: &BaseConsumer, topics: &[&str]) -> BTreeMap<(String, i32), i64> {
    let mut out = BTreeMap::new();
    for t in topics {
        let md = c
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("Kafka of the local stack is not reachable (tests/stack.sh up)");
        for p in md.topics()[0].partitions() {
            let (_, high) = c
                .fetch_watermarks(t, p.id(), Duration::from_secs(10))
                .unwrap();
            out.insert((t.to_string(), p.id()), high);
        }
    }
    out
}

/// Every message of `topics` up to `until`, as (topic, partition, offset,
/// key, value).
type Raw = (String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);
fn read_all(until: &BTreeMap<(String, i32), i64>) -> Vec<Raw> {
    read_range(&BTreeMap::new(), until)
}

/// Messages from `from` (the beginning where absent) up to `until`.
fn read_range(
    from: &BTreeMap<(String, i32), i64>,
    until: &BTreeMap<(String, i32), i64>,
) -> Vec<Raw> {
    let c = kafka_consumer(&format!("reader-{}", unique()));
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    for (tp, high) in until.iter() {
        let low = from.get(tp).copied().unwrap_or(0);
        total += high - low;
        tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(low))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as i64) < total {
        assert!(Instant::now() < deadline, "timed out reading topics back");
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            let high = until[&(m.topic().to_string(), m.partition())];
            if m.offset() < high {
                out.push((
                    m.topic().to_string(),
                    m.partition(),
                    m.offset(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                ));
            }
        }
    }
    out
}

fn sink_config(prefix: &str, group: &str) -> SinkConfig {
    let mut cfg = SinkConfig::from_figment(SinkConfig::figment(None)).unwrap();
    cfg.output.prefix = prefix.to_string();
    cfg.kafka.group_id = group.to_string();
    cfg
}

/// A running sink, killed if a failing test leaves it behind.
struct SinkProcess(Option<Child>);

impl SinkProcess {
    fn take(mut self) -> Child {
        self.0.take().expect("running")
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the real sink binary with its own group and prefix.
fn spawn_sink(prefix: &str, group: &str, extra: &[(&str, &str)]) -> SinkProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc-sink"));
    cmd.env("CDC_SINK_OUTPUT__PREFIX", prefix)
        .env("CDC_SINK_KAFKA__GROUP_ID", group)
        .env("CDC_SINK_FLUSH__MAX_AGE_MS", "1000")
        .env("CDC_SINK_KAFKA__INSTANCE_ID", format!("{group}-sink"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    SinkProcess(Some(cmd.spawn().expect("start cdc-sink")))
}

fn terminate(sink: SinkProcess) {
    let mut child = sink.take();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "sink exited with {status} after SIGTERM");
}

/// Waits until `group` has committed every partition up to `until`.
async fn wait_committed(group: &str, until: &BTreeMap<(String, i32), i64>) {
    let c = kafka_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for ((t, p), _) in until.iter() {
        tpl.add_partition(t, *p);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let committed = c
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .unwrap();
        let behind: Vec<_> = committed
            .elements()
            .iter()
            .filter_map(|e| {
                let want = until[&(e.topic().to_string(), e.partition())];
                let have = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                (have < want).then(|| format!("{}[{}] {have}/{want}", e.topic(), e.partition()))
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sink did not catch up: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn read_parquet(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<(String, RecordBatch)> {
    let keys: Vec<Path> = store
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys.iter().filter(|k| k.as_ref().ends_with(".parquet")) {
        let bytes = store.get(key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&bytes[..4], b"PAR1", "{key} is not Parquet");
        let table = key
            .as_ref()
            .trim_start_matches(prefix)
            .trim_start_matches('/');
        let table = table.split('/').next().unwrap().to_string();
        for batch in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            out.push((table.clone(), batch.unwrap()));
        }
    }
    out
}

fn primary_key(table: &str) -> &'static [&'static str] {
    match table {
        "likes" => &["user_id", "tweet_id"],
        _ => &["id"],
    }
}

/// Canonical text of one cell: timestamps as epoch microseconds, the rest
/// as Arrow displays them (decimals with their scale, lists as `[a, b]`).
fn cell(col: &dyn Array, row: usize) -> Option<String> {
    if col.is_null(row) {
        return None;
    }
    if let DataType::Timestamp(..) = col.data_type() {
        let micros = cast(&col.slice(row, 1), &DataType::Int64).unwrap();
        return Some(micros.as_primitive::<Int64Type>().value(0).to_string());
    }
    Some(array_value_to_string(col, row).unwrap())
}

/// One change as the lake has it.
struct LakeRow {
    key: String,
    op: String,
    lsn: i64,
    partition: i32,
    offset: i64,
    values: BTreeMap<String, Option<String>>,
    unchanged: Vec<String>,
}

fn lake_rows(batches: &[(String, RecordBatch)]) -> HashMap<String, Vec<LakeRow>> {
    let mut out: HashMap<String, Vec<LakeRow>> = HashMap::new();
    for (table, b) in batches {
        let schema = b.schema();
        let col = |name: &str| b.column(schema.index_of(name).unwrap()).clone();
        for r in 0..b.num_rows() {
            let mut values = BTreeMap::new();
            for (i, f) in schema.fields().iter().enumerate() {
                if !f.name().starts_with("_cdc_") {
                    values.insert(f.name().clone(), cell(b.column(i).as_ref(), r));
                }
            }
            let key = primary_key(table)
                .iter()
                .map(|k| values[*k].clone().expect("key column set"))
                .collect::<Vec<_>>()
                .join(",");
            let unchanged_col = col("_cdc_unchanged_cols");
            let unchanged = if unchanged_col.is_null(r) {
                Vec::new()
            } else {
                let l = unchanged_col.as_list::<i32>().value(r);
                (0..l.len())
                    .map(|i| array_value_to_string(&l, i).unwrap())
                    .collect()
            };
            out.entry(table.clone()).or_default().push(LakeRow {
                key,
                op: cell(col("_cdc_op").as_ref(), r).unwrap(),
                lsn: cell(col("_cdc_lsn").as_ref(), r).unwrap().parse().unwrap(),
                partition: cell(col("_cdc_kafka_partition").as_ref(), r)
                    .unwrap()
                    .parse()
                    .unwrap(),
                offset: cell(col("_cdc_kafka_offset").as_ref(), r)
                    .unwrap()
                    .parse()
                    .unwrap(),
                values,
                unchanged,
            });
        }
    }
    out
}

/// (table, key, op, lsn) of every change event Debezium published.
fn published(raw: &[Raw]) -> Vec<(String, String, String, i64)> {
    let mut out = Vec::new();
    for (topic, _, _, key, value) in raw {
        let Some(value) = value else { continue };
        let v: Value = serde_json::from_slice(value).unwrap();
        let k: Value = serde_json::from_slice(key.as_ref().unwrap()).unwrap();
        let table = topic.rsplit('.').next().unwrap();
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
/// value lies before the window is dropped from the row (it cannot be known).
fn latest_state(
    rows: &mut [LakeRow],
) -> BTreeMap<String, Option<BTreeMap<String, Option<String>>>> {
    // One key always lands in one partition, so offset order is change order.
    rows.sort_by_key(|r| (r.partition, r.offset));
    let mut state: BTreeMap<String, Option<BTreeMap<String, Option<String>>>> = BTreeMap::new();
    for r in rows.iter() {
        if r.op == "d" {
            state.insert(r.key.clone(), None);
            continue;
        }
        let mut values = r.values.clone();
        for c in &r.unchanged {
            match state
                .get(&r.key)
                .and_then(|p| p.as_ref())
                .and_then(|p| p.get(c))
            {
                Some(prev) => values.insert(c.clone(), prev.clone()),
                None => values.remove(c),
            };
        }
        state.insert(r.key.clone(), Some(values));
    }
    state
}

/// The same canonical text, computed by PostgreSQL, for the rows whose
/// key is in `keys` (keys as the lake writes them: "1" or "3,17").
async fn pg_state(
    pg: &tokio_postgres::Client,
    table: &str,
    keys: &[&String],
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let cols = pg
        .query(
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap();
    let mut exprs = Vec::new();
    let mut names = Vec::new();
    for c in &cols {
        let (name, ty): (String, String) = (c.get(0), c.get(1));
        exprs.push(match ty.as_str() {
            "timestamp with time zone" => {
                format!("(extract(epoch from {name}) * 1000000)::bigint::text")
            }
            "ARRAY" => format!("'[' || array_to_string({name}, ', ') || ']'"),
            _ => format!("{name}::text"),
        });
        names.push(name);
    }
    let key_cols = primary_key(table);
    let parts: Vec<Vec<i64>> = (0..key_cols.len())
        .map(|i| {
            keys.iter()
                .map(|k| k.split(',').nth(i).unwrap().parse().unwrap())
                .collect()
        })
        .collect();
    let sql = format!(
        "SELECT {} FROM {table} WHERE ({}) IN (SELECT * FROM unnest({}))",
        exprs.join(", "),
        key_cols.join(", "),
        (1..=key_cols.len())
            .map(|i| format!("${i}::bigint[]"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parts
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let mut out = BTreeMap::new();
    for row in pg.query(&sql, &params).await.unwrap() {
        let values: BTreeMap<String, Option<String>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), row.get::<_, Option<String>>(i)))
            .collect();
        let key = key_cols
            .iter()
            .map(|k| values[*k].clone().unwrap())
            .collect::<Vec<_>>()
            .join(",");
        out.insert(key, values);
    }
    out
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
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let marks = watermarks(&c, &["twitter.users"]);
        if marks
            .get(&("twitter.users".to_string(), 0))
            .is_some_and(|&h| h > 0)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no events reached twitter.users partition 0"
        );
        pg.execute(
            "INSERT INTO users (username, display_name) VALUES ($1, 'Seed')",
            &[&format!("seed_{}", unique())],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until Debezium has published a row committed now, so that every
/// earlier transaction is in Kafka too (Debezium publishes in commit order).
async fn published_barrier(pg: &tokio_postgres::Client) -> BTreeMap<(String, i32), i64> {
    let name = format!("barrier_{}", unique());
    pg.execute(
        "INSERT INTO users (username, display_name) VALUES ($1, 'Barrier')",
        &[&name],
    )
    .await
    .unwrap();
    let c = kafka_consumer(&format!("barrier-{}", unique()));
    // Assigned, not subscribed: a group subscription would reset to the
    // latest offset and could miss the barrier.
    let mut tpl = TopicPartitionList::new();
    for ((t, p), _) in watermarks(&c, &["twitter.users"]) {
        tpl.add_partition_offset(&t, p, Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "Debezium did not publish {name} within 60s"
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500))
            && m.payload()
                .is_some_and(|p| String::from_utf8_lossy(p).contains(&name))
        {
            break;
        }
    }
    // Producer acks of other partitions may trail by a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let now = loop {
        let now = watermarks(&c, &["twitter.tweets"]);
        if !now.is_empty() {
            break now;
        }
        assert!(Instant::now() < deadline, "twitter.tweets never appeared");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
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
        let v: Value = serde_json::from_slice(payload).unwrap();
        if v["payload"]["after"]["body"] == body.as_str() {
            assert_eq!(v["payload"]["op"], "c");
            assert_eq!(v["payload"]["source"]["table"], "tweets");
            assert!(v["schema"]["fields"].is_array(), "schemas must be enabled");
            break;
        }
    }
}

/// The generator writes, the sink is killed -9 twice mid-stream and
/// restarted, and the lake still holds every published change exactly once
/// and the same latest state as PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_exactly_once_across_kill_9() {
    let run = unique();
    let prefix = format!("e2e-{run}");
    let group = format!("e2e-{run}");
    let _lock = PG_WRITERS.lock().await;
    let pg = pg().await;

    // The test covers the changes it causes: the group starts at today's
    // end of each topic, however much history the stack already holds.
    let start = watermarks(&kafka_consumer("e2e"), &TOPICS);
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in &start {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o)).unwrap();
    }
    // On a brand-new stack the topics may not exist yet: then the group
    // starts at the beginning, which is the start of the window too.
    if tpl.count() > 0 {
        kafka_consumer(&group)
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
    }

    let mut sink = spawn_sink(&prefix, &group, &[]);
    let generator = tokio::spawn(run_generator(40));
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let mut killed = sink.take();
        killed.kill().unwrap(); // SIGKILL
        killed.wait().unwrap();
        sink = spawn_sink(&prefix, &group, &[]);
    }
    let summary = generator.await.unwrap();
    assert_eq!(summary.batches, 40);

    let until = published_barrier(&pg).await;
    wait_committed(&group, &until).await;
    terminate(sink);

    let store = s3_store(&sink_config(&prefix, &group).s3, Duration::from_secs(30)).unwrap();
    let batches = read_parquet(&store, &prefix).await;
    let mut lake = lake_rows(&batches);

    // 1. Exactly the published changes: same multiset, so no loss and no
    //    duplicates, even across the kills.
    let expected = published(&read_range(&start, &until));
    let mut got: Vec<(String, String, String, i64)> = lake
        .iter()
        .flat_map(|(t, rows)| {
            rows.iter()
                .map(move |r| (t.clone(), r.key.clone(), r.op.clone(), r.lsn))
        })
        .collect();
    got.sort();
    assert_eq!(
        got.len(),
        expected.len(),
        "row count differs from what Debezium published"
    );
    assert!(
        got == expected,
        "lake rows differ from the published change events"
    );
    let mut positions: Vec<(i32, i64, String)> = lake
        .iter()
        .flat_map(|(t, rows)| rows.iter().map(move |r| (r.partition, r.offset, t.clone())))
        .collect();
    let n = positions.len();
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), n, "some Kafka offset was written twice");

    // 2. Latest state per key equals PostgreSQL, column by column.
    for table in ["users", "tweets", "likes"] {
        let lake_state = latest_state(lake.get_mut(table).expect("table in lake"));
        let keys: Vec<&String> = lake_state.keys().collect();
        let pg_state = pg_state(&pg, table, &keys).await;
        for (key, row) in &lake_state {
            match (row, pg_state.get(key)) {
                (None, None) => {}
                (Some(lake_row), Some(pg_row)) => {
                    for (col, v) in lake_row {
                        assert_eq!(Some(v), pg_row.get(col), "{table} key {key} column {col}");
                    }
                }
                (l, p) => panic!("{table} key {key}: lake {l:?}, PostgreSQL {p:?}"),
            }
        }
        assert!(!lake_state.is_empty(), "{table}: no changes in the lake");
    }

    // 3. Nothing was quarantined.
    let quarantined: Vec<_> = store
        .list(Some(&Path::from(format!("{prefix}/_quarantine"))))
        .try_collect()
        .await
        .unwrap();
    assert!(
        quarantined.is_empty(),
        "unexpected quarantine: {quarantined:?}"
    );
}

/// A malformed message is quarantined with its raw bytes, and the valid
/// message after it still lands; the offsets of both are committed.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_quarantined_not_lost() {
    let run = unique();
    let topic = format!("quarantine-test-{run}");
    let prefix = format!("q-{run}");
    let group = format!("q-{run}");

    // A real Debezium event to copy, taken from the users topic.
    ensure_user_events().await;
    let all = read_all(&watermarks(&kafka_consumer("q"), &["twitter.users"]));
    let good = all
        .iter()
        .rev()
        .find_map(|(_, _, _, k, v)| Some((k.clone()?, v.clone()?)))
        .expect("twitter.users has events (run the generator tests first or any insert)");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env("CDC_SINK_KAFKA__BROKERS"))
        .create()
        .unwrap();
    let bad_payloads: [&[u8]; 2] = [
        b"{this is not json",
        br#"{"schema":{"type":"struct","fields":[{"type":"struct","field":"after","fields":[{"type":"int64","field":"id"}]}]},"payload":{"op":"c","after":{"id":"not a number"},"source":{"ts_ms":1}}}"#,
    ];
    for bad in bad_payloads {
        producer
            .send(
                FutureRecord::to(&topic).partition(0).key("k").payload(bad),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key(&good.0)
                .payload(&good.1),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let sink = spawn_sink(
        &prefix,
        &group,
        &[("CDC_SINK_KAFKA__TOPICS", &format!("[\"{topic}\"]"))],
    );
    let until: BTreeMap<(String, i32), i64> = [((topic.clone(), 0), 3)].into();
    wait_committed(&group, &until).await;
    terminate(sink);

    let store = s3_store(&sink_config(&prefix, &group).s3, Duration::from_secs(30)).unwrap();
    for (offset, bad) in bad_payloads.iter().enumerate() {
        let key =
            cdc_sink::write::quarantine_key(&Path::from(prefix.as_str()), &topic, 0, offset as i64);
        let body = store
            .get(&key)
            .await
            .expect("quarantine object")
            .bytes()
            .await
            .unwrap();
        let rec: cdc_sink::write::QuarantineRecord = serde_json::from_slice(&body).unwrap();
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rec.value_base64.unwrap())
            .unwrap();
        assert_eq!(&raw, bad, "raw payload kept");
        assert_eq!(rec.offset, offset as i64);
        assert!(!rec.error.is_empty());
    }
    let batches = read_parquet(&store, &prefix).await;
    let rows: usize = batches.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(rows, 1, "the valid message after the bad ones landed");
}

/// A restart that finds an intent (a segment written before a crash but not
/// committed) ends its first segment exactly where the intent says, so the
/// replay overwrites the same objects rather than overlapping them.
#[tokio::test(flavor = "multi_thread")]
async fn replay_after_crash_follows_the_recorded_intent() {
    let run = unique();
    let prefix = format!("intent-{run}");
    let group = format!("intent-{run}");
    ensure_user_events().await;
    let until = watermarks(&kafka_consumer("intent"), &["twitter.users"]);
    let first_row = read_all(&until)
        .into_iter()
        .filter(|(_, p, _, _, v)| *p == 0 && v.is_some())
        .map(|(_, _, o, _, _)| o)
        .next()
        .expect("twitter.users partition 0 has events");
    // What a sink killed between writing and committing leaves behind.
    let store = s3_store(&sink_config(&prefix, &group).s3, Duration::from_secs(30)).unwrap();
    let intent = cdc_sink::write::intent_key(&Path::from(prefix.as_str()), "twitter.users", 0, 0);
    let body = serde_json::to_vec(&cdc_sink::write::Intent {
        first: 0,
        last: first_row,
    })
    .unwrap();
    store.put(&intent, body.into()).await.unwrap();

    let sink = spawn_sink(
        &prefix,
        &group,
        &[
            ("CDC_SINK_KAFKA__TOPICS", "[\"twitter.users\"]"),
            ("CDC_SINK_FLUSH__MAX_ROWS", "1000000"),
        ],
    );
    wait_committed(&group, &until).await;
    terminate(sink);

    let keys: Vec<String> = store
        .list(Some(&Path::from(format!("{prefix}/users"))))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    let p0: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains("twitter.users-p000-"))
        .collect();
    let replayed = format!("twitter.users-p000-{:020}-{first_row:020}-0.parquet", 0);
    assert!(
        p0.iter().any(|k| k.ends_with(&replayed)),
        "no replayed segment {replayed} in {p0:?}"
    );
    if until[&("twitter.users".to_string(), 0)] > first_row + 1 {
        let next = format!("twitter.users-p000-{:020}-", first_row + 1);
        assert!(
            p0.iter().any(|k| k.contains(&next)),
            "segment after the intent missing: {p0:?}"
        );
    }
}

/// Runs the sink until it exits on its own; panics if it is still running
/// after `limit`.
fn exit_within(sink: SinkProcess, limit: Duration) -> std::process::ExitStatus {
    let mut child = sink.take();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("sink still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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

/// With S3 unreachable the first object request is retried until the
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
    let status = exit_within(sink, Duration::from_secs(90));
    assert!(!status.success(), "{status}");
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
