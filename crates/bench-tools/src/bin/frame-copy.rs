//! Copies a topic of the converter's earlier Avro values (unframed, with
//! the headers `cdclake.schema` and `cdclake.encoding: avro`) into a new
//! topic, as they are or framed as the converter writes them now
//! (`cdc_wire::Frame`, the two headers dropped). Both copies hold the same
//! events, so a drain of one against the other measures the format alone.
//!
//! `frame-copy [--frame] BROKERS FROM TO` (built by `cargo build --release`)
//!
//! TO is created with FROM's partition count; each record keeps its
//! partition, key and timestamp. Tombstones are copied; records in another
//! format (JSON, or already framed) are left out of both copies. The
//! producer batches as the connector's does here (1 MiB, 50 ms, lz4).

use std::time::Duration;

use cdc_wire::{AVRO, ENCODING_HEADER, Frame, SCHEMA_HEADER};
use futures::executor::block_on;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let frame = args.iter().any(|a| a == "--frame");
    args.retain(|a| a != "--frame");
    let [_, brokers, from, to] = args.as_slice() else {
        eprintln!("usage: frame-copy [--frame] BROKERS FROM TO");
        std::process::exit(2);
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "frame-copy")
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let md = consumer
        .fetch_metadata(Some(from), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("kafka admin");
    let topic = NewTopic::new(to, partitions.len() as i32, TopicReplication::Fixed(1));
    for result in block_on(admin.create_topics([&topic], &AdminOptions::new())).expect("create") {
        result.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    let mut done = Vec::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(from, p, Duration::from_secs(10))
            .expect("watermarks");
        tpl.add_partition_offset(from, p, Offset::Offset(low))
            .expect("offset");
        ends.push(high);
        // An empty partition has nothing to wait for.
        done.push(low >= high);
    }
    consumer.assign(&tpl).expect("assign");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("batch.size", "1048576")
        .set("linger.ms", "50")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .expect("kafka producer");
    let (mut copied, mut left_out) = (0u64, 0u64);
    while !done.iter().all(|d| *d) {
        let Some(m) = consumer.poll(Duration::from_secs(5)) else {
            continue;
        };
        let m = m.expect("consume");
        let i = partitions
            .iter()
            .position(|p| *p == m.partition())
            .expect("partition");
        if m.offset() + 1 >= ends[i] {
            done[i] = true;
        }
        if m.offset() >= ends[i] {
            continue;
        }
        let mut schema = None;
        let mut avro = false;
        let mut others = OwnedHeaders::new();
        for h in m.headers().iter().flat_map(|h| h.iter()) {
            match h.key {
                SCHEMA_HEADER => schema = h.value,
                ENCODING_HEADER => avro = h.value == Some(AVRO.as_bytes()),
                _ => others = others.insert(h),
            }
        }
        let value = match m.payload() {
            None => None,
            Some(body) if avro && schema.is_some() && Frame::parse(body).is_none() => {
                if frame {
                    let fingerprint = schema.expect("checked");
                    let has_headers = others.count() > 0;
                    Some(
                        Frame {
                            fingerprint,
                            has_headers,
                            body,
                        }
                        .to_bytes(),
                    )
                } else {
                    Some(body.to_vec())
                }
            }
            Some(_) => {
                left_out += 1;
                continue;
            }
        };
        let headers = if frame || value.is_none() {
            others
        } else {
            m.headers().map(|h| h.detach()).unwrap_or_default()
        };
        let mut record: BaseRecord<'_, [u8], Vec<u8>> =
            BaseRecord::to(to).partition(m.partition()).headers(headers);
        if let Some(key) = m.key() {
            record = record.key(key);
        }
        if let Some(ts) = m.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        if let Some(v) = &value {
            record = record.payload(v);
        }
        // The producer's queue is full: wait for its deliveries.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        copied += 1;
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
    println!("{copied} records copied to {to}, {left_out} in another format left out");
}
