//! The schema topic of the schema-id format: a compacted topic on which
//! `debezium/converter`'s SchemaIdConverter publishes each distinct value
//! schema once, keyed by its fingerprint, before the first message that
//! names it (in an Avro value's frame, or the `cdclake.schema` header).
//!
//! Read whole, to its end, whenever a message names a fingerprint the
//! decoder does not know: the topic holds one small record per schema
//! version, and the converter's order of writes means that a schema not
//! there after reading to the end never will be.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// How long one read of the whole topic may take before it counts as failed.
const READ_DEADLINE: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SchemaTopicError {
    #[error("reading schema topic `{topic}`")]
    Kafka {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "schema topic `{0}` does not exist (kafka.schema_topic names the topic the converter writes)"
    )]
    Missing(String),
    #[error("schema topic `{0}` was not read to its end within 30 s")]
    Slow(String),
    #[error("the schema topic reader stopped: {0}")]
    Stopped(String),
}

/// One schema as published: the fingerprint the messages name, and the
/// Connect schema's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedSchema {
    pub fingerprint: Vec<u8>,
    pub json: String,
}

pub struct SchemaTopic {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl SchemaTopic {
    /// A reader with the source's brokers and client properties (TLS,
    /// SASL), and no consumer group: it assigns partitions itself and
    /// never commits.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut client = ClientConfig::new();
        for (k, v) in &cfg.properties {
            client.set(k, v);
        }
        let consumer: BaseConsumer = client
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", format!("{}.schemas", cfg.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set_log_level(RDKafkaLogLevel::Warning)
            .create()?;
        Ok(SchemaTopic {
            consumer: Arc::new(consumer),
            topic: cfg.schema_topic.clone(),
        })
    }

    /// Every schema on the topic (the last record of each fingerprint).
    pub async fn read_all(&self) -> Result<Vec<PublishedSchema>, SchemaTopicError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        // librdkafka's calls block: off the async runtime.
        tokio::task::spawn_blocking(move || read_all(&consumer, &topic))
            .await
            .map_err(|e| SchemaTopicError::Stopped(e.to_string()))?
    }
}

fn read_all(c: &BaseConsumer, topic: &str) -> Result<Vec<PublishedSchema>, SchemaTopicError> {
    let kafka = |source| SchemaTopicError::Kafka {
        topic: topic.to_string(),
        source,
    };
    let metadata = c
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(SchemaTopicError::Missing(topic.to_string()));
    }
    // Each partition's end now: everything published before the message
    // that sent us here is below it.
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = c
            .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
            .map_err(kafka)?;
        if high > low {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(kafka)?;
            ends.insert(p, high);
        }
    }
    let mut found: HashMap<Vec<u8>, String> = HashMap::new();
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    c.assign(&assignment).map_err(kafka)?;
    let deadline = Instant::now() + READ_DEADLINE;
    let result = loop {
        if ends.is_empty() {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(SchemaTopicError::Slow(topic.to_string()));
        }
        match c.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => break Err(kafka(e)),
            Some(Ok(m)) => {
                match (m.key(), m.payload()) {
                    (Some(k), Some(v)) => {
                        found.insert(k.to_vec(), String::from_utf8_lossy(v).into_owned());
                    }
                    // A compaction tombstone: that schema is gone.
                    (Some(k), None) => {
                        found.remove(k);
                    }
                    _ => {}
                }
                if ends
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() + 1 >= *end)
                {
                    ends.remove(&m.partition());
                }
            }
        }
    };
    c.unassign().map_err(kafka)?;
    result?;
    Ok(found
        .into_iter()
        .map(|(fingerprint, json)| PublishedSchema { fingerprint, json })
        .collect())
}
