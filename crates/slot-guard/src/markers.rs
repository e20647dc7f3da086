//! The recovery markers: one record in every partition of every captured
//! table's topic, written once the re-snapshot is wholly in Kafka.
//!
//! Written after Connect has committed an offset past the snapshot's end
//! (Connect commits an offset only once every record before it is
//! acknowledged by Kafka), so in each partition the marker comes after
//! every row of the snapshot. The sink writes it into the table's
//! changelog, and a current-state table that has applied the markers of
//! all its partitions removes the rows last changed before
//! `slotStartLsn`: the ones deleted while the slot was lost. The value is
//! the JSON the sink reads (`cdc-sink`'s `decode::marker`); the header
//! [`HEADER`] = `recovery` tells it from a Debezium event.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;

/// The marker header, its kind and the marker's value: the sink reads
/// them, and both take them from `cdc-wire`.
pub use cdc_wire::{MARKER_HEADER as HEADER, RECOVERY as KIND, RecoveryMarker};

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("Kafka: {what}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    #[error("no topic matches `kafka.topics` ({0}): no table to mark")]
    NoTopics(String),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub topics: Vec<String>,
    pub records: usize,
}

/// Which topics get a marker: those `patterns` take (names, or patterns
/// starting with `^`, as the sink's subscription), and only of a table
/// that was re-snapshotted (`tables`, schema-qualified), named as the sink
/// names a changelog: by the topic's last part. A table no longer
/// captured keeps its topic, and the sink still reads it; a marker there,
/// with no snapshot before it, would empty its current-state table.
fn matches(patterns: &[regex::Regex], names: &[String], tables: &[String], topic: &str) -> bool {
    let subscribed = names.iter().any(|n| n == topic) || patterns.iter().any(|r| r.is_match(topic));
    let table = topic.rsplit('.').next();
    subscribed && tables.iter().any(|t| t.rsplit('.').next() == table)
}

/// Writes the marker of recovery `id` to every partition of the topic of
/// every table in `tables` that `config.topics` matches.
pub async fn publish(
    config: &KafkaConfig,
    tables: &[String],
    id: &str,
    slot: &str,
    slot_start_lsn: i64,
    slot_start_ms: i64,
) -> Result<Marked, MarkerError> {
    let kafka = |what: &str| {
        let what = what.to_string();
        move |source| MarkerError::Kafka { what, source }
    };
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .create()
        .map_err(kafka("creating a producer"))?;
    // Topic names and partition ids, read off the metadata (which is not
    // `Send`) before any await.
    let topics: Vec<(String, Vec<i32>)> = {
        let producer = producer.clone();
        let (names, patterns): (Vec<String>, Vec<String>) = config
            .topics
            .iter()
            .cloned()
            .partition(|t| !t.starts_with('^'));
        // Validated with the configuration.
        let patterns: Vec<regex::Regex> = patterns
            .iter()
            .filter_map(|p| regex::Regex::new(p).ok())
            .collect();
        let tables = tables.to_vec();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(30))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| {
                            matches(&patterns, &names, &tables, t.name())
                                && !t.partitions().is_empty()
                        })
                        .map(|t| {
                            let ids = t.partitions().iter().map(|p| p.id()).collect();
                            (t.name().to_string(), ids)
                        })
                        .collect()
                })
        })
        .await
        .expect("metadata fetch does not panic")
        .map_err(kafka("reading topic metadata"))?
    };
    let completed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut marked = Marked {
        topics: Vec::new(),
        records: 0,
    };
    for (topic, partitions) in topics {
        let value = RecoveryMarker {
            id: id.to_string(),
            slot: slot.to_string(),
            slot_start_lsn,
            slot_start_ms,
            partitions: partitions.len() as i32,
            completed_at_ms,
        }
        .to_json();
        for p in partitions {
            let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic)
                .partition(p)
                .payload(value.as_bytes())
                .headers(OwnedHeaders::new().insert(Header {
                    key: HEADER,
                    value: Some(KIND),
                }));
            producer
                .send(record, Duration::from_secs(60))
                .await
                .map_err(|(e, _)| kafka(&format!("writing the marker to {topic}/{p}"))(e))?;
            marked.records += 1;
        }
        marked.topics.push(topic);
    }
    if marked.topics.is_empty() {
        return Err(MarkerError::NoTopics(config.topics.join(", ")));
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_subscribed_topics_of_snapshotted_tables_get_markers() {
        let p = vec![regex::Regex::new(r"^twitter\..*").unwrap()];
        let names = vec!["other.likes".to_string()];
        let tables = vec!["public.users".to_string(), "public.likes".to_string()];
        let m = |topic| matches(&p, &names, &tables, topic);
        assert!(m("twitter.users"));
        assert!(m("other.likes"));
        assert!(!m("twitter.tweets"), "a table not re-snapshotted");
        assert!(!m("__debezium-heartbeat.twitter"));
        assert!(!m("others.users"), "not subscribed");
    }
}
