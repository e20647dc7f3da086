//! The stack's Kafka (`CDC_SINK_KAFKA__BROKERS`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backon::BlockingRetryable;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
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

/// Produces `value` with `headers` and an optional message key; returns
/// its offset.
pub async fn send_with_headers(
    p: &FutureProducer,
    topic: &str,
    partition: i32,
    key: Option<&[u8]>,
    value: &[u8],
    headers: &[(&str, &[u8])],
) -> i64 {
    let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(*v),
        })
    });
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .partition(partition)
        .payload(value)
        .headers(headers);
    if let Some(k) = key {
        rec = rec.key(k);
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
            // A topic just created may have no leader for a moment
            // (NotLeaderForPartition): asked again, briefly.
            let fetch = || c.fetch_watermarks(t, p.id(), Duration::from_secs(10));
            let (_, high) = fetch
                .retry(
                    backon::ConstantBuilder::default()
                        .with_delay(Duration::from_millis(250))
                        .with_max_times(40),
                )
                .sleep(std::thread::sleep)
                .call()
                .unwrap();
            out.insert((t.to_string(), p.id()), high);
        }
    }
    out
}

/// One Kafka message. `value` is JSON with schemas whatever the format in
/// the log ([`json_with_schema`]), and `schema_id` keeps the schema-id
/// header it had.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub schema_id: Option<String>,
}

/// The headers of the schema-id format and its topic's default name, as
/// the programs name them.
pub use cdc_wire::{DEFAULT_SCHEMA_TOPIC as SCHEMA_TOPIC, ENCODING_HEADER, SCHEMA_HEADER};

/// Every schema on the schema topic, by fingerprint (none if the topic does
/// not exist).
pub fn published_schemas() -> BTreeMap<String, String> {
    let c = consumer(&format!("schemas-{}", unique()));
    let until = watermarks(&c, &[SCHEMA_TOPIC]);
    if until.values().all(|h| *h == 0) {
        return BTreeMap::new();
    }
    let mut tpl = TopicPartitionList::new();
    for (tp, _) in until.iter() {
        tpl.add_partition_offset(&tp.0, tp.1, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = BTreeMap::new();
    let mut left: BTreeMap<i32, i64> = until
        .iter()
        .map(|(tp, h)| (tp.1, *h))
        .filter(|(_, h)| *h > 0)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "timed out reading the schema topic"
        );
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            if let (Some(k), Some(v)) = (m.key(), m.payload()) {
                out.insert(
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
            if left
                .get(&m.partition())
                .is_some_and(|h| m.offset() + 1 >= *h)
            {
                left.remove(&m.partition());
            }
        }
    }
    out
}

/// `{"schema": S, "payload": P}` from a schema-id message's payload.
pub fn with_schema(schema: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(schema.len() + payload.len() + 24);
    out.extend_from_slice(b"{\"schema\":");
    out.extend_from_slice(schema.as_bytes());
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    out.push(b'}');
    out
}

/// The schema topic's schemas by fingerprint, read again when a message
/// names one not seen yet; each parsed once, for the Avro reader.
#[derive(Debug, Default)]
pub struct PublishedSchemas {
    raw: BTreeMap<String, String>,
    parsed: BTreeMap<String, serde_json::Value>,
}

impl PublishedSchemas {
    /// The schema `id` names; panics if the schema topic does not hold it.
    pub fn get(&mut self, id: &str) -> &str {
        if !self.raw.contains_key(id) {
            self.raw = published_schemas();
        }
        self.raw
            .get(id)
            .unwrap_or_else(|| panic!("schema {id} is not on {SCHEMA_TOPIC}"))
    }

    /// [`PublishedSchemas::get`], parsed.
    pub fn parsed(&mut self, id: &str) -> &serde_json::Value {
        if !self.parsed.contains_key(id) {
            let value = serde_json::from_str(self.get(id)).expect("a published schema");
            self.parsed.insert(id.to_string(), value);
        }
        &self.parsed[id]
    }
}

/// A header's value.
pub fn header<'a, M: Message>(m: &'a M, key: &str) -> Option<&'a [u8]> {
    m.headers()?.iter().find(|h| h.key == key)?.value
}

/// The fingerprint a schema-id message names: its Avro value's frame, or
/// its `cdclake.schema` header. `None` for JSON with schemas.
pub fn schema_id<M: Message>(m: &M) -> Option<String> {
    let id = match m.payload().and_then(cdc_wire::Frame::parse) {
        Some(frame) => frame.fingerprint,
        None => header(m, SCHEMA_HEADER)?,
    };
    Some(String::from_utf8_lossy(id).into_owned())
}

/// A message's value as JSON with schemas, whatever its format in the log:
/// JSON with schemas as it is; a schema-id value (a JSON payload, Avro in
/// a frame, or Avro with the header `cdclake.encoding: avro`) with its
/// published schema put back around its payload. `None` for a tombstone.
pub fn json_with_schema<M: Message>(m: &M, schemas: &mut PublishedSchemas) -> Option<Vec<u8>> {
    let payload = m.payload()?;
    let Some(id) = schema_id(m) else {
        return Some(payload.to_vec());
    };
    let avro = match cdc_wire::Frame::parse(payload) {
        Some(frame) => Some(frame.body),
        None => (header(m, ENCODING_HEADER) == Some(cdc_wire::AVRO.as_bytes())).then_some(payload),
    };
    let Some(body) = avro else {
        return Some(with_schema(schemas.get(&id), payload));
    };
    let json = crate::avro::payload_json(schemas.parsed(&id), body);
    let json = serde_json::to_vec(&json).unwrap();
    Some(with_schema(schemas.get(&id), &json))
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
    let mut schemas = PublishedSchemas::default();
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
                let schema_id = schema_id(&m);
                let value = json_with_schema(&m, &mut schemas);
                out.push(RawMessage {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value,
                    schema_id,
                });
            }
        }
    }
    out
}

/// How one message with a value came: framed or not, and its headers.
#[derive(Debug)]
pub struct ValueSeen {
    /// `Some(has_headers)` for a framed (Avro) value: its frame's flag.
    pub frame: Option<bool>,
    /// Its headers, name and value as text.
    pub headers: Vec<(String, String)>,
}

/// How every message in `topic` that has a value (tombstones left out)
/// came, read from the start to the end.
pub fn values_seen(topic: &str) -> Vec<ValueSeen> {
    let c = consumer(&format!("headers-{}", unique()));
    let until = watermarks(&c, &[topic]);
    let mut tpl = TopicPartitionList::new();
    let mut left = 0;
    for ((t, p), high) in &until {
        let (low, _) = c.fetch_watermarks(t, *p, Duration::from_secs(10)).unwrap();
        left += (high - low).max(0);
        tpl.add_partition_offset(t, *p, Offset::Offset(low))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while left > 0 {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        if m.offset() >= until[&(m.topic().to_string(), m.partition())] {
            continue;
        }
        left -= 1;
        if let Some(value) = m.payload() {
            let headers = m
                .headers()
                .iter()
                .flat_map(|h| h.iter())
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_string(), value.into_owned())
                })
                .collect();
            out.push(ValueSeen {
                frame: cdc_wire::Frame::parse(value).map(|f| f.has_headers),
                headers,
            });
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
