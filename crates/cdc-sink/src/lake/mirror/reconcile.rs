//! After a lost replication slot, the rows deleted while it was lost are
//! still in the mirror: nothing ever told the sink of their deletes. The
//! slot guard re-snapshots every table and then appends a recovery marker
//! to each of its partitions ([`crate::decode::marker`]). Once a mirror
//! has applied the markers of every partition, every row the snapshot
//! delivered is in it with a last change at or after the marker's
//! `slot_start_lsn`, as is every change streamed since; a row whose last
//! change is older is one the snapshot did not find: deleted during the
//! gap. A row an incremental snapshot read has no LSN, only the time it
//! was read: it is a leftover if that time is before `slot_start_ms`
//! (which assumes the Connect worker's clock and PostgreSQL's agree to
//! within the seconds between the connector's stop and its new snapshot).
//! This removes those rows, in a commit of its own that records the
//! recovery as reconciled, so that it is done exactly once (and doing it
//! again would remove nothing).
//!
//! Every live file is read once; only those that lose rows are rewritten.
//! A row with neither position is kept.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use arrow::error::ArrowError;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::{Action, Remove, Transaction};
use deltalake::protocol::{DeltaOperation, SaveMode};
use object_store::ObjectStoreExt;
use serde_json::json;

use super::changes::key_converter;
use super::through::{RecoveryState, TruncateState};
use super::{APP_ID, KEY_PROPERTY, Mirror, MirrorError, commit_info, is_conflict};
use crate::decode::schema::meta;
use crate::lake::LakeError;
use crate::lake::files::{ReadFile, now_ms};
use crate::lake::table::{LakeRoot, commit_properties, delta_err};

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

/// Where a recovery's new slot started: a row last changed before it is
/// a leftover.
#[derive(Debug, Clone, Copy)]
struct Start {
    lsn: i64,
    /// µs, as `_cdc_commit_ts`.
    micros: i64,
}

/// The rows of `batch` that are not a recovery's leftovers, or `None` if
/// it has none. A streamed change (or a blocking snapshot's read) is
/// judged by its LSN; an incremental snapshot's read, which has none, by
/// the time it was read.
fn without_leftovers(batch: &RecordBatch, start: Start) -> Result<Option<RecordBatch>, ArrowError> {
    let int64 = |name| -> Result<Option<ArrayRef>, ArrowError> {
        batch
            .column_by_name(name)
            .map(|c| arrow::compute::cast(c, &DataType::Int64))
            .transpose()
    };
    let (lsn, ts) = (int64(meta::LSN)?, int64(meta::COMMIT_TS)?);
    let lsn = lsn.as_ref().map(|a| a.as_primitive::<Int64Type>());
    let ts = ts.as_ref().map(|a| a.as_primitive::<Int64Type>());
    let before = |a: Option<&arrow::array::Int64Array>, i: usize, mark: i64| {
        a.filter(|a| a.is_valid(i)).map(|a| a.value(i) < mark)
    };
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|i| {
            let leftover = before(lsn, i, start.lsn)
                .or_else(|| before(ts, i, start.micros))
                .unwrap_or(false);
            Some(!leftover)
        })
        .collect();
    if keep.true_count() == batch.num_rows() {
        return Ok(None);
    }
    arrow::compute::filter_record_batch(batch, &keep).map(Some)
}

/// What a reconciliation removes: the rows a recovery left behind, or
/// the rows a TRUNCATE removed.
enum Due {
    Recovery(RecoveryState),
    Truncate(TruncateState),
}

impl Due {
    /// A row last changed before this is removed.
    fn start(&self) -> Start {
        match self {
            Due::Recovery(r) => Start {
                lsn: r.slot_start_lsn,
                micros: r.slot_start_ms.saturating_mul(1000),
            },
            Due::Truncate(t) => Start {
                lsn: t.lsn,
                micros: t.commit_us,
            },
        }
    }

    fn id(&self) -> String {
        match self {
            Due::Recovery(r) => r.id.clone(),
            Due::Truncate(t) => format!("TRUNCATE at LSN {}", t.lsn),
        }
    }
}

impl Mirror {
    /// Removes the leftovers of the newest recovery if its markers are all
    /// applied and it is not reconciled yet, else the rows the newest
    /// TRUNCATE removed if that is not done yet. `stale`: the mirror was
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
        let due = match (&positions.recovery, positions.truncate) {
            (Some(r), _) if r.due() => Due::Recovery(r.clone()),
            (_, Some(t)) if !t.reconciled => Due::Truncate(t),
            _ => return Ok(None),
        };
        let state = mirror.snapshot().map_err(&merr)?.clone();
        let applied = state
            .transaction_version(mirror.log_store().as_ref(), APP_ID)
            .await
            .map_err(&merr)?;
        let Some(through) = applied else {
            return Ok(None);
        };
        let configuration = state.metadata().configuration();
        let key: Vec<String> = configuration
            .get(KEY_PROPERTY)
            .and_then(|k| serde_json::from_str(k).ok())
            .ok_or_else(|| MirrorError::BadKey {
                table: table.to_string(),
            })?;
        // The files are sorted, and their ranges bound, in the mirror's order.
        let key = super::order::of(configuration, &key);
        let arrow_err = MirrorError::arrow(table);
        let file_err = MirrorError::file(table);
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
            let start = due.start();
            let Some(kept) = without_leftovers(&rows, start).map_err(arrow_err)? else {
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
                    .put(&store, &kept, &key, &converter, false)
                    .await
                    .map_err(|e| e.into_mirror(table))?;
                actions.push(Action::Add(add));
            }
        }
        actions.push(Action::Txn(Transaction::new_with_last_update(
            APP_ID,
            through,
            Some(now),
        )));
        let mut done = positions.clone();
        let what = match &due {
            Due::Recovery(recovery) => {
                if let Some(r) = &mut done.recovery {
                    r.reconciled = true;
                }
                json!({ "id": recovery.id, "rowsRemoved": removed_rows })
            }
            Due::Truncate(t) => {
                if let Some(t) = &mut done.truncate {
                    t.reconciled = true;
                }
                json!({ "truncateLsn": t.lsn, "rowsRemoved": removed_rows })
            }
        };
        let mut app: HashMap<String, serde_json::Value> = commit_info(through, &done);
        app.insert("cdc.reconciled".to_string(), what);
        let committed = CommitBuilder::from(commit_properties(&state).with_metadata(app))
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
            id: due.id(),
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
                match &due {
                    Due::Recovery(recovery) => tracing::warn!(table, recovery = %recovery.id,
                        rows_removed = removed_rows, files_rewritten = rewritten,
                        "current-state table reconciled after a lost slot: rows deleted while it was lost removed"),
                    Due::Truncate(t) => tracing::info!(
                        table,
                        lsn = t.lsn,
                        rows_removed = removed_rows,
                        files_rewritten = rewritten,
                        "current-state table truncated: rows last changed before the TRUNCATE removed"
                    ),
                }
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

    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::decode::schema::utc_micros;

    #[test]
    fn rows_older_than_the_new_slot_go_and_unknown_positions_stay() {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new(meta::LSN, DataType::Int64, true),
                Field::new(meta::COMMIT_TS, utc_micros(), true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6])),
                Arc::new(Int64Array::from(vec![
                    Some(5),
                    Some(10),
                    None,
                    Some(11),
                    None,
                    None,
                ])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![
                        Some(900_000),
                        Some(1),
                        None,
                        Some(1),
                        Some(999_999),
                        Some(1_000_000),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let start = Start {
            lsn: 10,
            micros: 1_000_000,
        };
        let kept = without_leftovers(&batch, start).unwrap().unwrap();
        let ids = kept.column(0).as_primitive::<Int64Type>();
        // 1: streamed before; 5: read by a snapshot before; 3: unknown.
        assert_eq!(ids.values(), &[2, 3, 4, 6]);
        let early = Start { lsn: 5, micros: 0 };
        assert!(
            without_leftovers(&batch, early).unwrap().is_none(),
            "none older"
        );
    }
}
