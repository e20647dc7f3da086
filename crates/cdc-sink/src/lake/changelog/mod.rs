//! The changelog: one append-only Delta table per captured table, one row
//! per change event, written with its Kafka partitions' offsets in the
//! same transaction.
//!
//! A flush is one Delta transaction per table ([`Changelog::commit`]): its
//! Parquet files are put first under fresh names ([`Changelog::stage`]),
//! then a single commit adds them together with one `txn` action per Kafka
//! partition it covers. Readers see all of a flush or none of it, and a
//! restarted sink asks the table where each partition stands
//! ([`Changelog::positions`]) instead of trusting Kafka.
//!
//! Commits are optimistic: the next log entry is written with an S3
//! conditional put (If-None-Match), so two writers can never both create
//! version N ([`LogHead`] follows the log and writes it). Before
//! committing, each partition's `txn` version is judged against the
//! write's [`Claim`]; if another writer moved it (a rebalance during a long
//! upload, a frozen sink that woke up), that partition is
//! [fenced](CommitOutcome::fenced): its files stay unreferenced (vacuum
//! removes them) and its position is read again. A put that loses the race
//! for its version reads the winning commit and judges every partition
//! again, so a concurrent commit carrying the same `app_id` fences that
//! partition and no other.

pub mod column;
pub mod roll;
pub mod segment;

use std::sync::Arc;

use arrow::array::RecordBatch;
use chrono::NaiveDate;
use deltalake::DeltaTableError;
use deltalake::kernel::transaction::TransactionError;
use deltalake::kernel::{Action, Add, MetadataExt, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::ObjectStore;

use crate::config::SinkConfig;
use crate::decode::schema::meta;
use crate::lake::files::{FileWriter, PartitionValues, Recent, now_ms, writer_properties};
use crate::lake::head::LogHead;
use crate::lake::table::{LakeRoot, Tables, conform, delta_err};
use crate::lake::{LakeError, app_id};
use crate::source::position::{Claim, Tp, Verdict};

/// One Parquet file's worth of rows: one schema, one commit date.
#[derive(Clone)]
pub struct DataFile {
    pub date: NaiveDate,
    pub batch: RecordBatch,
    /// The table's primary key columns, if it has one: kept in the file's
    /// footer (`cdc.key`), where the current-state writer finds it.
    pub key: Option<Arc<[String]>>,
}

/// The footer key naming a changelog file's primary key columns (a JSON
/// array of column names).
pub const KEY_METADATA: &str = "cdc.key";

/// What one partition contributes to a table commit.
#[derive(Clone)]
pub struct PartitionWrite {
    pub tp: Tp,
    /// The `txn` version it builds on and the one it leaves.
    pub claim: Claim,
    pub files: Vec<DataFile>,
}

#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// The table version written, if anything was committed.
    pub version: Option<i64>,
    /// Partitions committed, with their last offset.
    pub committed: Vec<(Tp, i64)>,
    /// Partitions another writer had advanced: nothing of theirs landed.
    pub fenced: Vec<Tp>,
    pub files: usize,
    pub rows: usize,
    pub bytes: usize,
}

impl CommitOutcome {
    fn count(&mut self, add: &Add, rows: usize) {
        self.files += 1;
        self.rows += rows;
        self.bytes += add.size as usize;
    }
}

/// A file put in the table's directory and not yet committed.
struct StagedFile {
    /// The rows, fitted to the table schema staging saw: kept in case a
    /// schema change before the commit means fitting them again.
    batch: RecordBatch,
    date: NaiveDate,
    key: Option<Arc<[String]>>,
    add: Add,
}

struct StagedWrite {
    tp: Tp,
    claim: Claim,
    files: Vec<StagedFile>,
}

/// The files of one flush of one table, put and ready to commit: what
/// [`Changelog::stage`] makes and [`Changelog::commit`] commits.
pub struct Staged {
    table: String,
    /// The table schema the files were fitted to (`None`: no files), and
    /// that schema grown by the columns they bring.
    base: Option<Arc<StructType>>,
    evolved: StructType,
    writes: Vec<StagedWrite>,
}

impl Staged {
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// One round of [`Changelog::commit`].
struct Round {
    /// The partitions already landed or fenced, and the counts of the
    /// files `actions` adds.
    outcome: CommitOutcome,
    /// The partitions `actions` commits, with their last offset.
    ours: Vec<(Tp, i64)>,
    actions: Vec<Action>,
}

/// Rounds of a commit that another writer's commit can cost before it
/// gives up (delta-rs' own default is 15). Each lost round means another
/// writer committed to the table meanwhile.
const COMMIT_ATTEMPTS: usize = 15;

/// Files of one flush encoded and put at once.
const CONCURRENT_PUTS: usize = 4;

/// The changelog tables of one consumer group.
pub struct Changelog {
    tables: Tables,
    group_id: String,
    files: FileWriter,
    /// Tests: where the next commit waits before its put (once).
    #[cfg(test)]
    commit_gate: std::sync::Mutex<Option<Arc<crate::lake::Gate>>>,
}

impl Changelog {
    /// The changelog the configuration names: its bucket, prefix, consumer
    /// group, Parquet settings and table properties.
    pub fn from_config(cfg: &SinkConfig) -> Result<Changelog, LakeError> {
        Ok(Changelog::new(
            LakeRoot::new(&cfg.s3, &cfg.output.prefix)?,
            &cfg.kafka.group_id,
            FileWriter::new(writer_properties(&cfg.output)),
            &cfg.lake,
        ))
    }

    pub fn new(
        root: LakeRoot,
        group_id: &str,
        files: FileWriter,
        lake: &crate::config::LakeConfig,
    ) -> Changelog {
        Changelog {
            tables: Tables::new(root, lake.table_properties()),
            group_id: group_id.to_string(),
            files,
            #[cfg(test)]
            commit_gate: std::sync::Mutex::new(None),
        }
    }

    /// Keeps every file this puts in `recent` too, for the current-state
    /// writer that reads it next.
    pub fn keeping_files_in(mut self, recent: Arc<Recent>) -> Changelog {
        self.files = self.files.with_recent(recent);
        self
    }

    pub fn root(&self) -> &LakeRoot {
        self.tables.root()
    }

    /// The `txn` version of each partition in `table`: the last offset the
    /// lake holds for it.
    pub async fn positions(&self, table: &str, tps: &[Tp]) -> Result<Vec<Option<i64>>, LakeError> {
        let ids = tps.iter().map(|tp| app_id(&self.group_id, tp)).collect();
        self.tables.txn_versions(table, ids).await
    }

    /// Stages and commits `writes` in one go (upkeep and tests; the sink
    /// pipelines the two).
    pub async fn write(
        &self,
        table: &str,
        writes: &[PartitionWrite],
    ) -> Result<CommitOutcome, LakeError> {
        let staged = self.stage(table, writes).await?;
        self.commit(&staged).await
    }

    /// Fits the files of `writes` to the table's schema, encodes them off
    /// the async runtime and puts them under fresh names, several at once.
    /// Creates the table if it is missing. Nothing is visible to readers
    /// until [`Changelog::commit`]; files of a flush never committed are
    /// left for vacuum.
    pub async fn stage(&self, table: &str, writes: &[PartitionWrite]) -> Result<Staged, LakeError> {
        let err = delta_err(table);
        let mut staged = Staged {
            table: table.to_string(),
            base: None,
            evolved: StructType::try_new([]).map_err(|e| err(e.into()))?,
            writes: writes
                .iter()
                .map(|w| StagedWrite {
                    tp: w.tp.clone(),
                    claim: w.claim,
                    files: Vec::with_capacity(w.files.len()),
                })
                .collect(),
        };
        let Some(first) = writes.iter().flat_map(|w| &w.files).next() else {
            return Ok(staged);
        };
        let view = self.tables.view(table, &first.batch.schema()).await?;
        let mut evolved = view.schema.as_ref().clone();
        let mut fitted = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            for file in &w.files {
                let batch = conform(file.batch.clone(), &mut evolved).map_err(&err)?;
                fitted.push((i, file.date, file.key.clone(), batch));
            }
        }
        let put: Vec<(usize, StagedFile)> =
            stream::iter(fitted)
                .map(|(i, date, key, batch)| {
                    let store = view.store.clone();
                    async move {
                        Ok::<_, LakeError>((i, self.put(store.as_ref(), date, key, batch).await?))
                    }
                })
                .buffered(CONCURRENT_PUTS)
                .try_collect()
                .await?;
        for (i, file) in put {
            staged.writes[i].files.push(file);
        }
        staged.base = Some(view.schema);
        staged.evolved = evolved;
        Ok(staged)
    }

    /// Puts `batch` as one file in `date`'s partition.
    async fn put(
        &self,
        store: &dyn ObjectStore,
        date: NaiveDate,
        key: Option<Arc<[String]>>,
        batch: RecordBatch,
    ) -> Result<StagedFile, LakeError> {
        let partition: PartitionValues = vec![(
            meta::DATE.to_string(),
            Some(date.format("%Y-%m-%d").to_string()),
        )];
        let footer: Vec<(String, String)> = key
            .iter()
            .map(|k| {
                let names = serde_json::to_string(&k[..]).expect("names serialise");
                (KEY_METADATA.to_string(), names)
            })
            .collect();
        let add = self
            .files
            .put(store, partition, &batch, true, &footer)
            .await?;
        Ok(StagedFile {
            batch,
            date,
            key,
            add,
        })
    }

    /// Commits staged files, with one `txn` per partition, in one Delta
    /// transaction. Safe to call again after an error: a commit that did
    /// land shows up as a moved `txn` version (committed or fenced), never
    /// twice.
    pub async fn commit(&self, staged: &Staged) -> Result<CommitOutcome, LakeError> {
        let table = staged.table.as_str();
        let Some(base) = &staged.base else {
            return Ok(CommitOutcome::default());
        };
        let err = delta_err(table);
        let slot = self.tables.slot(table);
        let mut open = slot.open.lock().await;
        for round in 0..COMMIT_ATTEMPTS {
            // Reads what others committed since this writer's last look.
            self.tables.refresh(table, &slot, &mut open, None).await?;
            let head = open
                .as_mut()
                .ok_or_else(|| LakeError::Location(self.root().table_url(table).to_string()))?;
            let Round {
                mut outcome,
                ours,
                actions,
            } = self.round(head, staged, base).await?;
            if ours.is_empty() {
                return Ok(outcome);
            }
            tracing::debug!(table, files = outcome.files, "files uploaded; committing");
            if round == 0 {
                crate::lake::failpoint_pause("lake::before-commit").await;
            }
            #[cfg(test)]
            {
                let gate = self.commit_gate.lock().expect("not poisoned").take();
                if let Some(gate) = gate {
                    gate.pass().await;
                }
            }
            let operation = DeltaOperation::StreamingUpdate {
                output_mode: OutputMode::Append,
                query_id: format!("cdc-sink:{}", self.group_id),
                epoch_id: now_ms(),
            };
            // `None`: another writer took the version. Its commit is read
            // on the next round, and each partition judged again: one it
            // advanced is fenced, the others still commit.
            if let Some(version) = head.append(actions, operation).await.map_err(&err)? {
                slot.set_view(head);
                outcome.version = Some(version);
                outcome.committed.extend(ours);
                return Ok(outcome);
            }
            tracing::debug!(
                table,
                "another writer committed first; committing on top of it"
            );
        }
        Err(err(DeltaTableError::Transaction {
            source: TransactionError::MaxCommitAttempts(COMMIT_ATTEMPTS as i32),
        }))
    }

    /// One round of a commit against what `head` holds: each partition
    /// judged by its `txn` version, and the actions that commit the ones
    /// still this writer's (none: nothing to commit).
    async fn round(
        &self,
        head: &mut LogHead,
        staged: &Staged,
        base: &StructType,
    ) -> Result<Round, LakeError> {
        let table = staged.table.as_str();
        let err = delta_err(table);
        let group = &self.group_id;
        let mut outcome = CommitOutcome::default();
        let mut ours = Vec::with_capacity(staged.writes.len());
        // Fencing: a partition whose txn version moved is not ours to write.
        for w in &staged.writes {
            let found = head.txn(&app_id(group, &w.tp)).await.map_err(&err)?;
            match w.claim.judge(found) {
                Verdict::Commit => ours.push(w),
                Verdict::Landed => outcome.committed.push((w.tp.clone(), w.claim.last)),
                Verdict::Fenced => {
                    tracing::warn!(partition = %w.tp, expected = ?w.claim.expected, found = ?found,
                        "another writer advanced this partition; dropping this sink's copy");
                    outcome.fenced.push(w.tp.clone());
                }
            }
        }
        let mut actions = Vec::new();
        if ours.is_empty() {
            return Ok(Round {
                outcome,
                ours: Vec::new(),
                actions,
            });
        }

        // Schema: the files fit the schema staging saw. If a commit since
        // changed it (another sink's, or ours of a flush staged earlier),
        // they are fitted and put again; rare, and never wrong.
        let current: &StructType = head.schema();
        let mut evolved = staged.evolved.clone();
        if current == base {
            for f in ours.iter().flat_map(|w| &w.files) {
                outcome.count(&f.add, f.batch.num_rows());
                actions.push(Action::Add(f.add.clone()));
            }
        } else {
            tracing::info!(
                table,
                "table schema changed since staging; fitting files again"
            );
            evolved = current.clone();
            let store = head.store();
            for f in ours.iter().flat_map(|w| &w.files) {
                let batch = conform(f.batch.clone(), &mut evolved).map_err(&err)?;
                let again = self
                    .put(store.as_ref(), f.date, f.key.clone(), batch)
                    .await?;
                outcome.count(&again.add, again.batch.num_rows());
                actions.push(Action::Add(again.add));
            }
        }
        if &evolved != head.schema().as_ref() {
            // Tables this sink creates support timestamp_ntz from the start
            // (see `table::protocol`), so a new column never needs a
            // protocol change.
            let metadata = head
                .metadata()
                .clone()
                .with_schema(&evolved)
                .map_err(|e| err(e.into()))?;
            actions.push(Action::Metadata(metadata));
            tracing::info!(table, "table schema evolved");
        }
        let now = now_ms();
        for w in &ours {
            actions.push(Action::Txn(Transaction::new_with_last_update(
                app_id(group, &w.tp),
                w.claim.last,
                Some(now),
            )));
        }
        Ok(Round {
            outcome,
            ours: ours.iter().map(|w| (w.tp.clone(), w.claim.last)).collect(),
            actions,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    use arrow::array::{Int32Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use test_support::counted::{Counters, counted_scheme};
    use url::Url;

    use super::*;
    use crate::config::{LakeConfig, OutputConfig};

    const TABLE: &str = "t";

    fn changelog(root: Url, checkpoint_interval: u64) -> Changelog {
        Changelog::new(
            LakeRoot::at(root, HashMap::new()),
            "g",
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &LakeConfig {
                checkpoint_interval,
                ..LakeConfig::default()
            },
        )
    }

    /// One row at `offset` of partition `partition` (the committer's tests
    /// use it too).
    pub(crate) fn batch(partition: i32, offset: i64) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
                Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![offset])),
                Arc::new(Int32Array::from(vec![partition])),
                Arc::new(Int64Array::from(vec![offset])),
            ],
        )
        .unwrap()
    }

    /// One row at `offset` of partition `partition`, claiming to follow
    /// `expected`.
    fn write(partition: i32, expected: Option<i64>, offset: i64) -> PartitionWrite {
        let batch = batch(partition, offset);
        PartitionWrite {
            tp: Tp::new("db.t", partition),
            claim: Claim {
                expected,
                last: offset,
            },
            files: vec![DataFile {
                date: NaiveDate::from_ymd_opt(2026, 12, 7).unwrap(),
                batch,
                key: None,
            }],
        }
    }

    /// A commit's requests do not grow with the table's history: it reads
    /// the log entries after its own last commit, not the whole log (as
    /// delta-rs' commit did, listing every entry to clean up expired
    /// ones, and re-reading every live file's statistics).
    #[tokio::test]
    async fn a_commit_lists_only_the_log_entries_after_its_last() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let scheme = counted_scheme("file", "changelog", counters.clone()).unwrap();
        let root = Url::parse(&format!("{scheme}://{}/", dir.path().display())).unwrap();
        let lake = changelog(root, 10);
        let mut last = None;
        // Versions 1 to 40 (0 creates the table), checkpoints at 9, 19, 29
        // and 39.
        for offset in 0..40 {
            let outcome = lake.write(TABLE, &[write(0, last, offset)]).await.unwrap();
            assert_eq!(outcome.committed.len(), 1, "{outcome:?}");
            last = Some(offset);
        }
        counters.reset();
        let outcome = lake.write(TABLE, &[write(0, last, 40)]).await.unwrap();
        assert_eq!(outcome.version, Some(41));
        let listed = counters.listed.load(Ordering::Relaxed);
        assert!(
            listed <= 3,
            "version 41 listed {listed} objects in {} lists",
            counters.lists.load(Ordering::Relaxed)
        );
    }

    /// Checkpoints come every `delta.checkpointInterval` commits, as
    /// readers expect, and a reader opening the table sees every write.
    #[tokio::test]
    async fn commits_checkpoint_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let root = Url::from_directory_path(dir.path()).unwrap();
        let lake = changelog(root.clone(), 4);
        let mut last = None;
        for offset in 0..9 {
            lake.write(TABLE, &[write(0, last, offset)]).await.unwrap();
            last = Some(offset);
        }
        let log = dir.path().join(TABLE).join("_delta_log");
        for v in [3, 7] {
            let checkpoint = log.join(format!("{v:020}.checkpoint.parquet"));
            assert!(checkpoint.exists(), "{checkpoint:?}");
        }
        let mut t = LakeRoot::at(root, HashMap::new()).handle(TABLE).unwrap();
        t.load().await.unwrap();
        assert_eq!(t.version(), Some(9));
        assert_eq!(t.snapshot().unwrap().log_data().num_files(), 9);
    }

    /// Two writers of one table, each with its own partition. A writer
    /// whose put loses to the other's commit reads that commit and judges
    /// its partitions again: one the other advanced is fenced, not
    /// overwritten; the others commit on top.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_lost_to_another_writer_lands_on_top_or_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let root = Url::from_directory_path(dir.path()).unwrap();
        let (a, b) = (changelog(root.clone(), 100), changelog(root.clone(), 100));
        a.write(TABLE, &[write(0, None, 0)]).await.unwrap();
        let p0 = Tp::new("db.t", 0);
        assert_eq!(
            b.positions(TABLE, std::slice::from_ref(&p0)).await.unwrap(),
            vec![Some(0)]
        );

        // `b` writes partition 1 (its own) and partition 0 as if it still
        // held it at offset 0. Between its look at the table and its put,
        // `a` commits partition 0's offset 1: `b`'s put of version 2 loses.
        let gate = Arc::new(crate::lake::Gate::default());
        *b.commit_gate.lock().unwrap() = Some(gate.clone());
        let staged = b
            .stage(TABLE, &[write(0, Some(0), 5), write(1, None, 10)])
            .await
            .unwrap();
        let b = Arc::new(b);
        let committing = tokio::spawn({
            let b = b.clone();
            async move { b.commit(&staged).await }
        });
        gate.reached.notified().await;
        let won = a.write(TABLE, &[write(0, Some(0), 1)]).await.unwrap();
        assert_eq!(won.version, Some(2));
        gate.proceed.notify_one();
        let outcome = committing.await.unwrap().unwrap();
        assert_eq!(outcome.version, Some(3), "{outcome:?}");
        assert_eq!(outcome.fenced, vec![p0.clone()]);
        assert_eq!(outcome.committed, vec![(Tp::new("db.t", 1), 10)]);
        assert_eq!((outcome.files, outcome.rows), (1, 1));

        let mut t = LakeRoot::at(root, HashMap::new()).handle(TABLE).unwrap();
        t.load().await.unwrap();
        let state = t.snapshot().unwrap();
        assert_eq!(state.log_data().num_files(), 3);
        for (partition, offset) in [(0, 1), (1, 10)] {
            let id = app_id("g", &Tp::new("db.t", partition));
            let found = state.transaction_version(t.log_store().as_ref(), id).await;
            assert_eq!(found.unwrap(), Some(offset));
        }
    }
}
