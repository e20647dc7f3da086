//! The Kafka side: a consumer-group member whose offsets are only ever
//! committed by hand, plus what it observes about rebalances and broker
//! health; and [`position`], where each assigned partition stands.
//!
//! [`Source`] is what the loop needs of its input; [`KafkaSource`] wraps
//! the rdkafka `StreamConsumer` (the pipeline's tests drive the loop with a
//! scripted one). Rebalances are reported as
//! [`Rebalance`] events on a channel that the pipeline drains before every
//! message, so buffers of revoked partitions are dropped before anything
//! else happens. Kafka's committed offsets are written for lag tools only:
//! where a partition resumes is decided by the lake (see `position`).
//! [`schemas`] reads the schema topic of the schema-id message format.

pub mod position;
pub mod schemas;

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance as RdRebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::source::position::Tp;
use crate::source::schemas::{PublishedSchema, SchemaTopic, SchemaTopicError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

pub struct SourceContext {
    events: mpsc::UnboundedSender<Rebalance>,
    /// Last time librdkafka reported a broker UP. A std mutex is fine: it
    /// is held for one assignment and never across an await.
    last_broker_up: Arc<Mutex<Instant>>,
    /// Consumer lag summed over the assigned partitions, as of the last
    /// statistics (every 5 s).
    lag: Arc<AtomicI64>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| Tp::new(e.topic(), e.partition()))
        .collect()
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        if stats.brokers.values().any(|b| b.state == "UP") {
            *self.last_broker_up.lock().expect("not poisoned") = Instant::now();
        }
        let mut total = 0;
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal unassigned partition; a lag
                // of -1 means not known (not assigned to this member).
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                total += p.consumer_lag;
                metrics::gauge!(crate::telemetry::CONSUMER_LAG,
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
        self.lag.store(total, Ordering::Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &RdRebalance<'_>) {
        if let RdRebalance::Revoke(tpl) = rebalance {
            let tps = partitions(tpl);
            tracing::info!(partitions = ?tps, "partitions revoked");
            let _ = self.events.send(Rebalance::Revoked(tps));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &RdRebalance<'_>) {
        match rebalance {
            RdRebalance::Assign(tpl) => {
                let tps = partitions(tpl);
                tracing::info!(partitions = ?tps, "partitions assigned");
                let _ = self.events.send(Rebalance::Assigned(tps));
            }
            RdRebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            RdRebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // The next commit supersedes this one. Kafka's offsets only
            // report lag: the lake's own log says where to resume.
            tracing::warn!(error = %e, offsets = ?partitions(offsets), "offset commit failed");
        }
    }
}

/// What the loop needs of its input.
pub trait Source {
    type Message<'a>: rdkafka::Message
    where
        Self: 'a;

    /// The messages of every assigned, unpaused partition, as they come;
    /// it never ends. Its `next()` is cancel safe, and a poll that finds a
    /// message ready takes it without waiting (what lets the loop take a
    /// burst of them between its other work). One stream serves the whole
    /// loop: librdkafka's stream registers a waker slot, under a lock, each
    /// time one is made.
    fn messages(&self) -> impl Stream<Item = KafkaResult<Self::Message<'_>>> + Send + Unpin;

    /// Commits `offset` (the next to read) for each partition, for lag
    /// tools: nothing in the sink reads these back.
    fn commit(&self, offsets: &[(Tp, i64)], mode: CommitMode) -> KafkaResult<()>;

    /// Stops fetching every assigned partition until [`Source::resume`];
    /// the group membership holds meanwhile.
    fn pause(&self) -> KafkaResult<()>;

    fn resume(&self) -> KafkaResult<()>;

    /// Sends the consumer of one partition to `offset`; whatever was
    /// fetched before is discarded.
    fn seek(&self, tp: &Tp, offset: i64) -> KafkaResult<()>;

    /// Messages not yet committed over the assigned partitions.
    fn lag(&self) -> i64;

    /// How long since a broker was last heard from.
    fn broker_down_for(&self) -> Duration;

    /// Every schema on the schema topic (the schema-id format), read to
    /// its end.
    fn read_schemas(
        &self,
    ) -> impl Future<Output = Result<Vec<PublishedSchema>, SchemaTopicError>> + Send;
}

pub struct KafkaSource {
    consumer: StreamConsumer<SourceContext>,
    schemas: SchemaTopic,
    last_broker_up: Arc<Mutex<Instant>>,
    lag: Arc<AtomicI64>,
}

/// Rebalances, in the order librdkafka reported them. Kept apart from
/// the source so that draining them never conflicts with a message still
/// borrowed from the consumer.
pub type Rebalances = mpsc::UnboundedReceiver<Rebalance>;

impl KafkaSource {
    pub fn connect(cfg: &KafkaConfig) -> KafkaResult<(KafkaSource, Rebalances)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let last_broker_up = Arc::new(Mutex::new(Instant::now()));
        let lag = Arc::new(AtomicI64::new(0));
        let context = SourceContext {
            events: tx,
            last_broker_up: last_broker_up.clone(),
            lag: lag.clone(),
        };
        let mut client = ClientConfig::new();
        for (k, v) in &cfg.properties {
            client.set(k, v);
        }
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            // Offsets are committed by the pipeline after the Delta commit,
            // never by librdkafka on a timer.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("statistics.interval.ms", "5000")
            // Bound what librdkafka prefetches, so memory stays bounded
            // while the pipeline is busy writing.
            .set_log_level(RDKafkaLogLevel::Warning);
        for (key, value) in [
            ("queued.max.messages.kbytes", "16384"),
            // librdkafka waits this long before fetching again once the
            // queue above was full; its default of 1 s made a drain wait
            // more than it worked (about 10k rows/s instead of 100k).
            ("fetch.queue.backoff.ms", "10"),
            ("fetch.max.bytes", "16777216"),
            // A crashed sink's partitions move on after 10 s, not 45 s.
            ("session.timeout.ms", "10000"),
        ] {
            if client.get(key).is_none() {
                client.set(key, value);
            }
        }
        // A topic created after subscribing (a newly captured table) is
        // seen at the next metadata refresh; librdkafka's default is 5 min.
        if client.get("topic.metadata.refresh.interval.ms").is_none() {
            client.set(
                "topic.metadata.refresh.interval.ms",
                cfg.metadata_refresh_ms.to_string(),
            );
        }
        if let Some(id) = &cfg.instance_id {
            client.set("group.instance.id", id);
        }
        let consumer: StreamConsumer<SourceContext> = client.create_with_context(context)?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok((
            KafkaSource {
                consumer,
                schemas: SchemaTopic::new(cfg)?,
                last_broker_up,
                lag,
            },
            rx,
        ))
    }
}

impl Source for KafkaSource {
    type Message<'a> = rdkafka::message::BorrowedMessage<'a>;

    fn messages(&self) -> impl Stream<Item = KafkaResult<Self::Message<'_>>> + Send + Unpin {
        self.consumer.stream()
    }

    /// As of librdkafka's last statistics (every 5 s).
    fn lag(&self) -> i64 {
        self.lag.load(Ordering::Relaxed)
    }

    fn broker_down_for(&self) -> Duration {
        self.last_broker_up.lock().expect("not poisoned").elapsed()
    }

    fn commit(&self, offsets: &[(Tp, i64)], mode: CommitMode) -> KafkaResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in offsets {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
        }
        self.consumer.commit(&tpl, mode)
    }

    /// librdkafka keeps serving the group (heartbeats, rebalances) and
    /// drops what it had prefetched; after [`Source::resume`] it fetches
    /// again from the next offset the pipeline has not received.
    fn pause(&self) -> KafkaResult<()> {
        self.consumer.pause(&self.consumer.assignment()?)
    }

    fn resume(&self) -> KafkaResult<()> {
        self.consumer.resume(&self.consumer.assignment()?)
    }

    fn seek(&self, tp: &Tp, offset: i64) -> KafkaResult<()> {
        // librdkafka refuses a seek to an absolute 0 on some versions;
        // the beginning is the same place.
        let to = if offset == 0 {
            Offset::Beginning
        } else {
            Offset::Offset(offset)
        };
        self.consumer
            .seek(&tp.topic, tp.partition, to, Duration::from_secs(10))
    }

    fn read_schemas(
        &self,
    ) -> impl Future<Output = Result<Vec<PublishedSchema>, SchemaTopicError>> + Send {
        self.schemas.read_all()
    }
}
