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

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use deltalake::kernel::Add;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tokio::sync::Semaphore;

use crate::config::{CompressionCodec, OutputConfig};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("encoding Parquet failed")]
    Encode(#[from] ParquetError),
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
