//! The one loop: receive, decode, buffer, flush, commit.
//!
//! [`run`] owns every piece of state and a single `select!` over shutdown, a
//! one-second tick (age-based flushes, health) and the next Kafka message.
//! Writes happen inline, so while a flush is being uploaded nothing more is
//! consumed: that is the backpressure which keeps memory bounded.
//!
//! A flush takes the due segments, groups them by table and commits each
//! table once ([`Lake::commit`]); partitions whose segment had no rows
//! (tombstones, quarantined messages) need no Delta commit: replaying them
//! rewrites nothing. Kafka offsets are committed afterwards, for lag tools.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use tokio::sync::watch;

use crate::batch::{RollPolicy, Segment};
use crate::config::{ConfigError, SinkConfig};
use crate::decode::{Decoded, Decoder};
use crate::lake::{Lake, LakeError, PartitionWrite, table_of};
use crate::position::{Admit, Positions, Tp};
use crate::quarantine::{Quarantine, s3_store};
use crate::source::{Rebalance, Source};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the lake failed for {secs}s; giving up")]
    Lake {
        secs: u64,
        #[source]
        source: LakeError,
    },
    #[error("quarantining a message failed for {secs}s; giving up")]
    Quarantine {
        secs: u64,
        #[source]
        source: object_store::Error,
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
    pub commits: u64,
    pub tombstones: u64,
    pub quarantined: u64,
    pub skipped: u64,
    pub fenced: u64,
    pub segments_dropped: u64,
}

struct Sink {
    decoder: Decoder,
    segments: HashMap<Tp, Segment>,
    positions: Positions,
    lake: Lake,
    quarantine: Quarantine,
    policy: RollPolicy,
    max_buffered: usize,
    give_up: Duration,
    stats: Stats,
}

/// Retries `f` with capped exponential backoff while its error may pass,
/// for at most `give_up` in total.
async fn with_retry<T, E, Fut>(
    give_up: Duration,
    retryable: impl Fn(&E) -> bool,
    f: impl FnMut() -> Fut,
) -> Result<T, (u64, E)>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error,
{
    let started = Instant::now();
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(give_up))
        .without_max_times();
    f.retry(backoff)
        .when(|e| retryable(e))
        .notify(|e, after| tracing::warn!(error = %chain(e), retry_in = ?after, "request failed, retrying"))
        .await
        .map_err(|e| (started.elapsed().as_secs(), e))
}

/// An error and its causes on one line, for logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub async fn run(
    cfg: &SinkConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Stats, PipelineError> {
    let give_up = cfg.give_up_after();
    let lake = Lake::from_config(cfg).map_err(|source| PipelineError::Lake { secs: 0, source })?;
    let quarantine = Quarantine::new(s3_store(&cfg.s3, give_up)?, &cfg.output.prefix);
    let mut source = Source::connect(&cfg.kafka)?;
    let mut sink = Sink {
        decoder: Decoder::new(),
        segments: HashMap::new(),
        positions: Positions::default(),
        lake,
        quarantine,
        policy: cfg.roll_policy(),
        max_buffered: cfg.flush.max_buffered_bytes,
        give_up,
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
    // Drain: everything buffered is committed, then Kafka's offsets.
    tracing::info!("shutting down: flushing open segments");
    sink.apply_rebalances(&mut source);
    let all: Vec<Tp> = sink.segments.keys().cloned().collect();
    sink.flush(&source, all, CommitMode::Sync).await?;
    tracing::info!(stats = ?sink.stats, "sink stopped");
    Ok(sink.stats)
}

impl Sink {
    fn apply_rebalances(&mut self, source: &mut Source) {
        while let Ok(ev) = source.events.try_recv() {
            match ev {
                Rebalance::Revoked(tps) => {
                    for tp in tps {
                        // The new owner resumes from the lake; writing this
                        // buffer now would only be fenced.
                        if self.segments.remove(&tp).is_some() {
                            self.stats.segments_dropped += 1;
                        }
                        self.positions.revoke(&tp);
                    }
                }
                Rebalance::Assigned(tps) => {
                    for tp in tps {
                        self.segments.remove(&tp);
                        self.positions.assign(tp);
                    }
                }
            }
        }
    }

    /// Reads the lake's version of every partition of `table` whose
    /// position is not known yet.
    async fn learn_positions(&mut self, table: &str, tp: &Tp) -> Result<(), PipelineError> {
        let tps = vec![tp.clone()];
        let lake = &self.lake;
        let versions = with_retry(self.give_up, LakeError::is_retryable, || {
            lake.positions(table, &tps)
        })
        .await
        .map_err(|(secs, source)| PipelineError::Lake { secs, source })?;
        if let Some(p) = self.positions.get_mut(tp) {
            tracing::info!(partition = %tp, lake_version = ?versions[0], "position read from the lake");
            p.learn(versions[0]);
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        source: &Source,
        msg: rdkafka::message::OwnedMessage,
    ) -> Result<(), PipelineError> {
        let tp = Tp::new(msg.topic(), msg.partition());
        let offset = msg.offset();
        loop {
            // A message fetched before a revoke was processed has no
            // position: its new owner reads it again.
            let Some(position) = self.positions.get_mut(&tp) else {
                return Ok(());
            };
            match position.admit(offset) {
                Admit::Accept => break,
                Admit::Skip => {
                    self.stats.skipped += 1;
                    return Ok(());
                }
                Admit::SeekTo(to) => {
                    tracing::info!(partition = %tp, from = offset, to, "seeking to the lake's position");
                    if let Err(e) = source.seek(&tp, to) {
                        // Start over: the next message asks again.
                        tracing::warn!(partition = %tp, error = %e, "seek failed");
                        position.fence(Some(to));
                    }
                    return Ok(());
                }
                Admit::NeedsLakeVersion => {
                    let table = table_of(&tp.topic).to_string();
                    self.learn_positions(&table, &tp).await?;
                }
            }
        }
        self.stats.messages += 1;

        let decoded = self.decoder.decode(msg.payload());
        let segment = self
            .segments
            .entry(tp.clone())
            .or_insert_with(|| Segment::new(offset));
        match decoded {
            Ok(Decoded::Row(row)) => {
                segment.push(&row, tp.partition, offset);
                self.stats.rows += 1;
            }
            Ok(Decoded::Tombstone) => {
                segment.cover(offset);
                self.stats.tombstones += 1;
            }
            Err(err) => {
                segment.cover(offset);
                let error = err.to_string();
                let q = &self.quarantine;
                let path = with_retry(
                    self.give_up,
                    |_| true,
                    || q.put(&tp, offset, msg.key(), msg.payload(), &error),
                )
                .await
                .map_err(|(secs, source)| PipelineError::Quarantine { secs, source })?;
                self.stats.quarantined += 1;
                tracing::warn!(partition = %tp, offset, %error, quarantined_at = %path,
                    "malformed change event quarantined");
            }
        }

        if self.segments[&tp].roll_reason(&self.policy).is_some() {
            self.flush(source, vec![tp], CommitMode::Async).await?;
        } else if self.buffered_bytes() > self.max_buffered {
            // Memory bound: flush the largest segment.
            let largest = self
                .segments
                .iter()
                .max_by_key(|(_, s)| s.bytes)
                .map(|(tp, _)| tp.clone());
            if let Some(tp) = largest {
                self.flush(source, vec![tp], CommitMode::Async).await?;
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
            .filter(|(_, s)| s.roll_reason(&self.policy).is_some())
            .map(|(tp, _)| tp.clone())
            .collect();
        self.flush(source, due, CommitMode::Async).await
    }

    /// Commits the segments of `tps`: one Delta transaction per table, then
    /// Kafka's offsets.
    async fn flush(
        &mut self,
        source: &Source,
        tps: Vec<Tp>,
        mode: CommitMode,
    ) -> Result<(), PipelineError> {
        let mut by_table: BTreeMap<String, Vec<PartitionWrite>> = BTreeMap::new();
        let mut kafka = Vec::new();
        // Where each write starts: a fenced partition resumes no later.
        let mut firsts: HashMap<Tp, i64> = HashMap::new();
        for tp in tps {
            let Some(segment) = self.segments.remove(&tp) else {
                continue;
            };
            let Some(position) = self.positions.get(&tp) else {
                continue;
            };
            let last = segment.last;
            firsts.insert(tp.clone(), segment.first);
            if segment.rows() == 0 {
                kafka.push((tp, last + 1));
                continue;
            }
            let write = PartitionWrite {
                expected: position.expected_version(),
                last,
                files: segment.into_files().map_err(|e| PipelineError::Lake {
                    secs: 0,
                    source: e.into(),
                })?,
                tp,
            };
            by_table
                .entry(table_of(&write.tp.topic).to_string())
                .or_default()
                .push(write);
        }
        for (table, writes) in by_table {
            let started = Instant::now();
            let lake = &self.lake;
            let outcome = with_retry(self.give_up, LakeError::is_retryable, || {
                lake.commit(&table, &writes)
            })
            .await
            .map_err(|(secs, source)| PipelineError::Lake { secs, source })?;
            for (tp, last) in &outcome.committed {
                if let Some(p) = self.positions.get_mut(tp) {
                    p.committed(*last);
                }
                kafka.push((tp.clone(), last + 1));
            }
            for tp in &outcome.fenced {
                // Whatever is buffered past the fenced segment is dropped
                // too: the position is read again from the lake, and the
                // consumer sent there now, not at the partition's next
                // message (it may be quiet).
                self.segments.remove(tp);
                if let Some(p) = self.positions.get_mut(tp) {
                    p.fence(firsts.get(tp).copied());
                }
                self.stats.fenced += 1;
                self.learn_positions(&table, tp).await?;
                if let Some(to) = self.positions.get_mut(tp).and_then(|p| p.seek_now())
                    && let Err(e) = source.seek(tp, to)
                {
                    // Revoked meanwhile, most likely; otherwise the next
                    // message asks again.
                    tracing::warn!(partition = %tp, error = %e, "seek after a fence failed");
                    if let Some(p) = self.positions.get_mut(tp) {
                        p.fence(Some(to));
                    }
                }
            }
            if outcome.version.is_some() {
                self.stats.commits += 1;
                self.stats.files += outcome.files as u64;
            }
            tracing::debug!(%table, version = ?outcome.version, files = outcome.files, rows = outcome.rows,
                bytes = outcome.bytes, ms = started.elapsed().as_millis() as u64, "committed");
        }
        if let Err(e) = source.commit(&kafka, mode) {
            // Only lag reporting suffers: the lake has the positions.
            tracing::warn!(error = %e, "committing Kafka offsets failed");
        }
        Ok(())
    }
}
