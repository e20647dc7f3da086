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
//! Commits are optimistic: delta-rs writes the next log entry with an S3
//! conditional put (If-None-Match), so two writers can never both create
//! version N. Before committing, each partition's `txn` version is judged
//! against the write's [`Claim`]; if another writer moved it (a rebalance
//! during a long upload, a frozen sink that woke up), that partition is
//! [fenced](CommitOutcome::fenced): its files stay unreferenced (vacuum
//! removes them) and its position is read again. delta-rs' conflict checker
//! covers the window between that check and the put: a concurrent commit
//! carrying the same `app_id` fails ours.

pub mod roll;
pub mod segment;

use std::sync::Arc;

use arrow::array::RecordBatch;
use chrono::NaiveDate;
use deltalake::DeltaTableError;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, MetadataExt, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::ObjectStore;

use crate::config::SinkConfig;
use crate::decode::schema::meta;
use crate::lake::files::{FileWriter, PartitionValues, now_ms, writer_properties};
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

/// Files of one flush encoded and put at once.
const CONCURRENT_PUTS: usize = 4;

/// The changelog tables of one consumer group.
pub struct Changelog {
    tables: Tables,
    group_id: String,
    files: FileWriter,
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
        }
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
        let mut outcome = CommitOutcome::default();
        let table = staged.table.as_str();
        let Some(base) = &staged.base else {
            return Ok(outcome);
        };
        let err = delta_err(table);
        let group = &self.group_id;
        let slot = self.tables.slot(table);
        let mut open = slot.open.lock().await;
        self.tables.refresh(table, &slot, &mut open, None).await?;
        let o = open
            .as_mut()
            .ok_or_else(|| LakeError::Location(self.root().table_url(table).to_string()))?;
        let log_store = o.table.log_store();

        // Fencing: a partition whose txn version moved is not ours to write.
        let state = o.table.snapshot().map_err(&err)?.clone();
        let mut ours = Vec::with_capacity(staged.writes.len());
        for w in &staged.writes {
            let found = o
                .txns
                .get(&state, log_store.as_ref(), app_id(group, &w.tp))
                .await
                .map_err(&err)?;
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
        if ours.is_empty() {
            return Ok(outcome);
        }
        let already = outcome.committed.clone();

        // Schema: the files fit the schema staging saw. If a commit since
        // changed it (another sink's, or ours of a flush staged earlier),
        // they are fitted and put again; rare, and never wrong.
        let current: StructType = state.schema().as_ref().clone();
        let mut evolved = staged.evolved.clone();
        let mut actions = Vec::new();
        if current == **base {
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
            let store = log_store.object_store(None);
            for f in ours.iter().flat_map(|w| &w.files) {
                let batch = conform(f.batch.clone(), &mut evolved).map_err(&err)?;
                let again = self
                    .put(store.as_ref(), f.date, f.key.clone(), batch)
                    .await?;
                outcome.count(&again.add, again.batch.num_rows());
                actions.push(Action::Add(again.add));
            }
        }
        if evolved != current {
            // Tables this sink creates support timestamp_ntz from the start
            // (see `table::protocol`), so a new column never needs a
            // protocol change.
            let metadata = state
                .metadata()
                .clone()
                .with_schema(&evolved)
                .map_err(|e| err(e.into()))?;
            actions.push(Action::Metadata(metadata));
            tracing::info!(table, "table schema evolved");
        }
        tracing::debug!(table, files = outcome.files, "files uploaded; committing");
        crate::lake::failpoint_pause("lake::before-commit").await;
        let now = now_ms();
        for w in &ours {
            actions.push(Action::Txn(Transaction::new_with_last_update(
                app_id(group, &w.tp),
                w.claim.last,
                Some(now),
            )));
        }
        let operation = DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: format!("cdc-sink:{group}"),
            epoch_id: now,
        };
        let result = CommitBuilder::from(CommitProperties::default())
            .with_actions(actions)
            .build(Some(state.snapshot()), log_store.clone(), operation)
            .await;
        match result {
            Ok(done) => {
                let version = done.version() as i64;
                o.txns.committed(
                    version,
                    ours.iter().map(|w| (app_id(group, &w.tp), w.claim.last)),
                );
                // The commit's own snapshot: the next refresh reads only
                // what others commit meanwhile.
                o.table.state = Some(done.snapshot());
                slot.set_view(&o.table).map_err(&err)?;
                outcome.version = Some(version);
                outcome.committed = already;
                outcome
                    .committed
                    .extend(ours.iter().map(|w| (w.tp.clone(), w.claim.last)));
                Ok(outcome)
            }
            // A concurrent commit carried one of our app ids: none of ours
            // landed (maybe our own earlier attempt did; re-reading the
            // position sorts that out either way).
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(c),
            }) => {
                tracing::warn!(conflict = %c, "commit lost to a concurrent writer");
                outcome.fenced.extend(ours.iter().map(|w| w.tp.clone()));
                outcome.files = 0;
                outcome.rows = 0;
                outcome.bytes = 0;
                Ok(outcome)
            }
            Err(e) => Err(err(e)),
        }
    }
}
