//! Parquet encoding of one batch, in memory.

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
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
