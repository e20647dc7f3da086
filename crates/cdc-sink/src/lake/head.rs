//! A changelog table followed by its log: the version, schema, protocol
//! and `txn` versions, kept current by reading each new commit once, and
//! commits written straight to the log. The changelog's writer appends
//! through it; the current-state tables' writer reads the changelog
//! through one of its own.
//!
//! Why not delta-rs' `CommitBuilder`, as the other writers use: after every
//! commit it brings the table's full snapshot up to date, and that
//! re-reads the statistics of every live file the table holds (delta-rs
//! keeps no parsed form of them between versions); it also lists the whole
//! `_delta_log` to clean up expired entries. An appender needs neither: its
//! commits add files and never read any. In a drain of 4.7M events the
//! snapshot upkeep was 17% of the sink's CPU, more than decoding, and both
//! grow with the table, so a sink running for a week would spend most of
//! its time there (docs/benchmarks.md).
//!
//! So [`LogHead`] holds only what an append needs. It is opened from a full
//! snapshot once (which also answers `txn` lookups for partitions no commit
//! since has named), then follows the log itself: [`LogHead::catch_up`]
//! reads each commit after its version, and [`LogHead::append`] writes the
//! next version by conditional put. A put that loses to another writer
//! changes nothing; the caller catches up and judges its partitions again,
//! which is where fencing lives ([`Claim`](crate::source::position::Claim)).
//! Checkpoints are still written every `delta.checkpointInterval` commits,
//! and expired log entries cleaned up with them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use deltalake::checkpoints::{cleanup_metadata, create_checkpoint};
use deltalake::kernel::transaction::{CommitData, PROTOCOL, TransactionError};
use deltalake::kernel::{Action, Metadata, StructType};
use deltalake::logstore::{CommitOrBytes, LogStoreRef, ObjectStoreRef, get_actions};
use deltalake::protocol::DeltaOperation;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

/// What `delta.checkpointInterval` is when a table does not set it.
const DEFAULT_CHECKPOINT_INTERVAL: i64 = 100;

/// Commits [`LogHead::catch_up`] read that it keeps for
/// [`LogHead::commit_entry`]: a mirror's sync reads the same commits
/// right after (a batch of them at most), so it need not GET them again.
const RECENT_COMMITS: usize = 64;

pub struct LogHead {
    /// The table's full snapshot as of its last (re)load: `txn` lookups
    /// for app ids no commit since has named, the protocol check, and
    /// checkpoints.
    table: DeltaTable,
    version: i64,
    metadata: Metadata,
    schema: Arc<StructType>,
    /// `txn` versions as of `version`, by app id: set by the commits read
    /// or written since `table`'s version, or looked up in it.
    txns: HashMap<String, Option<i64>>,
    /// The last [`RECENT_COMMITS`] commits `catch_up` read, by version.
    recent: VecDeque<(i64, Bytes)>,
}

impl LogHead {
    /// Follows `table`, which is loaded.
    pub fn open(table: DeltaTable) -> Result<LogHead, DeltaTableError> {
        // `append` hands the log store the commit's bytes, which only the
        // default log store (a conditional put) takes; the lake registers
        // it for every scheme it uses (`storage`).
        let log_store = table.log_store().name();
        if log_store != "DefaultLogStore" {
            return Err(DeltaTableError::Generic(format!(
                "the changelog writer needs delta-rs' default log store, not {log_store}"
            )));
        }
        let state = table.snapshot()?;
        Ok(LogHead {
            version: state.version() as i64,
            metadata: state.metadata().clone(),
            schema: Arc::new(state.schema().as_ref().clone()),
            txns: HashMap::new(),
            recent: VecDeque::new(),
            table,
        })
    }

    /// Follows the table `t` is a handle on, loading it; `None` if there
    /// is no table there (yet).
    pub async fn open_existing(mut t: DeltaTable) -> Result<Option<LogHead>, DeltaTableError> {
        if !t.verify_deltatable_existence().await? {
            return Ok(None);
        }
        t.load().await?;
        LogHead::open(t).map(Some)
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn schema(&self) -> &Arc<StructType> {
        &self.schema
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn store(&self) -> ObjectStoreRef {
        self.table.log_store().object_store(None)
    }

    pub fn log_store(&self) -> LogStoreRef {
        self.table.log_store()
    }

    pub fn table_url(&self) -> &Url {
        self.table.table_url()
    }

    /// The table's full snapshot as last loaded: at this head's version or
    /// behind it.
    pub fn table_as_loaded(&self) -> &DeltaTable {
        &self.table
    }

    /// The table's full snapshot at this head's version, for what needs
    /// its live files (a rebuild). A full load unless it is there already:
    /// for rare paths, not for every commit or sync.
    pub async fn table_at_head(&mut self) -> Result<&DeltaTable, DeltaTableError> {
        self.snapshot_at_head().await?;
        Ok(&self.table)
    }

    /// Reads the commits made since `version`, one GET each after one
    /// LIST. A protocol change, or a log that no longer holds the next
    /// commit (cleaned up while this head sat idle), loads the table again.
    pub async fn catch_up(&mut self) -> Result<(), DeltaTableError> {
        let log_store = self.table.log_store();
        let latest = match log_store.get_latest_version(self.version as u64).await {
            Ok(v) => v as i64,
            Err(DeltaTableError::InvalidVersion(_)) => return self.reload().await,
            Err(e) => return Err(e),
        };
        for version in self.version + 1..=latest {
            let Some(bytes) = log_store.read_commit_entry(version as u64).await? else {
                return self.reload().await;
            };
            let actions = get_actions(version as u64, &bytes)?;
            if actions.iter().any(|a| matches!(a, Action::Protocol(_))) {
                return self.reload().await;
            }
            self.apply(version, &actions)?;
            if self.recent.len() == RECENT_COMMITS {
                self.recent.pop_front();
            }
            self.recent.push_back((version, bytes));
        }
        Ok(())
    }

    /// The bytes of commit `version`: kept from [`LogHead::catch_up`] if it
    /// read it lately, else read from the log (`None`: not there).
    pub async fn commit_entry(&self, version: i64) -> Result<Option<Bytes>, DeltaTableError> {
        if let Some((_, bytes)) = self.recent.iter().find(|(v, _)| *v == version) {
            return Ok(Some(bytes.clone()));
        }
        self.table
            .log_store()
            .read_commit_entry(version as u64)
            .await
    }

    /// The `txn` version of `app_id` as of `version`.
    pub async fn txn(&mut self, app_id: &str) -> Result<Option<i64>, DeltaTableError> {
        if let Some(found) = self.txns.get(app_id) {
            return Ok(*found);
        }
        // No commit since the snapshot named it, so the snapshot's answer
        // holds; but the snapshot reads its log from storage to answer, and
        // log cleanup may have deleted an old snapshot's log since. So it
        // is brought to the head first: a full load, paid only when a
        // partition new to this writer is looked up.
        self.snapshot_at_head().await?;
        let found = self
            .table
            .snapshot()?
            .transaction_version(self.table.log_store().as_ref(), app_id)
            .await?;
        self.txns.insert(app_id.to_string(), found);
        Ok(found)
    }

    /// Writes `actions` as the version after this head's. `None`: another
    /// writer wrote that version first, and nothing of these landed.
    pub async fn append(
        &mut self,
        actions: Vec<Action>,
        operation: DeltaOperation,
    ) -> Result<Option<i64>, DeltaTableError> {
        // The table's protocol is the snapshot's: a commit that changes it
        // makes `catch_up` load the table again.
        PROTOCOL.can_commit(self.table.snapshot()?, &actions, &operation)?;
        let commit = CommitData::new(actions, operation, HashMap::new(), Vec::new());
        let version = self.version + 1;
        // The lake's log store puts the commit conditionally (If-None-Match
        // on S3; see `storage`): of two writers of one version, one fails.
        let written = self
            .table
            .log_store()
            .write_commit_entry(
                version as u64,
                CommitOrBytes::LogBytes(commit.get_bytes()?),
                uuid::Uuid::new_v4(),
            )
            .await;
        match written {
            Ok(()) => {}
            Err(TransactionError::VersionAlreadyExists(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.apply(version, &commit.actions)?;
        if (version + 1) % self.checkpoint_interval() == 0 {
            // The commit has landed whatever happens here: a checkpoint
            // that fails is only written later (by the next interval, or
            // by upkeep).
            if let Err(e) = self.checkpoint().await {
                tracing::warn!(version, error = %e, "writing a checkpoint failed");
            }
        }
        Ok(Some(version))
    }

    fn apply(&mut self, version: i64, actions: &[Action]) -> Result<(), DeltaTableError> {
        for action in actions {
            match action {
                Action::Txn(t) => {
                    self.txns.insert(t.app_id.clone(), Some(t.version));
                }
                Action::Metadata(m) => {
                    self.schema = Arc::new(m.parse_schema()?);
                    self.metadata = m.clone();
                }
                _ => {}
            }
        }
        self.version = version;
        Ok(())
    }

    fn checkpoint_interval(&self) -> i64 {
        self.metadata
            .configuration()
            .get("delta.checkpointInterval")
            .and_then(|v| v.parse().ok())
            .filter(|&v| v > 0)
            .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL)
    }

    /// A checkpoint at `version`, and the log entries it lets go: once per
    /// checkpoint interval, the full load a commit used to pay every time.
    async fn checkpoint(&mut self) -> Result<(), DeltaTableError> {
        self.snapshot_at_head().await?;
        create_checkpoint(&self.table, None).await?;
        if self
            .table
            .snapshot()?
            .table_config()
            .enable_expired_log_cleanup()
        {
            cleanup_metadata(&self.table, None).await?;
        }
        Ok(())
    }

    /// Loads the snapshot at this head's version, unless it is there.
    async fn snapshot_at_head(&mut self) -> Result<(), DeltaTableError> {
        if self.table.version() != Some(self.version as u64) {
            self.table.load_version(self.version as u64).await?;
        }
        Ok(())
    }

    /// Loads the table's snapshot again and follows it from there.
    async fn reload(&mut self) -> Result<(), DeltaTableError> {
        if let Err(e) = self.table.update_state().await {
            // A log that ends before this head's version is another
            // table's: this one was deleted and one created in its place,
            // whose versions start over. Its caller sees a new table id.
            let latest = match self.table.log_store().get_latest_version(0).await {
                Ok(latest) if (latest as i64) < self.version => latest,
                _ => return Err(e),
            };
            tracing::warn!(table = %self.table.table_url(), from = self.version, to = latest,
                "the table's log ends before the version read: it was created again; \
                 reading the new one");
            self.table.load_version(latest).await?;
        }
        let table = self.table.clone();
        *self = LogHead::open(table)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use arrow::datatypes::{DataType, Field, Schema};
    use deltalake::kernel::Transaction;
    use deltalake::protocol::OutputMode;
    use url::Url;

    use super::*;
    use crate::lake::table::{LakeRoot, create_table, table_schema};

    fn txn(app_id: &str, version: i64) -> Vec<Action> {
        vec![Action::Txn(Transaction::new(app_id, version))]
    }

    fn operation() -> DeltaOperation {
        DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: "test".into(),
            epoch_id: 0,
        }
    }

    /// Two heads on one table: the one whose put loses changes nothing,
    /// learns the winner's `txn` by catching up, and lands next.
    #[tokio::test]
    async fn a_put_lost_to_another_writer_lands_after_catching_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = LakeRoot::at(
            Url::from_directory_path(dir.path()).unwrap(),
            HashMap::new(),
        );
        let t = root.handle("t").unwrap();
        let schema = table_schema(&Schema::new(vec![Field::new("id", DataType::Int64, true)]));
        create_table(&t, "t", &schema.unwrap(), &[], std::iter::empty())
            .await
            .unwrap();
        let open = || async {
            let mut t = root.handle("t").unwrap();
            t.load().await.unwrap();
            LogHead::open(t).unwrap()
        };
        let (mut a, mut b) = (open().await, open().await);
        assert_eq!(b.append(txn("b", 7), operation()).await.unwrap(), Some(1));
        assert_eq!(a.append(txn("a", 3), operation()).await.unwrap(), None);
        assert_eq!((a.version(), a.txn("b").await.unwrap()), (0, None));
        a.catch_up().await.unwrap();
        assert_eq!((a.version(), a.txn("b").await.unwrap()), (1, Some(7)));
        assert_eq!(a.append(txn("a", 3), operation()).await.unwrap(), Some(2));
        b.catch_up().await.unwrap();
        assert_eq!(b.txn("a").await.unwrap(), Some(3));

        // The commits `b` caught up on are kept: a reader of them after
        // (a mirror's sync) gets them without reading the log again.
        let log = dir.path().join("t").join("_delta_log");
        let second = std::fs::read(log.join(format!("{:020}.json", 2))).unwrap();
        std::fs::remove_file(log.join(format!("{:020}.json", 2))).unwrap();
        assert_eq!(b.commit_entry(2).await.unwrap().unwrap(), second);
        assert_eq!(a.commit_entry(2).await.unwrap(), None, "written, not read");
    }
}
