//! After a lost replication slot, the rows deleted while it was lost are
//! still in the mirror: nothing ever told the sink of their deletes. The
//! slot guard re-snapshots every table and then appends a recovery marker
//! to each of its partitions ([`crate::decode::marker`]). Once a mirror
//! has applied the markers of every partition, every row the snapshot
//! delivered is in it with a last change at or after the marker's
//! `slot_start_lsn`, as is every change streamed since; a row whose last
//! change is older is one the snapshot did not find: deleted during the
//! gap. This removes those rows, in a commit of its own that records the
//! recovery as reconciled, so that it is done exactly once (and doing it
//! again would remove nothing).
//!
//! Every live file is read once; only those that lose rows are rewritten.
//! A row whose `_cdc_lsn` is unknown is kept.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use arrow::error::ArrowError;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use object_store::ObjectStoreExt;
use serde_json::json;

use super::changes::key_converter;
use super::{APP_ID, KEY_PROPERTY, Mirror, MirrorError, PutError, commit_info, is_conflict};
use crate::decode::schema::meta;
use crate::lake::LakeError;
use crate::lake::files::{ReadFile, now_ms};
use crate::lake::table::{LakeRoot, delta_err};

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// The recovery it finished.
    pub id: String,
    pub rows_removed: usize,
    pub files_rewritten: usize,
    /// The mirror version written.
    pub version: i64,
    /// Lost to a concurrent writer: nothing written.
    pub conflict: bool,
}

/// The rows of `batch` that are not a recovery's leftovers (last change
/// before `slot_start_lsn`), or `None` if it has none.
fn without_leftovers(
    batch: &RecordBatch,
    slot_start_lsn: i64,
) -> Result<Option<RecordBatch>, ArrowError> {
    let Some(lsn) = batch.column_by_name(meta::LSN) else {
        return Ok(None);
    };
    let lsn = arrow::compute::cast(lsn, &DataType::Int64)?;
    let lsn = lsn.as_primitive::<Int64Type>();
    let keep: BooleanArray = (0..lsn.len())
        .map(|i| Some(!lsn.is_valid(i) || lsn.value(i) >= slot_start_lsn))
        .collect();
    if keep.true_count() == batch.num_rows() {
        return Ok(None);
    }
    arrow::compute::filter_record_batch(batch, &keep).map(Some)
}

impl Mirror {
    /// Removes the leftovers of the newest recovery if its markers are all
    /// applied and it is not reconciled yet. `stale`: the mirror was
    /// committed to since it was last loaded.
    pub(super) async fn reconcile_if_due(
        &self,
        table: &str,
        mirror: &mut DeltaTable,
        stale: bool,
    ) -> Result<Option<Reconciled>, MirrorError> {
        let name = LakeRoot::mirror_of(table);
        let merr = delta_err(&name);
        if stale {
            mirror.update_state().await.map_err(&merr)?;
        }
        let Some(version) = mirror.version().map(|v| v as i64) else {
            return Ok(None);
        };
        let positions = self.through_at(table, mirror, version).await?;
        let Some(recovery) = positions.recovery.clone().filter(|r| r.due()) else {
            return Ok(None);
        };
        let state = mirror.snapshot().map_err(&merr)?.clone();
        let applied = state
            .transaction_version(mirror.log_store().as_ref(), APP_ID)
            .await
            .map_err(&merr)?;
        let Some(through) = applied else {
            return Ok(None);
        };
        let key: Vec<String> = state
            .metadata()
            .configuration()
            .get(KEY_PROPERTY)
            .and_then(|k| serde_json::from_str(k).ok())
            .ok_or_else(|| MirrorError::BadKey {
                table: table.to_string(),
            })?;
        let arrow_err = |source| MirrorError::Arrow {
            table: table.to_string(),
            source,
        };
        let file_err = |source| MirrorError::File {
            table: table.to_string(),
            source,
        };
        let store = mirror.log_store().object_store(None);
        let now = now_ms();
        let (mut actions, mut removed_rows, mut rewritten) = (Vec::new(), 0, 0);
        for f in state.log_data().iter() {
            let path = f.object_store_path();
            let store_err = |e| MirrorError::Lake(Box::new(LakeError::Store(e)));
            let bytes = store
                .get(&path)
                .await
                .map_err(store_err)?
                .bytes()
                .await
                .map_err(store_err)?;
            let file = ReadFile::read(path.to_string(), bytes).map_err(file_err)?;
            let rows =
                arrow::compute::concat_batches(&file.schema, &file.batches).map_err(arrow_err)?;
            let Some(kept) =
                without_leftovers(&rows, recovery.slot_start_lsn).map_err(arrow_err)?
            else {
                continue;
            };
            removed_rows += rows.num_rows() - kept.num_rows();
            rewritten += 1;
            actions.push(Action::Remove(Remove {
                path: path.to_string(),
                data_change: true,
                deletion_timestamp: Some(now),
                extended_file_metadata: Some(false),
                ..Default::default()
            }));
            if kept.num_rows() > 0 {
                // Still sorted by key, its range within the old one.
                let converter = key_converter(&kept.schema(), &key).map_err(arrow_err)?;
                let add = self
                    .put(&store, &kept, &key, &converter)
                    .await
                    .map_err(|e| match e {
                        PutError::File(source) => file_err(source),
                        PutError::Arrow(source) => arrow_err(source),
                    })?;
                actions.push(Action::Add(add));
            }
        }
        actions.push(Action::Txn(Transaction::new_with_last_update(
            APP_ID,
            through,
            Some(now),
        )));
        let mut done = positions.clone();
        if let Some(r) = &mut done.recovery {
            r.reconciled = true;
        }
        let mut app: HashMap<String, serde_json::Value> = commit_info(through, &done);
        app.insert(
            "cdc.reconciled".to_string(),
            json!({ "id": recovery.id, "rowsRemoved": removed_rows }),
        );
        let committed = CommitBuilder::from(CommitProperties::default().with_metadata(app))
            .with_max_retries(0)
            .with_actions(actions)
            .build(
                Some(state.snapshot()),
                mirror.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )
            .await;
        let mut out = Reconciled {
            id: recovery.id.clone(),
            rows_removed: removed_rows,
            files_rewritten: rewritten,
            version,
            conflict: false,
        };
        match committed {
            Ok(c) => {
                out.version = c.version() as i64;
                self.through
                    .lock()
                    .expect("not poisoned")
                    .insert(table.to_string(), (out.version, done));
                tracing::warn!(table, recovery = %recovery.id, rows_removed = removed_rows,
                    files_rewritten = rewritten,
                    "current-state table reconciled after a lost slot: rows deleted while it was lost removed");
                Ok(Some(out))
            }
            Err(e) if is_conflict(&e) => {
                out.conflict = true;
                Ok(Some(out))
            }
            Err(e) => Err(merr(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn rows_older_than_the_new_slot_go_and_unknown_positions_stay() {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new(meta::LSN, DataType::Int64, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(Int64Array::from(vec![Some(5), Some(10), None, Some(11)])),
            ],
        )
        .unwrap();
        let kept = without_leftovers(&batch, 10).unwrap().unwrap();
        let ids = kept.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.values(), &[2, 3, 4]);
        assert!(
            without_leftovers(&batch, 5).unwrap().is_none(),
            "none older"
        );
    }
}
