//! Decode, Arrow and Parquet throughput on one core, on real Debezium
//! messages captured from the local stack: the demo tables' events, the
//! shape of the sink's real traffic. Each in both formats the sink reads:
//! JSON with schemas, and the schema-id format (the same messages' payloads,
//! their schemas registered once, as the schema topic gives them). And the
//! stack's own format, Avro values in their frame (`cdc_wire::Frame`, no
//! header), on the newest 1,000 events of a filled `twitter.tweets`
//! (`tests/capture-fixtures.sh avro`): the messages `tests/bench/drain.sh`
//! drains.
//!
//! `cargo bench -p cdc-sink --bench decode`

use std::hint::black_box;

use cdc_sink::config::SinkConfig;
use cdc_sink::decode::{Decoded, Decoder, MessageHeaders};
use cdc_sink::lake::changelog::segment::Segment;
use cdc_sink::lake::files::{encode, writer_properties};
use cdc_wire::Frame;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The demo tables' events, repeated to a corpus of `n` messages.
fn corpus(n: usize) -> Vec<Vec<u8>> {
    let lines: Vec<&str> = include_str!("../tests/fixtures/twitter.jsonl")
        .lines()
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .cycle()
        .take(n)
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// A message in the schema-id format: the payload, and its schema's id.
struct ById {
    payload: Vec<u8>,
    fingerprint: Vec<u8>,
}

/// The corpus in the schema-id format, and a decoder that knows its schemas.
fn by_id(msgs: &[Vec<u8>]) -> (Vec<ById>, Decoder) {
    let mut d = Decoder::new();
    let mut ids: Vec<String> = Vec::new();
    let out = msgs
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m).unwrap();
            let schema = v["schema"].to_string();
            let n = ids.iter().position(|s| *s == schema).unwrap_or_else(|| {
                ids.push(schema.clone());
                ids.len() - 1
            });
            let fingerprint = format!("{n:032x}").into_bytes();
            d.register(&fingerprint, &schema);
            ById {
                payload: v["payload"].to_string().into_bytes(),
                fingerprint,
            }
        })
        .collect();
    (out, d)
}

/// The captured Avro events repeated to `n` messages, and a decoder that
/// knows their schemas.
fn avro_corpus(n: usize) -> (Vec<ById>, Decoder) {
    use base64::Engine as _;
    let mut d = Decoder::new();
    let mut events = Vec::new();
    for line in include_str!("../tests/fixtures/twitter_avro.jsonl").lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let fingerprint = v["fingerprint"].as_str().unwrap().as_bytes().to_vec();
        if let Some(schema) = v["schema"].as_str() {
            d.register(&fingerprint, schema);
            continue;
        }
        let body = base64::engine::general_purpose::STANDARD
            .decode(v["avro"].as_str().unwrap())
            .unwrap();
        let payload = Frame {
            fingerprint: &fingerprint,
            has_headers: false,
            body: &body,
        }
        .to_bytes();
        events.push(ById {
            payload,
            fingerprint,
        });
    }
    let msgs = (0..n)
        .map(|i| {
            let e = &events[i % events.len()];
            ById {
                payload: e.payload.clone(),
                fingerprint: e.fingerprint.clone(),
            }
        })
        .collect();
    (msgs, d)
}

/// A framed value's record has no header.
const NO_HEADERS: MessageHeaders<'static> = MessageHeaders {
    schema_ref: None,
    marker: None,
    encoding: None,
    new_key: None,
    old_key: None,
};

fn decode_avro(c: &mut Criterion) {
    let (msgs, mut d) = avro_corpus(10_000);
    let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
    let mut g = c.benchmark_group("decode avro");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function(format!("{} msgs, {} MiB", msgs.len(), bytes >> 20), |b| {
        b.iter(|| {
            for m in &msgs {
                black_box(d.decode_message(Some(&m.payload), &NO_HEADERS).unwrap());
            }
        })
    });
    g.finish();
}

fn decode_avro_arrow_parquet(c: &mut Criterion) {
    let (msgs, mut d) = avro_corpus(10_000);
    let props = writer_properties(&SinkConfig::default().output);
    let mut g = c.benchmark_group("decode avro+arrow+parquet(zstd)");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("10k msgs", |b| {
        b.iter(|| {
            let mut seg = Segment::new(0);
            for (i, m) in msgs.iter().enumerate() {
                if let Decoded::Row(r) = d.decode_message(Some(&m.payload), &NO_HEADERS).unwrap() {
                    seg.push(&r, 0, i as i64);
                }
            }
            for file in seg.into_files().unwrap() {
                black_box(encode(&file.batch, &props).unwrap());
            }
        })
    });
    g.finish();
}

fn decode_by_id(c: &mut Criterion) {
    let (msgs, mut d) = by_id(&corpus(10_000));
    let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
    let mut g = c.benchmark_group("decode schema-id");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function(format!("{} msgs, {} MiB", msgs.len(), bytes >> 20), |b| {
        b.iter(|| {
            for m in &msgs {
                black_box(
                    d.decode_with(Some(&m.payload), Some(&m.fingerprint))
                        .unwrap(),
                );
            }
        })
    });
    g.finish();
}

fn decode_by_id_arrow_parquet(c: &mut Criterion) {
    let (msgs, mut d) = by_id(&corpus(10_000));
    let props = writer_properties(&SinkConfig::default().output);
    let mut g = c.benchmark_group("decode schema-id+arrow+parquet(zstd)");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("10k msgs", |b| {
        b.iter(|| {
            let mut seg = Segment::new(0);
            for (i, m) in msgs.iter().enumerate() {
                if let Decoded::Row(r) = d
                    .decode_with(Some(&m.payload), Some(&m.fingerprint))
                    .unwrap()
                {
                    seg.push(&r, 0, i as i64);
                }
            }
            for file in seg.into_files().unwrap() {
                black_box(encode(&file.batch, &props).unwrap());
            }
        })
    });
    g.finish();
}

fn decode_only(c: &mut Criterion) {
    let msgs = corpus(10_000);
    let bytes: usize = msgs.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function(format!("{} msgs, {} MiB", msgs.len(), bytes >> 20), |b| {
        let mut d = Decoder::new();
        b.iter(|| {
            for m in &msgs {
                black_box(d.decode(Some(m)).unwrap());
            }
        })
    });
    g.finish();
}

fn decode_arrow_parquet(c: &mut Criterion) {
    let msgs = corpus(10_000);
    let props = writer_properties(&SinkConfig::default().output);
    let mut g = c.benchmark_group("decode+arrow+parquet(zstd)");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("10k msgs", |b| {
        let mut d = Decoder::new();
        b.iter(|| {
            let mut seg = Segment::new(0);
            for (i, m) in msgs.iter().enumerate() {
                if let Decoded::Row(r) = d.decode(Some(m)).unwrap() {
                    seg.push(&r, 0, i as i64);
                }
            }
            for file in seg.into_files().unwrap() {
                black_box(encode(&file.batch, &props).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    decode_only,
    decode_arrow_parquet,
    decode_by_id,
    decode_by_id_arrow_parquet,
    decode_avro,
    decode_avro_arrow_parquet
);
criterion_main!(benches);
