//! What the generator reports to operators: the metrics of the pipeline's
//! metrics contract, served with `/healthz` and `/readyz` on
//! `metrics.listen` by `cdc-telemetry`.
//!
//! Rows are counted from what PostgreSQL reported for each statement of a
//! transaction that committed (`RETURNING`, affected-row counts), never from
//! the plan: a like that already existed, an edit of a tweet that is gone, or
//! an attempt that failed and was written again do not count twice or at
//! all. Cascaded deletes and the follower-count trigger's updates are
//! PostgreSQL's doing, not the generator's, and are not counted either.

use std::time::Duration;

use cdc_telemetry::Readiness;
use cdc_telemetry::server::{self, OpsServer};
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

use crate::config::MetricsConfig;
use crate::db::BatchOutcome;
use crate::pools::Committed;

pub const BATCHES: &str = "tweetgen_batches_total";
pub const ROWS: &str = "tweetgen_rows_total";
pub const TRANSACTION_DURATION: &str = "tweetgen_transaction_duration_seconds";
pub const RECONNECTS: &str = "tweetgen_reconnects_total";
pub const RETRIES: &str = "tweetgen_retries_total";
pub const THROTTLED: &str = "tweetgen_throttled";

/// Every `(table, op)` the generator writes.
const ROW_SERIES: [(&str, &str); 10] = [
    ("users", "insert"),
    ("users", "update"),
    ("users", "delete"),
    ("tweets", "insert"),
    ("tweets", "update"),
    ("tweets", "delete"),
    ("likes", "insert"),
    ("likes", "delete"),
    ("follows", "insert"),
    ("follows", "delete"),
];

#[derive(Debug, thiserror::Error)]
#[error("cannot serve `metrics.listen`")]
pub struct ServeError(#[source] server::ServeError);

/// Serves `/metrics`, `/healthz` and `/readyz` on `metrics.listen` and
/// starts recording; `None` (and nothing recorded) when it is empty. Keep
/// the server: dropping it stops serving.
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

/// HELP lines, and every series at 0 from the start, so that a dashboard
/// sees a rate of 0 rather than no data before the first delete or retry.
fn describe() {
    describe_counter!(BATCHES, "Batches (or load chunks) committed");
    describe_counter!(
        ROWS,
        "Rows the generator's own statements wrote in committed transactions, by table and op"
    );
    describe_histogram!(
        TRANSACTION_DURATION,
        Unit::Seconds,
        "One committed batch or chunk transaction, BEGIN to COMMIT"
    );
    describe_counter!(RECONNECTS, "PostgreSQL connections replaced after a loss");
    describe_counter!(RETRIES, "Repeated attempts at a batch or chunk");
    metrics::describe_gauge!(
        THROTTLED,
        "1 while writes are held because a replication slot is close to being lost"
    );
    metrics::gauge!(THROTTLED).set(0.0);
    counter!(BATCHES).absolute(0);
    counter!(RECONNECTS).absolute(0);
    counter!(RETRIES).absolute(0);
    for (table, op) in ROW_SERIES {
        counter!(ROWS, "table" => table, "op" => op).absolute(0);
    }
}

/// A batch committed with `outcome`.
pub(crate) fn batch_committed(outcome: &BatchOutcome) {
    let o = outcome;
    let len = |n: usize| n as u64;
    committed([
        len(o.users_inserted.len()),
        o.users_updated,
        len(o.users_deleted.len()),
        len(o.tweets_inserted.len()),
        o.tweets_updated,
        len(o.tweets_deleted.len()),
        len(o.likes_inserted.len()),
        len(o.likes_deleted.len()),
        len(o.follows_inserted.len()),
        len(o.follows_deleted.len()),
    ]);
}

/// A load chunk committed: `committed` as stored, plus `tweets` tweets
/// (`committed.tweets` lists only those later rows may refer to).
pub(crate) fn chunk_committed(c: &Committed, tweets: usize) {
    let len = |n: usize| n as u64;
    committed([
        len(c.users.len()),
        0,
        0,
        len(tweets),
        0,
        0,
        len(c.likes.len()),
        0,
        len(c.follows.len()),
        0,
    ]);
}

/// Counts one committed transaction that wrote `rows`, in [`ROW_SERIES`]
/// order.
fn committed(rows: [u64; 10]) {
    counter!(BATCHES).increment(1);
    for ((table, op), n) in ROW_SERIES.into_iter().zip(rows) {
        if n > 0 {
            counter!(ROWS, "table" => table, "op" => op).increment(n);
        }
    }
}

/// A batch or chunk transaction committed after `elapsed` (from BEGIN).
pub(crate) fn transaction(elapsed: Duration) {
    histogram!(TRANSACTION_DURATION).record(elapsed.as_secs_f64());
}

/// A lost connection is being replaced.
pub(crate) fn reconnect() {
    counter!(RECONNECTS).increment(1);
}

/// A batch or chunk is about to be attempted again.
pub(crate) fn retry() {
    counter!(RETRIES).increment(1);
}
