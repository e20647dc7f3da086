//! Data files: what the changelog writer, the current-state writer and
//! upkeep put in a table, and read back.
//!
//! One [`FileWriter`] encodes a batch as Parquet (off the async runtime, a
//! bounded number at once), names it afresh in its Hive-style partition
//! directory, puts it (multipart when large) and returns the `Add` action
//! that commits it. Nothing here commits: a file put and never committed is
//! invisible to readers and left for vacuum.
//!
//! Reading is here too: [`ReadFile`] is one file read whole, and
//! [`Recent`] keeps files just put as rows for the current-state writer,
//! which reads them next.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{Array, ArrayRef, Int64Array, UInt32Array, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use deltalake::kernel::engine::arrow_conversion::TryIntoArrow;
use deltalake::kernel::{Add, StructType};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use tokio::sync::Semaphore;

use crate::config::{CompressionCodec, OutputConfig};
use crate::decode::schema::meta;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("encoding Parquet failed")]
    Encode(#[from] ParquetError),
    #[error("reading Parquet file `{path}`")]
    Read {
        path: String,
        #[source]
        source: ParquetError,
    },
    /// Dropping the column would lose data, so the file is not rewritten.
    #[error("file `{path}` has column `{column}`, which the table does not")]
    UnknownColumn { path: String, column: String },
    #[error("rows of different files do not fit one schema")]
    Arrow(#[from] ArrowError),
    #[error("putting data file `{path}` failed")]
    Put {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

impl FileError {
    /// A put may pass on a later try; an encoding error will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FileError::Put { .. })
    }
}

/// Files above this size are put as multipart uploads, in parts of
/// [`PART_SIZE`]: a failed part is retried alone, and S3 never holds more
/// than one part of ours in a request.
const MULTIPART_FROM: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;

pub fn writer_properties(output: &OutputConfig) -> WriterProperties {
    let compression = match output.compression {
        CompressionCodec::Zstd => {
            Compression::ZSTD(ZstdLevel::try_new(output.zstd_level).unwrap_or_default())
        }
        CompressionCodec::Snappy => Compression::SNAPPY,
        CompressionCodec::None => Compression::UNCOMPRESSED,
    };
    WriterProperties::builder()
        .set_compression(compression)
        .set_created_by(concat!("cdc-sink ", env!("CARGO_PKG_VERSION")).to_string())
        // Dates and timestamps here are proleptic Gregorian, as Spark >= 3
        // writes them. Spark trusts that only of files that say so with
        // this key; without it, it refuses values before 1582/1900 (the
        // -infinity sentinel 0001-01-01, say) unless every reader sets
        // `datetimeRebaseModeInRead`.
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "org.apache.spark.version".to_string(),
            "3.5.0".to_string(),
        )]))
        .set_column_dictionary_enabled(ColumnPath::from(meta::KAFKA_OFFSET), false)
        .set_column_dictionary_enabled(ColumnPath::from(meta::LSN), false)
        .build()
}

/// Encodes one batch as a complete Parquet file in memory. Files are bounded
/// by the roll policy (or upkeep's target size), so buffering one is
/// cheaper than streaming it.
pub fn encode(batch: &RecordBatch, props: &WriterProperties) -> Result<Bytes, ParquetError> {
    encode_with(batch, props, &[])
}

/// [`encode`], with `footer` added to the file's key-value metadata.
pub fn encode_with(
    batch: &RecordBatch,
    props: &WriterProperties,
    footer: &[(String, String)],
) -> Result<Bytes, ParquetError> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
    let unique = mostly_unique(batch);
    let props = if unique.is_empty() {
        props.clone()
    } else {
        let mut builder = props.clone().into_builder();
        for column in unique {
            builder = builder.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        builder.build()
    };
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))?;
    for (key, value) in footer {
        writer.append_key_value_metadata(KeyValue::new(key.clone(), value.clone()));
    }
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(buf))
}

/// Rows of a batch looked at to tell whether a column is mostly unique,
/// spread evenly over it.
const SAMPLE_ROWS: usize = 1024;
/// Fewer values than this: a column keeps its dictionary (a small file
/// costs little either way).
const SAMPLE_MIN: usize = 128;

/// Up to [`SAMPLE_ROWS`] of `rows` row numbers, in order: all of them, or
/// one at a (fixed) random place in each of as many equal stretches. At
/// a random place, not the first of each: values that repeat with a
/// period (a table's rows cycled) would otherwise alias with the stride.
fn stratified(rows: usize) -> Vec<usize> {
    if rows <= SAMPLE_ROWS {
        return (0..rows).collect();
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..SAMPLE_ROWS)
        .map(|b| {
            let (start, end) = (b * rows / SAMPLE_ROWS, (b + 1) * rows / SAMPLE_ROWS);
            // xorshift64: cheap, and the same sample every time.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            start + (state % (end - start) as u64) as usize
        })
        .collect()
}

/// The top-level columns of `batch` whose values are mostly (over three
/// quarters of a sample) distinct: a primary key, a text, a timestamp. A
/// Parquet dictionary of such a column costs a hash of every value and
/// ends up as big as the values, until the writer gives it up at its
/// page size limit; written plain instead, they compress as well. The
/// sample is spread over the whole batch ([`stratified`]), so a column
/// whose values repeat further apart than its first rows keeps its
/// dictionary. Only strings, binaries and fixed-width primitives are
/// looked at.
fn mostly_unique(batch: &RecordBatch) -> Vec<String> {
    use std::hash::BuildHasher;
    let sample = stratified(batch.num_rows());
    let hasher = foldhash::fast::FixedState::default();
    let mut seen = std::collections::HashSet::with_capacity_and_hasher(SAMPLE_ROWS, hasher.clone());
    let mut unique = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let ty = column.data_type();
        let is_bytes = matches!(ty, DataType::Utf8 | DataType::Binary);
        let width = ty.primitive_width().filter(|_| ty.is_primitive());
        if !is_bytes && width.is_none() {
            continue;
        }
        let data = column.to_data();
        // One value's bytes, as the array holds them.
        let value = |i: usize| -> &[u8] {
            match width {
                None => {
                    let offsets = data.buffer::<i32>(0);
                    &data.buffers()[1].as_slice()[offsets[i] as usize..offsets[i + 1] as usize]
                }
                Some(width) => {
                    let at = (data.offset() + i) * width;
                    &data.buffers()[0].as_slice()[at..at + width]
                }
            }
        };
        seen.clear();
        let mut values = 0;
        for &i in sample.iter().filter(|&&i| column.is_valid(i)) {
            values += 1;
            seen.insert(hasher.hash_one(value(i)));
        }
        if values >= SAMPLE_MIN && seen.len() * 4 > values * 3 {
            unique.push(field.name().clone());
        }
    }
    unique
}

/// A partition directory: `(column, value)` in the table's partition
/// column order; `None` is Hive's null partition.
pub type PartitionValues = Vec<(String, Option<String>)>;

/// A fresh file name in the partition's Hive-style directory.
pub fn new_file_path(partition: &[(String, Option<String>)]) -> String {
    let mut path = String::new();
    for (column, value) in partition {
        let value = value.as_deref().unwrap_or("__HIVE_DEFAULT_PARTITION__");
        path.push_str(&format!("{column}={value}/"));
    }
    path.push_str(&format!("part-{}.parquet", uuid::Uuid::new_v4()));
    path
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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

/// Encodes and puts Parquet files with one set of writer properties.
#[derive(Clone)]
pub struct FileWriter {
    props: Arc<WriterProperties>,
    /// Files being encoded at once, across all tables and flushes: one per
    /// core. Each holds an encoder's buffers, so more would only add memory.
    encoders: Arc<Semaphore>,
    /// Where the files put are kept as rows for their next reader, if
    /// anywhere ([`Recent`]).
    recent: Option<Arc<Recent>>,
}

impl FileWriter {
    pub fn new(props: WriterProperties) -> FileWriter {
        FileWriter {
            props: Arc::new(props),
            encoders: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            recent: None,
        }
    }

    /// Keeps every file this puts in `recent` as well.
    pub fn with_recent(mut self, recent: Arc<Recent>) -> FileWriter {
        self.recent = Some(recent);
        self
    }

    /// Encodes `batch` (with `footer` in its key-value metadata) and puts
    /// it under a fresh name in `partition`'s directory of the table whose
    /// store is `store`. The returned `Add` says whether the rows are new
    /// (`data_change`: the changelog) or a rewrite of rows already there
    /// (upkeep's compaction).
    pub async fn put(
        &self,
        store: &dyn ObjectStore,
        partition: PartitionValues,
        batch: &RecordBatch,
        data_change: bool,
        footer: &[(String, String)],
    ) -> Result<Add, FileError> {
        let footer = footer.to_vec();
        let props = self.props.clone();
        let permit = self
            .encoders
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // zstd is CPU-bound: run it where it does not hold up the runtime
        // thread that consumes and decodes. The batch is shared, not copied.
        let rows = batch.num_rows();
        let to_encode = batch.clone();
        let path = new_file_path(&partition);
        let keep_as = self.recent.is_some().then(|| path.clone());
        let (bytes, as_read) = match tokio::task::spawn_blocking(move || {
            let bytes = encode_with(&to_encode, &props, &footer);
            let as_read = match (&bytes, keep_as) {
                (Ok(bytes), Some(path)) => ReadFile::written(path, bytes, &to_encode),
                _ => None,
            };
            drop(permit);
            bytes.map(|b| (b, as_read))
        })
        .await
        {
            Ok(done) => done?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let size = bytes.len();
        upload(store, &Path::from(path.as_str()), bytes)
            .await
            .map_err(|source| FileError::Put {
                path: path.clone(),
                source,
            })?;
        // Only once it is there: a file whose put failed is never read.
        if let (Some(recent), Some(file)) = (&self.recent, as_read) {
            recent.keep(file);
        }
        Ok(Add {
            path,
            partition_values: partition.into_iter().collect::<HashMap<_, _>>(),
            size: size as i64,
            modification_time: now_ms(),
            data_change,
            stats: Some(format!(r#"{{"numRecords":{rows}}}"#)),
            ..Default::default()
        })
    }
}

/// Files this process just put, kept as the rows they hold, for a while.
///
/// With current-state tables on, the mirror writer reads every changelog
/// file a moment after the changelog writer put it, and rewrites its own
/// newest file at its next sync. Reading them back cost a GET and a Parquet
/// decode of rows the process had just held: about 7% of the sink's CPU
/// in a drain with current-state tables (docs/benchmarks.md). So a [`FileWriter`] given a
/// [`Recent`] keeps each file it puts here, and a reader takes a file from
/// here when it is still kept, else reads it from the store as before.
///
/// A kept file is exactly the file: data files are never changed and never
/// reuse a name, and what is kept is the batch that was encoded, under the
/// schema read back from the encoded file's own footer (a batch whose
/// columns do not fit it is not kept). Memory is bounded by a budget; the
/// oldest files go first, so a reader that falls far behind reads from the
/// store again.
///
/// The files are kept by path within their table (names are fresh UUIDs,
/// so two tables never share one).
pub struct Recent {
    budget: usize,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    files: HashMap<String, (ReadFile, usize)>,
    /// Paths in the order they were kept: the oldest is dropped first.
    order: VecDeque<String>,
    bytes: usize,
}

impl Recent {
    /// Keeps files up to `budget` bytes of Arrow memory in all.
    pub fn new(budget: usize) -> Recent {
        Recent {
            budget,
            kept: Mutex::new(Kept::default()),
        }
    }

    /// Keeps `file`, dropping the oldest files kept until it fits; a file
    /// bigger than the whole budget is not kept.
    pub fn keep(&self, file: ReadFile) {
        let bytes = memory(&file);
        if bytes > self.budget {
            return;
        }
        let mut kept = self.kept.lock().expect("not poisoned");
        while kept.bytes + bytes > self.budget {
            let Some(oldest) = kept.order.pop_front() else {
                break;
            };
            if let Some((_, b)) = kept.files.remove(&oldest) {
                kept.bytes -= b;
            }
        }
        kept.bytes += bytes;
        kept.order.push_back(file.path.clone());
        if let Some((_, replaced)) = kept.files.insert(file.path.clone(), (file, bytes)) {
            kept.bytes -= replaced;
        }
    }

    /// Tests: drops every file kept.
    #[cfg(test)]
    pub(crate) fn clear(&self) {
        *self.kept.lock().expect("not poisoned") = Kept::default();
    }

    /// The file at `path`, if it is still kept; taken out, as each is read
    /// once.
    pub fn take(&self, path: &str) -> Option<ReadFile> {
        let mut kept = self.kept.lock().expect("not poisoned");
        let (file, bytes) = kept.files.remove(path)?;
        kept.bytes -= bytes;
        // Files are taken about in the order they were kept: near the front.
        if let Some(at) = kept.order.iter().position(|p| p == path) {
            kept.order.remove(at);
        }
        Some(file)
    }
}

/// The Arrow memory a kept file holds (buffers it shares count whole).
fn memory(file: &ReadFile) -> usize {
    file.batches.iter().map(|b| b.get_array_memory_size()).sum()
}

/// One data file, read whole (files are bounded: compaction reads small
/// ones, the current-state writer the changelog's and its own).
#[derive(Clone)]
pub struct ReadFile {
    pub path: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The footer's key-value metadata.
    pub footer: HashMap<String, String>,
}

impl ReadFile {
    /// What [`ReadFile::read`] of `bytes`, the encoding of `batch`, would
    /// give, without decoding it: the footer and the schema are read from
    /// `bytes`, the rows are `batch`'s. `None` if `batch`'s columns do not
    /// fit the schema read back (then the file is read, not kept).
    pub fn written(path: String, bytes: &Bytes, batch: &RecordBatch) -> Option<ReadFile> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).ok()?;
        let footer = footer_of(&builder);
        // The reader's batches carry its fields alone, not the file's
        // metadata (which is the footer).
        let schema = Arc::new(Schema::new(builder.schema().fields().clone()));
        let mut rows = RecordBatch::try_new(schema.clone(), batch.columns().to_vec()).ok()?;
        // A slice of a bigger batch (a file cut from a rewrite) would keep
        // the whole batch alive: kept, it holds its own rows alone.
        if rows.get_array_memory_size() > sliced_memory(&rows) * 5 / 4 {
            let all = UInt32Array::from_iter_values(0..rows.num_rows() as u32);
            rows = arrow::compute::take_record_batch(&rows, &all).ok()?;
        }
        Some(ReadFile {
            path,
            schema,
            batches: vec![rows],
            footer,
        })
    }

    pub fn read(path: String, bytes: Bytes) -> Result<ReadFile, FileError> {
        let read_err = |source| FileError::Read {
            path: path.clone(),
            source,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(read_err)?;
        let footer = footer_of(&builder);
        let reader = builder.build().map_err(read_err)?;
        let schema = arrow::record_batch::RecordBatchReader::schema(&reader);
        let batches = reader
            .collect::<Result<Vec<_>, ArrowError>>()
            .map_err(|e| read_err(ParquetError::ArrowError(e.to_string())))?;
        Ok(ReadFile {
            path,
            schema,
            batches,
            footer,
        })
    }
}

/// The Arrow memory of `batch`'s rows as sliced (not the buffers they
/// are a slice of).
pub fn sliced_memory(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// A Parquet file's key-value metadata.
fn footer_of<T>(
    builder: &parquet::arrow::arrow_reader::ArrowReaderBuilder<T>,
) -> HashMap<String, String> {
    builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect()
}

/// The schema of rows read from several files of a table: the table's data
/// columns in table order, each with the Arrow type the files were written
/// with (the sink's types; the Delta schema is coarser, e.g. about time
/// zones), nullable wherever some file lacks the column. A file column the
/// table does not know is an error: dropping it would lose data.
pub fn output_schema(
    table_schema: &StructType,
    partition_columns: &[String],
    files: &[ReadFile],
) -> Result<SchemaRef, FileError> {
    let schemas: Vec<(&str, &Schema)> = files
        .iter()
        .map(|f| (f.path.as_str(), f.schema.as_ref()))
        .collect();
    output_schema_of(table_schema, partition_columns, &schemas)
}

/// [`output_schema`] from the files' paths and schemas alone.
pub fn output_schema_of(
    table_schema: &StructType,
    partition_columns: &[String],
    files: &[(&str, &Schema)],
) -> Result<SchemaRef, FileError> {
    for (path, schema) in files {
        if let Some(extra) = schema
            .fields()
            .iter()
            .find(|f| table_schema.field(f.name()).is_none())
        {
            return Err(FileError::UnknownColumn {
                path: path.to_string(),
                column: extra.name().clone(),
            });
        }
    }
    let mut fields = Vec::new();
    for column in table_schema.fields() {
        if partition_columns.contains(column.name()) {
            continue;
        }
        let found: Vec<&Field> = files
            .iter()
            .filter_map(|(_, schema)| schema.field_with_name(column.name()).ok())
            .collect();
        let field = match found.first() {
            Some(first) => {
                let everywhere = found.len() == files.len();
                first
                    .as_ref()
                    .clone()
                    .with_nullable(first.is_nullable() || !everywhere)
            }
            None => TryIntoArrow::<Field>::try_into_arrow(column)
                .map_err(FileError::Arrow)?
                .with_nullable(true),
        };
        fields.push(field);
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// `batch` in `schema`: columns by name, cast where a file holds a
/// narrower type, null where the file predates the column.
pub fn align(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast(c, field.data_type()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// Rows ordered by (Kafka partition, offset), stably, so that readers that
/// take a file's row order for change order see it.
pub fn sort_by_kafka_position(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let key = |name: &str| -> Result<Option<Int64Array>, ArrowError> {
        batch
            .column_by_name(name)
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Int64))
            .transpose()
            .map(|c| {
                c.map(|c| {
                    c.as_any()
                        .downcast_ref::<Int64Array>()
                        .cloned()
                        .expect("cast to Int64")
                })
            })
    };
    let (Some(partition), Some(offset)) = (key(meta::KAFKA_PARTITION)?, key(meta::KAFKA_OFFSET)?)
    else {
        return Ok(batch.clone());
    };
    let at = |a: &Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    // `sort_by_key` is stable: rows with equal positions keep file order.
    order.sort_by_key(|&i| (at(&partition, i as usize), at(&offset, i as usize)));
    arrow::compute::take_record_batch(batch, &UInt32Array::from(order))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, rows: i64) -> ReadFile {
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from_iter_values(0..rows)) as _,
        )])
        .unwrap();
        ReadFile {
            path: path.to_string(),
            schema: batch.schema(),
            batches: vec![batch],
            footer: HashMap::new(),
        }
    }

    #[test]
    fn the_oldest_files_go_first_when_the_budget_is_full() {
        // Room for two files of 100 rows.
        let one = memory(&file("x", 100));
        let recent = Recent::new(2 * one + one / 2);
        recent.keep(file("a", 100));
        recent.keep(file("b", 100));
        recent.keep(file("c", 100));
        assert!(recent.take("a").is_none());
        assert_eq!(recent.take("b").unwrap().batches[0].num_rows(), 100);
        // Taken once.
        assert!(recent.take("b").is_none());
        // Taking frees its room: `d` fits beside `c`.
        recent.keep(file("d", 100));
        assert!(recent.take("c").is_some());
        assert!(recent.take("d").is_some());
        // Bigger than the budget: not kept.
        recent.keep(file("e", 10_000));
        assert!(recent.take("e").is_none());
    }
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::sync::Arc;

    #[test]
    fn file_names_are_hive_style_and_fresh() {
        let part = vec![
            ("_cdc_date".to_string(), Some("2026-12-04".to_string())),
            ("x".to_string(), None),
        ];
        let a = new_file_path(&part);
        assert!(
            a.starts_with("_cdc_date=2026-12-04/x=__HIVE_DEFAULT_PARTITION__/part-"),
            "{a}"
        );
        assert!(a.ends_with(".parquet"));
        assert_ne!(a, new_file_path(&part));
    }

    /// A file kept as it was put ([`ReadFile::written`]) is what reading
    /// it gives: the same schema, footer and rows, for every kind of
    /// column the sink writes, from a slice too.
    #[test]
    fn a_file_kept_as_written_is_the_file_as_read() {
        use arrow::array::{
            BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
            Int8Array, Int16Array, Int32Array, Int64Builder, ListBuilder, StringArray,
            StringBuilder, TimestampMicrosecondArray,
        };
        use arrow::datatypes::TimeUnit;
        let n = 500usize;
        let mut tags = ListBuilder::new(StringBuilder::new());
        for i in 0..n {
            if i % 7 == 0 {
                tags.append_null();
            } else {
                tags.values().append_value(format!("t{i}"));
                tags.values().append_null();
                tags.append(true);
            }
        }
        let tz: Arc<str> = "+00:00".into();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false)
                .with_metadata(HashMap::from([("cdc.key".to_string(), "1".to_string())])),
            Field::new("n", DataType::Int32, true),
            Field::new("text", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some(tz)),
                true,
            ),
            Field::new("amount", DataType::Decimal128(38, 10), true),
            Field::new("ratio", DataType::Float64, true),
            Field::new("flag", DataType::Boolean, true),
            Field::new("day", DataType::Date32, true),
            Field::new("blob", DataType::Binary, true),
            Field::new("tags", tags.finish().data_type().clone(), true),
            Field::new("tiny", DataType::Int8, true),
            Field::new("small", DataType::Int16, true),
            Field::new("real", DataType::Float32, true),
            Field::new(
                "local",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("price", DataType::Decimal128(9, 2), true),
            Field::new(
                "ids",
                DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
                true,
            ),
        ]));
        let mut ids = ListBuilder::new(Int64Builder::new());
        for i in 0..n as i64 {
            ids.values().append_value(i);
            ids.values().append_null();
            ids.append(i % 3 != 0);
        }
        let mut tags = ListBuilder::new(StringBuilder::new());
        for i in 0..n {
            tags.values().append_value(format!("t{i}"));
            tags.append(i % 7 != 0);
        }
        let special = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 1.5];
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
                Arc::new(Int32Array::from_iter(
                    (0..n as i32).map(|i| (i % 3 != 0).then_some(i)),
                )),
                Arc::new(StringArray::from_iter(
                    (0..n).map(|i| (i % 5 != 0).then(|| format!("row {i} ✓"))),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter(
                        (0..n as i64).map(|i| Some(i * 1_000_003)),
                    )
                    .with_timezone("+00:00"),
                ),
                Arc::new(
                    Decimal128Array::from_iter((0..n as i128).map(|i| Some(i * 10_i128.pow(12))))
                        .with_precision_and_scale(38, 10)
                        .unwrap(),
                ),
                Arc::new(Float64Array::from_iter_values(
                    (0..n).map(|i| special[i % special.len()]),
                )),
                Arc::new(BooleanArray::from_iter((0..n).map(|i| Some(i % 2 == 0)))),
                Arc::new(Date32Array::from_iter_values(0..n as i32)),
                Arc::new(BinaryArray::from_iter(
                    (0..n).map(|i| Some(vec![i as u8; i % 4])),
                )),
                Arc::new(tags.finish()),
                Arc::new(Int8Array::from_iter(
                    (0..n).map(|i| (i % 4 != 0).then_some(i as i8)),
                )),
                Arc::new(Int16Array::from_iter_values((0..n).map(|i| i as i16 - 250))),
                Arc::new(Float32Array::from_iter_values(
                    (0..n).map(|i| special[i % special.len()] as f32),
                )),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    (0..n as i64).map(|i| i * -7_000_001),
                )),
                Arc::new(
                    Decimal128Array::from_iter(
                        (0..n as i128).map(|i| (i % 6 != 0).then_some(i * 101)),
                    )
                    .with_precision_and_scale(9, 2)
                    .unwrap(),
                ),
                Arc::new(ids.finish()),
            ],
        )
        .unwrap();
        let props = writer_properties(&crate::config::SinkConfig::default().output);
        let footer = [("cdc.key".to_string(), r#"["id"]"#.to_string())];
        for rows in [batch.clone(), batch.slice(37, 300), batch.slice(37, 50)] {
            let bytes = encode_with(&rows, &props, &footer).unwrap();
            let kept = ReadFile::written("p".into(), &bytes, &rows).unwrap();
            // A small slice is copied: kept, it holds its own rows alone.
            let held = kept.batches[0].get_array_memory_size();
            assert!(
                held < batch.get_array_memory_size() / 4 || rows.num_rows() > 50,
                "{held} bytes held for {} rows",
                rows.num_rows()
            );
            let read = ReadFile::read("p".into(), bytes).unwrap();
            assert_eq!(kept.schema, read.schema);
            assert_eq!(kept.footer, read.footer);
            let all = |f: &ReadFile| arrow::compute::concat_batches(&f.schema, &f.batches).unwrap();
            // Arrow's equality compares floats by their bits: NaN included.
            let (k, r) = (all(&kept), all(&read));
            assert_eq!(k.schema(), r.schema());
            for (a, b) in k.columns().iter().zip(r.columns()) {
                assert!(a.to_data() == b.to_data(), "{} differs", a.data_type());
            }
        }
    }

    #[test]
    fn files_tell_spark_their_calendar() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).unwrap();
        let bytes = encode(
            &batch,
            &writer_properties(&crate::config::SinkConfig::default().output),
        )
        .unwrap();
        let reader = SerializedFileReader::new(bytes).unwrap();
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap();
        assert!(
            kv.iter().any(|k| k.key == "org.apache.spark.version"),
            "{kv:?}"
        );
    }

    /// A column whose values are mostly distinct (a key, a text) is
    /// written without a dictionary, one that repeats keeps it; nulls,
    /// a slice's offset and every value survive either way.
    #[test]
    fn mostly_distinct_columns_are_written_without_a_dictionary() {
        use arrow::array::{StringArray, TimestampMicrosecondArray};
        use parquet::basic::Encoding;
        let n = 3_000i64;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("user_id", DataType::Int64, true),
            Field::new("text", DataType::Utf8, true),
            Field::new("op", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n)),
                Arc::new(Int64Array::from_iter(
                    (0..n).map(|i| (i % 5 != 0).then_some(i % 40)),
                )),
                Arc::new(StringArray::from_iter(
                    (0..n).map(|i| (i % 7 != 0).then(|| format!("tweet number {i}"))),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| ["c", "u", "d"][i as usize % 3]),
                )),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    (0..n).map(|i| i * 1_000),
                )),
            ],
        )
        .unwrap()
        // A slice whose buffers start before its first row.
        .slice(500, 2_000);
        assert_eq!(mostly_unique(&batch), ["id", "text", "at"]);
        assert!(
            mostly_unique(&batch.slice(0, 100)).is_empty(),
            "too few rows to tell"
        );
        // Values that repeat further apart than the sample's first rows
        // (here every 1,002 rows) are not taken for unique.
        let cycled = Int64Array::from_iter_values((0..20_000).map(|i| i % 1_002));
        let cycled = RecordBatch::try_from_iter([("c", Arc::new(cycled) as ArrayRef)]).unwrap();
        assert!(mostly_unique(&cycled).is_empty());

        let bytes = encode(
            &batch,
            &writer_properties(&crate::config::SinkConfig::default().output),
        )
        .unwrap();
        let reader = SerializedFileReader::new(bytes.clone()).unwrap();
        let row_group = reader.metadata().row_group(0);
        for c in row_group.columns() {
            let dictionary = c.encodings().any(|e| e == Encoding::RLE_DICTIONARY);
            let name = c.column_path().string();
            assert_eq!(
                dictionary,
                ["user_id", "op"].contains(&name.as_str()),
                "{name}"
            );
        }
        let read = ReadFile::read("f".to_string(), bytes).unwrap();
        let read =
            arrow::compute::concat_batches(&read.batches[0].schema(), &read.batches).unwrap();
        assert_eq!(read, batch);
    }
}
