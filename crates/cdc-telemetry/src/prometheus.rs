//! The process-wide `metrics` recorder, rendered in the Prometheus text
//! format by `metrics-exporter-prometheus`.
//!
//! Services record with the `metrics` macros (`counter!`, `histogram!`, ...)
//! wherever the event happens; until [`install`] runs those are no-ops, so
//! a service with its endpoint disabled pays nothing and library code (and
//! its tests) need no recorder.

use std::sync::{Mutex, PoisonError};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Upper bounds, in seconds, of the buckets of every histogram whose name
/// ends in `_duration_seconds`: 5 ms (a small local transaction) to 60 s
/// (an upload retried against a slow S3), roughly 2.5x apart so that
/// `histogram_quantile` stays within a factor of about two anywhere in the
/// range. Slower events land in `+Inf`.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus metrics recorder")]
pub struct RecorderError(#[source] BuildError);

/// Installs the global recorder and returns the handle that renders it.
///
/// Idempotent: a second call returns the handle of the first, since a
/// process has one global recorder (and a test binary may start several
/// servers). Fails if some other recorder was installed first.
///
/// Histograms named `*_duration_seconds` get [`DURATION_BUCKETS`]; other
/// histograms are rendered as summaries. Nothing runs the exporter's upkeep
/// (draining histogram samples into their buckets) but [`crate::server`] and
/// each render: a caller that installs without serving must call
/// [`PrometheusHandle::run_upkeep`] now and then.
pub fn install() -> Result<PrometheusHandle, RecorderError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            DURATION_BUCKETS,
        )
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(RecorderError)?;
    *installed = Some(handle.clone());
    Ok(handle)
}
