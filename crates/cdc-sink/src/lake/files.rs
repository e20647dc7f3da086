//! Data files: what the changelog writer and upkeep both put in a table.
//!
//! One [`FileWriter`] encodes a batch as Parquet (off the async runtime, a
//! bounded number at once), names it afresh in its Hive-style partition
//! directory, puts it (multipart when large) and returns the `Add` action
//! that commits it. Nothing here commits: a file put and never committed is
//! invisible to readers and left for vacuum.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::{Array, ArrayRef, Int64Array, UInt32Array, new_null_array};
use arrow::datatypes::{Field, Schema, SchemaRef};
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
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props.clone()))?;
    for (key, value) in footer {
        writer.append_key_value_metadata(KeyValue::new(key.clone(), value.clone()));
    }
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(buf))
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
}

impl FileWriter {
    pub fn new(props: WriterProperties) -> FileWriter {
        FileWriter {
            props: Arc::new(props),
            encoders: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
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
        let bytes = match tokio::task::spawn_blocking(move || {
            let bytes = encode_with(&to_encode, &props, &footer);
            drop(permit);
            bytes
        })
        .await
        {
            Ok(done) => done?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let path = new_file_path(&partition);
        let size = bytes.len();
        upload(store, &Path::from(path.as_str()), bytes)
            .await
            .map_err(|source| FileError::Put {
                path: path.clone(),
                source,
            })?;
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

/// One data file, read whole (files are bounded: compaction reads small
/// ones, the current-state writer the changelog's and its own).
pub struct ReadFile {
    pub path: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The footer's key-value metadata.
    pub footer: HashMap<String, String>,
}

impl ReadFile {
    pub fn read(path: String, bytes: Bytes) -> Result<ReadFile, FileError> {
        let read_err = |source| FileError::Read {
            path: path.clone(),
            source,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(read_err)?;
        let footer = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .into_iter()
            .flatten()
            .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
            .collect();
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
}
