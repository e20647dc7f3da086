//! Prints the sum of a consumer group's committed offsets over a topic's
//! partitions. Used by tests/bench/drain.sh to see when a drain is done
//! without starting a JVM every second.
//!
//! `committed BROKERS GROUP TOPIC` (built by `cargo build --release`)
//!
//! With `--to-end` it instead commits each partition's current high
//! watermark for GROUP (a new group then starts at today's end), and prints
//! their sum: tests/bench/sustained.sh measures only the events of its run.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let to_end = args.iter().any(|a| a == "--to-end");
    args.retain(|a| a != "--to-end");
    let [_, brokers, group, topic] = args.as_slice() else {
        eprintln!("usage: committed [--to-end] BROKERS GROUP TOPIC");
        std::process::exit(2);
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("kafka client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    if to_end {
        let mut ends = TopicPartitionList::new();
        let mut sum = 0;
        for p in md.topics()[0].partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            ends.add_partition_offset(topic, p.id(), Offset::Offset(high))
                .expect("offset");
            sum += high;
        }
        consumer
            .commit(&ends, rdkafka::consumer::CommitMode::Sync)
            .expect("commit");
        println!("{sum}");
        return;
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let sum: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    println!("{sum}");
}
