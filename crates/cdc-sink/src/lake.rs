//! The lake: one Delta Lake table per captured table, written with delta-rs.
//!
//! A flush is one Delta transaction per table ([`Lake::commit`]): its
//! Parquet files are put first under fresh names, then a single commit adds
//! them together with one `txn` action per Kafka partition it covers
//! (`app_id` = `cdc-sink:<group>:<topic>:<partition>`, `version` = the last
//! offset it holds). Readers see all of a flush or none of it, and the
//! table itself records how far each partition has landed, so a restarted
//! sink asks the table ([`Lake::positions`]) instead of trusting Kafka.
//!
//! Commits are optimistic: delta-rs writes the next log entry with an S3
//! conditional put (If-None-Match), so two writers can never both create
//! version N. Before committing, each partition's `txn` version must still
//! be the one this sink last saw; if another writer moved it (a rebalance
//! during a long upload, a frozen sink that woke up), that partition is
//! [fenced](CommitOutcome::fenced): its files stay unreferenced (vacuum
//! removes them) and its position is read again. delta-rs' conflict checker
//! covers the window between that check and the put: a concurrent commit
//! carrying the same `app_id` fails ours.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use bytes::Bytes;
use chrono::NaiveDate;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, MetadataExt, Protocol, StructField, StructType, Transaction};
use deltalake::logstore::{LogStore, ObjectStoreRef};
use deltalake::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use url::Url;

use crate::config::{LakeConfig, S3Config};
use crate::encode::encode;
use crate::position::Tp;
use crate::schema::meta;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("Delta table `{table}`")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("building a record batch failed")]
    Arrow(#[from] ArrowError),
    #[error("encoding Parquet failed")]
    Parquet(#[from] ParquetError),
    #[error("object store request failed")]
    Store(#[from] object_store::Error),
    #[error("lake location `{0}` is not a valid URL")]
    Location(String),
}

impl LakeError {
    /// Storage and commit errors may pass; encoding errors, and a table
    /// this writer cannot write, will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            LakeError::Delta { source, .. } => !matches!(
                source,
                DeltaTableError::Transaction {
                    source: TransactionError::UnsupportedTableFeatures(_)
                        | TransactionError::TableFeaturesRequired(_)
                        | TransactionError::DeltaTableAppendOnly
                } | DeltaTableError::SchemaMismatch { .. }
                    | DeltaTableError::InvalidTableLocation(_)
            ),
            LakeError::Store(_) => true,
            LakeError::Arrow(_) | LakeError::Parquet(_) | LakeError::Location(_) => false,
        }
    }
}

/// One Parquet file's worth of rows: one schema, one commit date.
#[derive(Clone)]
pub struct DataFile {
    pub date: NaiveDate,
    pub batch: RecordBatch,
}

/// What one partition contributes to a table commit.
#[derive(Clone)]
pub struct PartitionWrite {
    pub tp: Tp,
    /// The last offset of this write (the `txn` version it records).
    pub last: i64,
    /// The `txn` version the table must still hold (see `position`).
    pub expected: Option<i64>,
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

pub struct Lake {
    root: Url,
    storage: HashMap<String, String>,
    group_id: String,
    props: Arc<WriterProperties>,
    /// Properties of tables this sink creates (checkpoint interval, log
    /// retention).
    table_properties: BTreeMap<String, String>,
    /// One slot per table opened. A std mutex: held only to find a slot.
    tables: std::sync::Mutex<HashMap<String, Arc<TableSlot>>>,
    /// Files being encoded at once, across all tables and flushes: one per
    /// core. Each holds an encoder's buffers, so more would only add memory.
    encoders: Arc<tokio::sync::Semaphore>,
}

/// One table, as this process knows it.
#[derive(Default)]
struct TableSlot {
    /// The open table, at the version last read or committed. A tokio
    /// mutex held across one commit, which also keeps two commits of this
    /// sink to one table from racing each other.
    open: tokio::sync::Mutex<Option<OpenTable>>,
    /// What staging files needs, kept apart from `open` so that encoding
    /// and putting the next files never waits for a commit in progress.
    /// A std mutex: held only to clone or replace it.
    view: std::sync::Mutex<Option<TableView>>,
}

impl TableSlot {
    fn view(&self) -> Option<TableView> {
        self.view.lock().expect("not poisoned").clone()
    }

    fn set_view(&self, table: &DeltaTable) -> Result<(), DeltaTableError> {
        let view = TableView {
            schema: Arc::new(table.snapshot()?.schema().as_ref().clone()),
            store: table.log_store().object_store(None),
        };
        *self.view.lock().expect("not poisoned") = Some(view);
        Ok(())
    }
}

#[derive(Clone)]
struct TableView {
    schema: Arc<StructType>,
    store: ObjectStoreRef,
}

struct OpenTable {
    table: DeltaTable,
    txns: TxnCache,
}

/// `txn` versions as of one table version. Looking one up replays the log
/// since the last checkpoint (up to `checkpoint_interval` commits, each an
/// S3 GET); a table that only this sink writes still holds what its own
/// last commit wrote, so that is remembered instead.
#[derive(Default)]
struct TxnCache {
    at: Option<i64>,
    versions: HashMap<String, Option<i64>>,
}

impl TxnCache {
    async fn get(
        &mut self,
        state: &DeltaTableState,
        log_store: &dyn LogStore,
        app_id: String,
    ) -> Result<Option<i64>, DeltaTableError> {
        let version = state.version() as i64;
        if self.at != Some(version) {
            // Someone else committed since: what we knew may be stale.
            self.versions.clear();
            self.at = Some(version);
        }
        if let Some(found) = self.versions.get(&app_id) {
            return Ok(*found);
        }
        let found = state.transaction_version(log_store, &app_id).await?;
        self.versions.insert(app_id, found);
        Ok(found)
    }

    /// Our commit `version`, carrying `txns`, landed. Only if it sits
    /// directly on the version the cache is at is nothing else in between.
    fn committed(&mut self, version: i64, txns: impl Iterator<Item = (String, i64)>) {
        if self.at.is_some_and(|at| version == at + 1) {
            self.at = Some(version);
            self.versions.extend(txns.map(|(id, v)| (id, Some(v))));
        } else {
            self.at = None;
            self.versions.clear();
        }
    }
}

/// A file put in the table's directory and not yet committed.
struct StagedFile {
    /// The rows, fitted to the table schema staging saw: kept in case a
    /// schema change before the commit means fitting them again.
    batch: RecordBatch,
    date: NaiveDate,
    add: Add,
}

struct StagedWrite {
    tp: Tp,
    last: i64,
    expected: Option<i64>,
    files: Vec<StagedFile>,
}

/// The files of one flush of one table, put and ready to commit: what
/// [`Lake::stage`] makes and [`Lake::commit`] commits.
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

/// Files above this size are put as multipart uploads, in parts of
/// [`PART_SIZE`]: a failed part is retried alone, and S3 never holds more
/// than one part of ours in a request.
const MULTIPART_FROM: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;
/// Files of one flush encoded and put at once.
const CONCURRENT_PUTS: usize = 4;

/// The `txn` application id of one partition within one consumer group.
pub fn app_id(group_id: &str, tp: &Tp) -> String {
    format!("cdc-sink:{group_id}:{}:{}", tp.topic, tp.partition)
}

/// `table` is the last dot-separated part of the topic (`twitter.tweets`
/// is `tweets`).
pub fn table_of(topic: &str) -> &str {
    topic.rsplit('.').next().unwrap_or(topic)
}

/// Puts `bytes` in one request, or as a multipart upload when large.
async fn upload(store: &dyn ObjectStore, path: &Path, bytes: Bytes) -> object_store::Result<()> {
    if bytes.len() < MULTIPART_FROM {
        store.put(path, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let mut upload =
        WriteMultipart::new_with_chunk_size(store.put_multipart(path).await?, PART_SIZE);
    upload.put(bytes);
    upload.finish().await?;
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Lake {
    pub fn new(
        s3: &S3Config,
        prefix: &str,
        group_id: &str,
        props: WriterProperties,
        lake: &LakeConfig,
    ) -> Result<Lake, LakeError> {
        let prefix = prefix.trim_matches('/');
        let root = if prefix.is_empty() {
            format!("s3://{}/", s3.bucket)
        } else {
            format!("s3://{}/{prefix}/", s3.bucket)
        };
        let root = Url::parse(&root).map_err(|_| LakeError::Location(root.clone()))?;
        let storage =
            crate::storage::options(s3).map_err(|e| LakeError::Location(e.to_string()))?;
        Ok(Lake::at(root, storage, group_id, props, lake))
    }

    /// The lake the configuration names: its bucket, prefix, consumer
    /// group, Parquet settings and table properties.
    pub fn from_config(cfg: &crate::config::SinkConfig) -> Result<Lake, LakeError> {
        Lake::new(
            &cfg.s3,
            &cfg.output.prefix,
            &cfg.kafka.group_id,
            crate::encode::writer_properties(&cfg.output),
            &cfg.lake,
        )
    }

    pub fn table_url(&self, table: &str) -> Url {
        self.root
            .join(&format!("{table}/"))
            .expect("a table name is a valid URL path segment")
    }

    fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> LakeError + '_ {
        move |source| LakeError::Delta {
            table: table.to_string(),
            source,
        }
    }

    fn slot(&self, table: &str) -> Arc<TableSlot> {
        self.tables
            .lock()
            .expect("not poisoned")
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Brings `open` to the table's latest version, opening it first (and
    /// creating it with `create_with`, if given and the table is missing).
    /// Leaves `None` for a missing table.
    async fn refresh(
        &self,
        table: &str,
        slot: &TableSlot,
        open: &mut Option<OpenTable>,
        create_with: Option<&Schema>,
    ) -> Result<(), LakeError> {
        let err = Self::delta_err(table);
        if open.is_none() {
            let t = DeltaTableBuilder::from_url(self.table_url(table))
                .map_err(&err)?
                .with_storage_options(self.storage.clone())
                .build()
                .map_err(&err)?;
            if !t.verify_deltatable_existence().await.map_err(&err)? {
                match create_with {
                    Some(schema) => self.create(table, &t, schema).await?,
                    None => return Ok(()),
                }
            }
            *open = Some(OpenTable {
                table: t,
                txns: TxnCache::default(),
            });
        }
        let o = open.as_mut().expect("opened above");
        if o.table.version().is_none() {
            o.table.load().await.map_err(&err)?;
        } else {
            o.table.update_state().await.map_err(&err)?;
        }
        slot.set_view(&o.table).map_err(&err)
    }

    /// Creates the table (partitioned by `date`) if no writer has yet.
    ///
    /// Version 0 is committed directly rather than through delta-rs'
    /// `CreateBuilder`, which would list every legacy writer feature of
    /// writer version 7 (invariants among them, which delta-rs only writes
    /// with DataFusion); the protocol here lists exactly what the sink
    /// uses.
    async fn create(
        &self,
        table: &str,
        t: &DeltaTable,
        file_schema: &Schema,
    ) -> Result<(), LakeError> {
        let err = Self::delta_err(table);
        let schema = table_schema(file_schema).map_err(&err)?;
        let metadata =
            deltalake::kernel::new_metadata(&schema, [meta::DATE], self.table_properties.iter())
                .map_err(|e| err(e.into()))?
                .with_name(table.to_string())
                .map_err(|e| err(e.into()))?;
        let protocol = protocol();
        let operation = DeltaOperation::Create {
            mode: SaveMode::ErrorIfExists,
            location: self.table_url(table),
            protocol: protocol.clone(),
            metadata: metadata.clone(),
        };
        // No retries: a create that loses the race for version 0 must not
        // be committed again as version 1 (delta-rs would retry it), which
        // would give the table a second identity and fail every writer
        // whose snapshot predates it with "metadata changed".
        let created = CommitBuilder::default()
            .with_max_retries(0)
            .with_actions(vec![Action::Protocol(protocol), Action::Metadata(metadata)])
            .build(None, t.log_store(), operation)
            .await;
        match created {
            Ok(_) => tracing::info!(table, "created Delta table"),
            // Another sink created it first: that is fine, it is opened next.
            Err(_) if t.verify_deltatable_existence().await.map_err(&err)? => {
                tracing::info!(table, "another writer created the Delta table first");
            }
            Err(e) => return Err(err(e)),
        }
        Ok(())
    }

    /// The `txn` version of each partition in `table`: the last offset the
    /// lake holds for it.
    pub async fn positions(&self, table: &str, tps: &[Tp]) -> Result<Vec<Option<i64>>, LakeError> {
        let err = Self::delta_err(table);
        let slot = self.slot(table);
        let mut open = slot.open.lock().await;
        self.refresh(table, &slot, &mut open, None).await?;
        let Some(o) = open.as_mut() else {
            return Ok(vec![None; tps.len()]);
        };
        let state = o.table.snapshot().map_err(&err)?.clone();
        let mut out = Vec::with_capacity(tps.len());
        for tp in tps {
            let id = app_id(&self.group_id, tp);
            let log_store = o.table.log_store();
            out.push(
                o.txns
                    .get(&state, log_store.as_ref(), id)
                    .await
                    .map_err(&err)?,
            );
        }
        Ok(out)
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
    /// until [`Lake::commit`]; files of a flush never committed are left
    /// for vacuum.
    pub async fn stage(&self, table: &str, writes: &[PartitionWrite]) -> Result<Staged, LakeError> {
        let err = Self::delta_err(table);
        let mut staged = Staged {
            table: table.to_string(),
            base: None,
            evolved: StructType::try_new([]).map_err(|e| err(e.into()))?,
            writes: writes
                .iter()
                .map(|w| StagedWrite {
                    tp: w.tp.clone(),
                    last: w.last,
                    expected: w.expected,
                    files: Vec::with_capacity(w.files.len()),
                })
                .collect(),
        };
        let Some(first) = writes.iter().flat_map(|w| &w.files).next() else {
            return Ok(staged);
        };
        let slot = self.slot(table);
        let view = match slot.view() {
            Some(view) => view,
            None => {
                let mut open = slot.open.lock().await;
                self.refresh(table, &slot, &mut open, Some(&first.batch.schema()))
                    .await?;
                slot.view()
                    .ok_or_else(|| LakeError::Location(self.table_url(table).to_string()))?
            }
        };
        let mut evolved = view.schema.as_ref().clone();
        let mut fitted = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            for file in &w.files {
                let batch = conform(file.batch.clone(), &mut evolved).map_err(&err)?;
                fitted.push((i, file.date, batch));
            }
        }
        let put: Vec<(usize, StagedFile)> = stream::iter(fitted)
            .map(|(i, date, batch)| {
                let store = view.store.clone();
                async move { Ok::<_, LakeError>((i, self.put_file(store, date, batch).await?)) }
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

    /// Encodes `batch` as one Parquet file and puts it in `date`'s
    /// partition under a fresh name.
    async fn put_file(
        &self,
        store: ObjectStoreRef,
        date: NaiveDate,
        batch: RecordBatch,
    ) -> Result<StagedFile, LakeError> {
        let props = self.props.clone();
        let permit = self
            .encoders
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // zstd is CPU-bound: run it where it does not hold up the runtime
        // thread that consumes and decodes.
        let (batch, bytes) = match tokio::task::spawn_blocking(move || {
            let bytes = encode(&batch, &props);
            drop(permit);
            (batch, bytes)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let bytes = bytes?;
        let day = date.format("%Y-%m-%d").to_string();
        let path = format!("{}={day}/part-{}.parquet", meta::DATE, uuid::Uuid::new_v4());
        let size = bytes.len();
        upload(store.as_ref(), &Path::from(path.as_str()), bytes).await?;
        let add = Add {
            path,
            partition_values: HashMap::from([(meta::DATE.to_string(), Some(day))]),
            size: size as i64,
            modification_time: now_ms(),
            data_change: true,
            stats: Some(format!(r#"{{"numRecords":{}}}"#, batch.num_rows())),
            ..Default::default()
        };
        Ok(StagedFile { batch, date, add })
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
        let err = Self::delta_err(table);
        let group = &self.group_id;
        let slot = self.slot(table);
        let mut open = slot.open.lock().await;
        self.refresh(table, &slot, &mut open, None).await?;
        let o = open
            .as_mut()
            .ok_or_else(|| LakeError::Location(self.table_url(table).to_string()))?;
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
            if found == w.expected {
                ours.push(w);
            } else if found == Some(w.last) {
                // Our own earlier attempt of this very write landed (its
                // answer was lost and the commit retried): it is committed.
                outcome.committed.push((w.tp.clone(), w.last));
            } else {
                tracing::warn!(partition = %w.tp, expected = ?w.expected, found = ?found,
                    "another writer advanced this partition; dropping this sink's copy");
                outcome.fenced.push(w.tp.clone());
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
                let again = self.put_file(store.clone(), f.date, batch).await?;
                outcome.count(&again.add, again.batch.num_rows());
                actions.push(Action::Add(again.add));
            }
        }
        if evolved != current {
            // Tables this sink creates support timestamp_ntz from the start
            // (see `protocol`), so a new column never needs a protocol change.
            let metadata = state
                .metadata()
                .clone()
                .with_schema(&evolved)
                .map_err(|e| err(e.into()))?;
            actions.push(Action::Metadata(metadata));
            tracing::info!(table, "table schema evolved");
        }
        tracing::debug!(table, files = outcome.files, "files uploaded; committing");
        if let Some(pause) = pause_before_commit() {
            tokio::time::sleep(pause).await;
        }
        let now = now_ms();
        for w in &ours {
            actions.push(Action::Txn(Transaction::new_with_last_update(
                app_id(group, &w.tp),
                w.last,
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
                o.txns
                    .committed(version, ours.iter().map(|w| (app_id(group, &w.tp), w.last)));
                // The commit's own snapshot: the next refresh reads only
                // what others commit meanwhile.
                o.table.state = Some(done.snapshot());
                slot.set_view(&o.table).map_err(&err)?;
                outcome.version = Some(version);
                outcome.committed = already;
                outcome
                    .committed
                    .extend(ours.iter().map(|w| (w.tp.clone(), w.last)));
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

    /// A lake rooted at any location delta-rs can store to (`s3://`, or
    /// `file://` for tests); [`Lake::new`] is this for the configured
    /// bucket and prefix.
    pub fn at(
        root: Url,
        storage: HashMap<String, String>,
        group_id: &str,
        props: WriterProperties,
        lake: &LakeConfig,
    ) -> Lake {
        // s3:// table URLs resolve through the sink's own S3 store.
        crate::storage::register();
        Lake {
            root,
            storage,
            group_id: group_id.to_string(),
            props: Arc::new(props),
            table_properties: lake.table_properties(),
            tables: std::sync::Mutex::new(HashMap::new()),
            encoders: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    /// Where the tables live: one directory per table under it.
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// delta-rs storage options (they hold the S3 secret: never log them).
    pub fn storage(&self) -> &HashMap<String, String> {
        &self.storage
    }
}

/// The crash tests' failpoint `lake::before-commit`: a pause between putting
/// a flush's files and committing them, which widens the window a SIGKILL
/// must hit to leave written-but-uncommitted files
/// (`FAILPOINTS=lake::before-commit=return(MILLISECONDS)`). Compiled only
/// with the `failpoints` feature, which tests/run.sh enables; otherwise
/// always `None`.
fn pause_before_commit() -> Option<std::time::Duration> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("lake::before-commit", |ms: Option<String>| {
        ms.and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    None
}

/// Reader 3 / writer 7 with `timestampNtz`, so that `timestamp` columns
/// (wall-clock times, no zone) can be added at any time. kernel keeps its
/// constructor private; the JSON form is the protocol's own definition.
fn protocol() -> Protocol {
    serde_json::from_value(serde_json::json!({
        "minReaderVersion": 3,
        "minWriterVersion": 7,
        "readerFeatures": ["timestampNtz"],
        "writerFeatures": ["timestampNtz"],
    }))
    .expect("a valid protocol action")
}

/// The Delta schema of a new table: the file's columns plus `date`.
fn table_schema(file_schema: &Schema) -> Result<StructType, DeltaTableError> {
    let mut fields: Vec<Field> = file_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(meta::DATE, DataType::Date32, true));
    let s: StructType = (&Schema::new(fields)).try_into_kernel()?;
    Ok(s)
}

/// Makes `batch` fit the table schema, growing `table` where it must:
/// - a column the table lacks is added (nullable);
/// - a column whose type the table holds wider is cast up, losslessly;
/// - a column whose type cannot be held losslessly in the table's (a
///   narrowed or changed type) goes to a new column `<name>__<type>`, so
///   no value is ever rounded or dropped.
fn conform(batch: RecordBatch, table: &mut StructType) -> Result<RecordBatch, DeltaTableError> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut added: Vec<StructField> = Vec::new();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let incoming: StructField = field.as_ref().try_into_kernel()?;
        let incoming = StructField::nullable(incoming.name(), incoming.data_type().clone());
        match table.field(field.name()) {
            None => {
                added.push(incoming);
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
            Some(existing) if existing.data_type() == incoming.data_type() => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
            Some(existing) => {
                let target = to_arrow(existing)?;
                if widens(field.data_type(), target.data_type()) {
                    columns.push(arrow::compute::cast(column, target.data_type())?);
                    fields.push(target.with_nullable(true));
                } else {
                    let name = format!("{}__{}", field.name(), type_suffix(&incoming));
                    let renamed = field.as_ref().clone().with_name(&name);
                    if table.field(&name).is_none() && !added.iter().any(|f| f.name() == &name) {
                        added.push(StructField::nullable(&name, incoming.data_type().clone()));
                    }
                    fields.push(renamed);
                    columns.push(column.clone());
                }
            }
        }
    }
    if !added.is_empty() {
        *table = StructType::try_new(table.fields().cloned().chain(added))?;
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)) as SchemaRef,
        columns,
    )?)
}

/// Whether every value of `from` is exactly representable in `to`.
fn widens(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    match (from, to) {
        (Int8, Int16 | Int32 | Int64) | (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (Float32, Float64) => true,
        (Int8 | Int16 | Int32, Float64) => true,
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            s2 >= s1 && (*p2 as i16 - *s2 as i16) >= (*p1 as i16 - *s1 as i16)
        }
        (Date32, Timestamp(_, None)) => true,
        _ => false,
    }
}

fn type_suffix(field: &StructField) -> String {
    field
        .data_type()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn to_arrow(field: &StructField) -> Result<Field, DeltaTableError> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
    Ok(TryIntoArrow::<Field>::try_into_arrow(field)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringArray};

    fn batch(fields: Vec<Field>, cols: Vec<arrow::array::ArrayRef>) -> RecordBatch {
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    #[test]
    fn app_ids_name_group_topic_and_partition() {
        assert_eq!(
            app_id("cdc-sink", &Tp::new("twitter.users", 2)),
            "cdc-sink:cdc-sink:twitter.users:2"
        );
        assert_eq!(table_of("twitter.tweets"), "tweets");
    }

    /// Spark's Delta reader refuses a table with a NOT NULL column unless
    /// the protocol lists `invariants`, which this writer cannot: every
    /// column of a table the sink creates is nullable.
    #[test]
    fn tables_have_only_nullable_columns() {
        let envelope: crate::schema::ConnectSchema = serde_json::from_str(
            r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
                {"type":"int64","optional":false,"field":"id"}]}]}"#,
        )
        .unwrap();
        let t = crate::schema::TableSchema::from_envelope(&envelope).unwrap();
        let delta = table_schema(&t.arrow).unwrap();
        let not_null: Vec<&String> = delta
            .fields()
            .filter(|f| !f.is_nullable())
            .map(|f| f.name())
            .collect();
        assert!(not_null.is_empty(), "NOT NULL columns: {not_null:?}");
        assert!(delta.field(meta::KAFKA_OFFSET).is_some());
    }

    #[test]
    fn schema_grows_and_never_narrows() {
        let base = batch(
            vec![Field::new("id", DataType::Int64, true)],
            vec![Arc::new(Int64Array::from(vec![1]))],
        );
        let mut table = table_schema(&base.schema()).unwrap();

        // An added column is added.
        let more = batch(
            vec![
                Field::new("id", DataType::Int64, true),
                Field::new("note", DataType::Utf8, true),
            ],
            vec![
                Arc::new(Int64Array::from(vec![2])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        );
        conform(more, &mut table).unwrap();
        assert!(table.field("note").is_some());

        // A narrower type is cast up to the table's.
        let narrow = batch(
            vec![Field::new("id", DataType::Int32, true)],
            vec![Arc::new(Int32Array::from(vec![3]))],
        );
        let out = conform(narrow, &mut table).unwrap();
        assert_eq!(out.schema().field(0).data_type(), &DataType::Int64);

        // A type the table cannot hold goes to its own column.
        let changed = batch(
            vec![Field::new("id", DataType::Utf8, true)],
            vec![Arc::new(StringArray::from(vec!["4a"]))],
        );
        let out = conform(changed, &mut table).unwrap();
        assert_eq!(out.schema().field(0).name(), "id__string");
        assert!(table.field("id__string").is_some());
        assert!(table.field(meta::DATE).is_some());
    }
}
