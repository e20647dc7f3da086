//! How current a mirror is: for each Kafka partition of its table, the
//! newest change applied (its source commit time and LSN), kept in every
//! mirror commit's `commitInfo` (`cdc.partitions`) and carried forward.
//!
//! A partition holds its table's changes in PostgreSQL commit order, so
//! once a change of a partition is applied, every earlier one of that
//! partition is too. The oldest of the partitions' newest commit times is
//! therefore a time through which every change of every partition has been
//! applied: what [`Through::commit_us`] reports as `cdc.sourceCommitTsMicros`.
//! A partition that has been quiet holds it back (it errs on the old side).
//!
//! It also carries the newest recovery seen in the changelog
//! ([`RecoveryState`], `cdc.recovery`): which partitions' markers are
//! applied, and whether the rows deleted during the recovery's gap are
//! removed yet. Recovery markers do not move a partition's position: they
//! are not source changes.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use serde::{Deserialize, Serialize};

use crate::decode::marker::{RECOVERY, RecoveryMarker};

/// `_cdc_op` of a TRUNCATE.
pub const TRUNCATE: &str = "t";
use crate::decode::schema::meta;

/// The `commitInfo` key of the per-partition positions.
pub const PARTITIONS_KEY: &str = "cdc.partitions";
/// The `commitInfo` key of the newest recovery's state.
pub const RECOVERY_KEY: &str = "cdc.recovery";
/// The `commitInfo` key of the newest TRUNCATE's state.
pub const TRUNCATE_KEY: &str = "cdc.truncate";

/// The newest TRUNCATE a mirror has seen. Every change before it in the
/// source is gone with it: a row whose last change is older is removed
/// (once, `reconciled`), and an older change applied later (from another
/// partition, committed after) is skipped. TRUNCATE takes an exclusive
/// lock, so every transaction that wrote the table before it committed
/// before it, at lower LSNs, and every later one after it: LSN order is
/// exact here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TruncateState {
    pub lsn: i64,
    /// Its source commit time (µs): what an incremental snapshot's read,
    /// which has no LSN, is judged by.
    pub commit_us: i64,
    #[serde(default)]
    pub reconciled: bool,
}

impl TruncateState {
    /// Whether a change at `lsn` (else at `commit_us`) came before it.
    pub fn covers(&self, lsn: Option<i64>, commit_us: Option<i64>) -> bool {
        match (lsn, commit_us) {
            (Some(lsn), _) => lsn < self.lsn,
            (None, Some(us)) => us < self.commit_us,
            (None, None) => false,
        }
    }

    /// The newer of both; of the same one, reconciled if either is.
    pub fn newest(
        older: Option<TruncateState>,
        newer: Option<TruncateState>,
    ) -> Option<TruncateState> {
        TruncateState::merged(older, newer)
    }

    fn merged(older: Option<TruncateState>, newer: Option<TruncateState>) -> Option<TruncateState> {
        match (older, newer) {
            (None, n) => n,
            (o, None) => o,
            (Some(o), Some(n)) if o.lsn == n.lsn => Some(TruncateState {
                reconciled: o.reconciled || n.reconciled,
                ..o
            }),
            (Some(o), Some(n)) => Some(if n.lsn > o.lsn { n } else { o }),
        }
    }
}

/// The newest recovery whose markers a mirror has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryState {
    pub id: String,
    pub slot_start_lsn: i64,
    pub slot_start_ms: i64,
    pub partitions: i32,
    /// Partitions whose marker is applied.
    pub seen: BTreeSet<i32>,
    /// The rows older than `slot_start_lsn` are removed.
    #[serde(default)]
    pub reconciled: bool,
}

impl RecoveryState {
    fn of(marker: &RecoveryMarker, partition: i32) -> RecoveryState {
        RecoveryState {
            id: marker.id.clone(),
            slot_start_lsn: marker.slot_start_lsn,
            slot_start_ms: marker.slot_start_ms,
            partitions: marker.partitions,
            seen: BTreeSet::from([partition]),
            reconciled: false,
        }
    }

    /// Every partition's marker is applied: so is every row the
    /// recovery's snapshot delivered.
    pub fn complete(&self) -> bool {
        (0..self.partitions).all(|p| self.seen.contains(&p))
    }

    /// Removing the rows it left behind is due.
    pub fn due(&self) -> bool {
        self.complete() && !self.reconciled
    }

    /// Both states, `newer` taking over unless it is the same recovery
    /// or an older one. A newer recovery supersedes an older one not yet
    /// reconciled: its snapshot delivered every row again, so its own
    /// reconciliation removes the older one's leftovers too.
    fn merged(
        older: Option<&RecoveryState>,
        newer: Option<&RecoveryState>,
    ) -> Option<RecoveryState> {
        match (older, newer) {
            (None, n) => n.cloned(),
            (o, None) => o.cloned(),
            (Some(o), Some(n)) if o.id == n.id => {
                let mut out = o.clone();
                out.seen.extend(&n.seen);
                out.reconciled |= n.reconciled;
                Some(out)
            }
            (Some(o), Some(n)) if n.slot_start_lsn >= o.slot_start_lsn => Some(n.clone()),
            (Some(o), Some(_)) => Some(o.clone()),
        }
    }
}

/// The newest change applied from one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    #[serde(rename = "commitTsMicros", skip_serializing_if = "Option::is_none")]
    pub commit_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<i64>,
}

impl Applied {
    fn max(self, other: Applied) -> Applied {
        Applied {
            commit_us: self.commit_us.max(other.commit_us),
            lsn: self.lsn.max(other.lsn),
        }
    }
}

/// Per Kafka partition, the newest change applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Through {
    partitions: BTreeMap<i32, Applied>,
    /// The newest recovery seen, if any.
    pub recovery: Option<RecoveryState>,
    /// The newest TRUNCATE seen, if any.
    pub truncate: Option<TruncateState>,
}

impl Through {
    /// The newest change of each partition among changelog `rows`.
    pub fn of_rows(rows: &RecordBatch) -> Through {
        let mut out = Through::default();
        let Some(partition) = rows
            .column_by_name(meta::KAFKA_PARTITION)
            .and_then(|c| arrow::compute::cast(c, &DataType::Int32).ok())
        else {
            return out;
        };
        let partition = partition.as_primitive::<Int32Type>();
        let int64 = |name| {
            rows.column_by_name(name)
                .and_then(|c| arrow::compute::cast(c, &DataType::Int64).ok())
        };
        let (commit, lsn) = (int64(meta::COMMIT_TS), int64(meta::LSN));
        let op = rows
            .column_by_name(meta::OP)
            .and_then(|c| c.as_string_opt::<i32>().cloned());
        let marker = rows
            .column_by_name(meta::RECOVERY)
            .and_then(|c| c.as_string_opt::<i32>().cloned());
        let value = |a: &Option<arrow::array::ArrayRef>, i: usize| {
            a.as_ref()
                .map(|a| a.as_primitive::<Int64Type>())
                .filter(|a| a.is_valid(i))
                .map(|a| a.value(i))
        };
        for i in 0..rows.num_rows() {
            if !partition.is_valid(i) {
                continue;
            }
            if op
                .as_ref()
                .is_some_and(|op| op.is_valid(i) && op.value(i) == RECOVERY)
            {
                let parsed = marker
                    .as_ref()
                    .filter(|m| m.is_valid(i))
                    .and_then(|m| serde_json::from_str::<RecoveryMarker>(m.value(i)).ok());
                if let Some(m) = parsed {
                    let seen = RecoveryState::of(&m, partition.value(i));
                    out.recovery = RecoveryState::merged(out.recovery.as_ref(), Some(&seen));
                }
                continue;
            }
            let applied = Applied {
                commit_us: value(&commit, i),
                lsn: value(&lsn, i),
            };
            if op
                .as_ref()
                .is_some_and(|op| op.is_valid(i) && op.value(i) == TRUNCATE)
                && let (Some(lsn), Some(commit_us)) = (applied.lsn, applied.commit_us)
            {
                let seen = TruncateState {
                    lsn,
                    commit_us,
                    reconciled: false,
                };
                out.truncate = TruncateState::merged(out.truncate, Some(seen));
            }
            let e = out.partitions.entry(partition.value(i)).or_default();
            *e = e.max(applied);
        }
        out
    }

    /// Read back from a mirror commit's `commitInfo`; `None` if the
    /// commit is not the mirror writer's (a vacuum's).
    pub fn from_commit_info(info: &serde_json::Value) -> Option<Through> {
        let partitions = info
            .get(PARTITIONS_KEY)
            .and_then(|p| serde_json::from_value::<BTreeMap<String, Applied>>(p.clone()).ok())?
            .into_iter()
            .filter_map(|(p, a)| Some((p.parse().ok()?, a)))
            .collect();
        let recovery = info
            .get(RECOVERY_KEY)
            .and_then(|r| serde_json::from_value(r.clone()).ok());
        let truncate = info
            .get(TRUNCATE_KEY)
            .and_then(|t| serde_json::from_value(t.clone()).ok());
        Some(Through {
            partitions,
            recovery,
            truncate,
        })
    }

    /// The `commitInfo` entries that record it.
    pub fn to_commit_info(&self) -> Vec<(String, serde_json::Value)> {
        let map: BTreeMap<String, Applied> = self
            .partitions
            .iter()
            .map(|(p, a)| (p.to_string(), *a))
            .collect();
        let mut out = vec![(
            PARTITIONS_KEY.to_string(),
            serde_json::to_value(map).expect("positions serialise"),
        )];
        if let Some(r) = &self.recovery {
            out.push((
                RECOVERY_KEY.to_string(),
                serde_json::to_value(r).expect("a recovery state serialises"),
            ));
        }
        if let Some(t) = &self.truncate {
            out.push((
                TRUNCATE_KEY.to_string(),
                serde_json::to_value(t).expect("a truncate state serialises"),
            ));
        }
        out
    }

    /// Both, partition by partition, the newer of each.
    pub fn merged(&self, newer: &Through) -> Through {
        let mut out = self.clone();
        for (p, a) in &newer.partitions {
            let e = out.partitions.entry(*p).or_default();
            *e = e.max(*a);
        }
        out.recovery = RecoveryState::merged(self.recovery.as_ref(), newer.recovery.as_ref());
        out.truncate = TruncateState::merged(self.truncate, newer.truncate);
        out
    }

    /// The same positions without the recovery and truncate states: what
    /// a sync from the whole changelog builds on, since its rows hold every
    /// marker and TRUNCATE again and its files every row again.
    pub fn without_recovery(&self) -> Through {
        Through {
            partitions: self.partitions.clone(),
            recovery: None,
            truncate: None,
        }
    }

    /// The source commit time (µs) through which every partition's
    /// changes are applied: the oldest of their newest.
    pub fn commit_us(&self) -> Option<i64> {
        self.partitions
            .values()
            .map(|a| a.commit_us)
            .min()
            .flatten()
    }

    /// The same for LSNs. Weaker than the time: changes of concurrent
    /// transactions interleave in LSN, not in commit order.
    pub fn lsn(&self) -> Option<i64> {
        self.partitions.values().map(|a| a.lsn).min().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int32Array, Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;
    use crate::decode::schema::utc_micros;

    fn rows(changes: &[(i32, i64, i64)]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
                Field::new(meta::COMMIT_TS, utc_micros(), true),
                Field::new(meta::LSN, DataType::Int64, true),
            ])),
            vec![
                Arc::new(Int32Array::from_iter_values(changes.iter().map(|c| c.0))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(changes.iter().map(|c| c.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.2))),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_oldest_partition_holds_the_mark_back_and_marks_only_advance() {
        let first = Through::of_rows(&rows(&[(0, 100, 10), (1, 300, 30), (0, 200, 20)]));
        assert_eq!(first.commit_us(), Some(200));
        assert_eq!(first.lsn(), Some(20));
        // A later sync that saw only partition 1, older than before (the
        // other sink's commit landed first): nothing goes back.
        let second = Through::of_rows(&rows(&[(1, 250, 25), (2, 400, 40)]));
        let through = first.merged(&second);
        assert_eq!(through.commit_us(), Some(200));
        assert_eq!(
            through.partitions[&1],
            Applied {
                commit_us: Some(300),
                lsn: Some(30)
            }
        );
        let info: serde_json::Map<_, _> = through.to_commit_info().into_iter().collect();
        assert_eq!(
            Through::from_commit_info(&serde_json::Value::Object(info)),
            Some(through)
        );
        assert_eq!(Through::from_commit_info(&serde_json::json!({})), None);
        assert_eq!(Through::default().commit_us(), None);
    }

    /// The newest TRUNCATE among the rows, carried through commits; the
    /// newer one wins, and the same one stays reconciled.
    #[test]
    fn the_newest_truncate_is_carried_forward() {
        let with_ops = |changes: &[(i32, i64, i64)], ops: &[&str]| {
            let base = rows(changes);
            let mut fields: Vec<Field> = base
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(meta::OP, DataType::Utf8, true));
            let mut columns = base.columns().to_vec();
            columns.push(Arc::new(arrow::array::StringArray::from(ops.to_vec())));
            RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
        };
        let first = Through::of_rows(&with_ops(&[(0, 100, 10), (1, 200, 20)], &["c", "t"]));
        let t = first.truncate.unwrap();
        assert_eq!((t.lsn, t.commit_us, t.reconciled), (20, 200, false));
        assert!(t.covers(Some(19), None) && !t.covers(Some(20), None));
        assert!(t.covers(None, Some(199)) && !t.covers(None, None));
        let mut done = first.clone();
        done.truncate.as_mut().unwrap().reconciled = true;
        let again = done.merged(&first);
        assert!(again.truncate.unwrap().reconciled, "the same TRUNCATE");
        let later = Through::of_rows(&with_ops(&[(2, 300, 30)], &["t"]));
        let newer = again.merged(&later).truncate.unwrap();
        assert_eq!((newer.lsn, newer.reconciled), (30, false));
        let info: serde_json::Map<_, _> = again.to_commit_info().into_iter().collect();
        assert_eq!(
            Through::from_commit_info(&serde_json::Value::Object(info)),
            Some(again)
        );
    }
}
