//! Current-state tables: for every captured table with a primary key, a
//! Delta table at `<root>/_current/<table>/` holding exactly its rows, one
//! per key, deletes removed.
//!
//! A mirror is a function of its changelog: [`Mirror::sync`] applies the
//! changelog versions after the one the mirror was last synced to, and
//! commits the result with a `txn` action (`cdc-sink-mirror`, version = the
//! changelog version it now reflects) in the same Delta transaction. A
//! crash anywhere leaves the mirror at a whole changelog version, and the
//! next sync starts from there: nothing is applied twice. The sink syncs a
//! table's mirror after each changelog commit to it; `cdc-sink mirror`
//! syncs (or rebuilds) from the changelog alone, which is also how a lake
//! written before mirrors gets them.
//!
//! Writing is copy-on-write, without deletion vectors, so every Delta
//! reader opens a mirror with no options. Each file holds a disjoint range
//! of primary keys, sorted, its first and last key in its footer; a sync
//! reduces its changes to the last per key, rewrites only the files whose
//! range holds a changed key (keys past the end go to the last file while
//! it is small, then to a new one), and commits the removes, the adds and
//! the `txn` together. Two writers of one mirror (two sinks of a group)
//! conflict on the files they both remove or on the `txn`, and the loser
//! syncs again from the newer state.
//!
//! Upkeep never compacts a mirror: delta-rs' conflict checker ignores
//! `dataChange=false` removes, so a compaction racing a sync could bring
//! rows back. It only checkpoints and vacuums them.

mod build;
pub mod changes;
mod halves;
pub mod order;
mod reconcile;
mod retype;
mod rewrite;
pub mod through;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{OwnedRow, RowConverter};
use bytes::Bytes;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, TransactionError};
use deltalake::kernel::{Action, MetadataExt, Remove, StructType, Transaction};
use deltalake::logstore::ObjectStoreRef;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::file::metadata::ParquetMetaDataReader;
use serde_json::json;

use crate::config::{Clustering, MirrorConfig};
use crate::decode::schema::meta;
use crate::lake::LakeError;
use crate::lake::changelog::KEY_METADATA;
use crate::lake::files::{FileError, FileWriter, ReadFile, Recent, align, now_ms, output_schema};
use crate::lake::head::LogHead;
use crate::lake::mirror::build::{LiveFile, Whole, fetch_file};
use crate::lake::mirror::changes::{Changes, Outcome, Source, key_rows};
use crate::lake::mirror::order::Order;
use crate::lake::mirror::retype::KeyTypes;
use crate::lake::mirror::rewrite::{OldFile, Rewrite, RewriteError};
use crate::lake::mirror::through::{Through, TruncateState};
use crate::lake::table::{LakeRoot, commit_properties, create_table, delta_err};

/// The `txn` app id of mirror commits: its version is the changelog
/// version the mirror reflects.
pub const APP_ID: &str = "cdc-sink-mirror";
/// Footer keys of a mirror file: its first and last key (row encoding,
/// hex).
const KEY_MIN: &str = "cdc.key_min";
const KEY_MAX: &str = "cdc.key_max";
/// The mirror table's property naming its primary key (a JSON array).
pub const KEY_PROPERTY: &str = "cdc.primaryKey";
/// The mirror table's property naming the changelog it reflects: the
/// changelog's Delta table id, which one deleted and created again in its
/// place does not keep (its versions start over).
pub const CHANGELOG_PROPERTY: &str = "cdc.changelogId";

/// Changelog columns a mirror leaves out: they describe a change, not a
/// row. `_cdc_lsn` and `_cdc_commit_ts` stay: the row's last change.
const CHANGE_ONLY: [&str; 8] = [
    meta::OP,
    meta::KEY_UPDATE,
    meta::TX_ID,
    meta::KAFKA_PARTITION,
    meta::KAFKA_OFFSET,
    meta::UNCHANGED,
    meta::DATE,
    meta::RECOVERY,
];

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Lake(#[from] Box<LakeError>),
    #[error("reading or writing a file of the mirror of `{table}`")]
    File {
        table: String,
        #[source]
        source: FileError,
    },
    #[error("building rows of the mirror of `{table}`")]
    Arrow {
        table: String,
        #[source]
        source: ArrowError,
    },
    #[error("the primary key of `{table}` in its changelog files is not a list of columns")]
    BadKey { table: String },
    #[error(
        "building the current-state table of `{table}` from its whole changelog took {took:?}, \
         more than half of the vacuum retention ({retention:?}): a vacuum could have deleted \
         the files it put before their commit, so it is not committed; raise \
         `lake.vacuum_retention_hours` or `mirror.build_memory_bytes`"
    )]
    BuildTooLong {
        table: String,
        took: std::time::Duration,
        retention: std::time::Duration,
    },
    #[error(
        "key column `{column}` of `{table}` is empty in the change at {at}; its type or name \
         changed ({siblings}) in a way the current-state table cannot follow (it follows a \
         wider integer or float type, or a decimal of more digits, such as `integer` to \
         `bigint`): it stays \
         at the change before, and the changelog goes on"
    )]
    KeyChanged {
        table: String,
        column: String,
        /// `partition P, offset O`, as far as the row says.
        at: String,
        /// The changelog's sibling columns of the key column, or that it has none.
        siblings: String,
    },
}

impl From<LakeError> for MirrorError {
    fn from(e: LakeError) -> Self {
        MirrorError::Lake(Box::new(e))
    }
}

impl MirrorError {
    /// An Arrow error building `table`'s mirror rows.
    fn arrow(table: &str) -> impl Fn(ArrowError) -> MirrorError + Copy + '_ {
        move |source| MirrorError::Arrow {
            table: table.to_string(),
            source,
        }
    }

    /// A file error reading or writing `table`'s mirror.
    fn file(table: &str) -> impl Fn(FileError) -> MirrorError + Copy + '_ {
        move |source| MirrorError::File {
            table: table.to_string(),
            source,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            MirrorError::Lake(e) => e.is_retryable(),
            MirrorError::File { source, .. } => source.is_retryable(),
            MirrorError::Arrow { .. }
            | MirrorError::BadKey { .. }
            | MirrorError::BuildTooLong { .. }
            | MirrorError::KeyChanged { .. } => false,
        }
    }
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synced {
    /// The changelog version the mirror reflects now (`None`: no mirror).
    pub through: Option<i64>,
    /// The mirror version written, if anything was committed.
    pub version: Option<i64>,
    /// Applied from the whole changelog rather than the versions since the
    /// last sync (a new mirror, a rebuild, or a gap no longer in the log).
    pub full: bool,
    /// Applied from the whole changelog because the mirror's order was
    /// still pending ([`order`]): routine while the table is small.
    pub rechosen: bool,
    pub upserts: usize,
    pub deletes: usize,
    pub files_removed: usize,
    pub files_added: usize,
    /// Rows in the files written (rows rewritten plus rows changed), and
    /// their Parquet bytes.
    pub rows_written: usize,
    pub bytes_written: usize,
    /// Built from the whole changelog in this many ranges of its order
    /// (0: not by ranges; see [`build`]).
    pub ranges: usize,
    /// The table has no primary key: no mirror.
    pub no_key: bool,
    /// Lost to a concurrent writer: sync again.
    pub conflict: bool,
    /// The changelog has versions past `through`: sync again.
    pub behind: bool,
    /// The source commit time (µs) through which every partition's
    /// changes are now applied ([`Through::commit_us`]).
    pub through_commit_us: Option<i64>,
    /// A recovery's leftovers removed in a commit of their own: which
    /// recovery, and how many rows went.
    pub reconciled: Option<reconcile::Reconciled>,
    /// Creates of primary-key updates whose unchanged TOASTed values had no
    /// previous image (see [`Changes::unpaired`]): those columns stay NULL.
    pub unavailable: usize,
    /// Nothing applied: the next changelog version holds half of a
    /// primary-key update whose other half is not committed yet. Sync again
    /// shortly, or at the table's next commit.
    pub waiting: bool,
    /// Nothing applied: the mirror must be built from the whole changelog,
    /// and another table's build has the turn ([`Mirror::sync`]). Sync
    /// again shortly.
    pub awaits_build: bool,
}

/// Changelog files to apply, and the version they bring the mirror to.
struct Appended {
    files: Vec<Added>,
    through: i64,
    /// Each version's commit time (ms), from its `commitInfo`.
    committed_ms: HashMap<i64, i64>,
}

/// A data file a changelog version added.
struct Added {
    path: Path,
    version: i64,
    size: usize,
}

impl Appended {
    fn paths(&self) -> Vec<Path> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }
}

/// A batch of changelog versions, read, as a sync may apply it.
enum Paired {
    /// Its files, through this version.
    Files { files: Vec<ReadFile>, through: i64 },
    /// A version is gone from the log or its files from the store.
    Gone,
    /// Its first version holds half of a primary-key update whose other
    /// half is not committed yet.
    Wait,
}

/// How long a sync waits for the other half of a primary-key update
/// before it applies one half alone (a create quarantined, say): the
/// halves are read within moments of each other, so the other is
/// normally one flush behind.
const PAIR_WAIT_MS: i64 = 30_000;

/// How many bytes of changelog files past its batch a sync reads, at
/// least, looking for the other halves of its primary-key updates.
const PAIR_READ_BYTES: usize = 64 << 20;

/// Arrow memory of the files just put kept for the next sync ([`Recent`]),
/// the changelog's and the mirrors' own each: about two files of the
/// default target size.
const RECENT_BYTES: usize = 32 << 20;

/// How many times a build's commit goes on top of commits that changed
/// nothing it replaces ([`Mirror::content`]).
const MAX_REBASES: usize = 5;

/// A mirror's live files and the changelog version it reflects.
#[derive(Debug, PartialEq, Eq)]
struct Content {
    files: Vec<String>,
    applied: Option<i64>,
}

/// Files put for some changes, not committed yet.
#[derive(Clone)]
struct Staged {
    adds: Vec<Action>,
    /// Files rewritten (beside a full sync's, which are every file).
    removed: Vec<String>,
    /// The mirror's columns the files hold.
    schema: SchemaRef,
    upserts: usize,
    deletes: usize,
    rows_written: usize,
    bytes_written: usize,
    unavailable: usize,
}

impl Staged {
    /// Both, as one commit's.
    fn and(mut self, other: Staged) -> Staged {
        self.adds.extend(other.adds);
        self.removed.extend(other.removed);
        self.upserts += other.upserts;
        self.deletes += other.deletes;
        self.rows_written += other.rows_written;
        self.bytes_written += other.bytes_written;
        self.unavailable += other.unavailable;
        self
    }
}

/// One live mirror file and the keys it holds.
#[derive(Debug, Clone)]
struct FileRange {
    path: String,
    size: i64,
    min: Vec<u8>,
    max: Vec<u8>,
}

/// Changes routed to one file (`None`: a new file).
/// The changes' rows for the rewrites, with the old keys' rows appended.
struct Lent {
    changed: RecordBatch,
    /// Where the row of `Changes::moved[n]` is in `changed`, if it was found.
    rows: Vec<Option<usize>>,
    /// Moved keys with no row in the current-state table.
    missing: usize,
}

struct Bucket {
    file: Option<usize>,
    /// The changed keys routed to the file, sorted, with their outcomes.
    keys: Vec<(OwnedRow, Outcome)>,
}

pub struct Mirror {
    root: LakeRoot,
    files: FileWriter,
    properties: BTreeMap<String, String>,
    /// Files are cut at about this many encoded bytes.
    target_bytes: usize,
    /// How a new or rebuilt mirror orders its files.
    clustering: Clustering,
    /// New keys past the last file go into it while it is smaller than
    /// this, then into a new file.
    tail_bytes: usize,
    /// Changelog Parquet bytes one sync applies at most (at least one
    /// commit's): what bounds its memory.
    sync_bytes: usize,
    /// The memory a sync from the whole changelog aims to stay under:
    /// past it, it builds by ranges ([`build`]).
    build_bytes: usize,
    /// Upkeep's vacuum deletes unreferenced files older than this: files
    /// a build put must be committed well within it.
    vacuum_retention: std::time::Duration,
    /// Files just put as rows ([`Recent`]): the changelog writer's, which a
    /// sync applies, and this writer's own, which the next sync rewrites
    /// (the newest keys' file, most often). Apart, so that a mirror far
    /// behind its changelog does not push its own files out.
    changelog_files: Arc<Recent>,
    own_files: Arc<Recent>,
    /// [`Mirror::files`], keeping what it puts in `own_files`: for an
    /// incremental sync's files (a build's are not rewritten soon).
    kept_files: FileWriter,
    /// Tests: where a build waits before its commit.
    #[cfg(test)]
    build_gate: Option<Arc<crate::lake::Gate>>,
    /// Tables found without a primary key, and the changelog version they
    /// were looked at through.
    no_key: std::sync::Mutex<HashMap<String, i64>>,
    /// Key ranges of mirror files, by path (files never change): read from
    /// a footer once, or known from writing the file.
    ranges: std::sync::Mutex<HashMap<String, FileRange>>,
    /// Each mirror's per-partition positions, and the mirror version they
    /// are those of (read from that commit when it is not the last one
    /// this writer made).
    through: std::sync::Mutex<HashMap<String, (i64, Through)>>,
    /// Each table's changelog and mirror, as of its last sync, behind a
    /// lock of its own: one sync of a table at a time, held throughout;
    /// tables sync side by side.
    open: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Opened>>>>>,
    /// One build from the whole changelog at a time: each takes up to
    /// `build_bytes` of memory, and takes minutes on a big table, while
    /// other tables' incremental syncs go on.
    builds: tokio::sync::Semaphore,
}

/// A table's changelog and mirror, kept open between its syncs.
struct Opened {
    changelog: Option<LogHead>,
    mirror: DeltaTable,
}

/// What a mirror commit brings the mirror to: through `version` of the
/// changelog whose Delta table id is `changelog`, keyed by `key`.
/// `anew`: the mirror reflected another changelog (see [`replaced`]), so
/// its schema, key and positions are this one's, not carried forward.
/// `retyped`: a key column changed type ([`retype`]), so its schema is the
/// rows', not the old one grown.
#[derive(Clone, Copy)]
struct Reflects<'a> {
    changelog: &'a str,
    version: i64,
    key: &'a [String],
    anew: bool,
    retyped: bool,
}

/// Whether `mirror`, synced through changelog version `applied`, reflects
/// another changelog than `changelog`: one deleted since, and another
/// created in its place, whose versions start over. Its own mirror is
/// built anew: none of the old rows, columns or positions are its. A
/// mirror written before it named its changelog tells only when it is past
/// the changelog's version, which another sink's commits to both since
/// this one's head was read also make it: the head is read again first.
async fn replaced(
    table: &str,
    changelog: &mut LogHead,
    mirror: &DeltaTable,
    applied: Option<i64>,
) -> Result<bool, MirrorError> {
    let state = mirror
        .snapshot()
        .map_err(delta_err(&LakeRoot::mirror_of(table)))?;
    let replaced = match state.metadata().configuration().get(CHANGELOG_PROPERTY) {
        Some(named) => named != changelog.metadata().id(),
        None if applied.is_some_and(|a| a > changelog.version()) => {
            changelog.catch_up().await.map_err(delta_err(table))?;
            applied.is_some_and(|a| a > changelog.version())
        }
        None => false,
    };
    let id = changelog.metadata().id();
    if replaced {
        tracing::warn!(
            table,
            changelog = id,
            "the changelog is not the one the current-state table reflects (it was deleted \
             and created again): building the table anew from it"
        );
    }
    Ok(replaced)
}

/// The Delta schema of a mirror of rows of `schema`: every column nullable.
fn delta_schema(table: &str, schema: &SchemaRef) -> Result<StructType, MirrorError> {
    let nullable: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    (&Schema::new(nullable))
        .try_into_kernel()
        .map_err(MirrorError::arrow(table))
}

/// Brings `t` to its latest version, loading it the first time; `false`
/// if there is no table there (yet).
async fn refresh(t: &mut DeltaTable) -> Result<bool, DeltaTableError> {
    if t.version().is_some() {
        t.update_state().await?;
        return Ok(true);
    }
    if !t.verify_deltatable_existence().await? {
        return Ok(false);
    }
    t.load().await?;
    Ok(true)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Mirror {
    pub fn new(
        root: LakeRoot,
        files: FileWriter,
        properties: BTreeMap<String, String>,
        target_bytes: usize,
    ) -> Mirror {
        let own_files = Arc::new(Recent::new(RECENT_BYTES));
        Mirror {
            root,
            kept_files: files.clone().with_recent(own_files.clone()),
            files,
            changelog_files: Arc::new(Recent::new(RECENT_BYTES)),
            own_files,
            properties,
            target_bytes: target_bytes.max(1),
            clustering: Clustering::Time,
            tail_bytes: target_bytes / 4,
            sync_bytes: (target_bytes / 4).max(1),
            build_bytes: MirrorConfig::default().build_memory_bytes,
            vacuum_retention: std::time::Duration::from_secs(168 * 3600),
            #[cfg(test)]
            build_gate: None,
            ranges: std::sync::Mutex::new(HashMap::new()),
            no_key: std::sync::Mutex::new(HashMap::new()),
            through: std::sync::Mutex::new(HashMap::new()),
            open: std::sync::Mutex::new(HashMap::new()),
            builds: tokio::sync::Semaphore::new(1),
        }
    }

    /// Where files just put are kept for this writer's syncs: the
    /// changelog writer of the same process keeps its files there too.
    pub fn recent(&self) -> Arc<Recent> {
        self.changelog_files.clone()
    }

    /// Tests: forgets the files kept, as if none had been put here.
    #[cfg(test)]
    pub(crate) fn forget_kept(&self) {
        self.changelog_files.clear();
        self.own_files.clear();
    }

    /// The mirrors of the lake at `root`, as `cfg` configures them.
    pub fn configured(root: LakeRoot, cfg: &crate::config::SinkConfig) -> Mirror {
        let mut mirror = Mirror::new(
            root,
            FileWriter::new(crate::lake::files::writer_properties(&cfg.output)),
            cfg.lake.table_properties(),
            cfg.mirror.target_file_bytes,
        )
        .with_clustering(cfg.mirror.clustering)
        .with_build_bytes(cfg.mirror.build_memory_bytes);
        if let Some(bytes) = cfg.mirror.sync_max_bytes {
            mirror.sync_bytes = bytes;
        }
        mirror.vacuum_retention =
            std::time::Duration::from_secs(cfg.lake.vacuum_retention_hours * 3600);
        mirror
    }

    /// Orders the files of mirrors this creates or rebuilds by
    /// `clustering` (by time unless told).
    pub fn with_clustering(mut self, clustering: Clustering) -> Mirror {
        self.clustering = clustering;
        self
    }

    /// Bounds a build from the whole changelog to about `bytes` of memory
    /// ([`build::peak`]), range by range of the table's order.
    pub fn with_build_bytes(mut self, bytes: usize) -> Mirror {
        self.build_bytes = bytes.max(1);
        self
    }

    #[cfg(test)]
    pub(crate) fn with_build_gate(mut self, gate: Arc<crate::lake::Gate>) -> Mirror {
        self.build_gate = Some(gate);
        self
    }

    #[cfg(test)]
    fn with_vacuum_retention(mut self, retention: std::time::Duration) -> Mirror {
        self.vacuum_retention = retention;
        self
    }

    pub fn root(&self) -> &LakeRoot {
        &self.root
    }

    /// Brings the mirror of `table` to its changelog's latest version
    /// (with `rebuild`, from the whole changelog, replacing every file).
    pub async fn sync(&self, table: &str, rebuild: bool) -> Result<Synced, MirrorError> {
        // The tables stay open between syncs, so that each reads only the
        // log entries since the last (the changelog may go long without a
        // checkpoint). One sync of a table at a time: its tokio mutex,
        // held throughout.
        let slot = self
            .open
            .lock()
            .expect("not poisoned")
            .entry(table.to_string())
            .or_default()
            .clone();
        let mut open = slot.lock().await;
        let Opened {
            mut changelog,
            mut mirror,
        } = match open.take() {
            Some(opened) => opened,
            None => Opened {
                changelog: None,
                mirror: self
                    .root
                    .handle(&LakeRoot::mirror_of(table))
                    .map_err(delta_err(table))?,
            },
        };
        let mut synced = self
            .sync_open(table, &mut changelog, &mut mirror, rebuild)
            .await;
        if let Ok(s) = &mut synced
            && s.through.is_some()
            && !s.conflict
        {
            // Due after the changes that complete a recovery's markers, or
            // still due after a crash between their commit and this one.
            // A recovery and a TRUNCATE may both be due: one each.
            for _ in 0..2 {
                let committed = s.version.is_some();
                match self.reconcile_if_due(table, &mut mirror, committed).await {
                    // Lost to a concurrent writer: again at the next sync.
                    Ok(Some(r)) if r.conflict => s.behind = true,
                    Ok(Some(r)) => {
                        s.version = Some(r.version);
                        s.reconciled = Some(r);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => synced = Err(e),
                }
                break;
            }
        }
        *open = Some(Opened { changelog, mirror });
        synced
    }

    async fn sync_open(
        &self,
        table: &str,
        changelog: &mut Option<LogHead>,
        mirror: &mut DeltaTable,
        rebuild: bool,
    ) -> Result<Synced, MirrorError> {
        let err = delta_err(table);
        // The changelog is followed by its log alone (see `LogHead`): its
        // full snapshot, which parses every live file's statistics again on
        // each update, is loaded only when a sync needs its live files.
        match changelog {
            Some(head) => head.catch_up().await.map_err(&err)?,
            None => {
                let t = self.root.handle(table).map_err(&err)?;
                *changelog = LogHead::open_existing(t).await.map_err(&err)?;
            }
        }
        let Some(changelog) = changelog.as_mut() else {
            return Ok(Synced::default());
        };
        let target = changelog.version();

        let name = LakeRoot::mirror_of(table);
        let merr = delta_err(&name);
        let exists = refresh(mirror).await.map_err(&merr)?;
        let applied = if exists {
            let state = mirror.snapshot().map_err(&merr)?;
            state
                .transaction_version(mirror.log_store().as_ref(), APP_ID)
                .await
                .map_err(&merr)?
        } else {
            None
        };
        let anew = exists && replaced(table, changelog, mirror, applied).await?;
        if anew {
            self.no_key.lock().expect("not poisoned").remove(table);
        }
        // The mirror's own key, schema and positions count only if they
        // are its changelog's.
        let known = exists && !anew;
        // A key column whose type changed since the mirror was written:
        // its files' key ranges are encodings of the old type.
        let retyped = known && retyped(table, changelog, mirror)?;
        let rebuild = rebuild || anew || retyped;
        if applied == Some(target) && !rebuild {
            return Ok(Synced {
                through: applied,
                ..Synced::default()
            });
        }

        let store = changelog.store();
        let rechosen = match rebuild {
            false => self.rechoose(table, changelog, mirror, &store).await?,
            true => None,
        };
        let rechoosing = rechosen.is_some();
        let rebuild = rebuild || rechoosing;

        // The changelog's commits since the last sync (from version 0 for
        // a new mirror), a bounded batch of them at a time, so that memory
        // does not grow with how far behind the mirror is; the caller syncs
        // again while `through` is short of the changelog. A rebuild, or
        // commits no longer in the log or whose files were compacted and
        // vacuumed since, take the live files instead, all at once.
        // A table known to have no key is looked at again only from where
        // it was last looked at: its files are not read again every commit.
        let looked = self
            .no_key
            .lock()
            .expect("not poisoned")
            .get(table)
            .copied();
        let from = if rebuild {
            None
        } else {
            Some(applied.or(looked).unwrap_or(-1))
        };
        let incremental = match from {
            Some(a) => self.appended(changelog, a, target).await?,
            None => None,
        };
        // A build from the whole changelog takes the turn (`builds`) to the
        // end of this sync, or, another table's build having it, is tried
        // again shortly: a sync that waited here would hold its caller's
        // slot, which other tables' small syncs need meanwhile.
        let picked = match incremental {
            Some(batch) => match self.paired(table, changelog, &store, batch, target).await? {
                Paired::Files { files, through } => Some((Whole::Files(files), false, through)),
                Paired::Gone => None,
                Paired::Wait => {
                    return Ok(Synced {
                        through: applied,
                        waiting: true,
                        ..Synced::default()
                    });
                }
            },
            None => rechosen.map(|files| (Whole::Files(files), true, target)),
        };
        let (whole, full, through, _building) = match picked {
            Some((whole, full, through)) => (whole, full, through, None),
            None => {
                let Ok(permit) = self.builds.try_acquire() else {
                    return Ok(Synced {
                        through: applied,
                        awaits_build: true,
                        ..Synced::default()
                    });
                };
                let whole = self
                    .whole(table, changelog, known.then_some(&*mirror), &store)
                    .await?;
                (whole, true, target, Some(permit))
            }
        };

        if !exists && !whole.has_changes() {
            // Only the changelog's creation (or recovery markers) so far:
            // nothing says whether it has a key yet, so it is not taken
            // for a table without one.
            return Ok(Synced {
                behind: through < target,
                ..Synced::default()
            });
        }
        let key = match key_of(table, whole.named_key(), known.then_some(&*mirror))? {
            Some(key) => key,
            None => {
                self.no_key
                    .lock()
                    .expect("not poisoned")
                    .insert(table.to_string(), through);
                return Ok(Synced {
                    no_key: true,
                    behind: through < target,
                    ..Synced::default()
                });
            }
        };
        if !exists && looked.is_some() && from != Some(-1) {
            // Keyed from some version on (a primary key added): the
            // mirror starts from the changelog's beginning.
            self.no_key.lock().expect("not poisoned").remove(table);
            return Ok(Synced {
                behind: true,
                ..Synced::default()
            });
        }
        let files = match whole {
            Whole::Files(files) => files,
            Whole::Ranged(survey) => {
                let to = Reflects {
                    changelog: changelog.metadata().id(),
                    version: through,
                    key: &key,
                    anew,
                    retyped,
                };
                let mut synced = self
                    .build(table, changelog, mirror, exists, survey, to)
                    .await?;
                synced.behind = through < target;
                synced.rechosen = rechoosing;
                return Ok(synced);
            }
        };

        let changelog_id = changelog.metadata().id().to_string();
        let to = Reflects {
            changelog: &changelog_id,
            version: through,
            key: &key,
            anew,
            retyped,
        };
        // The changes, in Kafka order, reduced to one outcome per key.
        let arrow_err = MirrorError::arrow(table);
        let partition_columns = changelog.metadata().partition_columns().to_vec();
        let key_types = KeyTypes::of(changelog.schema(), &key).map_err(&err)?;
        let files = files
            .into_iter()
            .map(|f| key_types.file(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)?;
        let read_as = key_types.table(changelog.schema()).map_err(&err)?;
        let schema = output_schema(&read_as, &partition_columns, &files).map_err(|source| {
            MirrorError::File {
                table: table.to_string(),
                source,
            }
        })?;
        // Each intermediate goes as soon as the next is made: the peak is
        // about twice the changes, not four times.
        let mut batches = Vec::new();
        for f in files {
            for b in f.batches {
                batches.push(align(&b, &schema).map_err(arrow_err)?);
            }
        }
        let rows = {
            let unsorted = arrow::compute::concat_batches(&schema, &batches).map_err(arrow_err)?;
            drop(batches);
            key_types.order(&unsorted).map_err(arrow_err)?
        };
        // The newest TRUNCATE, seen before or among these rows: the
        // changes before it are skipped.
        let seen = match mirror.version().filter(|_| exists && !full) {
            Some(v) => self.through_at(table, mirror, v as i64).await?.truncate,
            None => None,
        };
        let truncate = TruncateState::newest(seen, Through::of_rows(&rows).truncate);
        // The key's columns in the order of the mirror's files: chosen from
        // these rows when they replace every file, else the mirror's own.
        // Everything from here on sorts, routes and bounds by it.
        let order = if !exists || full {
            order::chosen(&rows, &key, self.clustering).map_err(arrow_err)?
        } else {
            let state = mirror.snapshot().map_err(&merr)?;
            Order::stored(state.metadata().configuration(), &key)
        };
        let changes =
            Changes::reduce(rows, &order.columns, truncate).map_err(|e| e.into_mirror(table))?;

        if !exists
            && !self
                .create(table, mirror, &mirror_schema(&schema), &key, &order)
                .await?
        {
            return Ok(Synced {
                conflict: true,
                ..Synced::default()
            });
        }
        let mut outcome = self.apply(table, mirror, &order, changes, full, to).await?;
        outcome.behind = through < target;
        outcome.rechosen = rechoosing;
        if outcome.conflict {
            tracing::info!(
                table,
                "mirror commit lost to a concurrent writer; syncing again"
            );
        }
        Ok(outcome)
    }

    /// The changelog's live files, read, if this sync should rebuild the
    /// mirror to choose its order again ([`order`]): the order is pending
    /// (chosen from too few rows), the changelog is small (at most
    /// [`Mirror::sync_bytes`]), so the rebuild is cheap, and nothing a
    /// rebuild would redo or lose is at stake. A rebuild applies every
    /// change at once, so it would apply half of a primary-key update whose
    /// other half is not committed yet without its carried values (an
    /// incremental sync waits for it), and it would take a recovery or a
    /// TRUNCATE the mirror has already reconciled as due again.
    async fn rechoose(
        &self,
        table: &str,
        changelog: &mut LogHead,
        mirror: &DeltaTable,
        store: &ObjectStoreRef,
    ) -> Result<Option<Vec<ReadFile>>, MirrorError> {
        let name = LakeRoot::mirror_of(table);
        let merr = delta_err(&name);
        let Some(version) = mirror.version() else {
            return Ok(None);
        };
        let state = mirror.snapshot().map_err(&merr)?;
        if !order::pending(state.metadata().configuration()) {
            return Ok(None);
        }
        let through = self.through_at(table, mirror, version as i64).await?;
        if through.recovery.is_some() || through.truncate.is_some() {
            return Ok(None);
        }
        // A changelog only grows: one the snapshot as last loaded (behind
        // the head, maybe) already finds too big is too big now, and the
        // head's full snapshot is not loaded to say so, sync after sync.
        let bytes = |t: &DeltaTable| -> Result<i64, DeltaTableError> {
            Ok(t.snapshot()?.log_data().iter().map(|f| f.size()).sum())
        };
        let too_big = self.sync_bytes as i64;
        if bytes(changelog.table_as_loaded()).map_err(delta_err(table))? > too_big {
            return Ok(None);
        }
        let at_head = changelog.table_at_head().await.map_err(delta_err(table))?;
        if bytes(at_head).map_err(delta_err(table))? > too_big {
            return Ok(None);
        }
        let files = self.live(table, changelog, store).await?;
        let mut updates = halves::KeyUpdates::default();
        for f in &files {
            f.batches.iter().for_each(|b| updates.add(0, b));
        }
        Ok(updates.first_unpaired().is_none().then_some(files))
    }

    /// The data files the changelog's versions from `after+1` added
    /// (compactions add none: they rewrite rows already there), up to
    /// `target` or until they hold [`Mirror::sync_bytes`]. `None` if a
    /// version is no longer in the log.
    async fn appended(
        &self,
        changelog: &LogHead,
        after: i64,
        target: i64,
    ) -> Result<Option<Appended>, MirrorError> {
        let err = delta_err(changelog.table_url().as_str());
        let mut files = Vec::new();
        let mut committed_ms = HashMap::new();
        let mut taken = 0;
        let mut through = after;
        for v in after + 1..=target {
            if taken >= self.sync_bytes {
                break;
            }
            through = v;
            let Some(bytes) = changelog.commit_entry(v).await.map_err(&err)? else {
                return Ok(None);
            };
            for line in bytes.split(|b| *b == b'\n') {
                let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(ms) = action
                    .get("commitInfo")
                    .and_then(|c| c.get("timestamp"))
                    .and_then(|t| t.as_i64())
                {
                    committed_ms.insert(v, ms);
                }
                let Some(add) = action.get("add") else {
                    continue;
                };
                if add.get("dataChange").and_then(|d| d.as_bool()) != Some(true) {
                    continue;
                }
                if let Some(path) = add.get("path").and_then(|p| p.as_str()) {
                    let path = percent_decode(path);
                    let size = add.get("size").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
                    files.push(Added {
                        path: Path::from(path.as_str()),
                        version: v,
                        size,
                    });
                    taken += size;
                }
            }
        }
        Ok(Some(Appended {
            files,
            through,
            committed_ms,
        }))
    }

    /// `batch`'s files, read, holding both halves of every primary-key
    /// update in it or neither (see [`halves`]): extended by the versions
    /// after it while a half's other half is missing, else cut before the
    /// half. A half alone in the first version waits for its other half,
    /// up to [`PAIR_WAIT_MS`] after its commit.
    async fn paired(
        &self,
        table: &str,
        changelog: &LogHead,
        store: &ObjectStoreRef,
        mut batch: Appended,
        target: i64,
    ) -> Result<Paired, MirrorError> {
        let Some(mut files) = read_all(table, store, &batch.paths(), &self.changelog_files).await?
        else {
            return Ok(Paired::Gone);
        };
        let first = batch.files.first().map_or(batch.through, |f| f.version);
        let mut updates = halves::KeyUpdates::default();
        for (file, added) in files.iter().zip(&batch.files) {
            file.batches
                .iter()
                .for_each(|b| updates.add(added.version, b));
        }
        let mut extended = 0;
        while let Some(hold) = updates.hold_from() {
            if batch.through < target && extended < self.sync_bytes.max(PAIR_READ_BYTES) {
                // The other half is in a later version, committed or not.
                let Some(more) = self
                    .appended(changelog, batch.through, batch.through + 1)
                    .await?
                else {
                    return Ok(Paired::Gone);
                };
                let Some(read) =
                    read_all(table, store, &more.paths(), &self.changelog_files).await?
                else {
                    return Ok(Paired::Gone);
                };
                for (file, added) in read.iter().zip(&more.files) {
                    file.batches
                        .iter()
                        .for_each(|b| updates.add(added.version, b));
                    extended += added.size;
                }
                files.extend(read);
                batch.files.extend(more.files);
                batch.committed_ms.extend(more.committed_ms);
                batch.through = more.through;
                continue;
            }
            if hold > first {
                // The versions before it now; the rest once the other
                // half is committed.
                let files = files
                    .into_iter()
                    .zip(&batch.files)
                    .filter(|(_, added)| added.version < hold)
                    .map(|(file, _)| file)
                    .collect();
                return Ok(Paired::Files {
                    files,
                    through: hold - 1,
                });
            }
            let unpaired = updates.first_unpaired().unwrap_or(hold);
            let committed = batch.committed_ms.get(&unpaired).copied().unwrap_or(0);
            if now_ms() - committed < PAIR_WAIT_MS {
                return Ok(Paired::Wait);
            }
            tracing::warn!(
                table,
                version = unpaired,
                "half of a primary-key update has had no other half in the changelog for \
                 {PAIR_WAIT_MS} ms; applying it alone"
            );
            break;
        }
        Ok(Paired::Files {
            files,
            through: batch.through,
        })
    }

    /// Every live file of the changelog, read.
    async fn live(
        &self,
        table: &str,
        changelog: &mut LogHead,
        store: &ObjectStoreRef,
    ) -> Result<Vec<ReadFile>, MirrorError> {
        let paths: Vec<Path> = changelog
            .table_at_head()
            .await
            .map_err(delta_err(table))?
            .snapshot()
            .map_err(delta_err(table))?
            .log_data()
            .iter()
            .map(|f| f.object_store_path())
            .collect();
        read_all(table, store, &paths, &self.changelog_files)
            .await?
            .ok_or_else(|| missing_live_file(table))
    }

    /// Creates the mirror, sorted in `order`, and loads it; `false` if
    /// another writer created it (in an order of its own, maybe) or synced
    /// it first: changes read and sorted for an empty mirror in this order
    /// no longer apply.
    async fn create(
        &self,
        table: &str,
        mirror: &mut DeltaTable,
        schema: &SchemaRef,
        key: &[String],
        order: &Order,
    ) -> Result<bool, MirrorError> {
        let name = LakeRoot::mirror_of(table);
        let delta = delta_schema(table, schema)?;
        let mut properties = self.properties.clone();
        properties.insert(
            KEY_PROPERTY.to_string(),
            serde_json::to_string(key).expect("names serialise"),
        );
        properties.extend(order.properties());
        create_table(mirror, &name, &delta, &[], properties.iter()).await?;
        let merr = delta_err(&name);
        mirror.load().await.map_err(&merr)?;
        let theirs = order::of(
            mirror.snapshot().map_err(&merr)?.metadata().configuration(),
            key,
        );
        Ok(mirror.version() == Some(0) && theirs == order.columns)
    }

    /// Every live file of the changelog, read, or surveyed when their rows
    /// outgrow [`Mirror::build_bytes`] (see [`build`]).
    async fn whole(
        &self,
        table: &str,
        changelog: &mut LogHead,
        mirror: Option<&DeltaTable>,
        store: &ObjectStoreRef,
    ) -> Result<Whole, MirrorError> {
        let files: Vec<LiveFile> = changelog
            .table_at_head()
            .await
            .map_err(delta_err(table))?
            .snapshot()
            .map_err(delta_err(table))?
            .log_data()
            .iter()
            .map(|f| LiveFile {
                path: f.object_store_path(),
                size: f.size().max(0) as usize,
                rows: f.num_records(),
            })
            .collect();
        let key = property_key(mirror.filter(|m| m.version().is_some()))
            .and_then(|k| serde_json::from_str(&k).ok());
        build::read_whole(
            table,
            store,
            files,
            key,
            changelog.schema(),
            self.build_bytes,
        )
        .await?
        .ok_or_else(|| missing_live_file(table))
    }

    /// A full sync from a survey of the whole changelog: the mirror built
    /// range by range of its order, and committed once (see [`build`]).
    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        table: &str,
        changelog: &LogHead,
        mirror: &mut DeltaTable,
        exists: bool,
        mut survey: Box<build::Survey>,
        to: Reflects<'_>,
    ) -> Result<Synced, MirrorError> {
        let name = LakeRoot::mirror_of(table);
        let merr = delta_err(&name);
        let store = changelog.store();
        let key = to.key;
        survey
            .pair_halves(table, &store, key, changelog.schema())
            .await?
            .ok_or_else(|| missing_live_file(table))?;
        let plan = survey.plan(
            table,
            changelog.schema(),
            changelog.metadata().partition_columns(),
            key,
            self.clustering,
            self.build_bytes,
        )?;
        // What the build replaces: a commit on top of it that changes none
        // of it (upkeep's vacuum) is no conflict (see below).
        let base = match exists {
            true => Some(self.content(table, mirror).await?),
            false => None,
        };
        let truncate = TruncateState::newest(None, survey.through.truncate);
        let started = std::time::Instant::now();
        let mut staged: Option<Staged> = None;
        for i in 0..plan.ranges() {
            let range = plan.range(i);
            let rows = plan
                .read(table, &store, &range)
                .await?
                .ok_or_else(|| missing_live_file(table))?;
            // Seconds of CPU for a range of millions of rows: off the
            // runtime, which a running sink's Kafka loop shares.
            let columns = plan.order.columns.clone();
            let changes = blocking(table, move || {
                let mut changes = Changes::reduce(rows, &columns, truncate)?;
                // Gathered keys are their own ranges' to write and count.
                changes.retain_keys(|k| range.holds(k))?;
                Ok(changes)
            })
            .await?
            .map_err(|e: changes::ReduceError| e.into_mirror(table))?;
            let part = self
                .stage(table, mirror, None, &plan.order, changes, true)
                .await?;
            staged = Some(match staged {
                Some(before) => before.and(part),
                None => part,
            });
        }
        tracing::info!(
            table,
            ranges = plan.ranges(),
            "current-state table built from the whole changelog, range by range"
        );
        let staged = staged.expect("a plan has a range at least");
        #[cfg(test)]
        if let Some(gate) = &self.build_gate {
            gate.pass().await;
        }
        // A new table is created only now, with every file put: it is
        // never seen empty, nor left so by a build that fails. The files
        // of one that loses the race stay unreferenced: vacuum removes
        // them.
        if !exists
            && !self
                .create(
                    table,
                    mirror,
                    &mirror_schema(&plan.schema),
                    key,
                    &plan.order,
                )
                .await?
        {
            return Ok(Synced {
                conflict: true,
                ..Synced::default()
            });
        }
        let mut state = mirror.snapshot().map_err(&merr)?.clone();
        let mut base = match base {
            Some(base) => base,
            None => self.content(table, mirror).await?,
        };
        let mut rebased = 0;
        loop {
            if started.elapsed() > self.vacuum_retention / 2 {
                return Err(MirrorError::BuildTooLong {
                    table: table.to_string(),
                    took: started.elapsed(),
                    retention: self.vacuum_retention,
                });
            }
            let mut synced = self
                .commit(
                    table,
                    mirror,
                    &state,
                    &plan.order,
                    staged.clone(),
                    &survey.through,
                    true,
                    to,
                )
                .await?;
            synced.ranges = plan.ranges();
            if !synced.conflict || rebased == MAX_REBASES {
                return Ok(synced);
            }
            // A build takes minutes: a commit meanwhile that changed no
            // file and no position (upkeep's vacuum) leaves what it
            // replaces as it was, so it commits on top of that one.
            refresh(mirror).await.map_err(&merr)?;
            let now = self.content(table, mirror).await?;
            if now != base {
                return Ok(synced);
            }
            (state, base) = (mirror.snapshot().map_err(&merr)?.clone(), now);
            rebased += 1;
        }
    }

    /// What a mirror holds, as far as a build from the whole changelog
    /// replaces it: its live files and its `txn`.
    async fn content(&self, table: &str, mirror: &DeltaTable) -> Result<Content, MirrorError> {
        let name = LakeRoot::mirror_of(table);
        let state = mirror.snapshot().map_err(delta_err(&name))?;
        let mut files: Vec<String> = state
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect();
        files.sort_unstable();
        let applied = state
            .transaction_version(mirror.log_store().as_ref(), APP_ID)
            .await
            .map_err(delta_err(&name))?;
        Ok(Content { files, applied })
    }

    /// Applies `changes` to the mirror's files and commits them with the
    /// `txn` of changelog version `through`, the files sorted in `order`
    /// (a full sync makes it the table's).
    async fn apply(
        &self,
        table: &str,
        mirror: &DeltaTable,
        order: &Order,
        changes: Changes,
        full: bool,
        to: Reflects<'_>,
    ) -> Result<Synced, MirrorError> {
        let state = mirror
            .snapshot()
            .map_err(delta_err(&LakeRoot::mirror_of(table)))?
            .clone();
        let positions = Through::of_rows(&changes.rows);
        let staged = self
            .stage(table, mirror, Some(&state), order, changes, full)
            .await?;
        self.commit(table, mirror, &state, order, staged, &positions, full, to)
            .await
    }

    /// Writes the files `changes` make of the mirror's (every file anew for
    /// a full sync, `state`'s files left to [`Mirror::commit`] to remove),
    /// without committing them.
    async fn stage(
        &self,
        table: &str,
        mirror: &DeltaTable,
        state: Option<&DeltaTableState>,
        order: &Order,
        mut changes: Changes,
        full: bool,
    ) -> Result<Staged, MirrorError> {
        let store = mirror.log_store().object_store(None);
        let key = order.columns.as_slice();
        let arrow_err = MirrorError::arrow(table);
        let target_schema = mirror_schema(&changes.rows.schema());
        let converter = &changes.converter;

        // The live files and their key ranges.
        let mut ranges = Vec::new();
        let routed = state.filter(|_| !full && !changes.outcomes.is_empty());
        let (upserts, deletes) = changes.outcomes.values().fold((0, 0), |(u, d), o| match o {
            Outcome::Upsert { .. } => (u + 1, d),
            Outcome::Delete => (u, d + 1),
        });
        let live: Vec<(Path, i64)> = routed
            .iter()
            .flat_map(|s| s.log_data())
            .map(|f| (f.object_store_path(), f.size()))
            .collect();
        for (path, size) in live {
            let cached = self
                .ranges
                .lock()
                .expect("not poisoned")
                .get(path.as_ref())
                .cloned();
            let range = match cached {
                Some(r) => r,
                None => {
                    let r = read_range(&store, path, size, key).await?;
                    self.ranges
                        .lock()
                        .expect("not poisoned")
                        .insert(r.path.clone(), r.clone());
                    r
                }
            };
            ranges.push(range);
        }
        ranges.sort_by(|a, b| a.min.cmp(&b.min));

        // Route every changed key to the file whose range holds it (or
        // would, extended); a full sync replaces every file. The outcomes
        // move into their buckets: a full sync has one per key.
        let mut keys: Vec<(OwnedRow, Outcome)> =
            std::mem::take(&mut changes.outcomes).into_iter().collect();
        // Keys are unique: an unstable sort orders them the same, without
        // the stable sort's buffer of these wide pairs.
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut buckets: BTreeMap<Option<usize>, Bucket> = BTreeMap::new();
        let mut removed = Vec::new();
        for (k, outcome) in keys {
            let is_delete = matches!(outcome, Outcome::Delete);
            let file = if full || ranges.is_empty() {
                None
            } else {
                let bytes = k.as_ref();
                let i = ranges
                    .partition_point(|r| r.min.as_slice() <= bytes)
                    .saturating_sub(1);
                let r = &ranges[i];
                let past_end = bytes > r.max.as_slice();
                if is_delete && (past_end || bytes < r.min.as_slice()) {
                    // Not in any file: nothing to delete.
                    continue;
                }
                if past_end && i == ranges.len() - 1 && r.size >= self.tail_bytes as i64 {
                    None
                } else {
                    Some(i)
                }
            };
            if file.is_none() && is_delete {
                continue;
            }
            buckets
                .entry(file)
                .or_insert_with(|| Bucket {
                    file,
                    keys: Vec::new(),
                })
                .keys
                .push((k, outcome));
        }

        // Values a primary-key update carries from its old key's row.
        let mut fetched: HashMap<String, Bytes> = HashMap::new();
        let changed = project(&changes.rows, &target_schema).map_err(arrow_err)?;
        let Lent {
            changed,
            rows: lent,
            missing,
        } = lend(
            table,
            &store,
            &ranges,
            &changes,
            moved_used(buckets.values().flat_map(|b| b.keys.iter().map(|(_, o)| o))),
            changed,
            &mut fetched,
        )
        .await?;
        if !changes.moved.is_empty() {
            for bucket in buckets.values_mut() {
                for (_, outcome) in &mut bucket.keys {
                    if let Outcome::Upsert { carried, .. } = outcome {
                        carried.retain_mut(|(_, source)| match *source {
                            Source::Moved(n) => match lent[n] {
                                Some(row) => {
                                    *source = Source::Change(row);
                                    true
                                }
                                None => false,
                            },
                            _ => true,
                        });
                    }
                }
            }
        }
        let unavailable = changes.unpaired.len() + missing;

        let mut actions = Vec::new();
        let (mut rows_written, mut bytes_written) = (0, 0);
        let key_names: Arc<[String]> = key.into();
        for bucket in buckets.into_values() {
            let old = match bucket.file {
                Some(i) => {
                    let path = ranges[i].path.clone();
                    let prefetched = fetched.remove(&path);
                    removed.push(path.clone());
                    Some(match (self.own_files.take(&path), prefetched) {
                        (Some(kept), _) => OldFile::Kept(kept),
                        (None, Some(bytes)) => OldFile::Fetched { path, bytes },
                        (None, None) => OldFile::Fetched {
                            bytes: fetch(&store, &path).await?,
                            path,
                        },
                    })
                }
                None => None,
            };
            let rewrite = Rewrite {
                old,
                changed: changed.clone(),
                changes_schema: changes.rows.schema(),
                keys: bucket.keys,
                key: key_names.clone(),
                converter: changes.converter.clone(),
                schema: target_schema.clone(),
            };
            let merged = blocking(table, move || rewrite.run())
                .await?
                .map_err(|e| e.into_mirror(table))?;
            rows_written += merged.num_rows();
            for chunk in self.chunks(&merged) {
                let add = self
                    .put(&store, &chunk, key, converter, !full)
                    .await
                    .map_err(|e| e.into_mirror(table))?;
                bytes_written += add.size as usize;
                actions.push(Action::Add(add));
            }
        }
        Ok(Staged {
            adds: actions,
            removed,
            schema: target_schema,
            upserts,
            deletes,
            rows_written,
            bytes_written,
            unavailable,
        })
    }

    /// Commits `staged` (for a full sync, with the removes of every file
    /// `state` has) with the `txn` of changelog version `through`.
    /// `positions`: those of the changelog rows applied.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        table: &str,
        mirror: &DeltaTable,
        state: &DeltaTableState,
        order: &Order,
        staged: Staged,
        positions: &Through,
        full: bool,
        to: Reflects<'_>,
    ) -> Result<Synced, MirrorError> {
        let key = order.columns.as_slice();
        let name = LakeRoot::mirror_of(table);
        let merr = delta_err(&name);
        let through = to.version;
        let Staged {
            adds: mut actions,
            mut removed,
            schema: target_schema,
            upserts,
            deletes,
            rows_written,
            bytes_written,
            unavailable,
        } = staged;
        let added = actions.len();
        if full {
            removed.extend(
                state
                    .log_data()
                    .iter()
                    .map(|f| f.object_store_path().to_string()),
            );
        }
        let now = now_ms();
        for path in &removed {
            actions.push(Action::Remove(Remove {
                path: path.clone(),
                data_change: true,
                deletion_timestamp: Some(now),
                extended_file_metadata: Some(false),
                ..Default::default()
            }));
        }

        // Columns the changelog gained since the mirror was created; a
        // mirror built anew takes its new changelog's columns alone, and
        // one whose key changed type the rows' columns.
        let current = state.schema().as_ref().clone();
        let mut evolved = match to.anew || to.retyped {
            false => current.clone(),
            true => delta_schema(table, &target_schema)?,
        };
        crate::lake::table::conform(RecordBatch::new_empty(target_schema.clone()), &mut evolved)
            .map_err(&merr)?;
        // A full sync's order (chosen anew) becomes the table's, in the same
        // commit as the files sorted by it.
        let configuration = state.metadata().configuration();
        let order_json = serde_json::to_string(key).expect("names serialise");
        let reordered = full
            && (configuration.get(order::ORDER_PROPERTY) != Some(&order_json)
                || order::pending(configuration) != order.pending);
        let relinked =
            configuration.get(CHANGELOG_PROPERTY).map(String::as_str) != Some(to.changelog);
        let key_json = serde_json::to_string(to.key).expect("names serialise");
        let rekeyed = to.anew && configuration.get(KEY_PROPERTY) != Some(&key_json);
        if evolved != current || reordered || relinked || rekeyed {
            let mut metadata = state
                .metadata()
                .clone()
                .with_schema(&evolved)
                .map_err(|e| merr(e.into()))?;
            if rekeyed {
                metadata = metadata
                    .add_config_key(KEY_PROPERTY.to_string(), key_json)
                    .map_err(|e| merr(e.into()))?;
            }
            if relinked {
                metadata = metadata
                    .add_config_key(CHANGELOG_PROPERTY.to_string(), to.changelog.to_string())
                    .map_err(|e| merr(e.into()))?;
            }
            if reordered {
                tracing::info!(table, order = ?order.columns, pending = order.pending,
                    "current-state table's files sorted in a newly chosen order");
                metadata = metadata
                    .remove_config_key(order::PENDING_PROPERTY)
                    .map_err(|e| merr(e.into()))?;
                for (k, v) in order.properties() {
                    metadata = metadata.add_config_key(k, v).map_err(|e| merr(e.into()))?;
                }
            }
            actions.push(Action::Metadata(metadata));
        }
        actions.push(Action::Txn(Transaction::new_with_last_update(
            APP_ID,
            through,
            Some(now),
        )));

        // How current the mirror is after this commit, carried forward
        // from the one it builds on (its recovery state too, unless these
        // changes are the whole changelog, which holds every marker again).
        let base = match to.anew {
            false => {
                self.through_at(table, mirror, state.version() as i64)
                    .await?
            }
            true => Through::default(),
        };
        let base = if full { base.without_recovery() } else { base };
        let positions = base.merged(positions);
        let app = commit_info(through, &positions);
        tracing::debug!(
            table,
            files = added,
            removed = removed.len(),
            "mirror files put; committing"
        );
        crate::lake::failpoint_pause("mirror::before-commit").await;
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let committed = CommitBuilder::from(commit_properties(state).with_metadata(app))
            .with_max_retries(0)
            .with_actions(actions)
            .build(Some(state.snapshot()), mirror.log_store(), operation)
            .await;
        let mut synced = Synced {
            through: Some(through),
            full,
            upserts,
            deletes,
            files_removed: removed.len(),
            files_added: added,
            rows_written,
            bytes_written,
            through_commit_us: positions.commit_us(),
            unavailable,
            ..Synced::default()
        };
        match committed {
            Ok(done) => {
                synced.version = Some(done.version() as i64);
                self.through
                    .lock()
                    .expect("not poisoned")
                    .insert(table.to_string(), (done.version() as i64, positions));
                Ok(synced)
            }
            Err(e) if is_conflict(&e) => {
                // The files just put stay unreferenced: vacuum removes them.
                synced.through = None;
                synced.conflict = true;
                Ok(synced)
            }
            Err(e) => Err(merr(e).into()),
        }
    }

    /// The per-partition positions mirror version `version` holds: known
    /// if this writer made it or read it before, else read from its commit
    /// or, when that is not a sync's (upkeep's vacuum commits), the newest
    /// sync's before it.
    async fn through_at(
        &self,
        table: &str,
        mirror: &DeltaTable,
        version: i64,
    ) -> Result<Through, MirrorError> {
        if let Some((v, t)) = self.through.lock().expect("not poisoned").get(table)
            && *v == version
        {
            return Ok(t.clone());
        }
        let name = LakeRoot::mirror_of(table);
        let mut found = Through::default();
        // Back past upkeep's vacuum commits (two per run, and a quiet
        // mirror gets many runs), as far as the log goes; once per table
        // and process, since what is found is kept.
        for v in (0..=version).rev() {
            let Some(entry) = mirror
                .log_store()
                .read_commit_entry(v as u64)
                .await
                .map_err(delta_err(&name))?
            else {
                break;
            };
            let info = entry
                .split(|b| *b == b'\n')
                .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
                .find_map(|action| action.get("commitInfo").cloned());
            if let Some(t) = info.and_then(|i| Through::from_commit_info(&i)) {
                found = t;
                break;
            }
        }
        self.through
            .lock()
            .expect("not poisoned")
            .insert(table.to_string(), (version, found.clone()));
        Ok(found)
    }

    /// `batch` cut into files of one to two times the target size (by its Arrow size;
    /// Parquet is smaller still).
    fn chunks(&self, batch: &RecordBatch) -> Vec<RecordBatch> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Vec::new();
        }
        // Equal parts of at least the target: a rewritten file is split
        // only once it has doubled, so a file that gains a few rows stays
        // one file instead of halving at every rewrite.
        let bytes = batch.get_array_memory_size();
        let files = (bytes / self.target_bytes).clamp(1, rows);
        let per_file = rows.div_ceil(files);
        (0..rows)
            .step_by(per_file)
            .map(|start| batch.slice(start, per_file.min(rows - start)))
            .collect()
    }

    /// Puts one mirror file (rows sorted by key) with its key range in its
    /// footer; kept as rows for the next sync if `keep`.
    async fn put(
        &self,
        store: &ObjectStoreRef,
        batch: &RecordBatch,
        key: &[String],
        converter: &RowConverter,
        keep: bool,
    ) -> Result<deltalake::kernel::Add, RewriteError> {
        // The batch is sorted by key: its first and last rows bound it.
        let bound = |row| {
            key_rows(converter, &batch.slice(row, 1), key)
                .map(|k| k.row(0).as_ref().to_vec())
                .map_err(RewriteError::Arrow)
        };
        let min = bound(0)?;
        let max = bound(batch.num_rows() - 1)?;
        let footer = vec![
            (
                KEY_METADATA.to_string(),
                serde_json::to_string(key).expect("names serialise"),
            ),
            (KEY_MIN.to_string(), hex(&min)),
            (KEY_MAX.to_string(), hex(&max)),
        ];
        let files = if keep { &self.kept_files } else { &self.files };
        let add = files
            .put(store.as_ref(), Vec::new(), batch, true, &footer)
            .await
            .map_err(RewriteError::File)?;
        let range = FileRange {
            path: add.path.clone(),
            size: add.size,
            min,
            max,
        };
        self.ranges
            .lock()
            .expect("not poisoned")
            .insert(range.path.clone(), range);
        Ok(add)
    }
}

/// `cdc-sink mirror`: syncs (or rebuilds) the current-state table of
/// `table`, or of every changelog, and prints one line per table.
pub async fn run(
    cfg: &crate::config::SinkConfig,
    table: Option<&str>,
    rebuild: bool,
) -> Result<Vec<Synced>, MirrorError> {
    let mirror = Mirror::configured(LakeRoot::new(&cfg.s3, &cfg.output.prefix)?, cfg);
    let tables = match table {
        Some(t) => vec![t.to_string()],
        None => mirror.root().tables().await?,
    };
    let mut done = Vec::new();
    for t in tables {
        let mut synced = mirror.sync(&t, rebuild).await?;
        let (mut rebuilding, mut conflicts, mut batches) = (rebuild && synced.conflict, 0, 0);
        // Lost to a running sink's commit: again from the newer state; a
        // bounded batch applied with more to come (or a reconciliation
        // still due): on towards the end of the changelog (bounded: a
        // running sink keeps adding to it).
        while (synced.conflict && conflicts < 10)
            || (!synced.conflict && synced.behind && batches < 1000)
        {
            conflicts += usize::from(synced.conflict);
            batches += 1;
            synced = mirror.sync(&t, rebuilding).await?;
            rebuilding &= synced.conflict;
        }
        if synced.conflict {
            println!("{t}: lost to concurrent writers ten times; not synced");
            continue;
        }
        if synced.no_key {
            println!("{t}: no primary key, no current-state table");
        } else if synced.waiting {
            println!(
                "{t}: at changelog version {:?}; the next holds half of a primary-key update \
                 whose other half is not committed yet (applied alone {} s after its commit; \
                 run again)",
                synced.through,
                PAIR_WAIT_MS / 1000
            );
        } else {
            println!(
                "{t}: through changelog version {:?}, {} upserts, {} deletes{}",
                synced.through,
                synced.upserts,
                synced.deletes,
                match (synced.full, synced.ranges) {
                    (false, _) => String::new(),
                    (true, 0) => " (from the whole changelog)".to_string(),
                    (true, n) => format!(" (from the whole changelog, in {n} ranges of its order)"),
                }
            );
        }
        done.push(synced);
    }
    Ok(done)
}

/// The `commitInfo` of a mirror commit: the changelog version it reflects
/// and how current that is ([`Through`]).
fn commit_info(through: i64, positions: &Through) -> HashMap<String, serde_json::Value> {
    let mut app: HashMap<String, serde_json::Value> =
        positions.to_commit_info().into_iter().collect();
    app.insert("cdc.changelogVersion".to_string(), json!(through));
    if let Some(us) = positions.commit_us() {
        app.insert("cdc.sourceCommitTsMicros".to_string(), json!(us));
    }
    if let Some(lsn) = positions.lsn() {
        app.insert("cdc.sourceLsn".to_string(), json!(lsn));
    }
    app
}

/// Another writer committed to the mirror since this sync read it. With
/// no retries (see `apply`), delta-rs reports that as running out of
/// attempts, a conflict, or the version already existing.
fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_)
                    | TransactionError::VersionAlreadyExists(_)
                    | TransactionError::MaxCommitAttempts(_)
            }
    )
}

/// Delta log paths are percent-encoded; object store paths are not.
fn percent_decode(path: &str) -> String {
    url::Url::parse(&format!("file:///{path}"))
        .ok()
        .and_then(|u| {
            u.to_file_path()
                .ok()
                .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
        })
        .unwrap_or_else(|| path.to_string())
}

/// `work` on the blocking pool: a file's rewrite, a range's reduction.
async fn blocking<T: Send + 'static>(
    table: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, MirrorError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Ok(done),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a blocking task.
            Err(_) => Err(MirrorError::arrow(table)(ArrowError::ExternalError(
                "the runtime shut down during a blocking step".into(),
            ))),
        },
    }
}

fn missing_live_file(table: &str) -> MirrorError {
    MirrorError::Lake(Box::new(LakeError::Location(format!(
        "a live file of `{table}` is missing"
    ))))
}

/// Reads `paths` (those still kept in `recent` from there); `None` if one
/// is gone.
async fn read_all(
    table: &str,
    store: &ObjectStoreRef,
    paths: &[Path],
    recent: &Recent,
) -> Result<Option<Vec<ReadFile>>, MirrorError> {
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        if let Some(kept) = recent.take(p.as_ref()) {
            files.push(kept);
            continue;
        }
        match fetch_file(table, store, p).await? {
            Some(file) => files.push(file),
            None => return Ok(None),
        }
    }
    Ok(Some(files))
}

/// Whether a key column of `mirror`'s changelog changed type since the
/// mirror was written ([`retype`]).
fn retyped(table: &str, changelog: &LogHead, mirror: &DeltaTable) -> Result<bool, MirrorError> {
    let Some(key) = key_of(table, None, Some(mirror))? else {
        return Ok(false);
    };
    let types = KeyTypes::of(changelog.schema(), &key).map_err(delta_err(table))?;
    let name = LakeRoot::mirror_of(table);
    let state = mirror.snapshot().map_err(delta_err(&name))?;
    let changed = types
        .changes(state.schema().as_ref())
        .map_err(delta_err(&name))?;
    if changed {
        tracing::info!(
            table,
            key = %types.describe(),
            "a primary-key column changed type: building the current-state table anew"
        );
    }
    Ok(changed)
}

/// The mirror's own record of its primary key (JSON).
fn property_key(mirror: Option<&DeltaTable>) -> Option<String> {
    let state = mirror?.snapshot().ok()?;
    state.metadata().configuration().get(KEY_PROPERTY).cloned()
}

/// The primary key: the one the changelog's newest file names, else the
/// mirror's own property.
fn key_of(
    table: &str,
    named: Option<String>,
    mirror: Option<&DeltaTable>,
) -> Result<Option<Vec<String>>, MirrorError> {
    match named.or_else(|| property_key(mirror)) {
        None => Ok(None),
        Some(json) => serde_json::from_str::<Vec<String>>(&json)
            .ok()
            .filter(|k| !k.is_empty())
            .map(Some)
            .ok_or_else(|| MirrorError::BadKey {
                table: table.to_string(),
            }),
    }
}

/// `changed` with the current-state rows of `changes.moved[n]` for each
/// `n` in `used` (old keys of primary-key updates an outcome takes values
/// from) appended, and where each went. The files
/// read stay in `fetched`: the old key's delete rewrites its file.
async fn lend(
    table: &str,
    store: &ObjectStoreRef,
    ranges: &[FileRange],
    changes: &Changes,
    used: std::collections::BTreeSet<usize>,
    changed: RecordBatch,
    fetched: &mut HashMap<String, Bytes>,
) -> Result<Lent, MirrorError> {
    let arrow_err = MirrorError::arrow(table);
    let mut rows = vec![None; changes.moved.len()];
    let mut parts = vec![changed.clone()];
    let mut at = changed.num_rows();
    let mut missing = 0;
    // Only the keys an outcome still takes a value from.
    // Moved keys by the file whose range holds them.
    let mut by_file: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for n in used {
        let k = &changes.moved[n];
        let bytes = k.as_ref();
        let i = ranges
            .partition_point(|r| r.min.as_slice() <= bytes)
            .checked_sub(1);
        match i.filter(|&i| bytes <= ranges[i].max.as_slice()) {
            Some(i) => by_file.entry(i).or_default().push(n),
            None => missing += 1,
        }
    }
    for (i, wanted) in by_file {
        let path = &ranges[i].path;
        let bytes = match fetched.get(path) {
            Some(b) => b.clone(),
            None => {
                let b = fetch(store, path).await?;
                fetched.insert(path.clone(), b.clone());
                b
            }
        };
        let file = ReadFile::read(path.clone(), bytes).map_err(MirrorError::file(table))?;
        let schema = changed.schema();
        let aligned = file
            .batches
            .iter()
            .map(|b| align(b, &schema))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)?;
        let batch = arrow::compute::concat_batches(&schema, &aligned).map_err(arrow_err)?;
        let keys = key_rows(&changes.converter, &batch, &changes.key).map_err(arrow_err)?;
        let mut taken = Vec::new();
        for n in wanted {
            let found = (0..batch.num_rows())
                .rev()
                .find(|&r| keys.row(r) == changes.moved[n].row());
            match found {
                Some(r) => {
                    taken.push(r as u32);
                    rows[n] = Some(at);
                    at += 1;
                }
                None => missing += 1,
            }
        }
        let indices = arrow::array::UInt32Array::from(taken);
        parts.push(arrow::compute::take_record_batch(&batch, &indices).map_err(arrow_err)?);
    }
    let changed = if parts.len() == 1 {
        changed
    } else {
        arrow::compute::concat_batches(&changed.schema(), &parts).map_err(arrow_err)?
    };
    Ok(Lent {
        changed,
        rows,
        missing,
    })
}

/// The old keys (`Changes::moved`) that `outcomes` carry values from.
fn moved_used<'a>(
    outcomes: impl Iterator<Item = &'a Outcome>,
) -> std::collections::BTreeSet<usize> {
    outcomes
        .flat_map(|o| match o {
            Outcome::Upsert { carried, .. } => carried.as_slice(),
            Outcome::Delete => &[],
        })
        .filter_map(|(_, s)| match s {
            Source::Moved(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// A mirror file, whole.
async fn fetch(store: &ObjectStoreRef, path: &str) -> Result<Bytes, MirrorError> {
    let store_err = |e| MirrorError::Lake(Box::new(LakeError::Store(e)));
    store
        .get(&Path::from(path))
        .await
        .map_err(store_err)?
        .bytes()
        .await
        .map_err(store_err)
}

/// A mirror file's key range, from its footer (two ranged GETs: the
/// footer's length, then the footer). A failed request may pass; a file
/// without the range will not.
async fn read_range(
    store: &ObjectStoreRef,
    path: Path,
    size: i64,
    order: &[String],
) -> Result<FileRange, LakeError> {
    let bad = |m: String| {
        LakeError::File(FileError::Read {
            path: path.to_string(),
            source: parquet::errors::ParquetError::General(m),
        })
    };
    let len = size as u64;
    if len < 12 {
        return Err(bad("too short for a Parquet file".into()));
    }
    let get = |range: std::ops::Range<u64>| {
        let path = path.clone();
        async move {
            store
                .get_ranges(&path, &[range])
                .await
                .map(|mut r| r.remove(0))
        }
    };
    let tail = get(len - 8..len).await?;
    if &tail[4..8] != b"PAR1" {
        return Err(bad("no Parquet magic".into()));
    }
    let footer = u32::from_le_bytes(tail[0..4].try_into().expect("four bytes")) as u64;
    if footer + 12 > len {
        return Err(bad("footer longer than the file".into()));
    }
    let bytes = get(len - 8 - footer..len - 8).await?;
    let metadata = ParquetMetaDataReader::decode_metadata(&bytes).map_err(|source| {
        LakeError::File(FileError::Read {
            path: path.to_string(),
            source,
        })
    })?;
    let kv: HashMap<String, String> = metadata
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect();
    // Its ranges bound keys in the order it was sorted in: routing keys
    // of another order by them would put rows in the wrong files.
    let sorted_by: Option<Vec<String>> = kv
        .get(KEY_METADATA)
        .and_then(|k| serde_json::from_str(k).ok());
    if let Some(sorted_by) = sorted_by.filter(|s| s != order) {
        return Err(bad(format!(
            "a mirror file sorted by {sorted_by:?} in a table sorted by {order:?} (written by \
             a sink that does not know the table's order: an older version?); rebuild the \
             table with `cdc-sink mirror --table <table> --rebuild`"
        )));
    }
    let bound = |k: &str| {
        kv.get(k)
            .and_then(|h| unhex(h))
            .ok_or_else(|| bad(format!("a mirror file without `{k}` in its footer")))
    };
    Ok(FileRange {
        path: path.to_string(),
        size,
        min: bound(KEY_MIN)?,
        max: bound(KEY_MAX)?,
    })
}

/// The mirror's columns: the changelog's, without those of a change.
fn mirror_schema(changelog: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = changelog
        .fields()
        .iter()
        .filter(|f| !CHANGE_ONLY.contains(&f.name().as_str()))
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Arc::new(Schema::new(fields))
}

/// `batch`'s columns of `schema`, by name.
fn project(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    align(batch, schema)
}

#[cfg(test)]
pub(crate) mod tests;
