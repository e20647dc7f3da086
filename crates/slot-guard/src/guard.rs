//! The watch loop: one look at the slot every `guard.interval_ms`, its
//! metrics, and a recovery when PostgreSQL reports it lost.

use std::time::{Duration, Instant};

use backon::Retryable;
use cdc_telemetry::Readiness;
use cdc_telemetry::server::{self, OpsServer};
use cdc_telemetry::systemd::{self, Watchdog};
use metrics::{counter, describe_counter, describe_gauge, gauge};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{Config, ConfigError, MetricsConfig};
use crate::connect::{Connect, ConnectError};
use crate::recovery::{self, RecoveryError};
use crate::slot::{self, SlotStatus};

pub const WAL_STATUS: &str = "cdc_slot_guard_wal_status";
pub const SAFE_WAL: &str = "cdc_slot_guard_safe_wal_size_bytes";
pub const RETAINED_WAL: &str = "cdc_slot_guard_retained_wal_bytes";
pub const RECOVERING: &str = "cdc_slot_guard_recovering";
pub const RECOVERIES: &str = "cdc_slot_guard_recoveries_total";
pub const LAST_RECOVERY: &str = "cdc_slot_guard_last_recovery_duration_seconds";

/// The series of [`WAL_STATUS`]: one is 1, the others 0.
const STATUSES: [&str; 5] = ["reserved", "extended", "unreserved", "lost", "absent"];

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach PostgreSQL at {host}:{port} (gave up after {secs} s)")]
    Postgres {
        host: String,
        port: u16,
        secs: u64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot read the connector's configuration (gave up after {secs} s)")]
    Connect {
        secs: u64,
        #[source]
        source: ConnectError,
    },
    #[error("the recovery of slot {slot} failed {attempts} times in a row")]
    Recovery {
        slot: String,
        attempts: u32,
        #[source]
        source: RecoveryError,
    },
    #[error("cannot serve `metrics.listen`")]
    Serve(#[source] server::ServeError),
}

/// Serves `/metrics`, `/healthz` and `/readyz`; `None` when
/// `metrics.listen` is empty. Keep the server: dropping it stops serving.
pub async fn serve(
    config: &MetricsConfig,
    readiness: Readiness,
) -> Result<Option<OpsServer>, GuardError> {
    let Some(addr) = config.listen_addr() else {
        return Ok(None);
    };
    let ops = server::start(addr, readiness, describe)
        .await
        .map_err(GuardError::Serve)?;
    Ok(Some(ops))
}

fn describe() {
    describe_gauge!(
        WAL_STATUS,
        "1 for the slot's pg_replication_slots.wal_status (absent: no slot), 0 for the others"
    );
    describe_gauge!(
        SAFE_WAL,
        "Bytes of WAL that can be written before the slot may be lost (safe_wal_size)"
    );
    describe_gauge!(RETAINED_WAL, "Bytes of WAL the slot holds back");
    describe_gauge!(RECOVERING, "1 while a lost slot is being recovered");
    describe_counter!(RECOVERIES, "Recoveries of a lost slot, by outcome");
    describe_gauge!(
        LAST_RECOVERY,
        "Seconds the last successful recovery took, lost slot seen to snapshot signalled"
    );
    for outcome in ["ok", "failed"] {
        counter!(RECOVERIES, "outcome" => outcome).absolute(0);
    }
    gauge!(RECOVERING).set(0.0);
}

/// The slot's status as the metric and the log name it.
fn status_name(status: Option<&SlotStatus>) -> &str {
    match status {
        None => "absent",
        Some(s) => s.wal_status.as_deref().unwrap_or("being created"),
    }
}

fn record(status: Option<&SlotStatus>) {
    let current = status_name(status);
    for s in STATUSES {
        gauge!(WAL_STATUS, "status" => s).set(if s == current { 1.0 } else { 0.0 });
    }
    let bytes = |v: Option<i64>| v.map_or(f64::NAN, |b| b as f64);
    gauge!(SAFE_WAL).set(bytes(status.and_then(|s| s.safe_wal_size)));
    gauge!(RETAINED_WAL).set(bytes(status.and_then(|s| s.retained_bytes)));
}

/// A PostgreSQL session, retried with backoff for `guard.give_up_after_secs`.
async fn connect_pg(config: &Config) -> Result<Client, GuardError> {
    let db = &config.database;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&db.host)
        .port(db.port)
        .dbname(&db.dbname)
        .user(&db.user)
        .application_name("cdc-slot-guard")
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = db.resolve_password()? {
        pg.password(p.expose_secret());
    }
    let connect = || async {
        let (client, connection) = pg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok::<_, tokio_postgres::Error>(client)
    };
    connect
        .retry(recovery::backoff(config.give_up_after()))
        .notify(|e, after| {
            Watchdog::from_env().ping();
            tracing::warn!(error = %e, retry_in = ?after, "cannot reach PostgreSQL, retrying");
        })
        .await
        .map_err(|source| GuardError::Postgres {
            host: db.host.clone(),
            port: db.port,
            secs: config.guard.give_up_after_secs,
            source,
        })
}

/// Watches the slot until `stop` turns true.
pub async fn run(
    config: &Config,
    readiness: Readiness,
    watchdog: Watchdog,
    mut stop: watch::Receiver<bool>,
) -> Result<(), GuardError> {
    let connect = Connect::new(&config.connect);
    let mut pg = connect_pg(config).await?;
    let slot = (|| connect.config())
        .retry(recovery::backoff(config.give_up_after()))
        .notify(|e, after| {
            tracing::warn!(error = %e, retry_in = ?after, "cannot read the connector, retrying");
        })
        .await
        .map_err(|source| GuardError::Connect {
            secs: config.guard.give_up_after_secs,
            source,
        })?
        .slot;
    tracing::info!(%slot, connector = %config.connect.connector, "watching the replication slot");
    readiness.set_ready();
    systemd::ready();

    let mut failures = 0;
    let mut last_status = String::new();
    loop {
        watchdog.ping();
        let status = match slot::status(&pg, &slot).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading the slot failed; reconnecting");
                readiness.set_not_ready("reconnecting to PostgreSQL");
                pg = connect_pg(config).await?;
                readiness.set_ready();
                continue;
            }
        };
        record(status.as_ref());
        let now = status_name(status.as_ref());
        if now != last_status {
            // Once per change, not per look.
            tracing::info!(%slot, wal_status = now, "slot status");
            last_status = now.to_string();
        }
        let lost = status.as_ref().is_some_and(SlotStatus::is_lost);
        // A recovery an earlier run left unfinished (the connector's config
        // says so) is finished now. Connect not answering is no reason to
        // act: the next look asks again.
        let pending = !lost
            && match connect.config().await {
                Ok(c) => recovery::is_pending(&c),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the connector's config failed");
                    false
                }
            };
        if lost || pending {
            if lost {
                tracing::error!(%slot, "PostgreSQL has lost the replication slot: recovering");
            } else {
                tracing::warn!(%slot, "finishing the recovery an earlier run left pending");
            }
            gauge!(RECOVERING).set(1.0);
            readiness.set_not_ready("recovering a lost replication slot");
            let started = Instant::now();
            // The steps wait on Connect and PostgreSQL: keep the watchdog fed.
            let result = {
                let recovery = recovery::recover(&pg, &connect, config);
                tokio::pin!(recovery);
                loop {
                    tokio::select! {
                        r = &mut recovery => break r,
                        _ = tokio::time::sleep(watchdog.bound(Duration::from_secs(5))) => watchdog.ping(),
                    }
                }
            };
            gauge!(RECOVERING).set(0.0);
            readiness.set_ready();
            match result {
                Ok(r) => {
                    failures = 0;
                    counter!(RECOVERIES, "outcome" => "ok").increment(1);
                    gauge!(LAST_RECOVERY).set(started.elapsed().as_secs_f64());
                    tracing::warn!(slot = %r.slot, tables = ?r.tables,
                        markers = r.marked.as_ref().map_or(0, |m| m.records),
                        secs = format!("{:.1}", r.took.as_secs_f64()),
                        "recovered: streaming on a new slot, every captured table re-snapshotted");
                }
                Err(source) => {
                    failures += 1;
                    counter!(RECOVERIES, "outcome" => "failed").increment(1);
                    tracing::error!(error = %error_chain(&source), attempt = failures,
                        of = config.guard.attempts, "recovery failed");
                    if failures >= config.guard.attempts {
                        return Err(GuardError::Recovery {
                            slot,
                            attempts: failures,
                            source,
                        });
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(watchdog.bound(config.interval())) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
