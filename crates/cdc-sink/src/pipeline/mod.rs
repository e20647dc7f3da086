//! The loop: receive, decode, buffer, flush; commits run behind it.
//!
//! [`run`] connects to Kafka and the lake; [`run_with`] is the loop itself,
//! over any [`Source`] (the tests' is scripted). It owns the assigned
//! [`Partitions`] (positions and buffers) and selects over shutdown, the
//! next committed flush, a one-second tick (age-based flushes, health) and
//! the next Kafka messages (a burst of what librdkafka holds). A flush
//! takes the due segments, groups them by table and hands them to the
//! [`Committer`], which encodes, uploads and
//! commits them while the loop goes on consuming and decoding. Partitions
//! whose segment had no rows (tombstones, quarantined messages) need no
//! Delta commit: replaying them rewrites nothing. Kafka offsets are
//! committed once a flush is in the lake, for lag tools.
//!
//! Memory is bounded by `flush.max_buffered_bytes`, counting buffered rows
//! and flushes in flight by their decoded size: past it, the largest
//! segment is flushed and, while flushes are still in flight, consumption
//! is paused (librdkafka keeps polling, so the group membership holds).

pub mod mirrors;
pub mod partition;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::{self, Watchdog};
use futures::{FutureExt, StreamExt};
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use rdkafka::error::KafkaResult;
use rdkafka::message::Headers;
use tokio::sync::watch;

use crate::config::{ConfigError, SinkConfig};
use crate::decode::marker::{self, MarkerRow};
use crate::decode::{
    self, ChangeRow, Decoded, Decoder, ENCODING_HEADER, MessageHeaders, NEW_KEY_HEADER,
    OLD_KEY_HEADER, SCHEMA_HEADER,
};
use crate::lake::changelog::roll::{RollPolicy, RollReason};
use crate::lake::changelog::{Changelog, PartitionWrite};
use crate::lake::committer::{Committer, Fate, Flush, Flushed, LakeFailed, TableFlush, Write};
use crate::lake::mirror::Mirror;
use crate::lake::quarantine::Quarantine;
use crate::lake::storage::s3_store;
use crate::lake::table::LakeRoot;
use crate::lake::{LakeError, table_of};
use crate::pipeline::mirrors::Mirrors;
use crate::pipeline::partition::{Partitions, Taken};
use crate::retry::{Dependency, with_retry};
use crate::source::position::{Admit, Ticket, Tp, TpNames};
use crate::source::schemas::SchemaTopicError;
use crate::source::{KafkaSource, Rebalance, Rebalances, Source};
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
    #[error("reading the schema topic failed for {secs}s; giving up")]
    SchemaTopic {
        secs: u64,
        #[source]
        source: SchemaTopicError,
    },
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

/// Messages taken in one turn of the loop, while librdkafka has them ready
/// (about a millisecond of work at a drain's rate).
const BURST: usize = 256;

/// How the loop handled a message: in memory, or after waiting on
/// something (S3, the lake's log, the schema topic, a seek), which ends a
/// burst so that the loop's other work is not held behind a run of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    InMemory,
    Waited,
}

/// What the loop is told besides its source and lake.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub policy: RollPolicy,
    /// `flush.max_buffered_bytes`.
    pub max_buffered: usize,
    /// How long a failing dependency is waited out.
    pub give_up: Duration,
    /// `metrics.ready_window_secs`.
    pub ready_window: Duration,
}

impl LoopSettings {
    pub fn from_config(cfg: &SinkConfig) -> LoopSettings {
        LoopSettings {
            policy: RollPolicy::from_config(&cfg.flush),
            max_buffered: cfg.flush.max_buffered_bytes,
            give_up: cfg.give_up_after(),
            ready_window: Duration::from_secs(cfg.metrics.ready_window_secs),
        }
    }
}

/// Where the loop writes.
pub struct Outputs {
    pub changelog: Arc<Changelog>,
    pub quarantine: Quarantine,
    /// The current-state tables, if kept.
    pub mirror: Option<Arc<Mirror>>,
}

struct Sink<'s, S: Source> {
    source: &'s S,
    decoder: Decoder,
    partitions: Partitions,
    lake: Arc<Changelog>,
    committer: Committer,
    quarantine: Quarantine,
    mirrors: Option<Mirrors>,
    settings: LoopSettings,
    paused: bool,
    stats: Stats,
    meters: Meters,
    /// (table, column) pairs already logged for a NULL in a NOT NULL
    /// column: logged once each, counted every time.
    lost_values: HashSet<(String, String)>,
    readiness: Readiness,
    /// The last commit, or the last moment nothing was waiting to be
    /// committed: readiness asks how long input has waited since.
    last_progress: Instant,
}

/// Connects to Kafka, the lake and the quarantine as configured, and runs
/// the loop until `shutdown`.
pub async fn run(
    cfg: &SinkConfig,
    readiness: Readiness,
    shutdown: watch::Receiver<bool>,
) -> Result<Stats, PipelineError> {
    let changelog = Changelog::from_config(cfg).map_err(|source| LakeFailed {
        secs: 0,
        source: Box::new(source),
    })?;
    let quarantine = Quarantine::new(s3_store(&cfg.s3)?, &cfg.output.prefix);
    let mirror = cfg
        .mirror
        .enabled
        .then(|| Arc::new(Mirror::configured(changelog.root().clone(), cfg)));
    // The mirrors read each changelog file just after it is put: they take
    // it from memory while it is kept.
    let lake = Arc::new(match &mirror {
        Some(mirror) => changelog.keeping_files_in(mirror.recent()),
        None => changelog,
    });
    let (source, rebalances) = KafkaSource::connect(&cfg.kafka)?;
    tracing::info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, bucket = %cfg.s3.bucket,
        mirrors = cfg.mirror.enabled, "sink started");
    let settings = LoopSettings::from_config(cfg);
    let outputs = Outputs {
        changelog: lake,
        quarantine,
        mirror,
    };
    run_with(&source, rebalances, outputs, settings, readiness, shutdown).await
}

/// The lake a configuration names, for tools that write no changelog.
pub fn lake_root(cfg: &SinkConfig) -> Result<LakeRoot, LakeError> {
    LakeRoot::new(&cfg.s3, &cfg.output.prefix)
}

/// The loop, over any source. Returns once `shutdown` is set and everything
/// buffered has been committed.
pub async fn run_with<S: Source>(
    source: &S,
    mut rebalances: Rebalances,
    outputs: Outputs,
    settings: LoopSettings,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Stats, PipelineError> {
    let mut sink = Sink {
        source,
        decoder: Decoder::new(),
        partitions: Partitions::default(),
        committer: Committer::spawn(outputs.changelog.clone(), settings.give_up),
        lake: outputs.changelog,
        quarantine: outputs.quarantine,
        mirrors: outputs.mirror.map(|m| Mirrors::spawn(m, settings.give_up)),
        paused: false,
        stats: Stats::default(),
        meters: Meters::default(),
        lost_values: HashSet::new(),
        readiness,
        last_progress: Instant::now(),
        settings,
    };
    systemd::ready();
    let watchdog = Watchdog::from_env();
    // Age-based flushes are checked on this tick: a quarter of the flush
    // age (so a due segment waits at most that long), between 100 ms and 1 s.
    let period = (sink.settings.policy.max_age / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    let mut tp_names = TpNames::default();
    let mut messages = source.messages();
    loop {
        tokio::select! {
            biased;
            // The watch guard stays inside: the loop's future is Send.
            _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
            done = sink.committer.next() => {
                let done = done.ok_or(PipelineError::CommitterStopped)??;
                sink.on_flushed(done, CommitMode::Async).await?;
                sink.flush_due();
                sink.hold_memory()?;
            }
            _ = tick.tick() => {
                watchdog.ping();
                sink.apply_rebalances(&mut rebalances);
                sink.flush_due();
                sink.hold_memory()?;
                sink.report();
                let down = source.broker_down_for();
                if down >= sink.settings.give_up {
                    return Err(PipelineError::KafkaDown(down.as_secs()));
                }
                if last_report.elapsed() >= Duration::from_secs(60) {
                    tracing::info!(stats = ?sink.stats, open_segments = sink.partitions.open_segments(),
                        in_flight = sink.committer.in_flight(), "progress");
                    last_report = Instant::now();
                }
            }
            Some(received) = messages.next() => {
                let mut handled = sink.on_received(received, &mut rebalances, &mut tp_names).await?;
                // What librdkafka already holds is taken in a burst, not one
                // select (and its shutdown, commit and timer polls) per
                // message: at a drain's rate those polls cost more than
                // decoding. A burst of messages handled in memory is short
                // (about a millisecond); one that waited on S3, the lake or
                // the schema topic ends it, so that a run of such messages
                // (all quarantined, say) still lets the watchdog, shutdown
                // and commits in between each.
                for _ in 1..BURST {
                    if handled == Handled::Waited {
                        break;
                    }
                    match messages.next().now_or_never() {
                        Some(Some(received)) => {
                            handled = sink.on_received(received, &mut rebalances, &mut tp_names).await?;
                        }
                        _ => break,
                    }
                }
            }
        }
    }
    // Drain: everything buffered is committed, then Kafka's offsets.
    tracing::info!("shutting down: flushing open segments");
    sink.apply_rebalances(&mut rebalances);
    let all = sink.partitions.buffered();
    sink.readiness.set_not_ready("shutting down");
    sink.flush(all, FlushReason::Shutdown);
    sink.committer.close();
    while let Some(done) = sink.committer.next().await {
        watchdog.ping();
        sink.on_flushed(done?, CommitMode::Sync).await?;
    }
    if let Some(mirrors) = sink.mirrors.take() {
        tracing::info!("shutting down: syncing current-state tables");
        mirrors.finish().await;
    }
    tracing::info!(stats = ?sink.stats, "sink stopped");
    Ok(sink.stats)
}

impl<S: Source> Sink<'_, S> {
    /// One message from the source: rebalances first, then the message.
    async fn on_received(
        &mut self,
        received: KafkaResult<S::Message<'_>>,
        rebalances: &mut Rebalances,
        tp_names: &mut TpNames,
    ) -> Result<Handled, PipelineError> {
        let msg = match received {
            Ok(m) => m,
            Err(e) => {
                // librdkafka reconnects on its own; the tick's health check
                // decides when to give up.
                tracing::warn!(error = %e, "kafka receive error");
                return Ok(Handled::Waited);
            }
        };
        // Buffers of revoked partitions go before anything else.
        self.apply_rebalances(rebalances);
        let tp = tp_names.get(msg.topic(), msg.partition());
        let payload = msg.payload();
        let mut headers = MessageHeaders::default();
        // librdkafka parses a message's headers into an allocated list when
        // first asked for them (about 8% of the sink's CPU), and a framed
        // value says whether its record has any.
        if decode::needs_headers(payload) {
            for h in msg.headers().iter().flat_map(|h| h.iter()) {
                match h.key {
                    SCHEMA_HEADER => headers.schema_ref = h.value,
                    ENCODING_HEADER => headers.encoding = h.value,
                    marker::HEADER => headers.marker = h.value,
                    NEW_KEY_HEADER => headers.new_key = h.value,
                    OLD_KEY_HEADER => headers.old_key = h.value,
                    _ => {}
                }
            }
        }
        let handled = self
            .on_message(tp, msg.offset(), msg.key(), payload, headers)
            .await?;
        drop(msg);
        self.hold_memory()?;
        Ok(handled)
    }

    fn apply_rebalances(&mut self, rebalances: &mut Rebalances) {
        while let Ok(ev) = rebalances.try_recv() {
            match ev {
                Rebalance::Revoked(tps) => {
                    for tp in tps {
                        // The new owner resumes from the lake; writing this
                        // buffer now would only be fenced. Flushes in flight
                        // go on: the lake's txn check decides them.
                        if self.partitions.revoke(&tp) {
                            self.stats.segments_dropped += 1;
                        }
                    }
                }
                Rebalance::Assigned(tps) => {
                    for tp in tps {
                        self.partitions.assign(tp);
                    }
                    if self.paused
                        && let Err(e) = self.source.pause()
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
            self.settings.give_up,
            LakeError::is_retryable,
            || lake.positions(table, &tps),
        )
        .await
        .map_err(|g| LakeFailed {
            secs: g.secs,
            source: Box::new(g.error),
        })?;
        if self.partitions.is_assigned(tp) {
            tracing::info!(partition = %tp, lake_version = ?versions[0], "position read from the lake");
            self.partitions.learn(tp, versions[0]);
        }
        Ok(())
    }

    /// Sends the consumer of `tp` to `to`. A failed seek (the partition
    /// was revoked meanwhile, most likely) starts the position over, so
    /// the next message asks again.
    fn seek(&mut self, tp: &Tp, to: i64) {
        tracing::info!(partition = %tp, to, "seeking to the lake's position");
        if let Err(e) = self.source.seek(tp, to) {
            tracing::warn!(partition = %tp, error = %e, "seek failed");
            self.partitions.fence(tp, None, Some(to));
        }
    }

    /// The restart sequence of a partition another writer advanced: its
    /// buffer and position go, the position is read again from the lake,
    /// and the consumer is sent there now, not at the partition's next
    /// message (it may be quiet).
    async fn restart(
        &mut self,
        tp: &Tp,
        staged_by: Ticket,
        dropped_from: i64,
    ) -> Result<(), PipelineError> {
        if !self
            .partitions
            .fence(tp, Some(staged_by), Some(dropped_from))
        {
            // Restarted since the write was staged, or revoked.
            return Ok(());
        }
        self.learn_position(tp).await?;
        if let Some(to) = self.partitions.seek_now(tp) {
            self.seek(tp, to);
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        tp: Tp,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: MessageHeaders<'_>,
    ) -> Result<Handled, PipelineError> {
        let mut handled = Handled::InMemory;
        loop {
            match self.partitions.admit(&tp, offset) {
                // A message fetched before a revoke was processed: its new
                // owner reads it again.
                None => return Ok(handled),
                Some(Admit::Accept) => break,
                Some(Admit::Skip) => {
                    self.stats.skipped += 1;
                    return Ok(handled);
                }
                Some(Admit::SeekTo(to)) => {
                    self.seek(&tp, to);
                    return Ok(Handled::Waited);
                }
                Some(Admit::NeedsLakeVersion) => {
                    self.learn_position(&tp).await?;
                    handled = Handled::Waited;
                }
            }
        }
        if let Some(fingerprint) = decode::schema_ref(payload, &headers)
            && !self.decoder.knows(fingerprint)
        {
            self.learn_schemas(fingerprint).await?;
            handled = Handled::Waited;
        }
        self.stats.messages += 1;
        let meters = self.meters.table(table_of(&tp.topic));
        meters.messages.increment(1);

        let decoded = match headers.marker {
            Some(kind) => marker::parse(kind, payload).map(Decoded::Marker),
            None => self.decoder.decode_message(payload, &headers),
        };
        match decoded {
            Ok(Decoded::Marker(marker)) => {
                tracing::info!(partition = %tp, offset, recovery = %marker.id,
                    slot_start_lsn = marker.slot_start_lsn, "recovery marker");
                let row = MarkerRow {
                    marker,
                    partition: tp.partition,
                    offset,
                };
                self.partitions.segment(&tp, offset).push_marker(row);
            }
            Ok(Decoded::Row(mut row)) => {
                row.key_update = headers
                    .new_key
                    .or(headers.old_key)
                    .map(|k| String::from_utf8_lossy(k).into());
                if !row.null_in_required.is_empty() {
                    report_lost_values(&mut self.lost_values, table_of(&tp.topic), &row);
                }
                let segment = self.partitions.segment(&tp, offset);
                segment.push(&row, tp.partition, offset);
                if let Some(columns) = self.decoder.key_columns(key) {
                    segment.key = Some(columns);
                }
                self.stats.rows += 1;
            }
            Ok(Decoded::Tombstone) => {
                self.partitions.segment(&tp, offset).cover(offset);
                self.stats.tombstones += 1;
                meters.tombstones.increment(1);
            }
            Err(err) => {
                self.partitions.segment(&tp, offset).cover(offset);
                let error = err.to_string();
                let q = &self.quarantine;
                let path = with_retry(
                    Dependency::S3,
                    self.settings.give_up,
                    |_| true,
                    || q.put(&tp, offset, key, payload, &headers, &error),
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
                handled = Handled::Waited;
            }
        }
        // A full segment goes at once (memory); one merely old enough waits
        // for `flush_due`, which sends every due segment together and only
        // while the committer keeps up. Flushing it here, one partition per
        // message, queued small commits faster than they landed.
        if let Some(reason) = self.partitions.full(&tp, &self.settings.policy) {
            self.flush(vec![tp], FlushReason::Rolled(reason));
        }
        Ok(handled)
    }

    /// Reads the schema topic to its end and registers what it holds. The
    /// converter publishes a schema before any message naming it, so one
    /// still missing afterwards never comes: it is marked missing, and its
    /// messages are quarantined without reading the topic again each time.
    async fn learn_schemas(&mut self, wanted: &[u8]) -> Result<(), PipelineError> {
        let source = self.source;
        let found = with_retry(
            Dependency::Kafka,
            self.settings.give_up,
            |_| true,
            || source.read_schemas(),
        )
        .await
        .map_err(|g| PipelineError::SchemaTopic {
            secs: g.secs,
            source: g.error,
        })?;
        for s in &found {
            self.decoder.register(&s.fingerprint, &s.json);
        }
        tracing::info!(schemas = found.len(), "schema topic read");
        if !self.decoder.knows(wanted) {
            self.decoder.mark_missing(wanted);
        }
        Ok(())
    }

    /// Buffered rows and flushes in flight: what `flush.max_buffered_bytes`
    /// bounds.
    fn held_bytes(&self) -> usize {
        self.partitions.buffered_bytes() + self.committer.in_flight_bytes()
    }

    /// Keeps buffered rows plus flushes in flight under the limit. Flushing
    /// frees nothing at once (rows become files in flight), but it is what
    /// frees memory once committed, so it happens while the buffer holds
    /// more than what is in flight; beyond that, consumption pauses until
    /// commits catch up.
    fn hold_memory(&mut self) -> Result<(), PipelineError> {
        while self.held_bytes() > self.settings.max_buffered
            && self.partitions.buffered_bytes() > self.committer.in_flight_bytes()
        {
            match self.partitions.largest() {
                Some(tp) => self.flush(vec![tp], FlushReason::Memory),
                None => break,
            }
        }
        let over = self.held_bytes() > self.settings.max_buffered;
        if over != self.paused {
            if over {
                self.source.pause()?;
                tracing::debug!(
                    buffered = self.partitions.buffered_bytes(),
                    in_flight = self.committer.in_flight_bytes(),
                    "memory limit reached: consumption paused"
                );
            } else {
                self.source.resume()?;
                tracing::debug!("consumption resumed");
            }
            self.paused = over;
        }
        Ok(())
    }

    /// Updates the gauges and readiness (every tick).
    fn report(&mut self) {
        let now = Instant::now();
        metrics::gauge!(t::BUFFERED_BYTES).set(self.held_bytes() as f64);
        let oldest = self
            .partitions
            .oldest()
            .into_iter()
            .chain(self.committer.oldest_in_flight())
            .min();
        metrics::gauge!(t::OLDEST_UNFLUSHED)
            .set(oldest.map_or(0.0, |o| now.duration_since(o).as_secs_f64()));
        if oldest.is_none() && self.source.lag() <= 0 {
            self.last_progress = now;
        }
        let waited = now.duration_since(self.last_progress);
        let down = self.source.broker_down_for();
        let window = self.settings.ready_window;
        self.readiness.set(if down > CONNECTED_WITHIN {
            Err(format!(
                "no Kafka broker reachable for {} s",
                down.as_secs()
            ))
        } else if waited > window {
            Err(format!(
                "input has waited {} s without a commit (metrics.ready_window_secs = {})",
                waited.as_secs(),
                window.as_secs()
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
        let due = self.partitions.due(&self.settings.policy);
        if let Some(&(_, reason)) = due.last() {
            let tps = due.into_iter().map(|(tp, _)| tp).collect();
            self.flush(tps, FlushReason::Rolled(reason));
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
            let Some(Taken { segment, stage }) = self.partitions.take(&tp) else {
                continue;
            };
            // A flush of due segments counts each by its own reason.
            let why = match reason {
                FlushReason::Rolled(_) => segment
                    .roll_reason(&self.settings.policy)
                    .map_or(reason, FlushReason::Rolled),
                other => other,
            };
            metrics::counter!(t::FLUSHES, "reason" => why.label()).increment(1);
            opened = Some(opened.map_or(segment.opened, |o| o.min(segment.opened)));
            let Some(stage) = stage else {
                rowless.push((tp, segment.last));
                continue;
            };
            bytes += segment.bytes;
            let (first, newest_source_ms) = (segment.first, segment.newest_source_ms);
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
                        claim: stage.claim,
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
    async fn on_flushed(&mut self, done: Flushed, mode: CommitMode) -> Result<(), PipelineError> {
        let mut kafka = Vec::new();
        for l in &done.landed {
            match l.fate {
                Fate::Committed => {
                    self.meters
                        .table(table_of(&l.tp.topic))
                        .landed_source_ms(l.newest_source_ms);
                    if self.partitions.is_assigned(&l.tp) {
                        self.partitions.committed(&l.tp, l.ticket, l.last);
                        kafka.push((l.tp.clone(), l.last + 1));
                    }
                }
                Fate::Fenced => {
                    self.stats.fenced += 1;
                    self.meters.table(table_of(&l.tp.topic)).fenced.increment(1);
                    self.restart(&l.tp, l.ticket, l.first).await?;
                }
            }
        }
        for (tp, last) in &done.rowless {
            if self.partitions.is_assigned(tp) {
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
                if let Some(version) = o.version {
                    metrics::gauge!(t::CHANGELOG_VERSION, "table" => c.table.clone())
                        .set(version as f64);
                }
                if let Some(mirrors) = &self.mirrors {
                    mirrors.changed(&c.table);
                }
            }
            tracing::debug!(table = %c.table, version = ?o.version, files = o.files, rows = o.rows,
                bytes = o.bytes, ms = c.took.as_millis() as u64, "committed");
        }
        if let Err(e) = self.source.commit(&kafka, mode) {
            // Only lag reporting suffers: the lake has the positions.
            tracing::warn!(error = %e, "committing Kafka offsets failed");
        }
        Ok(())
    }
}

/// A NULL where PostgreSQL allows none: the connector lost the value (the
/// row lands as it came, NULL included). Said once per table and column at
/// WARN, counted every time.
fn report_lost_values(reported: &mut HashSet<(String, String)>, table: &str, row: &ChangeRow) {
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

#[cfg(test)]
mod tests;
