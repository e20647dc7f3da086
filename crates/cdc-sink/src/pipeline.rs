//! The loop: receive, decode, buffer, flush; commits run behind it.
//!
//! [`run`] owns the buffers and positions and selects over shutdown, the
//! next committed flush, a one-second tick (age-based flushes, health) and
//! the next Kafka message. A flush takes the due segments, groups them by
//! table and hands them to the [`Committer`], which encodes, uploads and
//! commits them while the loop goes on consuming and decoding. Partitions
//! whose segment had no rows (tombstones, quarantined messages) need no
//! Delta commit: replaying them rewrites nothing. Kafka offsets are
//! committed once a flush is in the lake, for lag tools.
//!
//! Memory is bounded by `flush.max_buffered_bytes`, counting buffered rows
//! and flushes in flight by their decoded size: past it, the largest
//! segment is flushed and, while flushes are still in flight, consumption
//! is paused (librdkafka keeps polling, so the group membership holds).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::{self, Watchdog};
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use tokio::sync::watch;

use crate::batch::{RollPolicy, RollReason, Segment};
use crate::committer::{Committer, Fate, Flush, Flushed, LakeFailed, TableFlush, Write};
use crate::config::{ConfigError, SinkConfig};
use crate::decode::{Decoded, Decoder};
use crate::lake::{Lake, LakeError, PartitionWrite, table_of};
use crate::position::{Admit, Positions, Tp};
use crate::quarantine::Quarantine;
use crate::retry::{Dependency, with_retry};
use crate::source::{Rebalance, Rebalances, Source};
use crate::storage::s3_store;
use crate::telemetry::{self as t, Meters};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Lake(#[from] LakeFailed),
    #[error("quarantining a message failed for {secs}s; giving up")]
    Quarantine {
        secs: u64,
        #[source]
        source: object_store::Error,
    },
    #[error("no Kafka broker reachable for {0}s; giving up")]
    KafkaDown(u64),
    #[error("the commit task stopped unexpectedly")]
    CommitterStopped,
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

/// Why segments were flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushReason {
    Rolled(RollReason),
    Memory,
    Shutdown,
}

impl FlushReason {
    fn label(self) -> &'static str {
        match self {
            FlushReason::Rolled(RollReason::Rows) => "rows",
            FlushReason::Rolled(RollReason::Bytes) => "bytes",
            FlushReason::Rolled(RollReason::Age) => "age",
            FlushReason::Memory => "memory",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

/// Flushes in flight (one committing, one staged) beyond which segments
/// that are merely due wait for the next.
const DUE_FLUSHES_AHEAD: usize = 2;

/// A broker heard from within this long counts as connected (librdkafka
/// reports every 5 s).
const CONNECTED_WITHIN: Duration = Duration::from_secs(15);

struct Sink {
    decoder: Decoder,
    segments: HashMap<Tp, Segment>,
    positions: Positions,
    lake: Arc<Lake>,
    committer: Committer,
    quarantine: Quarantine,
    policy: RollPolicy,
    max_buffered: usize,
    paused: bool,
    give_up: Duration,
    stats: Stats,
    meters: Meters,
    /// (table, column) pairs already logged for a NULL in a NOT NULL
    /// column: logged once each, counted every time.
    lost_values: HashSet<(String, String)>,
    readiness: Readiness,
    ready_window: Duration,
    /// The last commit, or the last moment nothing was waiting to be
    /// committed: readiness asks how long input has waited since.
    last_progress: Instant,
}

pub async fn run(
    cfg: &SinkConfig,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Stats, PipelineError> {
    let give_up = cfg.give_up_after();
    let lake = Arc::new(Lake::from_config(cfg).map_err(|source| LakeFailed {
        secs: 0,
        source: Box::new(source),
    })?);
    let quarantine = Quarantine::new(s3_store(&cfg.s3, give_up)?, &cfg.output.prefix);
    let (source, mut rebalances) = Source::connect(&cfg.kafka)?;
    let mut sink = Sink {
        decoder: Decoder::new(),
        segments: HashMap::new(),
        positions: Positions::default(),
        committer: Committer::spawn(lake.clone(), give_up),
        lake,
        quarantine,
        policy: RollPolicy::from_config(&cfg.flush),
        max_buffered: cfg.flush.max_buffered_bytes,
        paused: false,
        give_up,
        stats: Stats::default(),
        meters: Meters::default(),
        lost_values: HashSet::new(),
        readiness,
        ready_window: Duration::from_secs(cfg.metrics.ready_window_secs),
        last_progress: Instant::now(),
    };
    systemd::ready();
    let watchdog = Watchdog::from_env();
    tracing::info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, bucket = %cfg.s3.bucket, "sink started");
    // Age-based flushes are checked on this tick: a quarter of the flush
    // age (so a due segment waits at most that long), between 100 ms and 1 s.
    let period =
        (sink.policy.max_age / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            done = sink.committer.next() => {
                let done = done.ok_or(PipelineError::CommitterStopped)??;
                sink.on_flushed(&source, done, CommitMode::Async).await?;
                sink.flush_due();
                sink.hold_memory(&source)?;
            }
            _ = tick.tick() => {
                watchdog.ping();
                sink.apply_rebalances(&source, &mut rebalances);
                sink.flush_due();
                sink.hold_memory(&source)?;
                sink.report(&source);
                let down = source.broker_down_for();
                if down >= sink.give_up {
                    return Err(PipelineError::KafkaDown(down.as_secs()));
                }
                if last_report.elapsed() >= Duration::from_secs(60) {
                    tracing::info!(stats = ?sink.stats, open_segments = sink.segments.len(),
                        in_flight = sink.committer.in_flight(), "progress");
                    last_report = Instant::now();
                }
            }
            received = source.consumer.recv() => {
                let msg = match received {
                    Ok(m) => m,
                    Err(e) => {
                        // librdkafka reconnects on its own; the health check
                        // above decides when to give up.
                        tracing::warn!(error = %e, "kafka receive error");
                        continue;
                    }
                };
                // Buffers of revoked partitions go before anything else.
                sink.apply_rebalances(&source, &mut rebalances);
                let tp = Tp::new(msg.topic(), msg.partition());
                sink.on_message(&source, tp, msg.offset(), msg.key(), msg.payload()).await?;
                drop(msg);
                sink.hold_memory(&source)?;
            }
        }
    }
    // Drain: everything buffered is committed, then Kafka's offsets.
    tracing::info!("shutting down: flushing open segments");
    sink.apply_rebalances(&source, &mut rebalances);
    let all: Vec<Tp> = sink.segments.keys().cloned().collect();
    sink.readiness.set_not_ready("shutting down");
    sink.flush(all, FlushReason::Shutdown);
    sink.committer.close();
    while let Some(done) = sink.committer.next().await {
        watchdog.ping();
        sink.on_flushed(&source, done?, CommitMode::Sync).await?;
    }
    tracing::info!(stats = ?sink.stats, "sink stopped");
    Ok(sink.stats)
}

impl Sink {
    fn apply_rebalances(&mut self, source: &Source, rebalances: &mut Rebalances) {
        while let Ok(ev) = rebalances.try_recv() {
            match ev {
                Rebalance::Revoked(tps) => {
                    for tp in tps {
                        // The new owner resumes from the lake; writing this
                        // buffer now would only be fenced. Flushes in flight
                        // go on: the lake's txn check decides them.
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
                    if self.paused
                        && let Err(e) = source.pause()
                    {
                        tracing::warn!(error = %e, "pausing new partitions failed");
                    }
                }
            }
        }
    }

    /// Reads the lake's version of a partition whose position is not
    /// known yet.
    async fn learn_position(&mut self, tp: &Tp) -> Result<(), PipelineError> {
        let tps = vec![tp.clone()];
        let table = table_of(&tp.topic);
        let lake = &self.lake;
        let versions = with_retry(
            Dependency::Lake,
            self.give_up,
            LakeError::is_retryable,
            || lake.positions(table, &tps),
        )
        .await
        .map_err(|g| LakeFailed {
            secs: g.secs,
            source: Box::new(g.error),
        })?;
        if let Some(p) = self.positions.get_mut(tp) {
            tracing::info!(partition = %tp, lake_version = ?versions[0], "position read from the lake");
            p.learn(versions[0]);
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        source: &Source,
        tp: Tp,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<(), PipelineError> {
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
                        self.positions.fence(&tp, None, Some(to));
                    }
                    return Ok(());
                }
                Admit::NeedsLakeVersion => self.learn_position(&tp).await?,
            }
        }
        self.stats.messages += 1;
        let meters = self.meters.table(table_of(&tp.topic));
        meters.messages.increment(1);

        let decoded = self.decoder.decode(payload);
        let segment = self
            .segments
            .entry(tp.clone())
            .or_insert_with(|| Segment::new(offset));
        match decoded {
            Ok(Decoded::Row(row)) => {
                if !row.null_in_required.is_empty() {
                    report_lost_values(&mut self.lost_values, table_of(&tp.topic), &row);
                }
                segment.push(&row, tp.partition, offset);
                self.stats.rows += 1;
            }
            Ok(Decoded::Tombstone) => {
                segment.cover(offset);
                self.stats.tombstones += 1;
                meters.tombstones.increment(1);
            }
            Err(err) => {
                segment.cover(offset);
                let error = err.to_string();
                let q = &self.quarantine;
                let path = with_retry(
                    Dependency::S3,
                    self.give_up,
                    |_| true,
                    || q.put(&tp, offset, key, payload, &error),
                )
                .await
                .map_err(|g| PipelineError::Quarantine {
                    secs: g.secs,
                    source: g.error,
                })?;
                self.stats.quarantined += 1;
                metrics::counter!(t::QUARANTINED, "topic" => tp.topic.clone(), "reason" => err.kind())
                    .increment(1);
                tracing::warn!(partition = %tp, offset, %error, quarantined_at = %path,
                    "malformed change event quarantined");
            }
        }
        // A full segment goes at once (memory); one merely old enough waits
        // for `flush_due`, which sends every due segment together and only
        // while the committer keeps up. Flushing it here, one partition per
        // message, queued small commits faster than they landed.
        if let Some(reason @ (RollReason::Rows | RollReason::Bytes)) =
            self.segments[&tp].roll_reason(&self.policy)
        {
            self.flush(vec![tp], FlushReason::Rolled(reason));
        }
        Ok(())
    }

    fn buffered_bytes(&self) -> usize {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Buffered rows and flushes in flight: what `flush.max_buffered_bytes`
    /// bounds.
    fn held_bytes(&self) -> usize {
        self.buffered_bytes() + self.committer.in_flight_bytes()
    }

    /// Keeps buffered rows plus flushes in flight under the limit. Flushing
    /// frees nothing at once (rows become files in flight), but it is what
    /// frees memory once committed, so it happens while the buffer holds
    /// more than what is in flight; beyond that, consumption pauses until
    /// commits catch up.
    fn hold_memory(&mut self, source: &Source) -> Result<(), PipelineError> {
        while self.held_bytes() > self.max_buffered
            && self.buffered_bytes() > self.committer.in_flight_bytes()
        {
            let largest = self
                .segments
                .iter()
                .max_by_key(|(_, s)| s.bytes)
                .map(|(tp, _)| tp.clone());
            match largest {
                Some(tp) => self.flush(vec![tp], FlushReason::Memory),
                None => break,
            }
        }
        let over = self.held_bytes() > self.max_buffered;
        if over != self.paused {
            if over {
                source.pause()?;
                tracing::debug!(
                    buffered = self.buffered_bytes(),
                    in_flight = self.committer.in_flight_bytes(),
                    "memory limit reached: consumption paused"
                );
            } else {
                source.resume()?;
                tracing::debug!("consumption resumed");
            }
            self.paused = over;
        }
        Ok(())
    }

    /// Updates the gauges and readiness (every tick).
    fn report(&mut self, source: &Source) {
        let now = Instant::now();
        metrics::gauge!(t::BUFFERED_BYTES).set(self.held_bytes() as f64);
        let oldest = self
            .segments
            .values()
            .map(|s| s.opened)
            .chain(self.committer.oldest_in_flight())
            .min();
        metrics::gauge!(t::OLDEST_UNFLUSHED)
            .set(oldest.map_or(0.0, |o| now.duration_since(o).as_secs_f64()));
        if oldest.is_none() && source.lag() <= 0 {
            self.last_progress = now;
        }
        let waited = now.duration_since(self.last_progress);
        let down = source.broker_down_for();
        self.readiness.set(if down > CONNECTED_WITHIN {
            Err(format!(
                "no Kafka broker reachable for {} s",
                down.as_secs()
            ))
        } else if waited > self.ready_window {
            Err(format!(
                "input has waited {} s without a commit (metrics.ready_window_secs = {})",
                waited.as_secs(),
                self.ready_window.as_secs()
            ))
        } else {
            Ok(())
        });
    }

    /// Flushes every segment due, together: one commit per table. Waits
    /// while [`DUE_FLUSHES_AHEAD`] flushes are in flight: segments due
    /// meanwhile go together in the next flush once one has committed,
    /// rather than queueing one small commit per tick behind a slow one
    /// (with a short flush age that queue grew, and with it the latency).
    fn flush_due(&mut self) {
        if self.committer.in_flight() >= DUE_FLUSHES_AHEAD {
            return;
        }
        let mut due = Vec::new();
        let mut reason = None;
        for (tp, s) in &self.segments {
            if let Some(r) = s.roll_reason(&self.policy) {
                due.push(tp.clone());
                reason = Some(r);
            }
        }
        if let Some(r) = reason {
            self.flush(due, FlushReason::Rolled(r));
        }
    }

    /// Hands the segments of `tps` to the committer: one Delta transaction
    /// per table.
    fn flush(&mut self, tps: Vec<Tp>, reason: FlushReason) {
        let mut tables: BTreeMap<String, Vec<Write>> = BTreeMap::new();
        let mut rowless = Vec::new();
        let mut bytes = 0;
        let mut opened: Option<Instant> = None;
        for tp in tps {
            let Some(segment) = self.segments.remove(&tp) else {
                continue;
            };
            // A flush of due segments counts each by its own reason.
            let why = match reason {
                FlushReason::Rolled(_) => segment
                    .roll_reason(&self.policy)
                    .map_or(reason, FlushReason::Rolled),
                other => other,
            };
            metrics::counter!(t::FLUSHES, "reason" => why.label()).increment(1);
            opened = Some(opened.map_or(segment.opened, |o| o.min(segment.opened)));
            let Some(position) = self.positions.get_mut(&tp) else {
                continue;
            };
            if segment.rows() == 0 {
                rowless.push((tp, segment.last));
                continue;
            }
            bytes += segment.bytes;
            let (first, last, newest_source_ms) =
                (segment.first, segment.last, segment.newest_source_ms);
            let stage = position.stage(last);
            let files = segment
                .into_files()
                .expect("builders made from the segment's own schemas");
            tables
                .entry(table_of(&tp.topic).to_string())
                .or_default()
                .push(Write {
                    ticket: stage.ticket,
                    first,
                    newest_source_ms,
                    write: PartitionWrite {
                        tp,
                        last,
                        expected: stage.expected,
                        files,
                    },
                });
        }
        if tables.is_empty() && rowless.is_empty() {
            return;
        }
        tracing::debug!(?reason, tables = tables.len(), bytes, "flush handed over");

        self.committer.submit(Flush {
            tables: tables
                .into_iter()
                .map(|(table, writes)| TableFlush { table, writes })
                .collect(),
            rowless,
            bytes,
            opened: opened.unwrap_or_else(Instant::now),
        });
    }

    /// Applies a committed flush: positions move on, fenced partitions
    /// start over from the lake, and Kafka's offsets follow.
    async fn on_flushed(
        &mut self,
        source: &Source,
        done: Flushed,
        mode: CommitMode,
    ) -> Result<(), PipelineError> {
        let mut kafka = Vec::new();
        for l in &done.landed {
            match l.fate {
                Fate::Committed => {
                    self.meters
                        .table(table_of(&l.tp.topic))
                        .landed_source_ms(l.newest_source_ms);
                    if let Some(p) = self.positions.get_mut(&l.tp) {
                        p.committed(l.ticket, l.last);
                        kafka.push((l.tp.clone(), l.last + 1));
                    }
                }
                Fate::Fenced => {
                    self.stats.fenced += 1;
                    self.meters.table(table_of(&l.tp.topic)).fenced.increment(1);
                    // Whatever is buffered past the fenced write is dropped
                    // too: the position is read again from the lake, and the
                    // consumer sent there now, not at the partition's next
                    // message (it may be quiet).
                    if !self.positions.fence(&l.tp, Some(l.ticket), Some(l.first)) {
                        continue;
                    }
                    self.segments.remove(&l.tp);
                    self.learn_position(&l.tp).await?;
                    if let Some(to) = self.positions.get_mut(&l.tp).and_then(|p| p.seek_now())
                        && let Err(e) = source.seek(&l.tp, to)
                    {
                        // Revoked meanwhile, most likely; otherwise the next
                        // message asks again.
                        tracing::warn!(partition = %l.tp, error = %e, "seek after a fence failed");
                        self.positions.fence(&l.tp, None, Some(to));
                    }
                }
            }
        }
        for (tp, last) in &done.rowless {
            if self.positions.get(tp).is_some() {
                kafka.push((tp.clone(), last + 1));
            }
        }
        for c in &done.tables {
            let o = &c.outcome;
            let m = self.meters.table(&c.table);
            if o.version.is_some() {
                self.stats.commits += 1;
                self.stats.files += o.files as u64;
                m.commits.increment(1);
                m.rows.increment(o.rows as u64);
                m.files.increment(o.files as u64);
                m.bytes.increment(o.bytes as u64);
                m.commit_duration.record(c.took.as_secs_f64());
                m.last_commit.set(unix_now());
                self.last_progress = Instant::now();
            }
            tracing::debug!(table = %c.table, version = ?o.version, files = o.files, rows = o.rows,
                bytes = o.bytes, ms = c.took.as_millis() as u64, "committed");
        }
        if let Err(e) = source.commit(&kafka, mode) {
            // Only lag reporting suffers: the lake has the positions.
            tracing::warn!(error = %e, "committing Kafka offsets failed");
        }
        Ok(())
    }
}

/// A NULL where PostgreSQL allows none: the connector lost the value (the
/// row lands as it came, NULL included). Said once per table and column at
/// WARN, counted every time.
fn report_lost_values(
    reported: &mut HashSet<(String, String)>,
    table: &str,
    row: &crate::decode::ChangeRow,
) {
    for &i in &row.null_in_required {
        let column = &row.schema.columns[i].name;
        metrics::counter!(t::NULL_IN_REQUIRED, "table" => table.to_string(), "column" => column.clone())
            .increment(1);
        if reported.insert((table.to_string(), column.clone())) {
            tracing::warn!(table, column = %column, op = row.op.code(),
                "a NOT NULL column arrived NULL: the connector lost its value (logged once per column)");
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
