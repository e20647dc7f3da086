//! Parquet files in the object store, under keys derived only from what
//! they contain.
//!
//! [`Writer::write_segment`] first records an [`Intent`] (the offset range
//! about to be written), then puts one Parquet object per group. Every key
//! is a function of topic, partition and offsets, so writing the same range
//! again overwrites the same objects with the same rows. Committing offsets
//! to Kafka is a separate, later step (see `commit`).

use std::sync::Arc;

use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use base64::Engine;
use bytes::Bytes;
use chrono::NaiveDate;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::batch::Segment;
use crate::config::{CompressionCodec, OutputConfig};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("building a record batch failed")]
    Arrow(#[from] ArrowError),
    #[error("encoding Parquet failed")]
    Parquet(#[from] ParquetError),
    #[error("object store request failed")]
    Store(#[from] object_store::Error),
    #[error("intent object {key} is corrupt")]
    Intent {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The offset range of a segment, recorded before its files are written so
/// that a replay after a crash closes the segment at the same offset and
/// rewrites exactly the same objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub first: i64,
    pub last: i64,
}

/// `table` is the last dot-separated part of the topic (`twitter.tweets`
/// is `tweets`).
pub fn table_of(topic: &str) -> &str {
    topic.rsplit('.').next().unwrap_or(topic)
}

/// `{prefix}/{table}/date={date}/{topic}-p{partition}-{first}-{last}-{n}.parquet`,
/// offsets zero-padded so that keys sort in offset order.
pub fn data_key(
    prefix: &Path,
    topic: &str,
    partition: i32,
    date: NaiveDate,
    first: i64,
    last: i64,
    n: usize,
) -> Path {
    prefix
        .clone()
        .join(table_of(topic))
        .join(format!("date={}", date.format("%Y-%m-%d")))
        .join(format!(
            "{topic}-p{partition:03}-{first:020}-{last:020}-{n}.parquet"
        ))
}

pub fn intent_key(prefix: &Path, topic: &str, partition: i32, first: i64) -> Path {
    prefix
        .clone()
        .join("_cdc_sink")
        .join("intents")
        .join(topic)
        .join(format!("p{partition:03}"))
        .join(format!("{first:020}.json"))
}

pub fn quarantine_key(prefix: &Path, topic: &str, partition: i32, offset: i64) -> Path {
    prefix
        .clone()
        .join("_quarantine")
        .join(topic)
        .join(format!("p{partition:03}"))
        .join(format!("{offset:020}.json"))
}

/// What is kept of a message that could not be decoded: everything needed
/// to replay it by hand once the cause is fixed.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    /// The key and value exactly as received, base64 encoded.
    pub key_base64: Option<String>,
    pub value_base64: Option<String>,
}

/// A segment ready to upload: its intent and its files (key, rows, bytes).
pub struct EncodedSegment {
    pub intent_key: Path,
    pub intent: Bytes,
    pub files: Vec<(Path, usize, Bytes)>,
}

pub struct Writer {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    props: WriterProperties,
}

impl Writer {
    pub fn new(store: Arc<dyn ObjectStore>, output: &OutputConfig) -> Writer {
        Writer {
            store,
            prefix: Path::from(output.prefix.trim_matches('/')),
            props: writer_properties(output),
        }
    }

    pub async fn read_intent(
        &self,
        topic: &str,
        partition: i32,
        first: i64,
    ) -> Result<Option<Intent>, WriteError> {
        let key = intent_key(&self.prefix, topic, partition, first);
        match self.store.get(&key).await {
            Ok(got) => {
                let bytes = got.bytes().await?;
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| WriteError::Intent {
                        key: key.to_string(),
                        source,
                    })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Encodes every group of the segment as one Parquet file. Builders are
    /// consumed, so this runs once per segment; [`Writer::put_segment`] may
    /// then be retried freely.
    pub fn encode_segment(
        &self,
        topic: &str,
        partition: i32,
        segment: &mut Segment,
    ) -> Result<EncodedSegment, WriteError> {
        let (first, last) = (segment.first, segment.last);
        let mut files = Vec::new();
        for (n, group) in segment.groups_mut().iter_mut().enumerate() {
            let rows = group.rows();
            let batch = group.finish()?;
            let key = data_key(&self.prefix, topic, partition, group.date, first, last, n);
            files.push((key, rows, encode(&batch, &self.props)?));
        }
        let intent = serde_json::to_vec(&Intent { first, last }).expect("serialisable");
        Ok(EncodedSegment {
            intent_key: intent_key(&self.prefix, topic, partition, first),
            intent: Bytes::from(intent),
            files,
        })
    }

    /// Writes the intent, then the files. A segment without rows writes
    /// nothing: there is nothing to replay identically.
    pub async fn put_segment(&self, segment: &EncodedSegment) -> Result<(), WriteError> {
        if segment.files.is_empty() {
            return Ok(());
        }
        self.store
            .put(
                &segment.intent_key,
                PutPayload::from(segment.intent.clone()),
            )
            .await?;
        let puts = segment
            .files
            .iter()
            .map(|(key, _, body)| self.store.put(key, PutPayload::from(body.clone())));
        futures::future::try_join_all(puts).await?;
        Ok(())
    }

    pub async fn quarantine(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        error: &str,
    ) -> Result<Path, WriteError> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let record = QuarantineRecord {
            topic: topic.to_string(),
            partition,
            offset,
            error: error.to_string(),
            key_base64: key.map(b64),
            value_base64: value.map(b64),
        };
        let path = quarantine_key(&self.prefix, topic, partition, offset);
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        self.store.put(&path, PutPayload::from(body)).await?;
        Ok(path)
    }
}

fn writer_properties(output: &OutputConfig) -> WriterProperties {
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
pub fn encode(batch: &RecordBatch, props: &WriterProperties) -> Result<Bytes, WriteError> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 2);
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props.clone()))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hive_partitioned_and_sortable() {
        let prefix = Path::from("");
        let d = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap();
        assert_eq!(
            data_key(&prefix, "twitter.tweets", 2, d, 100, 180, 0).as_ref(),
            "tweets/date=2026-11-24/twitter.tweets-p002-00000000000000000100-00000000000000000180-0.parquet"
        );
        assert_eq!(
            data_key(&Path::from("lake/v1"), "twitter.users", 0, d, 1, 1, 1).as_ref(),
            "lake/v1/users/date=2026-11-24/twitter.users-p000-00000000000000000001-00000000000000000001-1.parquet"
        );
        assert_eq!(
            intent_key(&prefix, "twitter.users", 1, 7).as_ref(),
            "_cdc_sink/intents/twitter.users/p001/00000000000000000007.json"
        );
        assert_eq!(
            quarantine_key(&prefix, "twitter.users", 1, 7).as_ref(),
            "_quarantine/twitter.users/p001/00000000000000000007.json"
        );
    }

    use std::sync::Arc;

    use arrow::array::{Array, AsArray, Decimal128Array};
    use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
    use object_store::memory::InMemory;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use crate::batch::Segment;
    use crate::config::SinkConfig;
    use crate::decode::{Decoded, Decoder};

    fn segment_from(corpus: &str) -> Segment {
        let mut d = Decoder::new();
        let mut seg = Segment::new(0);
        for (offset, line) in corpus.lines().enumerate() {
            match d.decode(Some(line.as_bytes())).unwrap() {
                Decoded::Row(r) => seg.push(&r, 0, offset as i64, line.len()),
                Decoded::Tombstone => seg.cover(offset as i64),
            }
        }
        seg
    }

    async fn read_back(store: &InMemory, key: &Path) -> Vec<RecordBatch> {
        let bytes = store.get(key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[tokio::test]
    async fn segment_round_trips_through_parquet() {
        let store = Arc::new(InMemory::new());
        let writer = Writer::new(store.clone(), &SinkConfig::default().output);
        let mut seg = segment_from(crate::decode::tests::TYPE_ZOO);
        let encoded = writer
            .encode_segment("fixtures.public.type_zoo", 0, &mut seg)
            .unwrap();
        writer.put_segment(&encoded).await.unwrap();

        // Two schemas (before and after ALTER TABLE ... ADD COLUMN), one date.
        assert_eq!(encoded.files.len(), 2);
        let (first_key, first_rows, _) = &encoded.files[0];
        assert!(
            first_key.as_ref().starts_with("type_zoo/date=2026-"),
            "{first_key}"
        );
        assert!(
            first_key
                .as_ref()
                .ends_with("-p000-00000000000000000000-00000000000000000005-0.parquet")
        );
        assert_eq!(*first_rows, 4);

        let batches = read_back(&store, first_key).await;
        let batch = &batches[0];
        let schema = batch.schema();
        let utc_us = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(
            schema.field_with_name("zoned_ts").unwrap().data_type(),
            &utc_us
        );
        assert_eq!(
            schema.field_with_name("local_ts").unwrap().data_type(),
            &utc_us
        );
        assert_eq!(
            schema.field_with_name("price").unwrap().data_type(),
            &DataType::Decimal128(10, 3)
        );
        assert_eq!(
            schema
                .field_with_name("_cdc_commit_ts")
                .unwrap()
                .data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        );
        let ids = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let row = (0..batch.num_rows()).find(|&i| ids.value(i) == 1).unwrap();
        let zoned = batch
            .column_by_name("zoned_ts")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(zoned.value(row), 1_709_205_255_654_321);
        let price = batch
            .column_by_name("price")
            .unwrap()
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap();
        assert_eq!(price.value_as_string(row), "12345.678");
        let tags = batch
            .column_by_name("tags")
            .unwrap()
            .as_list::<i32>()
            .value(row);
        assert_eq!(tags.as_string::<i32>().value(2), "日本");

        // The intent records the range for a replay.
        let intent = writer
            .read_intent("fixtures.public.type_zoo", 0, 0)
            .await
            .unwrap();
        assert_eq!(intent, Some(Intent { first: 0, last: 5 }));

        let (second_key, _, _) = &encoded.files[1];
        let after = read_back(&store, second_key).await;
        assert!(after[0].schema().field_with_name("added_later").is_ok());
    }

    #[tokio::test]
    async fn unchanged_toast_becomes_null_and_is_listed() {
        let store = Arc::new(InMemory::new());
        let writer = Writer::new(store.clone(), &SinkConfig::default().output);
        let users: String = crate::decode::tests::TWITTER
            .lines()
            .filter(|l| l.contains("\"table\":\"users\""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut seg = segment_from(&users);
        let encoded = writer.encode_segment("twitter.users", 1, &mut seg).unwrap();
        writer.put_segment(&encoded).await.unwrap();
        let batch = &read_back(&store, &encoded.files[0].0).await[0];
        let ops = batch.column_by_name("_cdc_op").unwrap().as_string::<i32>();
        let bio = batch.column_by_name("bio").unwrap();
        let unchanged = batch
            .column_by_name("_cdc_unchanged_cols")
            .unwrap()
            .as_list::<i32>();
        let update = (0..batch.num_rows())
            .find(|&i| ops.value(i) == "u")
            .unwrap();
        assert!(
            bio.is_null(update),
            "the placeholder is never written as data"
        );
        assert_eq!(unchanged.value(update).as_string::<i32>().value(0), "bio");
        let insert = (0..batch.num_rows())
            .find(|&i| ops.value(i) == "c")
            .unwrap();
        assert!(unchanged.is_null(insert));
        assert!(!bio.is_null(insert));
    }

    #[tokio::test]
    async fn rewriting_a_segment_is_idempotent() {
        let store = Arc::new(InMemory::new());
        let writer = Writer::new(store.clone(), &SinkConfig::default().output);
        let first = writer
            .encode_segment(
                "t.type_zoo",
                0,
                &mut segment_from(crate::decode::tests::TYPE_ZOO),
            )
            .unwrap();
        let again = writer
            .encode_segment(
                "t.type_zoo",
                0,
                &mut segment_from(crate::decode::tests::TYPE_ZOO),
            )
            .unwrap();
        writer.put_segment(&first).await.unwrap();
        writer.put_segment(&again).await.unwrap();
        let keys: Vec<_> = first.files.iter().map(|f| f.0.clone()).collect();
        assert_eq!(
            keys,
            again.files.iter().map(|f| f.0.clone()).collect::<Vec<_>>()
        );
        for ((_, _, a), (_, _, b)) in first.files.iter().zip(&again.files) {
            assert_eq!(a, b, "same rows, same bytes");
        }
        use futures::TryStreamExt;
        let listed: Vec<_> = store.list(None).try_collect().await.unwrap();
        assert_eq!(
            listed.len(),
            keys.len() + 1,
            "the files and one intent, nothing more"
        );
    }
}
