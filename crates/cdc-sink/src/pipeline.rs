//! The one loop: receive, decode, buffer, flush, commit.
//!
//! [`run`] owns every piece of state and a single `select!` over shutdown, a
//! one-second tick (age-based flushes, health) and the next Kafka message.
//! Writes happen inline, so while a segment is being uploaded nothing more
//! is consumed: that is the backpressure which keeps memory bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use secrecy::ExposeSecret;
use tokio::sync::watch;

use crate::batch::{RollPolicy, Segment};
use crate::commit::{Boundary, Offsets, Tp};
use crate::config::{ConfigError, S3Config, SinkConfig};
use crate::decode::{Decoded, Decoder};
use crate::source::{Rebalance, Source};
use crate::write::{WriteError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("object store set-up")]
    Store(#[from] object_store::Error),
    #[error("writing to the object store failed for {secs}s; giving up")]
    Write {
        secs: u64,
        #[source]
        source: WriteError,
    },
    #[error("no Kafka broker reachable for {0}s; giving up")]
    KafkaDown(u64),
}

/// Counters for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub messages: u64,
    pub rows: u64,
    pub files: u64,
    pub tombstones: u64,
    pub quarantined: u64,
    pub segments_dropped: u64,
}

/// Builds the S3 (MinIO) store. object_store retries each request with
/// backoff for up to `retry_for`; past that the error reaches the pipeline.
pub fn s3_store(
    cfg: &S3Config,
    retry_for: Duration,
) -> Result<Arc<dyn ObjectStore>, PipelineError> {
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_access_key_id(&cfg.access_key_id)
        .with_retry(object_store::RetryConfig {
            max_retries: usize::MAX,
            retry_timeout: retry_for,
            backoff: object_store::BackoffConfig::default(),
        });
    if let Some(secret) = cfg.resolve_secret()? {
        b = b.with_secret_access_key(secret.expose_secret());
    }
    if !cfg.endpoint.is_empty() {
        b = b
            .with_endpoint(&cfg.endpoint)
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    Ok(Arc::new(b.build()?))
}

struct Sink {
    decoder: Decoder,
    segments: HashMap<Tp, Segment>,
    offsets: Offsets,
    writer: Writer,
    policy: RollPolicy,
    max_buffered: usize,
    give_up: Duration,
    stats: Stats,
}

pub async fn run(
    cfg: &SinkConfig,
    store: Arc<dyn ObjectStore>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Stats, PipelineError> {
    let mut source = Source::connect(&cfg.kafka)?;
    let mut sink = Sink {
        decoder: Decoder::new(),
        segments: HashMap::new(),
        offsets: Offsets::default(),
        writer: Writer::new(store, &cfg.output),
        policy: cfg.roll_policy(),
        max_buffered: cfg.flush.max_buffered_bytes,
        give_up: cfg.give_up_after(),
        stats: Stats::default(),
    };
    tracing::info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, bucket = %cfg.s3.bucket, "sink started");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = tick.tick() => {
                sink.apply_rebalances(&mut source);
                sink.flush_due(&source).await?;
                let down = source.broker_down_for();
                if down >= sink.give_up {
                    return Err(PipelineError::KafkaDown(down.as_secs()));
                }
                if last_report.elapsed() >= Duration::from_secs(60) {
                    tracing::info!(stats = ?sink.stats, open_segments = sink.segments.len(), "progress");
                    last_report = Instant::now();
                }
            }
            received = source.consumer.recv() => {
                let msg = match received {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        // librdkafka reconnects on its own; the health check
                        // above decides when to give up.
                        tracing::warn!(error = %e, "kafka receive error");
                        continue;
                    }
                };
                sink.apply_rebalances(&mut source);
                sink.on_message(&source, msg).await?;
            }
        }
    }
    // Drain: everything buffered is written and committed synchronously.
    tracing::info!("shutting down: flushing open segments");
    sink.apply_rebalances(&mut source);
    let tps: Vec<Tp> = sink.segments.keys().cloned().collect();
    for tp in tps {
        sink.flush(&source, &tp, CommitMode::Sync).await?;
    }
    tracing::info!(stats = ?sink.stats, "sink stopped");
    Ok(sink.stats)
}

impl Sink {
    fn apply_rebalances(&mut self, source: &mut Source) {
        while let Ok(ev) = source.events.try_recv() {
            match ev {
                Rebalance::Revoked(tps) => {
                    for tp in tps {
                        // The new owner replays from the committed offset;
                        // writing this buffer now could race with it.
                        if self.segments.remove(&tp).is_some() {
                            self.stats.segments_dropped += 1;
                        }
                        self.offsets.revoke(&tp);
                    }
                }
                Rebalance::Assigned(tps) => {
                    for tp in tps {
                        self.segments.remove(&tp);
                        self.offsets.assign(tp);
                    }
                }
            }
        }
    }

    async fn on_message(
        &mut self,
        source: &Source,
        msg: rdkafka::message::OwnedMessage,
    ) -> Result<(), PipelineError> {
        let tp: Tp = (msg.topic().to_string(), msg.partition());
        let offset = msg.offset();
        if !self.offsets.is_assigned(&tp) {
            // A message fetched before a revoke was processed; its new owner
            // will read it again.
            return Ok(());
        }
        self.stats.messages += 1;

        if self.offsets.boundary(&tp, offset) == Boundary::RollThenAppend {
            // The replayed range ended at an offset that no longer exists:
            // close what was replayed (or forget the intent if nothing was).
            if self.segments.contains_key(&tp) {
                self.flush(source, &tp, CommitMode::Async).await?;
            } else {
                self.offsets.expire_intent(&tp);
            }
        }
        if !self.segments.contains_key(&tp) && self.offsets.needs_intent_check(&tp) {
            let intent = self
                .with_retry(|w| w.read_intent(&tp.0, tp.1, offset))
                .await?;
            if let Some(i) = intent {
                tracing::info!(topic = %tp.0, partition = tp.1, first = i.first, last = i.last,
                    "replaying a segment recorded before a restart");
            }
            self.offsets.set_intent(&tp, offset, intent.map(|i| i.last));
        }
        let boundary = self.offsets.boundary(&tp, offset);

        let decoded = self.decoder.decode(msg.payload());
        let segment = self
            .segments
            .entry(tp.clone())
            .or_insert_with(|| Segment::new(offset));
        match decoded {
            Ok(Decoded::Row(row)) => {
                let size = msg.payload().map_or(0, <[u8]>::len);
                segment.push(&row, tp.1, offset, size);
                self.stats.rows += 1;
            }
            Ok(Decoded::Tombstone) => {
                segment.cover(offset);
                self.stats.tombstones += 1;
            }
            Err(err) => {
                segment.cover(offset);
                let error = err.to_string();
                let path = self
                    .with_retry(|w| {
                        w.quarantine(&tp.0, tp.1, offset, msg.key(), msg.payload(), &error)
                    })
                    .await?;
                self.stats.quarantined += 1;
                tracing::warn!(topic = %tp.0, partition = tp.1, offset, %error, quarantined_at = %path,
                    "malformed change event quarantined");
            }
        }

        let replaying = self.offsets.replaying(&tp);
        let roll = match boundary {
            Boundary::AppendThenRoll => true,
            _ if replaying => false,
            _ => self.segments[&tp].roll_reason(&self.policy).is_some(),
        };
        if roll {
            self.flush(source, &tp, CommitMode::Async).await?;
        } else if self.buffered_bytes() > self.max_buffered {
            // Memory bound: flush the largest segment that is not replaying.
            let largest = self
                .segments
                .iter()
                .filter(|(tp, _)| !self.offsets.replaying(tp))
                .max_by_key(|(_, s)| s.bytes)
                .map(|(tp, _)| tp.clone());
            if let Some(tp) = largest {
                self.flush(source, &tp, CommitMode::Async).await?;
            }
        }
        Ok(())
    }

    fn buffered_bytes(&self) -> usize {
        self.segments.values().map(|s| s.bytes).sum()
    }

    async fn flush_due(&mut self, source: &Source) -> Result<(), PipelineError> {
        let due: Vec<Tp> = self
            .segments
            .iter()
            .filter(|(tp, s)| !self.offsets.replaying(tp) && s.roll_reason(&self.policy).is_some())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in due {
            self.flush(source, &tp, CommitMode::Async).await?;
        }
        Ok(())
    }

    /// Writes the segment of `tp`, then commits past it.
    async fn flush(
        &mut self,
        source: &Source,
        tp: &Tp,
        mode: CommitMode,
    ) -> Result<(), PipelineError> {
        let Some(mut segment) = self.segments.remove(tp) else {
            return Ok(());
        };
        let started = Instant::now();
        let encoded = self
            .writer
            .encode_segment(&tp.0, tp.1, &mut segment)
            .map_err(|source| PipelineError::Write { secs: 0, source })?;
        // Putting a segment is idempotent, so retrying it whole is safe.
        self.with_retry(|w| w.put_segment(&encoded)).await?;
        let files = &encoded.files;
        self.stats.files += files.len() as u64;
        let next = self.offsets.flushed(tp, segment.last);
        source.commit(tp, next, mode)?;
        tracing::debug!(topic = %tp.0, partition = tp.1, first = segment.first, last = segment.last,
            rows = segment.rows(), files = files.len(), ms = started.elapsed().as_millis() as u64, "segment flushed");
        Ok(())
    }

    async fn with_retry<'a, T, F, Fut>(&'a self, f: F) -> Result<T, PipelineError>
    where
        F: Fn(&'a Writer) -> Fut,
        Fut: std::future::Future<Output = Result<T, WriteError>>,
    {
        let started = Instant::now();
        loop {
            match f(&self.writer).await {
                Ok(v) => return Ok(v),
                Err(e) if started.elapsed() < self.give_up && is_retryable(&e) => {
                    tracing::warn!(error = %e, "object store request failed, retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(source) => {
                    return Err(PipelineError::Write {
                        secs: started.elapsed().as_secs(),
                        source,
                    });
                }
            }
        }
    }
}

/// Store errors may pass (object_store already retried transport errors
/// for a while); encoding errors will not.
fn is_retryable(e: &WriteError) -> bool {
    matches!(e, WriteError::Store(_))
}
