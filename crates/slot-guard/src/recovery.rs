//! The recovery of a lost slot, step by step (the crate's overview says
//! why each), written so that a recovery cut off anywhere is finished by
//! the next look rather than left half done.
//!
//! The intent is recorded first, durably, where every later look finds it:
//! a key in the connector's own configuration ([`PENDING`], stored by
//! Connect in its config topic), together with `snapshot.mode=no_data`.
//! Then the offsets are deleted and only then the slot dropped, so that
//! whoever resumes the connector in between (a redeploy re-registering
//! it) never streams from offsets into WAL that is gone: without offsets
//! and with the registered `initial` mode it takes a full snapshot, and
//! with `no_data` the guard's own snapshot signal follows. The key is
//! removed last, after the markers are written, so a crash before that
//! only signals the snapshot (and writes the markers) twice, which the
//! current-state tables absorb.
//!
//! The mark also holds `slotStartLsn`: the WAL position when the stopped
//! connector could deliver nothing more from the lost slot, so before
//! every change the new slot streams and after every change delivered
//! before. Once the snapshot is in Kafka (Connect's committed offset is
//! past the signal with no snapshot left in it), a marker carrying it goes
//! into every partition of every captured topic ([`crate::markers`]); the
//! current-state tables then drop the rows the snapshot did not deliver.
//!
//! Each call to Connect or PostgreSQL is retried with backoff for
//! `guard.step_timeout_secs` (a Connect rebalance answers 409 for a
//! moment; a restarting PostgreSQL refuses connections).

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::Client;

use crate::config::Config;
use crate::connect::{Connect, ConnectError, ConnectorConfig, ConnectorState};
use crate::markers::{self, Marked, MarkerError};
use crate::slot::{self, Dropped};

/// The connector configuration key that marks a recovery in progress; its
/// value says which slot was lost and when.
pub const PENDING: &str = "cdclake.recovery.pending";

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("PostgreSQL")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("slot {slot} is still held by a walsender after {waited:?}")]
    SlotStillActive { slot: String, waited: Duration },
    #[error("the connector runs but its new slot {slot} did not appear within {waited:?}")]
    NoNewSlot { slot: String, waited: Duration },
    #[error("the incremental snapshot did not complete within {waited:?} (tables left: {left})")]
    SnapshotTimeout { waited: Duration, left: String },
    #[error("writing the recovery markers")]
    Markers(#[from] MarkerError),
}

/// The value of [`PENDING`]: JSON, since Connect keeps config values as
/// strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pending {
    slot: String,
    started_at_unix: u64,
    /// See the module overview.
    slot_start_lsn: i64,
    /// The same moment on PostgreSQL's clock (Unix ms).
    slot_start_ms: i64,
}

impl Pending {
    fn of(config: &ConnectorConfig) -> Option<Pending> {
        serde_json::from_str(config.raw.get(PENDING)?.as_str()?).ok()
    }
}

/// What a finished recovery did.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub slot: String,
    /// The tables whose incremental snapshot was signalled.
    pub tables: Vec<String>,
    /// The markers written (`None`: an unfinished recovery of an older
    /// guard recorded no start position, so none could be).
    pub marked: Option<Marked>,
    pub took: Duration,
}

/// Whether the connector's configuration says a recovery is unfinished.
pub fn is_pending(config: &ConnectorConfig) -> bool {
    config.raw.contains_key(PENDING)
}

/// Capped exponential backoff with jitter for at most `limit`: every retry
/// of the guard (a recovery step, reaching PostgreSQL or Connect at start).
pub fn backoff(limit: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_total_delay(Some(limit))
        .without_max_times()
}

/// Runs `step` until it succeeds, for at most `limit`.
async fn step<T, E, Fut>(what: &str, limit: Duration, f: impl FnMut() -> Fut) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    f.retry(backoff(limit))
        .notify(|e, after| tracing::warn!(step = what, error = %e, retry_in = ?after, "recovery step failed, retrying"))
        .await
}

/// Recovers the connector after its slot was lost, or finishes a recovery
/// an earlier run left pending.
pub async fn recover(
    pg: &Client,
    connect: &Connect,
    settings: &Config,
) -> Result<Recovery, RecoveryError> {
    let step_timeout = settings.step_timeout();
    let started = Instant::now();
    let config = step("read the connector's config", step_timeout, || {
        connect.config()
    })
    .await?;
    let slot = config.slot.clone();
    let status = step("read the slot", step_timeout, || slot::status(pg, &slot)).await?;
    let state = step("read the connector's state", step_timeout, || {
        connect.state()
    })
    .await?;
    // Only the last steps are left when the connector already streams on a
    // healthy slot under a pending recovery: it was resumed, the signal
    // may be missing.
    let resumed = is_pending(&config)
        && state == ConnectorState::Running
        && status.as_ref().is_some_and(|s| !s.is_lost());
    if !resumed {
        stop_and_replace_slot(pg, connect, &config, step_timeout).await?;
    }
    let signalled = step("signal the snapshot", step_timeout, || {
        slot::signal_snapshot(pg, &config.signal_table, &config.tables)
    })
    .await?;
    tracing::warn!(tables = ?config.tables, signal = %config.signal_table,
        "recovery: incremental snapshot of every captured table signalled");
    wait_for_snapshot(connect, signalled, settings.snapshot_timeout()).await?;

    let current = step("read the connector's config", step_timeout, || {
        connect.config()
    })
    .await?;
    let marked = match Pending::of(&current) {
        Some(p) => {
            let id = format!("{slot}@{}", p.slot_start_lsn);
            let marked = step("write the recovery markers", step_timeout, || {
                markers::publish(
                    &settings.kafka,
                    &config.tables,
                    &id,
                    &slot,
                    p.slot_start_lsn,
                    p.slot_start_ms,
                )
            })
            .await?;
            tracing::warn!(recovery = %id, topics = ?marked.topics, records = marked.records,
                "recovery: snapshot complete in Kafka, markers written");
            Some(marked)
        }
        None => {
            tracing::warn!(
                "recovery: the pending mark holds no start position (an older guard's): no markers, so rows deleted while the slot was lost stay in the current-state tables"
            );
            None
        }
    };

    // Done: the mark goes, `no_data` stays (see the crate overview).
    if is_pending(&current) {
        let mut raw = current.raw.clone();
        raw.remove(PENDING);
        step("clear the recovery mark", step_timeout, || {
            connect.put_config(&raw)
        })
        .await?;
    }
    Ok(Recovery {
        slot,
        tables: config.tables,
        marked,
        took: started.elapsed(),
    })
}

/// The incremental snapshot signalled before WAL position `signalled` is
/// complete and every record of it is in Kafka: Connect has committed an
/// offset past the signal that names no collection still to read.
async fn wait_for_snapshot(
    connect: &Connect,
    signalled: i64,
    timeout: Duration,
) -> Result<(), RecoveryError> {
    let started = Instant::now();
    let mut told = Instant::now();
    let mut left = String::from("unknown");
    loop {
        match connect.offsets().await {
            Ok(offsets) => {
                let past = |o: &serde_json::Map<String, Value>| {
                    o.get("lsn")
                        .and_then(Value::as_i64)
                        .is_some_and(|l| l > signalled)
                };
                let running = |o: &serde_json::Map<String, Value>| {
                    o.get(SNAPSHOT_OFFSET_KEY).is_some_and(|c| !c.is_null())
                };
                if offsets.iter().any(|o| past(o) && !running(o)) {
                    tracing::info!(
                        secs = started.elapsed().as_secs(),
                        "recovery: snapshot complete"
                    );
                    return Ok(());
                }
                left = offsets
                    .iter()
                    .filter_map(|o| o.get(SNAPSHOT_OFFSET_KEY))
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the connector's offsets failed; retrying")
            }
        }
        if started.elapsed() > timeout {
            return Err(RecoveryError::SnapshotTimeout {
                waited: started.elapsed(),
                left,
            });
        }
        if told.elapsed() > Duration::from_secs(60) {
            tracing::info!(secs = started.elapsed().as_secs(), left = %left,
                "recovery: waiting for the incremental snapshot");
            told = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The least time between the connector's stop and its resume; see
/// `stop_and_replace_slot`.
const CLOCK_MARGIN: Duration = Duration::from_secs(10);

/// The key of Debezium's source offset that lists the collections an
/// incremental snapshot still has to read; absent once it is complete.
const SNAPSHOT_OFFSET_KEY: &str = "incremental_snapshot_collections";

/// Steps 1 to 4: the connector stopped, the intent recorded, its offsets
/// deleted, the lost slot dropped, the connector resumed on a new slot.
async fn stop_and_replace_slot(
    pg: &Client,
    connect: &Connect,
    config: &ConnectorConfig,
    step_timeout: Duration,
) -> Result<(), RecoveryError> {
    let slot = &config.slot;
    tracing::warn!(%slot, "recovery: stopping the connector");
    step("stop the connector", step_timeout, || connect.stop()).await?;
    connect
        .wait_for(ConnectorState::Stopped, step_timeout)
        .await?;

    // The intent, durably, before anything is deleted, with a position
    // after everything the stopped connector delivered. Taken afresh each
    // time: a retry may be about to drop a new slot that already streamed
    // (its undelivered deletes lost too), and any later position is as
    // good, since the snapshot that follows reads every row again. The
    // time stands half of CLOCK_MARGIN after the stop, and the connector
    // resumes no sooner than CLOCK_MARGIN after it (see below).
    let mut raw = config.raw.clone();
    raw.insert("snapshot.mode".into(), "no_data".into());
    let start = step("read the WAL position", step_timeout, || slot::position(pg)).await?;
    let stopped_at = Instant::now();
    let pending = Pending {
        slot: slot.clone(),
        started_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        slot_start_lsn: start.lsn,
        slot_start_ms: start.at_ms + CLOCK_MARGIN.as_millis() as i64 / 2,
    };
    raw.insert(
        PENDING.into(),
        Value::String(serde_json::to_string(&pending).expect("a mark serialises")),
    );
    step("record the recovery", step_timeout, || {
        connect.put_config(&raw)
    })
    .await?;

    // The offsets point into WAL that no longer exists. Connect deletes
    // them only from a stopped connector.
    step("delete the connector's offsets", step_timeout, || {
        connect.delete_offsets()
    })
    .await?;
    tracing::warn!("recovery: deleted the connector's offsets");

    let waiting = Instant::now();
    loop {
        match step("drop the slot", step_timeout, || slot::drop_slot(pg, slot)).await? {
            Dropped::Dropped => {
                tracing::warn!(%slot, "recovery: dropped the lost slot");
                break;
            }
            Dropped::Absent => {
                tracing::info!(%slot, "recovery: the slot is already gone");
                break;
            }
            Dropped::StillActive if waiting.elapsed() < step_timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Dropped::StillActive => {
                return Err(RecoveryError::SlotStillActive {
                    slot: slot.clone(),
                    waited: waiting.elapsed(),
                });
            }
        }
    }

    // Rows an incremental snapshot reads carry the read time on the Connect
    // worker's clock, judged against `slot_start_ms` on PostgreSQL's: with
    // every earlier read before the stop and every new one after the
    // resume, the two clocks may differ by up to half the margin.
    tokio::time::sleep(CLOCK_MARGIN.saturating_sub(stopped_at.elapsed())).await;
    step("resume the connector", step_timeout, || connect.resume()).await?;
    connect
        .wait_for(ConnectorState::Running, step_timeout)
        .await?;
    let waiting = Instant::now();
    loop {
        match step("read the slot", step_timeout, || slot::status(pg, slot)).await? {
            Some(s) if !s.is_lost() => break,
            _ if waiting.elapsed() < step_timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {
                return Err(RecoveryError::NoNewSlot {
                    slot: slot.clone(),
                    waited: waiting.elapsed(),
                });
            }
        }
    }
    tracing::warn!(%slot, "recovery: the connector streams on a new slot");
    Ok(())
}
