//! What the pipeline's services tell their operators.
//!
//! - Logs: [`init`] installs one `tracing` subscriber: the journald layer
//!   when the process runs under systemd (it sets `JOURNAL_STREAM` for units
//!   whose output goes to the journal), a plain terminal formatter
//!   otherwise. Both honour `RUST_LOG`, defaulting to `info` for our crates
//!   and `warn` for delta-rs and its kernel, which log every snapshot load
//!   at INFO.
//! - Metrics and health: [`server::start`] installs the Prometheus recorder
//!   ([`prometheus`]) that the `metrics` macros record into, and serves
//!   `/metrics`, `/healthz` and `/readyz` (from a [`Readiness`] the service
//!   sets).
//! - systemd: [`systemd::ready`] and a [`systemd::Watchdog`] the main loop
//!   pings.
//! - Shutdown: [`shutdown_signal`].
//!
//! A service wires them up like this:
//!
//! ```no_run
//! # async fn service(listen: Option<std::net::SocketAddr>) -> Result<(), cdc_telemetry::server::ServeError> {
//! use cdc_telemetry::{Readiness, server, systemd};
//! let readiness = Readiness::new("connecting");
//! // `None`: the config's listen address is empty, nothing is served or recorded.
//! let _ops = match listen {
//!     Some(addr) => Some(server::start(addr, readiness.clone(), || {}).await?),
//!     None => None,
//! };
//! // ... connected:
//! readiness.set_ready();
//! systemd::ready();
//! let watchdog = systemd::Watchdog::from_env();
//! loop {
//!     watchdog.ping();
//!     metrics::counter!("service_ticks_total").increment(1);
//!     tokio::time::sleep(watchdog.bound(std::time::Duration::from_secs(60))).await;
//! }
//! # }
//! ```

pub mod health;
pub mod prometheus;
pub mod server;
pub mod systemd;

pub use health::Readiness;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,deltalake_core=warn,deltalake_aws=warn,buoyant_kernel=warn,delta_kernel=warn",
        )
    });
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry.with(journald).init();
                return;
            }
            // Falling through keeps logs visible on stderr, which systemd also
            // forwards to the journal, just without structured fields.
            Err(err) => eprintln!("journald unavailable ({err}); logging to stderr"),
        }
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

/// Resolves on the first SIGTERM or SIGINT and sets `stop` to true, which
/// the services watch to finish their current unit of work and exit 0.
pub async fn shutdown_signal(stop: tokio::sync::watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested; finishing current work");
    let _ = stop.send(true);
}
