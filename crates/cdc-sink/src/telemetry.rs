//! What the sink reports to operators: the metrics of the pipeline's
//! metrics contract (docs/operations.md, Metrics), served with `/healthz` and
//! `/readyz` on `metrics.listen` by `cdc-telemetry`.
//!
//! Per-message counters are handles registered once per table and kept in
//! [`Meters`], so the hot path is an atomic add, not a label lookup in the
//! global registry.

use cdc_telemetry::Readiness;
use cdc_telemetry::server::{self, OpsServer};
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

use crate::config::MetricsConfig;

pub const CONSUMER_LAG: &str = "cdc_sink_consumer_lag";
pub const MESSAGES: &str = "cdc_sink_messages_total";
pub const ROWS_WRITTEN: &str = "cdc_sink_rows_written_total";
pub const FILES_WRITTEN: &str = "cdc_sink_files_written_total";
pub const BYTES_WRITTEN: &str = "cdc_sink_bytes_written_total";
pub const COMMITS: &str = "cdc_sink_commits_total";
pub const COMMIT_DURATION: &str = "cdc_sink_commit_duration_seconds";
pub const FLUSHES: &str = "cdc_sink_flushes_total";
pub const QUARANTINED: &str = "cdc_sink_quarantined_total";
pub const TOMBSTONES: &str = "cdc_sink_tombstones_total";
pub const NULL_IN_REQUIRED: &str = "cdc_sink_null_in_not_null_column_total";
pub const FENCED: &str = "cdc_sink_fenced_total";
pub const RETRIES: &str = "cdc_sink_retries_total";
pub const GIVE_UPS: &str = "cdc_sink_give_ups_total";
pub const BUFFERED_BYTES: &str = "cdc_sink_buffered_bytes";
pub const OLDEST_UNFLUSHED: &str = "cdc_sink_oldest_unflushed_age_seconds";
pub const LAST_COMMIT: &str = "cdc_sink_last_commit_timestamp_seconds";
pub const LAKE_SOURCE_TIMESTAMP: &str = "cdc_sink_lake_source_timestamp_seconds";
pub const READY: &str = "cdc_sink_ready";
pub const MIRROR_COMMITS: &str = "cdc_sink_mirror_commits_total";
pub const MIRROR_ERRORS: &str = "cdc_sink_mirror_errors_total";
pub const MIRROR_CHANGELOG_VERSION: &str = "cdc_sink_mirror_changelog_version";
pub const MIRROR_SOURCE_TIMESTAMP: &str = "cdc_sink_mirror_source_timestamp_seconds";
pub const MIRROR_ROWS_WRITTEN: &str = "cdc_sink_mirror_rows_written_total";
pub const MIRROR_BYTES_WRITTEN: &str = "cdc_sink_mirror_bytes_written_total";
pub const MIRROR_UNAVAILABLE: &str = "cdc_sink_mirror_unavailable_values_total";
pub const CHANGELOG_VERSION: &str = "cdc_sink_changelog_version";

#[derive(Debug, thiserror::Error)]
#[error("cannot serve `metrics.listen`")]
pub struct ServeError(#[source] server::ServeError);

/// Serves `/metrics`, `/healthz` and `/readyz` on `metrics.listen` and
/// starts recording; `None` (nothing recorded) when it is empty. Keep the
/// server: dropping it stops serving.
pub async fn serve(
    config: &MetricsConfig,
    readiness: Readiness,
) -> Result<Option<OpsServer>, ServeError> {
    let Some(addr) = config.listen_addr() else {
        return Ok(None);
    };
    let ops = server::start(addr, readiness, describe)
        .await
        .map_err(ServeError)?;
    Ok(Some(ops))
}

fn describe() {
    describe_gauge!(
        CONSUMER_LAG,
        "Messages between the partition's end and the group's committed offset (librdkafka, every 5 s)"
    );
    describe_counter!(MESSAGES, "Kafka messages admitted, by table");
    describe_counter!(ROWS_WRITTEN, "Rows committed to the Delta table");
    describe_counter!(FILES_WRITTEN, "Parquet files committed to the Delta table");
    describe_counter!(
        BYTES_WRITTEN,
        Unit::Bytes,
        "Parquet bytes committed to the Delta table"
    );
    describe_counter!(COMMITS, "Delta commits");
    describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "One table's flush, from staging its files to the end of its Delta commit"
    );
    describe_counter!(FLUSHES, "Segments flushed, by reason");
    describe_counter!(
        QUARANTINED,
        "Messages that are not change events, written to _quarantine/"
    );
    describe_counter!(TOMBSTONES, "Kafka tombstones skipped");
    describe_counter!(
        NULL_IN_REQUIRED,
        "Rows whose NOT NULL column arrived NULL (a value lost before the sink), by table and column"
    );
    describe_counter!(
        FENCED,
        "Writes dropped because another writer had advanced the partition"
    );
    describe_counter!(RETRIES, "Failed requests retried, by dependency");
    describe_counter!(GIVE_UPS, "Dependencies given up on (the sink then exits)");
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Decoded bytes buffered or in flight to the lake"
    );
    describe_gauge!(
        OLDEST_UNFLUSHED,
        Unit::Seconds,
        "Age of the oldest row not yet committed (0 when none)"
    );
    describe_gauge!(
        LAST_COMMIT,
        Unit::Seconds,
        "Unix time of the table's last Delta commit by this sink"
    );
    describe_gauge!(
        LAKE_SOURCE_TIMESTAMP,
        Unit::Seconds,
        "PostgreSQL commit time of the newest row in the lake; freshness is time() minus this"
    );
    describe_gauge!(READY, "1 while /readyz answers 200");
    describe_counter!(
        MIRROR_COMMITS,
        "Commits to the current-state table, by table"
    );
    describe_counter!(
        MIRROR_ERRORS,
        "Syncs of a current-state table that failed (retried at the next commit), by table"
    );
    describe_gauge!(
        MIRROR_CHANGELOG_VERSION,
        "The changelog version the current-state table reflects"
    );
    describe_counter!(
        MIRROR_ROWS_WRITTEN,
        "Rows written to current-state table files (rewritten and changed), by table"
    );
    describe_counter!(
        MIRROR_BYTES_WRITTEN,
        Unit::Bytes,
        "Parquet bytes written to current-state table files, by table"
    );
    describe_counter!(
        MIRROR_UNAVAILABLE,
        "Primary-key updates whose unchanged TOASTed values had no previous image in their sync, so those columns of the current-state row are NULL, by table"
    );
    describe_gauge!(
        CHANGELOG_VERSION,
        "The changelog's Delta version after this sink's last commit to it; minus cdc_sink_mirror_changelog_version, how far the current-state table is behind"
    );
    describe_gauge!(
        MIRROR_SOURCE_TIMESTAMP,
        Unit::Seconds,
        "PostgreSQL commit time of the newest change in the current-state table"
    );
    for reason in ["rows", "bytes", "age", "memory", "shutdown"] {
        counter!(FLUSHES, "reason" => reason).absolute(0);
    }
    for dependency in ["kafka", "s3", "lake"] {
        counter!(RETRIES, "dependency" => dependency).absolute(0);
        counter!(GIVE_UPS, "dependency" => dependency).absolute(0);
    }
}

/// One table's series.
pub struct TableMeters {
    pub messages: Counter,
    pub tombstones: Counter,
    pub fenced: Counter,
    pub rows: Counter,
    pub files: Counter,
    pub bytes: Counter,
    pub commits: Counter,
    pub commit_duration: Histogram,
    pub last_commit: Gauge,
    source_timestamp: Gauge,
    newest_source_ms: i64,
}

impl TableMeters {
    fn new(table: &str) -> TableMeters {
        let t = table.to_string();
        TableMeters {
            messages: counter!(MESSAGES, "table" => t.clone()),
            tombstones: counter!(TOMBSTONES, "table" => t.clone()),
            fenced: counter!(FENCED, "table" => t.clone()),
            rows: counter!(ROWS_WRITTEN, "table" => t.clone()),
            files: counter!(FILES_WRITTEN, "table" => t.clone()),
            bytes: counter!(BYTES_WRITTEN, "table" => t.clone()),
            commits: counter!(COMMITS, "table" => t.clone()),
            commit_duration: histogram!(COMMIT_DURATION, "table" => t.clone()),
            last_commit: gauge!(LAST_COMMIT, "table" => t.clone()),
            source_timestamp: gauge!(LAKE_SOURCE_TIMESTAMP, "table" => t),
            newest_source_ms: i64::MIN,
        }
    }

    /// Rows committed up to source time `ms` are in the lake. Only ever
    /// moves forward: a flush of an older partition's rows lands later.
    pub fn landed_source_ms(&mut self, ms: i64) {
        if ms > self.newest_source_ms {
            self.newest_source_ms = ms;
            self.source_timestamp.set(ms as f64 / 1000.0);
        }
    }
}

/// The per-table series, registered on first use.
#[derive(Default)]
pub struct Meters {
    tables: crate::FastMap<String, TableMeters>,
}

impl Meters {
    pub fn table(&mut self, table: &str) -> &mut TableMeters {
        if !self.tables.contains_key(table) {
            self.tables
                .insert(table.to_string(), TableMeters::new(table));
        }
        self.tables.get_mut(table).expect("inserted above")
    }
}
