//! The recovery of a lost slot, step by step (the crate's overview says
//! why each). Every step may run again after a crash part way: a slot
//! already dropped is skipped, offsets already deleted stay deleted, and a
//! connector already running on a new slot only gets the snapshot signal.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::connect::{Connect, ConnectError, ConnectorState};
use crate::slot::{self, Dropped};

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
}

/// What a finished recovery did.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub slot: String,
    /// The tables whose incremental snapshot was signalled.
    pub tables: Vec<String>,
    pub took: Duration,
}

/// Recovers the connector after its slot was lost.
pub async fn recover(
    pg: &Client,
    connect: &Connect,
    step_timeout: Duration,
) -> Result<Recovery, RecoveryError> {
    let started = Instant::now();
    let config = connect.config().await?;
    let slot = config.slot.clone();

    tracing::warn!(%slot, "recovery: stopping the connector");
    connect.stop().await?;
    connect
        .wait_for(ConnectorState::Stopped, step_timeout)
        .await?;

    let waiting = Instant::now();
    loop {
        match slot::drop_slot(pg, &slot).await? {
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
                    slot,
                    waited: waiting.elapsed(),
                });
            }
        }
    }

    // The offsets point into WAL that no longer exists.
    connect.delete_offsets().await?;
    tracing::warn!("recovery: deleted the connector's offsets");

    // Without offsets, `initial` would read every table before streaming
    // one change, with the new slot holding WAL all the while: stream from
    // now instead, and snapshot incrementally below.
    if config.raw.get("snapshot.mode").and_then(|v| v.as_str()) != Some("no_data") {
        let mut raw = config.raw.clone();
        raw.insert("snapshot.mode".into(), "no_data".into());
        connect.put_config(&raw).await?;
        tracing::info!("recovery: snapshot.mode set to no_data for the restart");
    }
    connect.resume().await?;
    connect
        .wait_for(ConnectorState::Running, step_timeout)
        .await?;

    let waiting = Instant::now();
    loop {
        match slot::status(pg, &slot).await? {
            Some(s) if !s.is_lost() => break,
            _ if waiting.elapsed() < step_timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {
                return Err(RecoveryError::NoNewSlot {
                    slot,
                    waited: waiting.elapsed(),
                });
            }
        }
    }
    tracing::warn!(%slot, "recovery: the connector streams on a new slot");

    slot::signal_snapshot(pg, &config.signal_table, &config.tables).await?;
    tracing::warn!(tables = ?config.tables, signal = %config.signal_table,
        "recovery: incremental snapshot of every captured table signalled");
    Ok(Recovery {
        slot,
        tables: config.tables,
        took: started.elapsed(),
    })
}
