//! The CPU half of a copy-on-write: one mirror file's rows after the changes
//! routed to it. [`Rewrite`] owns what it needs, so a sync runs it on a
//! blocking thread and the runtime goes on serving the Kafka loop and the
//! S3 requests meanwhile.
//!
//! A mirror file is written sorted by key, so its rows are walked once
//! beside the (sorted) changed keys, a merge join: no hashing or sorting of
//! the rows a change leaves alone, which are most of them.

use std::cmp::Ordering;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, new_empty_array};
use arrow::compute::interleave;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::row::{OwnedRow, RowConverter};
use bytes::Bytes;

use crate::lake::files::{FileError, ReadFile, align};
use crate::lake::mirror::MirrorError;
use crate::lake::mirror::changes::{Outcome, Source, key_rows};

/// Why a rewrite, or putting its file, failed.
pub(super) enum RewriteError {
    File(FileError),
    Arrow(ArrowError),
}

impl RewriteError {
    pub fn into_mirror(self, table: &str) -> MirrorError {
        match self {
            RewriteError::File(e) => MirrorError::file(table)(e),
            RewriteError::Arrow(e) => MirrorError::arrow(table)(e),
        }
    }
}

/// A live mirror file: as fetched, or as kept when this process wrote it
/// ([`crate::lake::files::Recent`]).
pub(super) enum OldFile {
    Fetched { path: String, bytes: Bytes },
    Kept(ReadFile),
}

/// One file's rewrite (or a new file, without `old`).
pub(super) struct Rewrite {
    pub old: Option<OldFile>,
    /// The changelog rows, projected to the mirror's columns.
    pub changed: RecordBatch,
    /// The changelog rows' own schema: what `carried` column indices name.
    pub changes_schema: SchemaRef,
    /// The changed keys routed to this file, sorted, with their outcomes.
    pub keys: Vec<(OwnedRow, Outcome)>,
    pub key: Arc<[String]>,
    pub converter: Arc<RowConverter>,
    /// The mirror's columns.
    pub schema: SchemaRef,
}

impl Rewrite {
    /// The file's rows after the changes, sorted by key.
    pub fn run(self) -> Result<RecordBatch, RewriteError> {
        let old = match &self.old {
            Some(file) => {
                let read;
                let f = match file {
                    OldFile::Fetched { path, bytes } => {
                        read = ReadFile::read(path.clone(), bytes.clone())
                            .map_err(RewriteError::File)?;
                        &read
                    }
                    OldFile::Kept(f) => f,
                };
                let aligned = f
                    .batches
                    .iter()
                    .map(|b| align(b, &self.schema))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(RewriteError::Arrow)?;
                arrow::compute::concat_batches(&self.schema, &aligned)
                    .map_err(RewriteError::Arrow)?
            }
            None => RecordBatch::new_empty(self.schema.clone()),
        };
        merge(&old, &self).map_err(RewriteError::Arrow)
    }
}

/// Where one output row's columns come from: `(array, row)` pairs, array 0
/// the old file and 1 the changes.
enum Plan {
    Old(usize),
    New {
        row: usize,
        /// Columns (mirror index) taken from elsewhere than `row`.
        carried: Vec<(usize, (usize, usize))>,
    },
}

/// `old`'s rows with the changed keys replaced or removed, sorted by key.
fn merge(old: &RecordBatch, job: &Rewrite) -> Result<RecordBatch, ArrowError> {
    let old_keys = key_rows(&job.converter, old, &job.key)?;
    let n = old.num_rows();
    // The writer sorts every file, so this is the identity; a file that is
    // not sorted (none should be) is ordered here rather than trusted.
    let mut order: Vec<usize> = (0..n).collect();
    if (1..n).any(|i| old_keys.row(i - 1) > old_keys.row(i)) {
        order.sort_by(|&a, &b| old_keys.row(a).cmp(&old_keys.row(b)));
    }
    let mut plans: Vec<Plan> = Vec::with_capacity(n + job.keys.len());
    let (mut i, mut j) = (0, 0);
    while i < n || j < job.keys.len() {
        // One row per key: of equal keys in a file (none should be), the
        // last is the file's row.
        if i + 1 < n && old_keys.row(order[i]) == old_keys.row(order[i + 1]) {
            i += 1;
            continue;
        }
        let ord = match (order.get(i), job.keys.get(j)) {
            (Some(&o), Some((k, _))) => old_keys.row(o).cmp(&k.row()),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        match ord {
            Ordering::Less => {
                plans.push(Plan::Old(order[i]));
                i += 1;
            }
            Ordering::Equal => {
                plans.extend(job.plan(&job.keys[j].1, Some(order[i])));
                i += 1;
                j += 1;
            }
            Ordering::Greater => {
                plans.extend(job.plan(&job.keys[j].1, None));
                j += 1;
            }
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(job.schema.fields().len());
    for (c, field) in job.schema.fields().iter().enumerate() {
        if plans.is_empty() {
            columns.push(new_empty_array(field.data_type()));
            continue;
        }
        let indices: Vec<(usize, usize)> = plans
            .iter()
            .map(|plan| match plan {
                Plan::Old(i) => (0, *i),
                Plan::New { row, carried } => carried
                    .iter()
                    .find(|(col, _)| *col == c)
                    .map_or((1, *row), |(_, at)| *at),
            })
            .collect();
        let arrays: [&dyn Array; 2] = [old.column(c).as_ref(), job.changed.column(c).as_ref()];
        columns.push(interleave(&arrays, &indices)?);
    }
    RecordBatch::try_new(job.schema.clone(), columns)
}

impl Rewrite {
    /// The output row of a changed key, if it has one; `existing` is the
    /// key's row in the old file.
    fn plan(&self, outcome: &Outcome, existing: Option<usize>) -> Option<Plan> {
        let Outcome::Upsert { row, carried } = outcome else {
            return None;
        };
        let mut from = Vec::new();
        for (column, source) in carried {
            // Carried columns are named in the changelog's schema.
            let Ok(c) = self
                .schema
                .index_of(self.changes_schema.field(*column).name())
            else {
                continue;
            };
            match source {
                Source::Change(j) => from.push((c, (1, *j))),
                Source::Existing => {
                    if let Some(i) = existing {
                        from.push((c, (0, i)));
                    }
                }
                // The sync turns these into changes before a rewrite (see
                // `Mirror::lend`): one left is a value with no image.
                Source::Moved(_) | Source::Pending(_) => {}
            }
        }
        Some(Plan::New {
            row: *row,
            carried: from,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;
    use crate::lake::mirror::changes::Changes;
    use crate::lake::mirror::changes::tests::rows as changelog;

    fn mirror_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]))
    }

    /// A mirror file's rows, in the order given.
    fn file(rows: &[(i64, &str)]) -> RecordBatch {
        RecordBatch::try_new(
            mirror_schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap()
    }

    fn rewrite(old: &RecordBatch, changes: &[(i64, &str, &str, &[&str])]) -> Vec<(i64, String)> {
        let key: Arc<[String]> = vec!["id".to_string()].into();
        let changes = Changes::reduce(changelog(changes), &key, None).unwrap();
        let mut keys: Vec<(OwnedRow, Outcome)> = changes
            .outcomes
            .iter()
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let job = Rewrite {
            old: None,
            changed: align(&changes.rows, &mirror_schema()).unwrap(),
            changes_schema: changes.rows.schema(),
            keys,
            key,
            converter: changes.converter.clone(),
            schema: mirror_schema(),
        };
        let out = merge(old, &job).unwrap();
        let ids = out.column(0).as_primitive::<Int64Type>();
        let notes = out.column(1).as_string::<i32>();
        (0..out.num_rows())
            .map(|i| (ids.value(i), notes.value(i).to_string()))
            .collect()
    }

    fn rows(r: &[(i64, &str)]) -> Vec<(i64, String)> {
        r.iter().map(|(i, n)| (*i, n.to_string())).collect()
    }

    const CHANGES: &[(i64, &str, &str, &[&str])] = &[
        (3, "u", "three'", &[]),
        (5, "d", "", &[]),
        (4, "c", "four", &[]),
        (9, "c", "nine", &[]),
        (8, "d", "", &[]),
        (7, "u", "(toasted)", &["note"]),
    ];

    #[test]
    fn a_rewrite_keeps_untouched_rows_and_applies_each_outcome_in_key_order() {
        let old = file(&[(1, "one"), (3, "three"), (5, "five"), (7, "seven")]);
        assert_eq!(
            rewrite(&old, CHANGES),
            rows(&[
                (1, "one"),
                (3, "three'"),
                (4, "four"),
                // Unchanged TOASTed note: carried from the file's row.
                (7, "seven"),
                (9, "nine"),
            ])
        );
    }

    /// Every file the writer makes is sorted by key; one that is not (or
    /// holds a key twice) still comes out sorted, one row per key.
    #[test]
    fn an_unsorted_file_is_ordered_not_trusted() {
        let old = file(&[(7, "seven"), (1, "one"), (5, "five"), (3, "three")]);
        assert_eq!(
            rewrite(&old, CHANGES),
            rows(&[
                (1, "one"),
                (3, "three'"),
                (4, "four"),
                (7, "seven"),
                (9, "nine")
            ])
        );
        let twice = file(&[(1, "one"), (2, "old two"), (2, "two"), (3, "three")]);
        assert_eq!(
            rewrite(&twice, &[(3, "d", "", &[])]),
            rows(&[(1, "one"), (2, "two")])
        );
    }

    #[test]
    fn a_new_file_holds_the_upserts_alone() {
        let empty = RecordBatch::new_empty(mirror_schema());
        assert_eq!(
            rewrite(&empty, CHANGES),
            rows(&[(3, "three'"), (4, "four"), (7, "(toasted)"), (9, "nine")])
        );
    }
}
