//! Parquet encoding of one batch, in memory.

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::config::{CompressionCodec, OutputConfig};

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
/// by the roll policy, so buffering one is cheaper than a multipart upload.
pub fn encode(batch: &RecordBatch, props: &WriterProperties) -> Result<Bytes, ParquetError> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props.clone()))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::sync::Arc;

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
