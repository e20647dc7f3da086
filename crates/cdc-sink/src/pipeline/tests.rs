//! The loop against a scripted source and a real Delta lake in a temporary
//! directory: rebalances, restarts and fences, without servers. What the
//! lake holds is read back through its Delta log and Parquet files, not
//! through the sink's counters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use cdc_telemetry::Readiness;
use deltalake::DeltaTableBuilder;
use futures::{Stream, stream};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::consumer::CommitMode;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{OwnedMessage, Timestamp};
use tokio::sync::{Notify, mpsc, watch};
use url::Url;

use super::*;
use crate::config::{LakeConfig, OutputConfig};
use crate::decode::schema::meta;
use crate::lake::changelog::segment::Segment;
use crate::lake::files::{FileWriter, writer_properties};
use crate::lake::table::LakeRoot;
use crate::source::position::Claim;

const TOPIC: &str = "db.users";
const TABLE: &str = "users";
const GROUP: &str = "g";

fn tp() -> Tp {
    Tp::new(TOPIC, 0)
}

/// Debezium events of one table (create and update of `users`), captured
/// from the real connector.
fn event(offset: i64) -> Vec<u8> {
    let users: Vec<&str> = crate::decode::tests::TWITTER
        .lines()
        .filter(|l| l.contains(r#""table":"users""#))
        .collect();
    assert_eq!(users.len(), 2, "the fixture's users events");
    users[offset as usize % 2].as_bytes().to_vec()
}

#[derive(Default)]
struct Log {
    /// Each partition's messages, by offset.
    messages: BTreeMap<Tp, Vec<Option<Vec<u8>>>>,
    /// Assigned partitions and the next offset each delivers.
    cursors: BTreeMap<Tp, i64>,
    paused: bool,
    seeks: Vec<(Tp, i64)>,
    delivered: usize,
    /// Shuts the loop down as it is handed this many messages.
    stop_at: Option<(usize, Arc<watch::Sender<bool>>)>,
}

/// A Kafka consumer in memory: per-partition logs, an assignment the test
/// changes (reported as rebalances, as librdkafka does), seeks that move a
/// cursor, pause and resume.
struct ScriptedSource {
    log: Mutex<Log>,
    wake: Notify,
    rebalances: mpsc::UnboundedSender<Rebalance>,
}

impl ScriptedSource {
    fn new() -> (Arc<ScriptedSource>, Rebalances) {
        let (tx, rx) = mpsc::unbounded_channel();
        let source = ScriptedSource {
            log: Mutex::new(Log::default()),
            wake: Notify::new(),
            rebalances: tx,
        };
        (Arc::new(source), rx)
    }

    fn append(&self, tp: &Tp, value: Option<Vec<u8>>) {
        self.log
            .lock()
            .unwrap()
            .messages
            .entry(tp.clone())
            .or_default()
            .push(value);
        self.wake.notify_one();
    }

    /// Assigns `tp`, delivering from `from` (Kafka's committed offset,
    /// which may be anywhere relative to the lake).
    fn assign(&self, tp: &Tp, from: i64) {
        // Reported before anything of it is delivered, as librdkafka does.
        self.rebalances
            .send(Rebalance::Assigned(vec![tp.clone()]))
            .unwrap();
        self.log.lock().unwrap().cursors.insert(tp.clone(), from);
        self.wake.notify_one();
    }

    fn revoke(&self, tp: &Tp) {
        self.log.lock().unwrap().cursors.remove(tp);
        self.rebalances
            .send(Rebalance::Revoked(vec![tp.clone()]))
            .unwrap();
        self.wake.notify_one();
    }

    /// Shuts the loop down (`stop`) from inside the `n`th delivery: what
    /// the loop does next shows whether it looks at shutdown first.
    fn stop_at(&self, n: usize, stop: Arc<watch::Sender<bool>>) {
        self.log.lock().unwrap().stop_at = Some((n, stop));
    }

    fn delivered(&self) -> usize {
        self.log.lock().unwrap().delivered
    }

    fn seeks(&self) -> Vec<(Tp, i64)> {
        self.log.lock().unwrap().seeks.clone()
    }

    /// The next message, once there is one.
    async fn recv(&self) -> OwnedMessage {
        loop {
            // Registered before looking, so a message appended between the
            // look and the wait still wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(m) = self.next() {
                return m;
            }
            woken.await;
        }
    }

    fn next(&self) -> Option<OwnedMessage> {
        let mut log = self.log.lock().unwrap();
        if log.paused {
            return None;
        }
        let Log {
            messages, cursors, ..
        } = &mut *log;
        let (tp, offset, value) = cursors.iter_mut().find_map(|(tp, cursor)| {
            let value = messages.get(tp)?.get(*cursor as usize)?.clone();
            let offset = *cursor;
            *cursor += 1;
            Some((tp.clone(), offset, value))
        })?;
        log.delivered += 1;
        if let Some((n, stop)) = &log.stop_at
            && *n == log.delivered
        {
            stop.send(true).unwrap();
        }
        Some(OwnedMessage::new(
            value,
            None,
            tp.topic.to_string(),
            Timestamp::NotAvailable,
            tp.partition,
            offset,
            None,
        ))
    }
}

impl Source for ScriptedSource {
    type Message<'a> = OwnedMessage;

    fn messages(&self) -> impl Stream<Item = KafkaResult<OwnedMessage>> + Send + Unpin {
        Box::pin(stream::unfold(self, |source| async move {
            Some((Ok(source.recv().await), source))
        }))
    }

    fn commit(&self, _: &[(Tp, i64)], _: CommitMode) -> KafkaResult<()> {
        Ok(())
    }

    fn pause(&self) -> KafkaResult<()> {
        self.log.lock().unwrap().paused = true;
        Ok(())
    }

    fn resume(&self) -> KafkaResult<()> {
        self.log.lock().unwrap().paused = false;
        self.wake.notify_one();
        Ok(())
    }

    fn seek(&self, tp: &Tp, offset: i64) -> KafkaResult<()> {
        let mut log = self.log.lock().unwrap();
        let Some(cursor) = log.cursors.get_mut(tp) else {
            return Err(KafkaError::Seek(format!("{tp} is not assigned")));
        };
        *cursor = offset;
        log.seeks.push((tp.clone(), offset));
        drop(log);
        self.wake.notify_one();
        Ok(())
    }

    fn lag(&self) -> i64 {
        0
    }

    fn broker_down_for(&self) -> Duration {
        Duration::ZERO
    }

    /// The scripted messages carry no schema header: never asked.
    async fn read_schemas(
        &self,
    ) -> Result<Vec<crate::source::schemas::PublishedSchema>, SchemaTopicError> {
        Ok(Vec::new())
    }
}

/// The lake in a temporary directory.
struct Lake {
    _dir: tempfile::TempDir,
    root: LakeRoot,
}

impl Lake {
    fn new() -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let root = LakeRoot::at(
            Url::from_directory_path(dir.path()).unwrap(),
            Default::default(),
        );
        Lake { _dir: dir, root }
    }

    /// A writer of the lake for `GROUP`, as a sink (or another sink) has.
    fn changelog(&self) -> Changelog {
        Changelog::new(
            self.root.clone(),
            GROUP,
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &LakeConfig::default(),
        )
    }

    /// The partition's `txn` version, read by a fresh writer.
    async fn position(&self) -> Option<i64> {
        self.changelog().positions(TABLE, &[tp()]).await.unwrap()[0]
    }

    /// Every Kafka offset the table holds a row of, read through the
    /// Delta log and the Parquet files themselves.
    async fn offsets(&self) -> Vec<i64> {
        let mut t = DeltaTableBuilder::from_url(self.root.table_url(TABLE))
            .unwrap()
            .build()
            .unwrap();
        t.load().await.unwrap();
        let store = t.log_store().object_store(None);
        let mut offsets = Vec::new();
        for f in t.snapshot().unwrap().log_data().iter() {
            let bytes = store
                .get(&f.object_store_path())
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch: RecordBatch = batch.unwrap();
                let column = batch.column_by_name(meta::KAFKA_OFFSET).unwrap();
                offsets.extend(column.as_primitive::<Int64Type>().values().iter());
            }
        }
        offsets.sort();
        offsets
    }
}

/// A sink running the loop over `source`, until [`Running::stop`].
struct Running {
    stop: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<Result<Stats, PipelineError>>,
}

impl Running {
    fn start(
        source: &Arc<ScriptedSource>,
        rebalances: Rebalances,
        lake: &Lake,
        policy: RollPolicy,
    ) -> Running {
        let (stop, shutdown) = watch::channel(false);
        let source = source.clone();
        let changelog = Arc::new(lake.changelog());
        let quarantine = Quarantine::new(Arc::new(object_store::memory::InMemory::new()), "");
        let settings = LoopSettings {
            policy,
            max_buffered: 64 << 20,
            give_up: Duration::from_secs(5),
            ready_window: Duration::from_secs(60),
        };
        let task = tokio::spawn(async move {
            let outputs = Outputs {
                changelog,
                quarantine,
                mirror: None,
            };
            run_with(
                &*source,
                rebalances,
                outputs,
                settings,
                Readiness::new("starting"),
                shutdown,
            )
            .await
        });
        Running {
            stop: Arc::new(stop),
            task,
        }
    }

    /// Shuts down (draining what is buffered) and returns the loop's
    /// counters.
    async fn stop(self) -> Stats {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap()
    }
}

/// Rolls every `rows` rows, or after 50 ms.
fn policy(rows: usize) -> RollPolicy {
    RollPolicy {
        max_rows: rows,
        max_bytes: 64 << 20,
        max_age: Duration::from_millis(50),
    }
}

/// Waits until `f` says yes, polling; fails with `what` after 20 s.
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_position(lake: &Lake, last: i64) {
    wait_until(&format!("the lake holds offset {last}"), || async {
        lake.position().await == Some(last)
    })
    .await;
}

/// Offsets `range`, but those holding no row (tombstones, quarantined).
fn rows_in(range: std::ops::Range<i64>, rowless: &[i64]) -> Vec<i64> {
    range.filter(|o| !rowless.contains(o)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resume_from_the_lake_whatever_kafka_says() {
    let lake = Lake::new();
    let (source, rebalances) = ScriptedSource::new();
    for o in 0..30 {
        let value = match o {
            // A tombstone and a message that is no event: no rows, but
            // their offsets are covered.
            11 => None,
            17 => Some(b"{}".to_vec()),
            _ => Some(event(o)),
        };
        source.append(&tp(), value);
    }
    source.assign(&tp(), 0);
    let sink = Running::start(&source, rebalances, &lake, policy(7));
    wait_for_position(&lake, 29).await;
    let first = sink.stop().await;
    assert_eq!((first.tombstones, first.quarantined), (1, 1));

    // Kafka's committed offset ahead of the lake (lost rows, were it
    // trusted): the sink seeks back to the lake's position.
    for o in 30..40 {
        source.append(&tp(), Some(event(o)));
    }
    let (source2, rebalances) = ScriptedSource::new();
    for o in 0..40 {
        source2.append(&tp(), (![11, 17].contains(&o)).then(|| event(o)));
    }
    source2.assign(&tp(), 35);
    let sink = Running::start(&source2, rebalances, &lake, policy(7));
    wait_for_position(&lake, 39).await;
    sink.stop().await;
    assert_eq!(source2.seeks(), vec![(tp(), 30)]);

    // Kafka behind the lake (offsets committed before a crash): read
    // through, nothing twice.
    for o in 40..45 {
        source2.append(&tp(), Some(event(o)));
    }
    let (source3, rebalances) = ScriptedSource::new();
    for o in 0..45 {
        source3.append(&tp(), (![11, 17].contains(&o)).then(|| event(o)));
    }
    source3.assign(&tp(), 0);
    let sink = Running::start(&source3, rebalances, &lake, policy(7));
    wait_for_position(&lake, 44).await;
    let third = sink.stop().await;
    assert_eq!(third.skipped, 40, "offsets 0..=39 are in the lake already");
    assert!(source3.seeks().is_empty());

    assert_eq!(lake.offsets().await, rows_in(0..45, &[11, 17]));
}

/// Another writer commits the partition while this sink holds it (a
/// rebalance it missed, a frozen sink that woke up): the sink's next write
/// is fenced, its buffer dropped, and it resumes after the other writer's
/// rows without waiting for a message. Every offset lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_partition_resumes_after_the_other_writers_rows() {
    let lake = Lake::new();
    let (source, rebalances) = ScriptedSource::new();
    for o in 0..10 {
        source.append(&tp(), Some(event(o)));
    }
    source.assign(&tp(), 0);
    let sink = Running::start(&source, rebalances, &lake, policy(5));
    wait_for_position(&lake, 9).await;

    // The other writer: offsets 10..=19, built on version 9.
    let mut decoder = Decoder::new();
    let mut segment = Segment::new(10);
    for o in 10..20 {
        let value = event(o);
        let Ok(Decoded::Row(row)) = decoder.decode(Some(&value)) else {
            panic!("a fixture event");
        };
        segment.push(&row, 0, o);
    }
    let other = lake
        .changelog()
        .write(
            TABLE,
            &[PartitionWrite {
                tp: tp(),
                claim: Claim {
                    expected: Some(9),
                    last: 19,
                },
                files: segment.into_files().unwrap(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(other.committed, vec![(tp(), 19)]);

    // Kafka holds the same offsets: this sink reads 10.. and is fenced.
    for o in 10..30 {
        source.append(&tp(), Some(event(o)));
    }
    wait_for_position(&lake, 29).await;
    let stats = sink.stop().await;
    assert!(stats.fenced >= 1, "{stats:?}");
    assert!(
        source.seeks().contains(&(tp(), 20)),
        "sent after the other writer's rows: {:?}",
        source.seeks()
    );
    assert_eq!(lake.offsets().await, (0..30).collect::<Vec<_>>());
}

/// A revoked partition's buffer goes with it; when the partition comes
/// back, it starts over from the lake, so nothing buffered before lands
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_drops_the_buffer_and_a_new_assignment_starts_from_the_lake() {
    let lake = Lake::new();
    let (source, rebalances) = ScriptedSource::new();
    for o in 0..5 {
        source.append(&tp(), Some(event(o)));
    }
    source.assign(&tp(), 0);
    // Nothing rolls on its own: the rows stay buffered.
    let never = RollPolicy {
        max_rows: 1000,
        max_bytes: 64 << 20,
        max_age: Duration::from_secs(3600),
    };
    let sink = Running::start(&source, rebalances, &lake, never);
    wait_until("all five messages are delivered", || async {
        source.delivered() == 5
    })
    .await;
    source.revoke(&tp());
    source.assign(&tp(), 0);
    wait_until("the five are delivered again", || async {
        source.delivered() == 10
    })
    .await;
    let stats = sink.stop().await;
    assert_eq!(stats.segments_dropped, 1, "{stats:?}");
    assert_eq!(lake.offsets().await, (0..5).collect::<Vec<_>>());
}

#[test]
fn a_seek_to_an_unassigned_partition_fails() {
    let (source, _rebalances) = ScriptedSource::new();
    assert!(matches!(source.seek(&tp(), 3), Err(KafkaError::Seek(_))));
}

/// The loop takes the messages librdkafka holds in a burst, but a message
/// it had to wait on something for (here S3, to quarantine it) ends the
/// burst: a run of them does not hold shutdown, commits and the watchdog
/// behind it. Ten are ready; shutdown comes as the second is handed over
/// (the first waited anyway: for the partition's position in the lake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_ends_at_a_message_the_loop_waited_on() {
    for (what, malformed, delivered) in [("events", false, 10), ("malformed", true, 2)] {
        let lake = Lake::new();
        let (source, rebalances) = ScriptedSource::new();
        for o in 0..10 {
            source.append(
                &tp(),
                Some(if malformed { b"{}".to_vec() } else { event(o) }),
            );
        }
        let sink = Running::start(&source, rebalances, &lake, policy(1000));
        source.stop_at(2, sink.stop.clone());
        source.assign(&tp(), 0);
        let stats = sink.task.await.unwrap().unwrap();
        assert_eq!(source.delivered(), delivered, "{what}: {stats:?}");
        assert_eq!(stats.quarantined, if malformed { 2 } else { 0 }, "{what}");
    }
}
