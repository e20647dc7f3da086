//! The lake: Delta Lake tables on S3, written with delta-rs.
//!
//! - [`storage`]: the one place an S3 client is built, with one retry
//!   policy for its requests.
//! - [`table`]: one table as a writer knows it (open, create, schema fit
//!   and evolution, `txn` versions), shared by every writer and upkeep.
//! - [`files`]: Parquet files: encode, name, put, and the `Add` action;
//!   files just put, kept as rows for the current-state writer.
//! - [`changelog`]: the append writer of the per-table changelog, and the
//!   rows ([`changelog::segment`]) and rolling policy
//!   ([`changelog::roll`]) it is fed by.
//! - [`committer`]: runs the changelog's writes behind the loop, staged
//!   ahead and committed in order.
//! - [`upkeep`]: compaction, vacuum and checkpoints.
//! - [`quarantine`]: messages that could not be read, kept whole.
//!
//! Exactly once: every commit carries, per Kafka partition it covers, a
//! `txn` action (`app_id` = `cdc-sink:<group>:<topic>:<partition>`,
//! `version` = the last offset it holds), so the table itself says how far
//! each partition has landed; `source::position` owns the rules.

pub mod changelog;
pub mod committer;
pub mod files;
pub mod head;
pub mod mirror;
pub mod quarantine;
pub mod storage;
pub mod table;
pub mod upkeep;

use arrow::error::ArrowError;
use deltalake::DeltaTableError;
use deltalake::kernel::transaction::TransactionError;

use crate::lake::files::FileError;
use crate::source::position::Tp;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("Delta table `{table}`")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },
    #[error("building a record batch failed")]
    Arrow(#[from] ArrowError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("object store request failed")]
    Store(#[from] object_store::Error),
    #[error("listing the tables under {root}")]
    List {
        root: String,
        #[source]
        source: object_store::Error,
    },
    #[error("lake location `{0}` is not a valid URL")]
    Location(String),
}

impl LakeError {
    /// Storage and commit errors may pass; encoding errors, and a table
    /// this writer cannot write, will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            LakeError::Delta { source, .. } => !matches!(
                source,
                DeltaTableError::Transaction {
                    source: TransactionError::UnsupportedTableFeatures(_)
                        | TransactionError::TableFeaturesRequired(_)
                        | TransactionError::DeltaTableAppendOnly
                } | DeltaTableError::SchemaMismatch { .. }
                    | DeltaTableError::InvalidTableLocation(_)
            ),
            LakeError::File(e) => e.is_retryable(),
            LakeError::Store(_) | LakeError::List { .. } => true,
            LakeError::Arrow(_) | LakeError::Location(_) => false,
        }
    }
}

/// Tests: a writer tells `reached` where the gate stands (a build once its
/// files are put, a changelog commit before its put), then waits for
/// `proceed`, so a test can commit something else in between.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Gate {
    pub reached: tokio::sync::Notify,
    pub proceed: tokio::sync::Notify,
}

#[cfg(test)]
impl Gate {
    pub(crate) async fn pass(&self) {
        self.reached.notify_one();
        self.proceed.notified().await;
    }
}

/// The crash tests' failpoints: a pause between putting a commit's files
/// and committing them, which widens the window a SIGKILL must hit to
/// leave written-but-uncommitted files. `lake::before-commit` (the
/// changelog) and `mirror::before-commit` (a current-state table), set as
/// `FAILPOINTS=NAME=return(MILLISECONDS)`. Compiled only with the
/// `failpoints` feature, which tests/run.sh enables; otherwise a no-op.
pub async fn failpoint_pause(name: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        let pause: Option<std::time::Duration> = (|| {
            fail::fail_point!(name, |ms: Option<String>| {
                ms.and_then(|ms| ms.parse().ok())
                    .map(std::time::Duration::from_millis)
            });
            None
        })();
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// The `txn` application id of one partition within one consumer group.
pub fn app_id(group_id: &str, tp: &Tp) -> String {
    format!("cdc-sink:{group_id}:{}:{}", tp.topic, tp.partition)
}

/// `table` is the last dot-separated part of the topic (`twitter.tweets`
/// is `tweets`).
pub fn table_of(topic: &str) -> &str {
    topic.rsplit('.').next().unwrap_or(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids_name_group_topic_and_partition() {
        assert_eq!(
            app_id("cdc-sink", &Tp::new("twitter.users", 2)),
            "cdc-sink:cdc-sink:twitter.users:2"
        );
        assert_eq!(table_of("twitter.tweets"), "tweets");
    }
}
