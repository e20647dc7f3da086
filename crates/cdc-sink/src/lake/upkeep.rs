//! `cdc-sink upkeep`: keeps every Delta table under the lake root cheap to
//! read. For each table, in this order:
//!
//! Current-state tables (`_current/<table>`) get the vacuum and the
//! checkpoint, never compaction: their writer is their only rewriter.
//!
//! 1. **Compaction.** A 10 s flush makes thousands of small files per table
//!    and day. A `date` partition with at least `compact_min_files` files
//!    smaller than `compact_target_bytes` is rewritten into files of about
//!    that size, rows ordered by Kafka partition and offset, in one commit
//!    that removes the old files and adds the new ones with
//!    `dataChange=false`. delta-rs' optimize needs DataFusion, which this
//!    crate does not build, hence our own.
//! 2. **Vacuum** (full mode): deletes files no version within the retention
//!    references, both compacted-away ones and files of flush attempts that
//!    never committed. The retention protects a sink's upload in flight.
//! 3. **Checkpoint** at the latest version, unless there is one, then the
//!    removal of log entries older than `delta.logRetentionDuration`.
//!    Vacuum commits twice when it deletes anything, so the checkpoint comes
//!    last: readers then start from a checkpoint at the newest version.
//!
//! It is safe while the sink appends: the sink's commits only add files,
//! and a compaction that removes files with `dataChange=false` does not
//! conflict with them (delta-rs' conflict checker agrees, and retries the
//! commit on the newer version). Each compaction commit also carries a
//! `txn` action of its own app id, so two upkeeps running at once conflict
//! instead of both replacing the same files (which would double rows); the
//! loser skips compaction this round.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::error::ArrowError;
use deltalake::checkpoints::{cleanup_metadata, create_checkpoint};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Remove, StructType, Transaction};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt;
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableError};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Deserialize;

use crate::config::{LakeConfig, SinkConfig};
use crate::lake::LakeError;
use crate::lake::changelog::KEY_METADATA;
use crate::lake::files::{
    FileError, FileWriter, PartitionValues, ReadFile, align, now_ms, output_schema,
    sort_by_kafka_position, writer_properties,
};
use crate::lake::table::{LakeRoot, MIRROR_DIR};

/// The `txn` app id of compaction commits; see the module docs.
const COMPACTION_APP_ID: &str = "cdc-sink-upkeep:compaction";

#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    /// Boxed, as the other large sources: errors are rare, results many.
    #[error(transparent)]
    Lake(Box<LakeError>),
    #[error("Delta table `{table}`")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("reading data file `{path}`")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("rewriting the files of table `{table}`")]
    Rewrite {
        table: String,
        #[source]
        source: ArrowError,
    },
    /// Reading or writing a file of the table; a file with a column the
    /// table does not know leaves its partition uncompacted.
    #[error("compacting the files of table `{table}`")]
    File {
        table: String,
        #[source]
        source: FileError,
    },
}

/// How one run behaves, beyond the lake configuration.
#[derive(Debug, Clone)]
pub struct UpkeepOptions {
    /// Change nothing; report what would be compacted and deleted.
    pub dry_run: bool,
    /// Unreferenced files younger than this are kept.
    pub vacuum_retention: Duration,
    /// Refuse a `vacuum_retention` below the table's
    /// `delta.deletedFileRetentionDuration` (delta-rs' safety check). Only
    /// tests turn it off.
    pub enforce_retention: bool,
}

impl UpkeepOptions {
    pub fn new(lake: &LakeConfig, dry_run: bool) -> UpkeepOptions {
        UpkeepOptions {
            dry_run,
            vacuum_retention: Duration::from_secs(lake.vacuum_retention_hours * 3600),
            enforce_retention: true,
        }
    }
}

/// What upkeep did to one table (or would do, in a dry run).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub files_before: usize,
    pub bytes_before: i64,
    pub files_after: usize,
    pub bytes_after: i64,
    /// Files compaction replaced, and the files it wrote.
    pub compacted: usize,
    pub written: usize,
    /// Compaction lost to a concurrent commit and was skipped this round.
    pub conflict: bool,
    /// The version a checkpoint was written at, if one was.
    pub checkpoint: Option<u64>,
    pub logs_removed: usize,
    /// Files vacuum deleted (or would delete).
    pub vacuumed: Vec<String>,
}

/// A live file small enough to compact.
#[derive(Debug, Clone)]
struct SmallFile {
    path: Path,
    size: i64,
    modified: i64,
    remove: Remove,
}

/// Files of one `date` partition that become one new file.
#[derive(Debug)]
struct Bin {
    partition_values: HashMap<String, Option<String>>,
    files: Vec<SmallFile>,
}

#[derive(Debug, Deserialize)]
struct LastCheckpoint {
    version: u64,
}

pub struct Upkeep {
    root: LakeRoot,
    files: FileWriter,
    lake: LakeConfig,
    options: UpkeepOptions,
}

/// Runs upkeep on every table of the configured lake, logging one line per
/// table.
pub async fn run(cfg: &SinkConfig, dry_run: bool) -> Result<Vec<TableReport>, UpkeepError> {
    let root =
        LakeRoot::new(&cfg.s3, &cfg.output.prefix).map_err(|e| UpkeepError::Lake(Box::new(e)))?;
    Upkeep::new(
        root,
        FileWriter::new(writer_properties(&cfg.output)),
        &cfg.lake,
        UpkeepOptions::new(&cfg.lake, dry_run),
    )
    .run()
    .await
}

fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> UpkeepError + '_ {
    move |source| UpkeepError::Delta {
        table: table.to_string(),
        source,
    }
}

fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(_)
        }
    )
}

impl Upkeep {
    /// Upkeep for the tables under `root`, writing with `files` (the
    /// sink's Parquet properties).
    pub fn new(
        root: LakeRoot,
        files: FileWriter,
        config: &LakeConfig,
        options: UpkeepOptions,
    ) -> Upkeep {
        Upkeep {
            root,
            files,
            lake: config.clone(),
            options,
        }
    }

    pub async fn run(&self) -> Result<Vec<TableReport>, UpkeepError> {
        let mut reports = Vec::new();
        let mirrors = self
            .root
            .mirror_tables()
            .await
            .map_err(|e| UpkeepError::Lake(Box::new(e)))?
            .into_iter()
            .map(|t| LakeRoot::mirror_of(&t));
        for table in self.tables().await?.into_iter().chain(mirrors) {
            let report = self.table(&table).await?;
            tracing::info!(
                table = %report.table,
                files_before = report.files_before,
                files_after = report.files_after,
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                compacted = report.compacted,
                written = report.written,
                conflict = report.conflict,
                checkpoint = ?report.checkpoint,
                logs_removed = report.logs_removed,
                vacuumed = report.vacuumed.len(),
                dry_run = self.options.dry_run,
                "upkeep"
            );
            reports.push(report);
        }
        Ok(reports)
    }

    /// The top-level directories under the root that hold a Delta table.
    pub async fn tables(&self) -> Result<Vec<String>, UpkeepError> {
        self.root
            .tables()
            .await
            .map_err(|e| UpkeepError::Lake(Box::new(e)))
    }

    async fn open(&self, table: &str) -> Result<DeltaTable, UpkeepError> {
        let err = delta_err(table);
        let mut t = self.root.handle(table).map_err(&err)?;
        t.load().await.map_err(&err)?;
        Ok(t)
    }

    /// Compaction, vacuum, checkpoint and log cleanup of one table.
    pub async fn table(&self, table: &str) -> Result<TableReport, UpkeepError> {
        let err = delta_err(table);
        let mut t = self.open(table).await?;
        let mut report = TableReport {
            table: table.to_string(),
            ..Default::default()
        };
        (report.files_before, report.bytes_before) = live_files(t.snapshot().map_err(&err)?);

        let state = t.snapshot().map_err(&err)?.clone();
        // A current-state table is rewritten by its writer alone: a
        // compaction (dataChange=false) racing one of its commits would
        // pass delta-rs' conflict checker and bring rows back.
        let bins = if table.starts_with(MIRROR_DIR) {
            Vec::new()
        } else {
            self.plan(&state)
        };
        if !bins.is_empty() {
            if self.options.dry_run {
                for bin in &bins {
                    let mut values: Vec<_> = bin.partition_values.iter().collect();
                    values.sort();
                    println!(
                        "{table}: would compact {} files of {values:?} into one",
                        bin.files.len()
                    );
                }
                report.compacted = bins.iter().map(|b| b.files.len()).sum();
                report.written = bins.len();
            } else {
                self.compact(table, &t, &state, bins, &mut report).await?;
                t.update_state().await.map_err(&err)?;
            }
        }

        let (vacuumed, metrics) = t
            .clone()
            .vacuum()
            .with_mode(VacuumMode::Full)
            .with_retention_period(
                chrono::Duration::from_std(self.options.vacuum_retention)
                    .unwrap_or(chrono::Duration::MAX),
            )
            .with_enforce_retention_duration(self.options.enforce_retention)
            .with_dry_run(self.options.dry_run)
            .await
            .map_err(&err)?;
        report.vacuumed = metrics.files_deleted;
        if self.options.dry_run {
            for path in &report.vacuumed {
                println!("{table}: would delete {path}");
            }
        }
        t = vacuumed;
        t.update_state().await.map_err(&err)?;

        if !self.options.dry_run {
            let version = t.version().unwrap_or(0);
            if self.last_checkpoint(table, &t).await? < Some(version) {
                create_checkpoint(&t, None).await.map_err(&err)?;
                report.checkpoint = Some(version);
            }
            let state = t.snapshot().map_err(&err)?;
            if state.table_config().enable_expired_log_cleanup() {
                report.logs_removed = cleanup_metadata(&t, None).await.map_err(&err)?;
            }
        }
        (report.files_after, report.bytes_after) = live_files(t.snapshot().map_err(&err)?);
        Ok(report)
    }

    /// The version of the table's latest checkpoint, from the
    /// `_last_checkpoint` hint every checkpoint writer keeps up to date.
    async fn last_checkpoint(
        &self,
        table: &str,
        t: &DeltaTable,
    ) -> Result<Option<u64>, UpkeepError> {
        let path = Path::from("_delta_log/_last_checkpoint");
        let store = t.log_store().object_store(None);
        let got = match store.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => {
                return Err(UpkeepError::Store {
                    path: format!("{table}/{path}"),
                    source,
                });
            }
        };
        let bytes = got.bytes().await.map_err(|source| UpkeepError::Store {
            path: format!("{table}/{path}"),
            source,
        })?;
        // An unreadable hint only costs one extra checkpoint.
        Ok(serde_json::from_slice::<LastCheckpoint>(&bytes)
            .ok()
            .map(|c| c.version))
    }

    /// Which files to rewrite into which: per `date` partition with enough
    /// small files, the small files in the order they were written, cut
    /// into runs of at most `compact_target_bytes` (a run of one file is
    /// left alone).
    fn plan(&self, state: &DeltaTableState) -> Vec<Bin> {
        let target = self.lake.compact_target_bytes as i64;
        let mut partitions: BTreeMap<Vec<(String, Option<String>)>, Vec<SmallFile>> =
            BTreeMap::new();
        for file in state.log_data().iter() {
            // Files with deletion vectors carry rows that are not live;
            // the sink never writes them, and rewriting them would need
            // the vector applied.
            if file.size() >= target || file.deletion_vector_descriptor().is_some() {
                continue;
            }
            let mut key: Vec<_> = file.partition_values_map().into_iter().collect();
            key.sort();
            partitions.entry(key).or_default().push(SmallFile {
                path: file.object_store_path(),
                size: file.size(),
                modified: file.modification_time(),
                remove: file.remove_action(false),
            });
        }
        let mut bins = Vec::new();
        for (key, mut files) in partitions {
            if files.len() < self.lake.compact_min_files {
                continue;
            }
            files.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
            let partition_values: HashMap<_, _> = key.into_iter().collect();
            let mut run: Vec<SmallFile> = Vec::new();
            let mut run_bytes = 0;
            for file in files {
                if !run.is_empty() && run_bytes + file.size > target {
                    bins.push(Bin {
                        partition_values: partition_values.clone(),
                        files: std::mem::take(&mut run),
                    });
                    run_bytes = 0;
                }
                run_bytes += file.size;
                run.push(file);
            }
            bins.push(Bin {
                partition_values,
                files: run,
            });
        }
        bins.retain(|b| b.files.len() > 1);
        bins
    }

    /// Writes the new files of `bins` and commits them in one transaction
    /// against `state`. A conflict skips this round: the files just
    /// written are deleted again (vacuum would get them otherwise).
    async fn compact(
        &self,
        table: &str,
        t: &DeltaTable,
        state: &DeltaTableState,
        bins: Vec<Bin>,
        report: &mut TableReport,
    ) -> Result<(), UpkeepError> {
        let err = delta_err(table);
        let store = t.log_store().object_store(None);
        let schema = state.schema();
        let partition_columns = state.metadata().partition_columns().to_vec();
        let mut actions = Vec::new();
        let mut written = Vec::new();
        for bin in &bins {
            let (batch, footer) = self
                .rewrite(table, &store, &schema, &partition_columns, bin)
                .await?;
            let partition: PartitionValues = partition_columns
                .iter()
                .map(|c| (c.clone(), bin.partition_values.get(c).cloned().flatten()))
                .collect();
            // Rows already in the table, rewritten: not a data change.
            let add = self
                .files
                .put(store.as_ref(), partition, &batch, false, &footer)
                .await
                .map_err(|source| UpkeepError::File {
                    table: table.to_string(),
                    source,
                })?;
            written.push(Path::from(add.path.as_str()));
            actions.extend(bin.files.iter().map(|f| Action::Remove(f.remove.clone())));
            actions.push(Action::Add(add));
        }
        actions.push(Action::Txn(Transaction::new_with_last_update(
            COMPACTION_APP_ID,
            state.version() as i64,
            Some(now_ms()),
        )));
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: self.lake.compact_target_bytes as i64,
        };
        let committed = CommitBuilder::from(CommitProperties::default())
            .with_actions(actions)
            .build(Some(state.snapshot()), t.log_store(), operation)
            .await;
        match committed {
            Ok(_) => {
                report.compacted = bins.iter().map(|b| b.files.len()).sum();
                report.written = written.len();
                Ok(())
            }
            Err(e) if is_conflict(&e) => {
                tracing::warn!(table, error = %e, "compaction lost to a concurrent commit; skipped this round");
                report.conflict = true;
                for path in written {
                    if let Err(error) = store.delete(&path).await {
                        tracing::warn!(table, %path, %error, "could not delete an uncommitted compacted file; vacuum will");
                    }
                }
                Ok(())
            }
            Err(e) => Err(err(e)),
        }
    }

    /// The rows of `bin`'s files as one batch in the table's column order
    /// (columns a file predates are null), sorted by Kafka partition and
    /// offset; and the footer the new file keeps (the primary key).
    async fn rewrite(
        &self,
        table: &str,
        store: &Arc<dyn ObjectStore>,
        schema: &StructType,
        partition_columns: &[String],
        bin: &Bin,
    ) -> Result<(RecordBatch, Vec<(String, String)>), UpkeepError> {
        let mut files = Vec::with_capacity(bin.files.len());
        for f in &bin.files {
            let store_err = |source| UpkeepError::Store {
                path: format!("{table}/{}", f.path),
                source,
            };
            let got = store.get(&f.path).await.map_err(store_err)?;
            let bytes = got.bytes().await.map_err(store_err)?;
            files.push(ReadFile::read(f.path.to_string(), bytes).map_err(|source| {
                UpkeepError::File {
                    table: table.to_string(),
                    source,
                }
            })?);
        }
        let rewrite_err = |source| UpkeepError::Rewrite {
            table: table.to_string(),
            source,
        };
        let schema = output_schema(schema, partition_columns, &files).map_err(|source| {
            UpkeepError::File {
                table: table.to_string(),
                source,
            }
        })?;
        let mut batches = Vec::new();
        for file in &files {
            for batch in &file.batches {
                batches.push(align(batch, &schema).map_err(rewrite_err)?);
            }
        }
        let batch = arrow::compute::concat_batches(&schema, &batches).map_err(rewrite_err)?;
        // The primary key the changelog files name goes on with their rows
        // (the current-state tables read it from there).
        let footer = files
            .iter()
            .rev()
            .find_map(|f| f.footer.get(KEY_METADATA))
            .map(|k| vec![(KEY_METADATA.to_string(), k.clone())])
            .unwrap_or_default();
        Ok((sort_by_kafka_position(&batch).map_err(rewrite_err)?, footer))
    }
}

/// Live files and their bytes.
fn live_files(state: &DeltaTableState) -> (usize, i64) {
    state
        .log_data()
        .iter()
        .fold((0, 0), |(n, bytes), f| (n + 1, bytes + f.size()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{ArrayRef, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use crate::decode::schema::meta;
    use arrow::datatypes::DataType;
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    use chrono::NaiveDate;

    use super::*;
    use crate::config::OutputConfig;
    use crate::lake::changelog::{Changelog, DataFile, PartitionWrite};
    use crate::lake::files::encode;
    use crate::lake::table::QUARANTINE_DIR;
    use crate::source::position::{Claim, Tp};

    const TABLE: &str = "tweets";

    fn lake_config() -> LakeConfig {
        LakeConfig {
            compact_min_files: 2,
            compact_target_bytes: 1 << 20,
            ..LakeConfig::default()
        }
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
    }

    /// Rows `offsets` of Kafka partition `partition`, shaped like the
    /// sink's files; `with_note` is the table after a column was added.
    fn rows(partition: i32, offsets: std::ops::Range<i64>, with_note: bool) -> RecordBatch {
        let n = offsets.clone().count();
        let mut fields = vec![Field::new("id", DataType::Int64, true)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(
            offsets.clone().map(|o| o * 10 + partition as i64),
        ))];
        if with_note {
            fields.push(Field::new("note", DataType::Utf8, true));
            columns.push(Arc::new(StringArray::from_iter_values(
                offsets.clone().map(|o| format!("note {o}")),
            )));
        }
        fields.push(Field::new(meta::KAFKA_PARTITION, DataType::Int32, false));
        columns.push(Arc::new(Int32Array::from(vec![partition; n])));
        fields.push(Field::new(meta::KAFKA_OFFSET, DataType::Int64, false));
        columns.push(Arc::new(Int64Array::from_iter_values(offsets)));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        lake: Changelog,
        /// The `txn` version each Kafka partition is at.
        last: BTreeMap<i32, i64>,
        next_offset: BTreeMap<i32, i64>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            let lake = changelog(LakeRoot::at(
                url::Url::from_directory_path(&root).unwrap(),
                HashMap::new(),
            ));
            Fixture {
                _dir: dir,
                root,
                lake,
                last: BTreeMap::new(),
                next_offset: BTreeMap::new(),
            }
        }

        fn tp(partition: i32) -> Tp {
            Tp::new(format!("db.{TABLE}"), partition)
        }

        /// One sink flush through the sink's own commit path: three rows
        /// per Kafka partition and date, one file each.
        async fn flush(&mut self, partitions: &[i32], dates: &[NaiveDate], with_note: bool) {
            let mut writes = Vec::new();
            for &p in partitions {
                let mut files = Vec::new();
                for &date in dates {
                    let start = *self.next_offset.entry(p).or_default();
                    self.next_offset.insert(p, start + 3);
                    files.push(DataFile {
                        date,
                        batch: rows(p, start..start + 3, with_note),
                        key: None,
                    });
                }
                writes.push(PartitionWrite {
                    tp: Fixture::tp(p),
                    claim: Claim {
                        expected: self.last.get(&p).copied(),
                        last: self.next_offset[&p] - 1,
                    },
                    files,
                });
            }
            let outcome = self.lake.write(TABLE, &writes).await.unwrap();
            assert!(outcome.fenced.is_empty(), "{outcome:?}");
            for (tp, last) in outcome.committed {
                self.last.insert(tp.partition, last);
            }
        }

        fn upkeep(&self, dry_run: bool) -> Upkeep {
            Upkeep::new(
                self.lake.root().clone(),
                FileWriter::new(writer_properties(&OutputConfig::default())),
                &lake_config(),
                UpkeepOptions {
                    dry_run,
                    vacuum_retention: Duration::ZERO,
                    enforce_retention: false,
                },
            )
        }

        fn table_dir(&self) -> std::path::PathBuf {
            self.root.join(TABLE)
        }

        /// A file as a flush attempt that never committed leaves it.
        fn orphan(&self) -> std::path::PathBuf {
            let dir = self.table_dir().join(format!("{}={}", meta::DATE, day(1)));
            let path = dir.join("part-never-committed.parquet");
            let bytes = encode(
                &rows(0, 0..3, false),
                &writer_properties(&OutputConfig::default()),
            )
            .unwrap();
            std::fs::write(&path, bytes).unwrap();
            path
        }

        async fn table(&self) -> DeltaTable {
            let mut t = self.lake.root().handle(TABLE).unwrap();
            t.load().await.unwrap();
            t
        }

        async fn positions(&self) -> Vec<Option<i64>> {
            // A fresh lake: nothing cached from before the upkeep.
            let lake = changelog(self.lake.root().clone());
            lake.positions(TABLE, &[Fixture::tp(0), Fixture::tp(1)])
                .await
                .unwrap()
        }
    }

    fn changelog(root: LakeRoot) -> Changelog {
        Changelog::new(
            root,
            "test-group",
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &lake_config(),
        )
    }

    /// Live files per `date`, in no particular order.
    fn files_by_date(t: &DeltaTable) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for f in t.snapshot().unwrap().log_data().iter() {
            let date = f.partition_values_map()[meta::DATE].clone().unwrap();
            out.entry(date).or_default().push(f.path().to_string());
        }
        out
    }

    /// Every row of the table, read through its log: one `column=value`
    /// line per row with nulls left out (so a file that predates a column
    /// reads like one holding nulls), sorted.
    async fn table_rows(t: &DeltaTable) -> Vec<String> {
        let store = t.log_store().object_store(None);
        let mut out = Vec::new();
        for f in t.snapshot().unwrap().log_data().iter() {
            let date = f.partition_values_map()[meta::DATE].clone().unwrap();
            let bytes = store
                .get(&f.object_store_path())
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            for batch in ReadFile::read(f.path().to_string(), bytes).unwrap().batches {
                out.extend(row_strings(&batch, &date));
            }
        }
        out.sort();
        out
    }

    fn row_strings(batch: &RecordBatch, date: &str) -> Vec<String> {
        let options = FormatOptions::default();
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        (0..batch.num_rows())
            .map(|i| {
                // By column name: Delta reads columns by name, and a file
                // written after a column was added has it elsewhere.
                let mut values = BTreeMap::from([(meta::DATE.to_string(), date.to_string())]);
                for ((field, column), f) in batch
                    .schema()
                    .fields()
                    .iter()
                    .zip(batch.columns())
                    .zip(&formatters)
                {
                    if column.is_valid(i) {
                        values.insert(field.name().clone(), f.value(i).to_string());
                    }
                }
                format!("{values:?}")
            })
            .collect()
    }

    /// Kafka (partition, offset) of each row of the file, in file order.
    async fn positions_in_file(t: &DeltaTable, path: &str) -> Vec<(i64, i64)> {
        let bytes = t
            .log_store()
            .object_store(None)
            .get(&Path::from(path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut out = Vec::new();
        for batch in ReadFile::read(path.to_string(), bytes).unwrap().batches {
            let col = |name| {
                arrow::compute::cast(batch.column_by_name(name).unwrap(), &DataType::Int64)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .clone()
            };
            let (p, o) = (col(meta::KAFKA_PARTITION), col(meta::KAFKA_OFFSET));
            out.extend((0..batch.num_rows()).map(|i| (p.value(i), o.value(i))));
        }
        out
    }

    /// Five flushes of two Kafka partitions into one date, the last two
    /// after a column was added; three flushes of one partition into
    /// another date.
    async fn fixture() -> Fixture {
        let mut fx = Fixture::new();
        for k in 0..5 {
            fx.flush(&[1, 0], &[day(1)], k >= 3).await;
        }
        for _ in 0..3 {
            fx.flush(&[0], &[day(2)], false).await;
        }
        fx
    }

    #[tokio::test]
    async fn compaction_vacuum_and_checkpoint() {
        let mut fx = fixture().await;
        std::fs::create_dir_all(fx.root.join(QUARANTINE_DIR).join("db.tweets")).unwrap();
        std::fs::write(fx.root.join(QUARANTINE_DIR).join("db.tweets/1.json"), "{}").unwrap();
        std::fs::create_dir_all(fx.root.join("not-a-table")).unwrap();
        std::fs::write(fx.root.join("not-a-table/x.parquet"), "x").unwrap();
        let orphan = fx.orphan();
        let before = fx.table().await;
        let rows_before = table_rows(&before).await;
        let positions_before = fx.positions().await;
        assert_eq!(
            files_by_date(&before).values().map(Vec::len).sum::<usize>(),
            13
        );

        let upkeep = fx.upkeep(false);
        assert_eq!(upkeep.tables().await.unwrap(), vec![TABLE.to_string()]);
        let reports = upkeep.run().await.unwrap();
        let report = &reports[0];
        assert_eq!(
            (report.files_before, report.files_after),
            (13, 2),
            "{report:?}"
        );
        assert_eq!((report.compacted, report.written), (13, 2), "{report:?}");
        assert!(!report.conflict);

        // One file per date, the same rows, the same positions.
        let after = fx.table().await;
        let by_date = files_by_date(&after);
        assert!(
            by_date.values().all(|files| files.len() == 1),
            "{by_date:?}"
        );
        assert_eq!(table_rows(&after).await, rows_before);
        assert_eq!(fx.positions().await, positions_before);

        // Rows in Kafka order: partition, then offset.
        let day1 = &by_date[&day(1).to_string()][0];
        let order = positions_in_file(&after, day1).await;
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        assert_eq!(order.len(), 30);

        // The orphan is gone, every live file is still there.
        assert!(!orphan.exists(), "orphan survived vacuum");
        assert!(
            report
                .vacuumed
                .iter()
                .any(|p| p.ends_with("part-never-committed.parquet"))
        );
        for files in by_date.values() {
            for f in files {
                assert!(fx.table_dir().join(f).exists(), "{f} was vacuumed");
            }
        }
        assert!(
            fx.root
                .join(QUARANTINE_DIR)
                .join("db.tweets/1.json")
                .exists()
        );

        // A checkpoint at the latest version.
        let version = report.checkpoint.expect("a checkpoint");
        assert_eq!(Some(version), after.version());
        let checkpoint = fx
            .table_dir()
            .join(format!("_delta_log/{version:020}.checkpoint.parquet"));
        assert!(checkpoint.exists(), "{checkpoint:?}");

        // The sink carries on from the positions it had.
        fx.flush(&[0, 1], &[day(2)], true).await;
        let again = fx.upkeep(false).run().await.unwrap();
        assert_eq!(again[0].files_after, 2, "{again:?}");
    }

    #[tokio::test]
    async fn dry_run_changes_nothing() {
        let fx = fixture().await;
        let orphan = fx.orphan();
        let before = fx.table().await;

        let reports = fx.upkeep(true).run().await.unwrap();
        let report = &reports[0];
        assert_eq!((report.compacted, report.written), (13, 2), "{report:?}");
        assert!(
            report
                .vacuumed
                .iter()
                .any(|p| p.ends_with("part-never-committed.parquet"))
        );
        assert_eq!(report.checkpoint, None);

        let after = fx.table().await;
        assert_eq!(after.version(), before.version());
        assert_eq!(files_by_date(&after), files_by_date(&before));
        assert!(orphan.exists());
        let log: Vec<_> = std::fs::read_dir(fx.table_dir().join("_delta_log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!log.iter().any(|f| f.contains("checkpoint")), "{log:?}");
    }

    /// A sink commit between planning and committing a compaction does not
    /// stop it; a second compaction of the same files does not land (it
    /// would double their rows).
    #[tokio::test]
    async fn appends_do_not_conflict_but_a_second_compaction_does() {
        let mut fx = fixture().await;
        let t = fx.table().await;
        let state = t.snapshot().unwrap().clone();
        let upkeep = fx.upkeep(false);
        let plan = |state| upkeep.plan(state);
        assert_eq!(plan(&state).len(), 2);

        fx.flush(&[0, 1], &[day(1)], true).await;
        let rows_with_append = table_rows(&fx.table().await).await;

        let mut first = TableReport::default();
        upkeep
            .compact(TABLE, &t, &state, plan(&state), &mut first)
            .await
            .unwrap();
        assert!(!first.conflict, "{first:?}");
        let after = fx.table().await;
        // Readers of the change feed skip it: it changed no data.
        let commit = std::fs::read_to_string(
            fx.table_dir()
                .join(format!("_delta_log/{:020}.json", after.version().unwrap())),
        )
        .unwrap();
        let files: Vec<serde_json::Value> = commit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|a| a.get("add").or(a.get("remove")).cloned())
            .collect();
        assert_eq!(files.len(), 13 + 2, "{commit}");
        assert!(files.iter().all(|f| f["dataChange"] == false), "{commit}");
        assert_eq!(table_rows(&after).await, rows_with_append);
        // The two appended files plus one per date.
        assert_eq!(files_by_date(&after)[&day(1).to_string()].len(), 3);

        let mut second = TableReport::default();
        upkeep
            .compact(TABLE, &t, &state, plan(&state), &mut second)
            .await
            .unwrap();
        assert!(second.conflict, "{second:?}");
        assert_eq!(table_rows(&fx.table().await).await, rows_with_append);
    }
}
