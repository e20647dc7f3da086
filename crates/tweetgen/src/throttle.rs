//! Holding writes while a replication slot is close to being lost.
//!
//! The generator can write far faster than Debezium reads (38,000 rows/s
//! against about 12,500 events/s in the sustained benchmark): the slot's
//! retained WAL then grows until PostgreSQL invalidates the slot at
//! `max_slot_wal_keep_size`, and the changes it had not read are gone. So
//! before each batch (or load chunk), at most once per `check_interval_ms`,
//! the generator reads the smallest `safe_wal_size` of the logical slots of
//! its database (how much WAL may still be written before one of them may
//! be lost; a slot of another database is not its writes' reader) and,
//! while it is below `throttle.min_safe_wal_bytes`, writes nothing and says
//! why, once when it starts holding and once when it resumes.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::ThrottleConfig;

/// Whether to write now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Write,
    /// The smallest `safe_wal_size` of the logical slots, below the limit.
    Hold {
        safe_wal_bytes: i64,
    },
}

pub struct Throttle {
    min_safe: i64,
    every: Duration,
    last: Option<(Instant, Verdict)>,
    holding_since: Option<Instant>,
}

impl Throttle {
    pub fn new(config: &ThrottleConfig) -> Throttle {
        Throttle {
            min_safe: i64::try_from(config.min_safe_wal_bytes).unwrap_or(i64::MAX),
            every: Duration::from_millis(config.check_interval_ms),
            last: None,
            holding_since: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.min_safe > 0
    }

    /// How long to wait before asking again while holding.
    pub fn interval(&self) -> Duration {
        self.every
    }

    /// The verdict, from PostgreSQL at most once per interval. A failed
    /// query lets the write go: the write meets the same connection and
    /// its own retries, and a monitoring read must not stop the workload.
    pub async fn check(&mut self, client: &Client) -> Verdict {
        if !self.enabled() {
            return Verdict::Write;
        }
        if let Some((at, verdict)) = self.last
            && at.elapsed() < self.every
        {
            return verdict;
        }
        let safe: Option<i64> = match client
            .query_one(
                "SELECT min(safe_wal_size) FROM pg_replication_slots
                  WHERE slot_type = 'logical' AND database = current_database()
                    AND wal_status <> 'lost'",
                &[],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(e) => {
                tracing::debug!(error = %e, "reading the slots' safe_wal_size failed");
                None
            }
        };
        let verdict = match safe {
            Some(s) if s < self.min_safe => Verdict::Hold { safe_wal_bytes: s },
            _ => Verdict::Write,
        };
        self.record(verdict);
        self.last = Some((Instant::now(), verdict));
        verdict
    }

    fn record(&mut self, verdict: Verdict) {
        match (verdict, self.holding_since) {
            (Verdict::Hold { safe_wal_bytes }, None) => {
                self.holding_since = Some(Instant::now());
                tracing::warn!(
                    safe_wal_bytes,
                    min_safe_wal_bytes = self.min_safe,
                    "holding writes: a replication slot is close to max_slot_wal_keep_size \
                     (its reader is behind); resuming once it has caught up"
                );
                metrics::gauge!(crate::telemetry::THROTTLED).set(1.0);
            }
            (Verdict::Write, Some(since)) => {
                self.holding_since = None;
                metrics::gauge!(crate::telemetry::THROTTLED).set(0.0);
                tracing::info!(
                    held_secs = format!("{:.1}", since.elapsed().as_secs_f64()),
                    "resuming writes: the replication slots are safe again"
                );
            }
            _ => {}
        }
    }
}
