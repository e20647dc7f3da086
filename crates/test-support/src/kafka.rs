//! The stack's Kafka (`CDC_SINK_KAFKA__BROKERS`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::stack::{env, unique};
use crate::wait::wait_until;

/// An offset per (topic, partition): watermarks, a range's ends, a group's
/// committed offsets.
pub type Offsets = BTreeMap<(String, i32), i64>;

const UNREACHABLE: &str = "Kafka of the local stack is not reachable (tests/stack.sh up)";

fn config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", env("CDC_SINK_KAFKA__BROKERS"));
    c
}

/// A consumer in `group` that never commits on its own.
pub fn consumer(group: &str) -> BaseConsumer {
    config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer")
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    config().create().expect("kafka admin client")
}

pub fn producer() -> FutureProducer {
    config().create().expect("kafka producer")
}

/// Creates `topic` with `partitions` partitions (one replica).
pub async fn create_topic(topic: &str, partitions: i32) {
    let res = admin()
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect(UNREACHABLE);
    for r in res {
        r.unwrap();
    }
}

/// Produces `value` (a tombstone for `None`) to one partition; returns its
/// offset.
pub async fn send(p: &FutureProducer, topic: &str, partition: i32, value: Option<&[u8]>) -> i64 {
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).partition(partition);
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    let delivery = p.send(rec, Duration::from_secs(10)).await.unwrap();
    delivery.offset
}

/// High watermarks of every partition of `topics` (none for a topic that
/// does not exist yet).
pub fn watermarks(c: &BaseConsumer, topics: &[&str]) -> Offsets {
    let mut out = BTreeMap::new();
    for t in topics {
        let md = c
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect(UNREACHABLE);
        for p in md.topics()[0].partitions() {
            let (_, high) = c
                .fetch_watermarks(t, p.id(), Duration::from_secs(10))
                .unwrap();
            out.insert((t.to_string(), p.id()), high);
        }
    }
    out
}

/// One Kafka message as it is in the log.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Every message from `from` (the log start where absent) up to `until`
/// (exclusive), per partition.
pub fn read_range(from: &Offsets, until: &Offsets) -> Vec<RawMessage> {
    let c = consumer(&format!("reader-{}", unique()));
    let mut tpl = TopicPartitionList::new();
    let mut total = 0;
    for (tp, high) in until.iter() {
        // Retention or DeleteRecords may have moved the log start past 0.
        let (log_start, _) = c
            .fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10))
            .unwrap();
        let low = from.get(tp).copied().unwrap_or(0).max(log_start);
        total += (high - low).max(0);
        tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(low))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (out.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "timed out reading topics back: {} of {total} messages",
            out.len()
        );
        // The poll itself waits for the next message.
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            let high = until[&(m.topic().to_string(), m.partition())];
            if m.offset() < high {
                out.push(RawMessage {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
            }
        }
    }
    out
}

/// `group`'s committed offsets of the partitions in `of` (0 where it has
/// committed none).
pub fn committed(group: &str, of: &Offsets) -> Offsets {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in of.keys() {
        tpl.add_partition(t, *p);
    }
    consumer(group)
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect(UNREACHABLE)
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            ((e.topic().to_string(), e.partition()), o)
        })
        .collect()
}

/// Waits until `group` has committed every partition up to `until`, at
/// most two minutes.
pub async fn wait_committed(group: &str, until: &Offsets) {
    wait_until(
        &format!("group {group} to commit up to {until:?}"),
        Duration::from_secs(120),
        async || {
            let behind: Vec<String> = committed(group, until)
                .iter()
                .filter(|(tp, have)| **have < until[*tp])
                .map(|((t, p), have)| format!("{t}[{p}] {have}/{}", until[&(t.clone(), *p)]))
                .collect();
            if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("behind: {behind:?}"))
            }
        },
    )
    .await;
}

/// Sets `group`'s committed offsets. The broker refuses while a member is
/// registered, and a stopped consumer's static membership lasts until its
/// session times out, so this retries until the broker accepts (at most
/// 40 s).
pub async fn commit_offsets(group: &str, offsets: &Offsets) {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in offsets {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o)).unwrap();
    }
    if tpl.count() == 0 {
        return;
    }
    wait_until(
        &format!("the broker to accept {group}'s offsets"),
        Duration::from_secs(40),
        async || consumer(group).commit(&tpl, CommitMode::Sync),
    )
    .await;
}
