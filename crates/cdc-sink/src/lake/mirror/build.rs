//! A mirror built from the whole changelog in ranges of its order, so that
//! the build's memory is bounded by [`Mirror`](super::Mirror)'s
//! `build_bytes` (`mirror.build_memory_bytes`), not by the table.
//!
//! A full sync (a rebuild, a new mirror whose first changelog versions are
//! gone from the log, a gap) reads every live changelog file. While their
//! rows fit the budget ([`peak`]) it keeps them and applies them at once,
//! as it always did ([`Whole::Files`]). Past that it drops them and only
//! surveys the rest ([`Survey`]), then builds in ranges:
//!
//! 1. **Survey**, one read of every file: the key's columns of every n-th
//!    row (a sample, in Kafka order), the halves of primary-key updates,
//!    each file's least and greatest key value per key column, its schema,
//!    and its positions and markers ([`Through`]).
//! 2. **Plan**: the order is chosen from the sample, and the sample's
//!    quantiles of the order's first column cut it into ranges whose
//!    [`peak`] is about the budget each. A key's changes all share its first
//!    column, so each key is in exactly one range, and the ranges' files
//!    are disjoint and in order.
//! 3. **Each range**: read the files whose key bounds meet it, keep the
//!    rows whose key is in it, reduce them and put its files. A
//!    primary-key update can move a row into the range from another: the
//!    create carries its unchanged TOASTed values from the old key's image,
//!    so the old key's history (and its own old keys', transitively) is
//!    read into the range too, and only the range's own keys' outcomes are
//!    written.
//! 4. **One commit** of every range's files, the removes of every old file
//!    and the `txn`: readers see the old table or the new one, never part.
//!
//! Range bounds are compared as Arrow row encodings of the first column
//! alone, against encodings of the whole key: each column's encoding is
//! self-delimiting and the whole key's starts with its first column's, so
//! a key is at or past a bound exactly when its first column is (see
//! [`at_or_past`], [`at_most`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::datatypes::{Field, Int64Type, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};
use deltalake::kernel::StructType;
use deltalake::logstore::ObjectStoreRef;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::config::Clustering;
use crate::decode::marker::RECOVERY;
use crate::decode::schema::meta;
use crate::lake::LakeError;
use crate::lake::changelog::KEY_METADATA;
use crate::lake::files::{ReadFile, align, output_schema_of, sort_by_kafka_position};
use crate::lake::mirror::MirrorError;
use crate::lake::mirror::changes::key_converter;
use crate::lake::mirror::order::{self, Order};
use crate::lake::mirror::retype::KeyTypes;
use crate::lake::mirror::through::{self, Through};
use crate::lake::table::delta_err;

/// Rows sampled, about: enough for the order's choice (which looks at up
/// to 65,536 rows per partition) and for the quantiles of a few hundred
/// ranges.
const SAMPLE_ROWS: usize = 1 << 18;

/// A live changelog file to read.
pub(super) struct LiveFile {
    pub path: Path,
    pub size: usize,
    /// Its rows, if the log says.
    pub rows: Option<usize>,
}

/// The whole changelog, as a full sync applies it.
pub(super) enum Whole {
    /// Every live file, read: their rows fit the budget.
    Files(Vec<ReadFile>),
    /// Too many rows to hold at once: built in ranges.
    Ranged(Box<Survey>),
}

impl Whole {
    /// Whether a file holds a change of a row (not only markers).
    pub fn has_changes(&self) -> bool {
        match self {
            Whole::Files(files) => files.iter().any(has_changes),
            Whole::Ranged(survey) => survey.has_changes,
        }
    }

    /// The primary key named by the file holding the newest change
    /// ([`newest_key`]), as JSON.
    pub fn named_key(&self) -> Option<String> {
        match self {
            Whole::Files(files) => newest_key(files),
            Whole::Ranged(survey) => survey.named.as_ref().map(|(_, k)| k.clone()),
        }
    }
}

/// What one read of every live changelog file found (see the module's
/// overview).
pub(super) struct Survey {
    files: Vec<Surveyed>,
    /// Every n-th row's key columns (as far as known) and Kafka position.
    sample: Vec<RecordBatch>,
    /// Every row's positions, recoveries and TRUNCATEs.
    pub through: Through,
    has_changes: bool,
    /// The key named by the file holding the newest change, of those that
    /// name one (JSON), and that change's LSN.
    named: Option<(Option<i64>, String)>,
    /// The rows' Arrow bytes, all told.
    bytes: usize,
    rows: usize,
}

struct Surveyed {
    path: Path,
    /// The key its rows were surveyed by.
    key: Option<Vec<String>>,
    /// Its halves of primary-key updates: key columns, op, LSN.
    halves: Vec<RecordBatch>,
    schema: SchemaRef,
    /// Per key column: its least and greatest value among the file's
    /// changes (NULL least), as two rows.
    bounds: HashMap<String, ArrayRef>,
}

/// Reads every file of `files`, keeping them while the [`peak`] of
/// applying them is at most `budget`, surveying them all. `key`: the
/// primary key as known before the first file names one (the mirror's
/// property); each file is read with its key columns folded by it
/// ([`KeyTypes`], from `table_schema`, the changelog's). `None` if a file
/// is gone.
pub(super) async fn read_whole(
    table: &str,
    store: &ObjectStoreRef,
    files: Vec<LiveFile>,
    key: Option<Vec<String>>,
    table_schema: &StructType,
    budget: usize,
) -> Result<Option<Whole>, MirrorError> {
    let arrow_err = MirrorError::arrow(table);
    // A file the log gives no row count for is taken to hold a row per 4
    // bytes: more than any holds, so the sample stays small.
    let total: usize = files.iter().map(|f| f.rows.unwrap_or(f.size / 4)).sum();
    let stride = total.div_ceil(SAMPLE_ROWS).max(1);
    let mut kept = Some(Vec::new());
    let mut survey = Survey {
        files: Vec::with_capacity(files.len()),
        sample: Vec::new(),
        through: Through::default(),
        has_changes: false,
        named: None,
        bytes: 0,
        rows: 0,
    };
    let mut key = key;
    let mut seen_rows = 0usize;
    for live in files {
        let Some(file) = fetch_file(table, store, &live.path).await? else {
            return Ok(None);
        };
        if let Some(named) = file.footer.get(KEY_METADATA) {
            let newest = max_lsn(&file);
            if survey.named.as_ref().is_none_or(|(lsn, _)| newest >= *lsn) {
                survey.named = Some((newest, named.clone()));
            }
            key = serde_json::from_str::<Vec<String>>(named)
                .ok()
                .filter(|k| !k.is_empty())
                .or(key);
        }
        // Surveyed with its key columns folded by the key known here, and
        // kept as read: a sync folds what it applies by the key it
        // settles on, which a later file may name.
        let surveyed = match &key {
            Some(key) => key_types(table, table_schema, key)?
                .file(file.clone())
                .map_err(arrow_err)?,
            None => file.clone(),
        };
        let mut file_halves = Vec::new();
        survey.has_changes |= has_changes(&file);
        let mut bounds = Bounds::default();
        for batch in &surveyed.batches {
            survey.bytes += batch.get_array_memory_size();
            survey.rows += batch.num_rows();
            survey.through = survey.through.merged(&Through::of_rows(batch));
            let Some(key) = &key else {
                continue;
            };
            let changes = change_rows(batch).map_err(arrow_err)?;
            bounds.add(&changes, key).map_err(arrow_err)?;
            // Every `stride`-th change, counting across files.
            let first = (stride - seen_rows % stride) % stride;
            let picked: Vec<u32> = (first..changes.num_rows())
                .step_by(stride)
                .map(|i| i as u32)
                .collect();
            seen_rows += changes.num_rows();
            survey.sample.push(
                arrow::compute::take_record_batch(
                    &present(&changes, &with_position(key)).map_err(arrow_err)?,
                    &UInt32Array::from(picked),
                )
                .map_err(arrow_err)?,
            );
            if let Some(halves) = halves(batch, key, None).map_err(arrow_err)? {
                file_halves.push(halves);
            }
        }
        survey.files.push(Surveyed {
            path: live.path,
            key: key.clone(),
            halves: file_halves,
            schema: surveyed.schema.clone(),
            bounds: bounds.finish().map_err(arrow_err)?,
        });
        kept = match kept {
            Some(mut files) if peak(survey.bytes, survey.rows) <= budget => {
                files.push(file);
                Some(files)
            }
            _ => None,
        };
    }
    // What the build is estimated to take, beside what it took (the
    // process's peak), is how the estimate is checked on other tables.
    tracing::info!(
        table,
        rows = survey.rows,
        arrow_bytes = survey.bytes,
        estimated_peak = peak(survey.bytes, survey.rows),
        budget,
        at_once = kept.is_some(),
        "current-state table to be built from the whole changelog"
    );
    Ok(Some(match kept {
        Some(files) => Whole::Files(files),
        None => Whole::Ranged(Box::new(survey)),
    }))
}

/// About the most memory applying `rows` changelog rows of `bytes` (their
/// Arrow size) at once takes: the rows about three times (as read, sorted,
/// and as the mirror's rows written), and per row its key's encoding, its
/// entry in the map of outcomes and its place in the sorts. Measured on
/// `likes` (60 bytes a row): 330 bytes a row at the peak; on `tweets` it
/// errs on the safe side (docs/benchmarks.md).
pub(super) fn peak(bytes: usize, rows: usize) -> usize {
    3 * bytes + 150 * rows
}

/// The LSN of the newest change in `file` (`None`: no row has one).
fn max_lsn(file: &ReadFile) -> Option<i64> {
    file.batches
        .iter()
        .filter_map(|b| {
            let lsn = b
                .column_by_name(meta::LSN)?
                .as_primitive_opt::<Int64Type>()?;
            arrow::compute::max(lsn)
        })
        .max()
}

/// The primary key named by the file holding the newest change, of
/// those that name one (JSON): not the order of `files`, which the Delta
/// log does not keep for live files (it lists the newest first), nor
/// when a file was written (a compaction rewrites old rows).
pub(super) fn newest_key(files: &[ReadFile]) -> Option<String> {
    files
        .iter()
        .filter_map(|f| Some((max_lsn(f), f.footer.get(KEY_METADATA)?)))
        .max_by_key(|(lsn, _)| *lsn)
        .map(|(_, key)| key.clone())
}

/// Whether `k` names the same columns as `key`, in any order.
fn same_key(k: &Option<Vec<String>>, key: &[String]) -> bool {
    let mut k = k.clone().unwrap_or_default();
    let mut key = key.to_vec();
    k.sort();
    key.sort();
    k == key
}

/// Reads the changelog file at `path`; `None` if it is gone.
pub(super) async fn fetch_file(
    table: &str,
    store: &ObjectStoreRef,
    path: &Path,
) -> Result<Option<ReadFile>, MirrorError> {
    let got = match store.get(path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(MirrorError::Lake(Box::new(LakeError::Store(e)))),
    };
    let bytes = got
        .bytes()
        .await
        .map_err(|e| MirrorError::Lake(Box::new(LakeError::Store(e))))?;
    ReadFile::read(path.to_string(), bytes)
        .map(Some)
        .map_err(MirrorError::file(table))
}

/// The folds of `key`'s columns in the changelog of Delta schema
/// `table_schema` ([`KeyTypes`]).
fn key_types(
    table: &str,
    table_schema: &StructType,
    key: &[String],
) -> Result<KeyTypes, MirrorError> {
    KeyTypes::of(table_schema, key).map_err(|e| MirrorError::from(delta_err(table)(e)))
}

/// Reads the changelog file at `path` with its key columns folded by
/// `types`; `None` if it is gone.
async fn fetch_keyed(
    table: &str,
    store: &ObjectStoreRef,
    path: &Path,
    types: &KeyTypes,
) -> Result<Option<ReadFile>, MirrorError> {
    let Some(file) = fetch_file(table, store, path).await? else {
        return Ok(None);
    };
    types
        .file(file)
        .map(Some)
        .map_err(MirrorError::arrow(table))
}

/// Whether `file` holds a change of a row (not only recovery markers).
pub(super) fn has_changes(file: &ReadFile) -> bool {
    file.batches.iter().any(|b| {
        match b
            .column_by_name(meta::OP)
            .and_then(|c| c.as_string_opt::<i32>())
        {
            Some(op) => (0..op.len()).any(|i| !op.is_valid(i) || op.value(i) != RECOVERY),
            None => b.num_rows() > 0,
        }
    })
}

/// `columns` with the Kafka position, which orders the sample.
fn with_position(columns: &[String]) -> Vec<String> {
    let mut out = columns.to_vec();
    out.extend([meta::KAFKA_PARTITION.into(), meta::KAFKA_OFFSET.into()]);
    out
}

/// `batch`'s columns among `names` (a file from before a column has none).
fn present(batch: &RecordBatch, names: &[String]) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let indices: Vec<usize> = names
        .iter()
        .filter_map(|n| schema.index_of(n).ok())
        .collect();
    batch.project(&indices)
}

/// Whether each row of `batch` is a change of a row: not a recovery
/// marker or a TRUNCATE, which have no key.
fn is_change(batch: &RecordBatch) -> BooleanArray {
    let op = batch
        .column_by_name(meta::OP)
        .and_then(|c| c.as_string_opt::<i32>());
    (0..batch.num_rows())
        .map(|i| {
            Some(!op.is_some_and(|op| {
                op.is_valid(i) && matches!(op.value(i), RECOVERY | through::TRUNCATE)
            }))
        })
        .collect()
}

fn change_rows(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    arrow::compute::filter_record_batch(batch, &is_change(batch))
}

/// The rows of `batch` that pair a primary-key update's halves, as
/// [`Changes::reduce`](super::changes::Changes::reduce) pairs them: creates
/// that list unchanged columns (only a key update's create does) and
/// deletes marked with `_cdc_key_update`, or, given `lsns`, the deletes at
/// those LSNs (a lake written before the mark). Their key columns, op and
/// LSN; `None` if there are none.
fn halves(
    batch: &RecordBatch,
    key: &[String],
    lsns: Option<&HashSet<i64>>,
) -> Result<Option<RecordBatch>, ArrowError> {
    let (Some(op), Some(lsn)) = (
        batch
            .column_by_name(meta::OP)
            .and_then(|c| c.as_string_opt::<i32>()),
        batch
            .column_by_name(meta::LSN)
            .and_then(|c| c.as_primitive_opt::<Int64Type>()),
    ) else {
        return Ok(None);
    };
    let unchanged = batch
        .column_by_name(meta::UNCHANGED)
        .and_then(|c| c.as_list_opt::<i32>());
    let marks = batch.column_by_name(meta::KEY_UPDATE);
    let wanted: BooleanArray = (0..batch.num_rows())
        .map(|i| {
            let is = |code: &str| op.is_valid(i) && op.value(i) == code && lsn.is_valid(i);
            Some(match lsns {
                Some(lsns) => is("d") && lsns.contains(&lsn.value(i)),
                None => {
                    (is("c") && unchanged.is_some_and(|u| u.is_valid(i) && !u.value(i).is_empty()))
                        || (is("d") && marks.is_some_and(|m| m.is_valid(i)))
                }
            })
        })
        .collect();
    if wanted.true_count() == 0 {
        return Ok(None);
    }
    let mut columns = key.to_vec();
    columns.extend([meta::OP.into(), meta::LSN.into()]);
    arrow::compute::filter_record_batch(&present(batch, &columns)?, &wanted).map(Some)
}

/// Per key column, the least and greatest value seen so far.
#[derive(Default)]
struct Bounds {
    /// Column name to (least, greatest), each one row and its encoding.
    seen: HashMap<String, [(ArrayRef, Vec<u8>); 2]>,
    /// Columns whose type differs between batches: not bounded, so the
    /// file is read for every range.
    mixed: HashSet<String>,
}

impl Bounds {
    fn add(&mut self, changes: &RecordBatch, key: &[String]) -> Result<(), ArrowError> {
        if changes.num_rows() == 0 {
            return Ok(());
        }
        for name in key {
            let Some(values) = changes.column_by_name(name) else {
                continue;
            };
            if self.mixed.contains(name) {
                continue;
            }
            let converter = RowConverter::new(vec![SortField::new(values.data_type().clone())])?;
            let rows = converter.convert_columns(std::slice::from_ref(values))?;
            let (mut least, mut greatest) = (0, 0);
            for i in 1..rows.num_rows() {
                if rows.row(i) < rows.row(least) {
                    least = i;
                }
                if rows.row(i) > rows.row(greatest) {
                    greatest = i;
                }
            }
            let new = [
                (values.slice(least, 1), rows.row(least).as_ref().to_vec()),
                (
                    values.slice(greatest, 1),
                    rows.row(greatest).as_ref().to_vec(),
                ),
            ];
            match self.seen.get_mut(name) {
                Some(old) if old[0].0.data_type() != values.data_type() => {
                    self.seen.remove(name);
                    self.mixed.insert(name.clone());
                }
                Some(old) => {
                    let [least, greatest] = new;
                    if least.1 < old[0].1 {
                        old[0] = least;
                    }
                    if greatest.1 > old[1].1 {
                        old[1] = greatest;
                    }
                }
                None => {
                    self.seen.insert(name.clone(), new);
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<HashMap<String, ArrayRef>, ArrowError> {
        self.seen
            .into_iter()
            .map(|(name, [least, greatest])| {
                Ok((
                    name,
                    arrow::compute::concat(&[least.0.as_ref(), greatest.0.as_ref()])?,
                ))
            })
            .collect()
    }
}

/// `key` is at or past `bound` (an encoding of the first column alone).
pub(super) fn at_or_past(key: &[u8], bound: &[u8]) -> bool {
    key >= bound
}

/// `key`'s first column is at most `bound`'s value: `key` sorts before the
/// bound, or starts with it (the same first value, more columns after).
pub(super) fn at_most(key: &[u8], bound: &[u8]) -> bool {
    key <= bound || key.starts_with(bound)
}

/// The ranges a survey's build goes through, and how to read each.
pub(super) struct Plan {
    pub schema: SchemaRef,
    /// How the changelog's files are read (see [`KeyTypes`]).
    key_types: KeyTypes,
    pub order: Order,
    /// The whole key's encoding, in the order's columns.
    converter: RowConverter,
    /// Range `i` holds the keys from `cuts[i - 1]` (the first column's
    /// encoding) up to `cuts[i]`, excluded; the first and last are open.
    cuts: Vec<Vec<u8>>,
    /// Per file, its bounds in the first column's encoding (`None`: not
    /// known; read it for every range).
    files: Vec<(Path, Option<[Vec<u8>; 2]>)>,
    /// A primary-key update's new key to the old keys moved to it.
    moved_from: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

/// One range of a [`Plan`].
pub(super) struct Range {
    low: Option<Vec<u8>>,
    high: Option<Vec<u8>>,
    /// Keys of other ranges whose history the range's rows need: old keys
    /// of primary-key updates into it.
    gathered: HashSet<Vec<u8>>,
}

impl Range {
    /// Whether the key (whole, encoded) is this range's.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.low.as_ref().is_none_or(|l| at_or_past(key, l))
            && self.high.as_ref().is_none_or(|h| !at_or_past(key, h))
    }

    /// Whether a file bounded by `bounds` may hold rows this range reads.
    fn meets(&self, bounds: &Option<[Vec<u8>; 2]>) -> bool {
        let Some([least, greatest]) = bounds else {
            return true;
        };
        let overlaps = self.high.as_ref().is_none_or(|h| least < h)
            && self.low.as_ref().is_none_or(|l| greatest >= l);
        overlaps
            || self
                .gathered
                .iter()
                .any(|k| at_or_past(k, least) && at_most(k, greatest))
    }
}

impl Survey {
    /// Completes the halves of primary-key updates for a build by `key`:
    /// those of files surveyed by another key (one changed since, or not
    /// known yet then) are read again by this one, and the deletes that
    /// pair with creates the survey holds no delete for are found: in a
    /// lake written before `_cdc_key_update`, no delete is marked, so
    /// they take another read of the files. `None` if a file is gone.
    pub async fn pair_halves(
        &mut self,
        table: &str,
        store: &ObjectStoreRef,
        key: &[String],
        table_schema: &StructType,
    ) -> Result<Option<()>, MirrorError> {
        let arrow_err = MirrorError::arrow(table);
        let types = key_types(table, table_schema, key)?;
        for f in self.files.iter_mut().filter(|f| !same_key(&f.key, key)) {
            let Some(file) = fetch_keyed(table, store, &f.path, &types).await? else {
                return Ok(None);
            };
            f.schema = file.schema.clone();
            f.halves.clear();
            for batch in &file.batches {
                if let Some(found) = halves(batch, key, None).map_err(arrow_err)? {
                    f.halves.push(found);
                }
            }
            f.key = Some(key.to_vec());
            f.bounds.clear();
        }
        let mut deletes = HashSet::new();
        let mut creates = HashSet::new();
        for b in self.files.iter().flat_map(|f| &f.halves) {
            let op = b.column_by_name(meta::OP).expect("projected");
            let op = op.as_string::<i32>();
            let lsn = b.column_by_name(meta::LSN).expect("projected");
            let lsn = lsn.as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                match op.value(i) {
                    "d" => deletes.insert(lsn.value(i)),
                    _ => creates.insert(lsn.value(i)),
                };
            }
        }
        let unpaired: HashSet<i64> = creates.difference(&deletes).copied().collect();
        if unpaired.is_empty() {
            return Ok(Some(()));
        }
        for f in &mut self.files {
            let Some(file) = fetch_keyed(table, store, &f.path, &types).await? else {
                return Ok(None);
            };
            for batch in &file.batches {
                if let Some(found) = halves(batch, key, Some(&unpaired)).map_err(arrow_err)? {
                    f.halves.push(found);
                }
            }
        }
        Ok(Some(()))
    }

    /// Chooses the order from the sample and cuts it into ranges of about
    /// `budget` bytes of [`peak`] each.
    pub fn plan(
        &self,
        table: &str,
        table_schema: &StructType,
        partition_columns: &[String],
        key: &[String],
        clustering: Clustering,
        budget: usize,
    ) -> Result<Plan, MirrorError> {
        let arrow_err = MirrorError::arrow(table);
        let schemas: Vec<(&str, &Schema)> = self
            .files
            .iter()
            .map(|f| (f.path.as_ref(), f.schema.as_ref()))
            .collect();
        let key_types = key_types(table, table_schema, key)?;
        let read_as = key_types
            .table(table_schema)
            .map_err(|e| MirrorError::from(delta_err(table)(e)))?;
        let schema = output_schema_of(&read_as, partition_columns, &schemas)
            .map_err(MirrorError::file(table))?;
        let project = |names: &[String]| -> Result<SchemaRef, ArrowError> {
            let fields = names
                .iter()
                .map(|n| schema.field_with_name(n).cloned())
                .collect::<Result<Vec<Field>, _>>()?;
            Ok(Arc::new(Schema::new(fields)))
        };
        let sample_schema = project(&with_position(key)).map_err(arrow_err)?;
        let sample = self
            .sample
            .iter()
            .map(|b| align(b, &sample_schema))
            .collect::<Result<Vec<_>, _>>()
            .map_err(arrow_err)?;
        let sample = arrow::compute::concat_batches(&sample_schema, &sample).map_err(arrow_err)?;
        let sample = sort_by_kafka_position(&sample).map_err(arrow_err)?;
        let order = order::chosen(&sample, key, clustering).map_err(arrow_err)?;
        let first = &order.columns[0];

        // The cuts: the sample's quantiles of the first column.
        let first_type = schema
            .field_with_name(first)
            .map_err(arrow_err)?
            .data_type()
            .clone();
        let single =
            RowConverter::new(vec![SortField::new(first_type.clone())]).map_err(arrow_err)?;
        let encoded = single
            .convert_columns(&[sample
                .column_by_name(first)
                .cloned()
                .expect("the sample has the key's columns")])
            .map_err(arrow_err)?;
        let mut values: Vec<&[u8]> = (0..encoded.num_rows())
            .map(|i| encoded.row(i).data())
            .collect();
        values.sort_unstable();
        let ranges = peak(self.bytes, self.rows).div_ceil(budget.max(1)).max(1);
        let mut cuts: Vec<Vec<u8>> = Vec::new();
        for i in 1..ranges {
            let Some(v) = values.get(i * values.len() / ranges) else {
                break;
            };
            if cuts.last().is_none_or(|c| c.as_slice() < *v) && values[0] < *v {
                cuts.push(v.to_vec());
            }
        }

        // Each file's bounds of the first column, in its encoding.
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            // A file of another key (one changed since) is read for every
            // range, as the build applies it by this key.
            let bounds = match f.bounds.get(first).filter(|_| same_key(&f.key, key)) {
                Some(b) => {
                    let b = if b.data_type() == &first_type {
                        b.clone()
                    } else {
                        arrow::compute::cast(b, &first_type).map_err(arrow_err)?
                    };
                    let rows = single.convert_columns(&[b]).map_err(arrow_err)?;
                    Some([rows.row(0).data().to_vec(), rows.row(1).data().to_vec()])
                }
                None => None,
            };
            files.push((f.path.clone(), bounds));
        }

        // Primary-key updates: each create's old key, by their shared LSN.
        let converter = key_converter(&schema, &order.columns).map_err(arrow_err)?;
        let mut halves_columns = order.columns.clone();
        halves_columns.extend([meta::OP.into(), meta::LSN.into()]);
        let halves_schema = project(&halves_columns).map_err(arrow_err)?;
        let mut deletes: HashMap<i64, Vec<u8>> = HashMap::new();
        let mut creates: Vec<(i64, Vec<u8>)> = Vec::new();
        for b in self.files.iter().flat_map(|f| &f.halves) {
            let b = align(b, &halves_schema).map_err(arrow_err)?;
            let keys =
                super::changes::key_rows(&converter, &b, &order.columns).map_err(arrow_err)?;
            let op = b.column_by_name(meta::OP).expect("projected");
            let op = op.as_string::<i32>();
            let lsn = b.column_by_name(meta::LSN).expect("projected");
            let lsn = lsn.as_primitive::<Int64Type>();
            for i in (0..b.num_rows()).filter(|&i| op.is_valid(i) && lsn.is_valid(i)) {
                let k = keys.row(i).data().to_vec();
                match op.value(i) {
                    "d" => {
                        deletes.insert(lsn.value(i), k);
                    }
                    "c" => creates.push((lsn.value(i), k)),
                    _ => {}
                }
            }
        }
        let mut moved_from: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        for (lsn, new) in creates {
            if let Some(old) = deletes.get(&lsn) {
                moved_from.entry(new).or_default().push(old.clone());
            }
        }
        Ok(Plan {
            schema,
            key_types,
            order,
            converter,
            cuts,
            files,
            moved_from,
        })
    }
}

impl Plan {
    pub fn ranges(&self) -> usize {
        self.cuts.len() + 1
    }

    /// Range `i`, with the old keys whose history it needs.
    pub fn range(&self, i: usize) -> Range {
        let mut range = Range {
            low: i.checked_sub(1).map(|l| self.cuts[l].clone()),
            high: self.cuts.get(i).cloned(),
            gathered: HashSet::new(),
        };
        // From each of the range's new keys back through its old keys,
        // and theirs: a chain of updates carries values along it.
        let mut visited: HashSet<&[u8]> = HashSet::new();
        let mut stack: Vec<&[u8]> = self
            .moved_from
            .keys()
            .filter(|k| range.holds(k))
            .map(|k| k.as_slice())
            .collect();
        while let Some(k) = stack.pop() {
            for old in self.moved_from.get(k).into_iter().flatten() {
                if visited.insert(old) {
                    if !range.holds(old) {
                        range.gathered.insert(old.clone());
                    }
                    stack.push(old);
                }
            }
        }
        range
    }

    /// The changelog rows `range` needs, in Kafka order: its keys' changes
    /// and the gathered keys'. `None` if a file is gone.
    pub async fn read(
        &self,
        table: &str,
        store: &ObjectStoreRef,
        range: &Range,
    ) -> Result<Option<RecordBatch>, MirrorError> {
        let arrow_err = MirrorError::arrow(table);
        let mut kept = Vec::new();
        for (path, bounds) in &self.files {
            if !range.meets(bounds) {
                continue;
            }
            let Some(file) = fetch_keyed(table, store, path, &self.key_types).await? else {
                return Ok(None);
            };
            for batch in &file.batches {
                let batch = align(batch, &self.schema).map_err(arrow_err)?;
                let keys = super::changes::key_rows(&self.converter, &batch, &self.order.columns)
                    .map_err(arrow_err)?;
                let change = is_change(&batch);
                let wanted: BooleanArray = (0..batch.num_rows())
                    .map(|i| {
                        let k = keys.row(i);
                        Some(
                            change.value(i)
                                && (range.holds(k.data()) || range.gathered.contains(k.data())),
                        )
                    })
                    .collect();
                let rows =
                    arrow::compute::filter_record_batch(&batch, &wanted).map_err(arrow_err)?;
                if rows.num_rows() > 0 {
                    kept.push(rows);
                }
            }
        }
        let rows = arrow::compute::concat_batches(&self.schema, &kept).map_err(arrow_err)?;
        drop(kept);
        Ok(Some(self.key_types.order(&rows).map_err(arrow_err)?))
    }
}

/// A column of `values`' type, for tests of the bounds' encodings.
#[cfg(test)]
fn encode(values: ArrayRef) -> Vec<Vec<u8>> {
    let converter = RowConverter::new(vec![SortField::new(values.data_type().clone())]).unwrap();
    let rows = converter.convert_columns(&[values]).unwrap();
    (0..rows.num_rows())
        .map(|i| rows.row(i).data().to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::DataType;

    use super::*;

    /// The whole key's encoding is at or past a bound on its first column
    /// exactly when the first column is, and at most it exactly when the
    /// first column is: what every range test relies on.
    #[test]
    fn a_whole_keys_encoding_compares_with_a_first_column_bound_as_its_first_column() {
        let firsts: Vec<&str> = vec!["", "a", "ab", "abc", "b", "ba", "zz"];
        let seconds = [i64::MIN, -1, 0, 7, i64::MAX];
        let bounds = encode(Arc::new(StringArray::from(firsts.clone())));
        let whole = RowConverter::new(vec![
            SortField::new(DataType::Utf8),
            SortField::new(DataType::Int64),
        ])
        .unwrap();
        for (f, first) in firsts.iter().enumerate() {
            for second in seconds {
                let k = whole
                    .convert_columns(&[
                        Arc::new(StringArray::from(vec![*first])),
                        Arc::new(Int64Array::from(vec![second])),
                    ])
                    .unwrap();
                let k = k.row(0).data().to_vec();
                for (b, bound) in bounds.iter().enumerate() {
                    assert_eq!(at_or_past(&k, bound), f >= b, "{first:?} vs {}", firsts[b]);
                    assert_eq!(at_most(&k, bound), f <= b, "{first:?} vs {}", firsts[b]);
                }
            }
        }
    }
}
