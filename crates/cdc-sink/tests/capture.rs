//! Capturing another table is one configuration change: on the real stack
//! (`tests/stack.sh up`), a table created while the sink runs and added to
//! the captured-tables list the way a user adds it (`tests/stack.sh
//! capture`) lands as a Delta table under the sink's prefix; a table that
//! already holds rows when it is captured arrives whole (the backfill), its
//! current-state table equal to PostgreSQL's.
//!
//! Each test appends to a temporary copy of `db/captured-tables`
//! (`CDC_LAKE_CAPTURED_TABLES_FILE`), so the repository's list is never
//! edited, and afterwards drops the table, re-applies the repository's list
//! and deletes the table's topic, so the next `tests/stack.sh up` finds the
//! stack as it was.
#![cfg(feature = "stack-tests")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch};
use arrow::util::display::array_value_to_string;
use cdc_sink::config::{S3Config, SinkConfig};
use cdc_sink::lake::storage::s3_store;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::admin::AdminOptions;
use test_support::{repo_root, wait_until};

/// The sink's flush interval (its default) and metadata refresh (its
/// default): a new topic is subscribed within one refresh and its first
/// segment committed within one flush.
const FLUSH_MS: u64 = 10_000;
/// Flush plus metadata refresh plus Debezium's and Connect's own latency,
/// with room for a loaded two-core machine.
const LAND_WITHIN: Duration = Duration::from_secs(60);

/// The columns the test reads back: (id, name, amount, _cdc_op) as text.
type Row = (String, Option<String>, Option<String>, String);

/// One test at a time changes the connector's table list: two would
/// overwrite each other's (`tests/stack.sh capture` applies a whole list).
static CAPTURE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The superuser over the stack's private socket: creating a table and
/// changing the publication need it, as they do for a user.
async fn pg_super() -> tokio_postgres::Client {
    test_support::pg::superuser("twitter").await
}

/// A running sink, killed if a failing test leaves it behind.
struct SinkProcess(Option<Child>);

impl Drop for SinkProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl SinkProcess {
    /// The real sink binary with its own group and prefix, subscribed by
    /// pattern, as by default (`^twitter\..*`), to the topics of the
    /// tables these tests create: what is under test is that a topic
    /// created after the sink started is found by its pattern. Narrower
    /// than the default so that a backlog on the stack's own topics (a
    /// benchmark's millions of events) does not hold up the new table.
    fn spawn(prefix: &str, group: &str) -> SinkProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .env(
                "CDC_SINK_KAFKA__TOPICS",
                "[\"^twitter[.](capture|backfill)_test_.*\"]",
            )
            .env("CDC_SINK_OUTPUT__PREFIX", prefix)
            .env("CDC_SINK_KAFKA__GROUP_ID", group)
            .env("CDC_SINK_FLUSH__MAX_AGE_MS", FLUSH_MS.to_string())
            // No /metrics: the port is the sink's default, one per host.
            .env("CDC_SINK_METRICS__LISTEN", "")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("start cdc-sink");
        SinkProcess(Some(child))
    }

    fn terminate(&mut self) -> Result<(), String> {
        let Some(mut child) = self.0.take() else {
            return Ok(());
        };
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        let status = child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("sink exited with {status} after SIGTERM"))
        }
    }
}

fn s3_config() -> S3Config {
    SinkConfig::from_figment(SinkConfig::figment(None))
        .expect("sink configuration from the CDC_SINK_* environment")
        .s3
}

/// The Python interpreter with the `deltalake` package, if there is one:
/// `CDC_LAKE_READERS_PYTHON`, else the readers venv in the cache.
fn python_reader() -> Option<PathBuf> {
    let python = std::env::var_os("CDC_LAKE_READERS_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/cdc-lake/readers-venv/bin/python"))
        })?;
    let ok = Command::new(&python)
        .args(["-c", "import deltalake, pyarrow"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(python)
}

const PY_READ: &str = r#"
import json, os, sys
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
opts = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP")}
try:
    dt = DeltaTable(sys.argv[1], storage_options=opts)
except TableNotFoundError:
    sys.exit(3)
for r in dt.to_pyarrow_table(columns=["id", "name", "amount", "_cdc_op"]).to_pylist():
    print(json.dumps({k: None if v is None else str(v) for k, v in r.items()}))
# deltalake 1.6.6 with pyarrow 26 aborts now and then in interpreter
# teardown ("terminate called without an active exception", about one run
# in ten here), after the rows are out: leave without the teardown.
sys.stdout.flush()
os._exit(0)
"#;

/// The table's rows through the `deltalake` Python package, which reads
/// only what the Delta log says is committed. `None`: no table yet.
fn read_with_python(python: &Path, s3: &S3Config, uri: &str) -> Option<Vec<Row>> {
    let secret = s3.resolve_secret().unwrap().expect("S3 secret");
    let out = Command::new(python)
        .args(["-c", PY_READ, uri])
        // The secret goes in the environment, never on a command line.
        .env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ACCESS_KEY_ID", &s3.access_key_id)
        .env(
            "AWS_SECRET_ACCESS_KEY",
            secrecy::ExposeSecret::expose_secret(&secret),
        )
        .env("AWS_REGION", &s3.region)
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .expect("run the Python deltalake reader");
    if out.status.code() == Some(3) {
        return None;
    }
    assert!(
        out.status.success(),
        "the deltalake reader failed on {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_string);
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    text(&v, "id").unwrap(),
                    text(&v, "name"),
                    text(&v, "amount"),
                    text(&v, "_cdc_op").unwrap(),
                )
            })
            .collect(),
    )
}

fn cell(b: &RecordBatch, col: &str, row: usize) -> Option<String> {
    let c = b
        .column_by_name(col)
        .unwrap_or_else(|| panic!("column {col} missing"));
    (!c.is_null(row)).then(|| array_value_to_string(c, row).unwrap())
}

/// The table's rows by reading its Delta log by hand: the files that the
/// JSON commits add and do not remove, read with the parquet crate. It is
/// not delta-rs, which the sink writes with, so it checks the sink's log.
/// `None`: no commit yet.
async fn read_with_log(store: &dyn ObjectStore, table_dir: &str) -> Option<Vec<Row>> {
    let log_dir = ObjPath::from(format!("{table_dir}/_delta_log"));
    let mut commits: Vec<ObjPath> = store
        .list(Some(&log_dir))
        .map_ok(|m| m.location)
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.as_ref().ends_with(".json"))
        .collect();
    if commits.is_empty() {
        return None;
    }
    commits.sort();
    assert!(
        commits[0].as_ref().ends_with("/00000000000000000000.json"),
        "{table_dir}: the log does not start at version 0 ({}), \
         which this reader (JSON commits only, no checkpoints) cannot read",
        commits[0]
    );
    let mut live: Vec<String> = Vec::new();
    for c in &commits {
        let bytes = store.get(c).await.unwrap().bytes().await.unwrap();
        for line in std::str::from_utf8(&bytes).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(p) = action["add"]["path"].as_str() {
                live.push(p.to_string());
            }
            if let Some(p) = action["remove"]["path"].as_str() {
                live.retain(|l| l != p);
            }
        }
    }
    let mut rows = Vec::new();
    for p in live {
        // Paths in the log are relative to the table and URL-encoded.
        let key = ObjPath::from(format!(
            "{table_dir}/{}",
            ObjPath::from_url_path(&p).unwrap()
        ));
        let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            for r in 0..b.num_rows() {
                rows.push((
                    cell(&b, "id", r).unwrap(),
                    cell(&b, "name", r),
                    cell(&b, "amount", r),
                    cell(&b, "_cdc_op", r).unwrap(),
                ));
            }
        }
    }
    Some(rows)
}

/// Everything the test created, removed whether it passed or not.
async fn clean_up(
    sink: &mut SinkProcess,
    table: &str,
    store: &dyn ObjectStore,
    prefix: &str,
    passed: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = sink.terminate() {
        errors.push(e);
    }
    // Out of the publication first, as a user would, then gone. DROP TABLE
    // alone would also leave the publication, but says less.
    let pg = pg_super().await;
    let sql = format!(
        "DO $$ BEGIN
           IF EXISTS (SELECT 1 FROM pg_publication_tables
                      WHERE pubname = 'twitter_cdc' AND schemaname = 'public' AND tablename = '{table}')
           THEN ALTER PUBLICATION twitter_cdc DROP TABLE public.{table}; END IF;
         END $$;
         DROP TABLE IF EXISTS public.{table};"
    );
    if let Err(e) = pg.batch_execute(&sql).await {
        errors.push(format!("dropping {table}: {e}"));
    }
    // The repository's list again, so the connector no longer names the
    // table: what the next `tests/stack.sh up` would do anyway.
    if let Err(e) = test_support::stack::capture(None) {
        errors.push(e);
    }
    let admin = test_support::kafka::admin();
    let topic = format!("twitter.{table}");
    match admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .map(|r| r.into_iter().next())
    {
        Ok(Some(Err((_, code))))
            if code != rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition =>
        {
            errors.push(format!("deleting topic {topic}: {code}"))
        }
        Err(e) => errors.push(format!("deleting topic {topic}: {e}")),
        _ => {}
    }
    // A failed run keeps its lake files for inspection.
    if passed {
        let keys = store
            .list(Some(&ObjPath::from(prefix)))
            .map_ok(|m| m.location)
            .boxed();
        let deleted: Vec<_> = store.delete_stream(keys).collect().await;
        if let Some(Err(e)) = deleted.into_iter().find(Result::is_err) {
            errors.push(format!("deleting s3 prefix {prefix}: {e}"));
        }
    }
    errors
}

/// What each test here creates: a table of its own (`<kind>_test_<run>`),
/// a lake prefix of its own, and a copy of the captured-tables list to
/// append it to.
struct Trial {
    table: String,
    prefix: String,
    s3: S3Config,
    store: std::sync::Arc<dyn ObjectStore>,
    list: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Trial {
    fn new(kind: &str) -> Trial {
        let run = test_support::unique();
        let s3 = s3_config();
        let store = s3_store(&s3).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        Trial {
            table: format!("{kind}_test_{run}"),
            prefix: format!("{kind}-test-{run}"),
            s3,
            store,
            list: tmp.path().join("captured-tables"),
            _tmp: tmp,
        }
    }

    /// The table, as a user writes it in a db/*.sql file (the primary key
    /// is the replica identity that lets updates and deletes be
    /// published), writable by the workload's role, then `then` (SQL).
    async fn create_table(&self, pg: &tokio_postgres::Client, then: &str) {
        let table = &self.table;
        pg.batch_execute(&format!(
            "CREATE TABLE public.{table} (
               id bigint PRIMARY KEY, name text, amount numeric(10,2));
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.{table} TO tweetgen;
             {then}"
        ))
        .await
        .unwrap();
    }

    /// The sink for this trial's prefix, in a consumer group of its own.
    fn sink(&self) -> SinkProcess {
        SinkProcess::spawn(&self.prefix, &self.prefix)
    }

    /// Writes the repository's list with this trial's table appended, and
    /// returns its path.
    fn write_list(&self) -> PathBuf {
        let mut text = std::fs::read_to_string(repo_root().join("db/captured-tables")).unwrap();
        text.push_str(&format!("{}\n", self.table));
        std::fs::write(&self.list, text).unwrap();
        self.list.clone()
    }

    /// The list with this trial's table, applied as a user applies it
    /// (`tests/stack.sh capture`).
    fn capture(&self) -> Result<(), String> {
        test_support::stack::capture(Some(&self.write_list()))
    }

    /// Cleans up whatever `outcome` was, then passes a failure on.
    async fn finish(&self, mut sink: SinkProcess, outcome: std::thread::Result<()>) {
        let errors = clean_up(
            &mut sink,
            &self.table,
            self.store.as_ref(),
            &self.prefix,
            outcome.is_ok(),
        )
        .await;
        if let Err(panic) = outcome {
            if !errors.is_empty() {
                eprintln!("clean-up after the failure also failed: {errors:?}");
            }
            std::panic::resume_unwind(panic);
        }
        assert!(errors.is_empty(), "clean-up failed: {errors:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_the_list_lands_in_the_running_pipeline() {
    let _one_at_a_time = CAPTURE.lock().await;
    let trial = Trial::new("capture");
    let (table, prefix, s3) = (&trial.table, &trial.prefix, &trial.s3);
    // The sink runs before the table exists: it must find the new topic on
    // its own, through its pattern subscription.
    let sink = trial.sink();

    let body = async {
        let pg = pg_super().await;
        trial.create_table(&pg, "").await;

        // The one configuration change: the table's name in the list.
        trial.capture().unwrap();

        // The writer is the workload's own role, as for any captured table.
        let app = test_support::pg::tweetgen().await;
        app.batch_execute(&format!(
            "INSERT INTO {table} VALUES (1, 'alpha', 1.50), (2, 'beta', NULL), (3, 'gamma', 3.25);
             UPDATE {table} SET name = 'beta2' WHERE id = 2;
             DELETE FROM {table} WHERE id = 3;"
        ))
        .await
        .unwrap();
        let written = Instant::now();

        // A delete under the default replica identity carries only the key.
        let mut want: Vec<Row> = [
            ("1", Some("alpha"), Some("1.50"), "c"),
            ("2", Some("beta"), None, "c"),
            ("3", Some("gamma"), Some("3.25"), "c"),
            ("2", Some("beta2"), None, "u"),
            ("3", None, None, "d"),
        ]
        .into_iter()
        .map(|(i, n, a, o)| {
            (
                i.into(),
                n.map(Into::into),
                a.map(Into::into),
                o.to_string(),
            )
        })
        .collect();
        want.sort();

        let python = python_reader();
        let table_dir = format!("{prefix}/{table}");
        let uri = format!("s3://{}/{table_dir}", s3.bucket);
        eprintln!(
            "reading {uri} with {}",
            python
                .as_ref()
                .map_or("the Delta log by hand".into(), |p| format!(
                    "the deltalake package ({})",
                    p.display()
                ))
        );
        // Reads until the rows are there: the deadline is the claim.
        let store = trial.store.as_ref();
        wait_until(
            &format!(
                "{table}, added to the captured-tables list of the running pipeline, \
                 to land at {uri} within {LAND_WITHIN:?} (flush interval {FLUSH_MS} ms), \
                 as {want:?}"
            ),
            LAND_WITHIN.saturating_sub(written.elapsed()),
            async || {
                let rows = match &python {
                    Some(p) => read_with_python(p, s3, &uri),
                    None => read_with_log(store, &table_dir).await,
                };
                let Some(mut rows) = rows else {
                    return Err("no Delta table there".to_string());
                };
                rows.sort();
                // The backfill signalled at capture may read the rows
                // before or after these writes: an `r` row is one of the
                // images the writes left, never anything else.
                let (reads, changes): (Vec<Row>, Vec<Row>) =
                    rows.into_iter().partition(|r| r.3 == "r");
                let stray: Vec<&Row> = reads
                    .iter()
                    .filter(|r| {
                        !changes
                            .iter()
                            .any(|c| c.3 != "d" && (&c.0, &c.1, &c.2) == (&r.0, &r.1, &r.2))
                    })
                    .collect();
                if changes == want && stray.is_empty() {
                    Ok(())
                } else {
                    Err(format!("changes {changes:?}, snapshot reads {reads:?}"))
                }
            },
        )
        .await;
        eprintln!(
            "{table} landed as a Delta table {:.1}s after its rows were committed",
            written.elapsed().as_secs_f64()
        );
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;
    trial.finish(sink, outcome).await;
}

/// Rows the backfilled table holds before it is captured.
const EXISTING_ROWS: i64 = 10_000;
/// Keys the writer inserts start here, far from the existing ones.
const NEW_KEYS_FROM: i64 = 1_000_000;

/// Whether `dir` under the lake's store holds a Delta log yet.
async fn has_log(store: &dyn ObjectStore, dir: &str) -> bool {
    let log = ObjPath::from(format!("{dir}/_delta_log"));
    store.list(Some(&log)).next().await.is_some()
}

/// The writer of the backfilled table, and what it did while the table
/// was being captured: the existing keys it changed (an update or a
/// delete), which the snapshot may carry as a streamed change instead of
/// an `r` row.
struct Writer {
    app: tokio_postgres::Client,
    table: String,
    /// Paces the rounds: ten a second, a steady stream of changes that
    /// leaves most existing keys untouched.
    pace: tokio::time::Interval,
    touched: std::collections::BTreeSet<i64>,
    rounds: i64,
}

impl Writer {
    async fn new(table: &str) -> Writer {
        Writer {
            app: test_support::pg::tweetgen().await,
            table: table.to_string(),
            pace: tokio::time::interval(Duration::from_millis(100)),
            touched: Default::default(),
            rounds: 0,
        }
    }

    /// One round, in one transaction: ten new keys inserted, one existing
    /// and one new key updated, one of each deleted.
    async fn round(&mut self) {
        self.pace.tick().await;
        let table = &self.table;
        let first_new = NEW_KEYS_FROM + self.rounds * 10;
        // Existing keys spread over the whole range, so that every
        // snapshot chunk sees changes while it is read.
        let updated = 1 + (self.rounds * 7919) % EXISTING_ROWS;
        let deleted = 1 + (self.rounds * 7919 + 2503) % EXISTING_ROWS;
        self.app
            .batch_execute(&format!(
                "INSERT INTO {table} SELECT g, 'new ' || g, g % 1000 / 100.0
                   FROM generate_series({first_new}, {last}) g;
                 UPDATE {table} SET name = name || ' +', amount = coalesce(amount, 0) + 1
                   WHERE id IN ({updated}, {first_new});
                 DELETE FROM {table} WHERE id IN ({deleted}, {last});",
                last = first_new + 9,
            ))
            .await
            .unwrap();
        self.touched.extend([updated, deleted]);
        self.rounds += 1;
    }

    /// Whether the writer ever wrote key `k` of the new range.
    fn wrote_new(&self, k: i64) -> bool {
        (NEW_KEYS_FROM..NEW_KEYS_FROM + self.rounds * 10).contains(&k)
    }
}

/// The backfill: a table that already holds rows is captured while it is
/// written to, and arrives whole. Its existing rows come as `r` events of
/// Debezium's incremental snapshot, signalled by `tests/stack.sh capture`
/// (db/capture.sh), with the streamed changes interleaved; the
/// current-state table ends equal to PostgreSQL, every column.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_captured_with_rows_is_backfilled_while_it_is_written() {
    let _one_at_a_time = CAPTURE.lock().await;
    let trial = Trial::new("backfill");
    let (table, prefix) = (&trial.table, &trial.prefix);
    let store = trial.store.as_ref();
    let sink = trial.sink();

    let body = async {
        let pg = pg_super().await;
        trial
            .create_table(
                &pg,
                &format!(
                    "INSERT INTO public.{table}
                     SELECT g, 'existing ' || g, CASE WHEN g % 10 = 0 THEN NULL ELSE g / 100.0 END
                     FROM generate_series(1, {EXISTING_ROWS}) g;"
                ),
            )
            .await;

        // The writer runs before, during and after the capture.
        let mut writer = Writer::new(table).await;
        for _ in 0..20 {
            writer.round().await;
        }
        let capture = tokio::task::spawn_blocking({
            let list = trial.write_list();
            move || test_support::stack::capture(Some(&list))
        });
        while !capture.is_finished() {
            writer.round().await;
        }
        capture.await.unwrap().unwrap();
        let captured = Instant::now();

        // Until every existing key the writer left alone has its `r` row:
        // then the snapshot has read the whole table.
        let changelog = format!("{prefix}/{table}");
        let mut pending = Instant::now();
        let deadline = LAND_WITHIN * 3;
        loop {
            writer.round().await;
            if pending.elapsed() < Duration::from_secs(3) {
                continue;
            }
            pending = Instant::now();
            assert!(
                captured.elapsed() < deadline,
                "{table}: its existing rows did not all arrive as `r` rows within {deadline:?} of its capture"
            );
            if !has_log(store, &changelog).await {
                continue;
            }
            let read: std::collections::BTreeSet<i64> =
                test_support::lake::lake_rows("deltalake", prefix, &[table])
                    .iter()
                    .filter(|r| r.op == "r")
                    .map(|r| r.key().parse().unwrap())
                    .collect();
            let missing = (1..=EXISTING_ROWS)
                .filter(|k| !writer.touched.contains(k) && !read.contains(k))
                .count();
            eprintln!(
                "{table}: {} `r` rows, {missing} untouched existing keys still to come ({} writer rounds)",
                read.len(),
                writer.rounds
            );
            if missing == 0 {
                break;
            }
        }
        let snapshotted = captured.elapsed();
        // A few more rounds after the snapshot, then the writer stops.
        for _ in 0..20 {
            writer.round().await;
        }
        let writer = writer;

        // The current-state table converges on PostgreSQL's rows.
        let mirror = format!("{prefix}/_current/{table}");
        wait_until(
            &format!("the current-state table of {table} to equal PostgreSQL's"),
            LAND_WITHIN,
            async || {
                if !has_log(store, &mirror).await {
                    return Err("no current-state table yet".to_string());
                }
                test_support::compare::mirror_diff(&pg, "deltalake", prefix, table).await
            },
        )
        .await;
        test_support::compare::assert_mirror_equals_pg(&pg, prefix, table).await;

        // The changelog: one `r` row per existing key, except keys the
        // writer changed while the snapshot ran (their streamed change
        // replaces the chunk's row) — never two, never one for a new key.
        let rows = test_support::lake::lake_rows("deltalake", prefix, &[table]);
        let mut reads = std::collections::BTreeMap::<i64, usize>::new();
        for r in rows.iter().filter(|r| r.op == "r") {
            *reads.entry(r.key().parse().unwrap()).or_default() += 1;
        }
        let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{table}: keys read twice: {twice:?}");
        let outside: Vec<_> = reads
            .keys()
            .filter(|k| !(1..=EXISTING_ROWS).contains(*k))
            .collect();
        // A new key inserted before its chunk was read is a row of the
        // table then, and may be read too: only keys never written are wrong.
        assert!(
            outside.iter().all(|k| writer.wrote_new(**k)),
            "{table}: `r` rows for keys never written: {outside:?}"
        );
        let untouched_read = (1..=EXISTING_ROWS)
            .filter(|k| !writer.touched.contains(k))
            .filter(|k| reads.contains_key(k))
            .count() as i64;
        let untouched = EXISTING_ROWS
            - (1..=EXISTING_ROWS)
                .filter(|k| writer.touched.contains(k))
                .count() as i64;
        assert_eq!(
            untouched_read, untouched,
            "{table}: untouched existing keys with an `r` row"
        );
        let streamed = rows.iter().filter(|r| r.op != "r").count();
        assert!(streamed > 0, "{table}: no streamed change in the changelog");
        eprintln!(
            "{table}: backfilled {} `r` rows ({untouched} untouched existing keys) with {streamed} \
             streamed changes interleaved, {} writer rounds; the snapshot was in the lake {:.1}s \
             after the capture",
            reads.len(),
            writer.rounds,
            snapshotted.as_secs_f64()
        );
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;
    trial.finish(sink, outcome).await;
}
