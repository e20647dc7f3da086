//! The changes of some changelog rows, reduced to the last one per primary
//! key.
//!
//! Rows are applied in Kafka order: by partition, then offset. Debezium
//! keys every event of a row by its primary key, so all changes of one key
//! are in one partition and that order is their commit order; a primary
//! key update is a delete of the old key and a create of the new one, two
//! keys. Unchanged TOASTed values (`_cdc_unchanged_cols`) are carried from
//! the key's previous image: an earlier change in the same rows, or the
//! current-state table's row.
//!
//! The create of a primary-key update has no previous image under its own
//! key: its unchanged TOASTed values are the old key's. PostgreSQL writes
//! the update as one WAL record, so its delete and its create carry the
//! same LSN; nothing else gives a create and a delete one LSN (an insert
//! and a delete are records of their own), and only such a create lists
//! unchanged columns (an insert sends every value). So the old key is the
//! key of the delete with the create's LSN, and the image is that key's
//! just before its delete. The two halves can sit in different partitions,
//! in either order here: a create waits for its delete's image
//! ([`Source::Pending`] while reducing).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type, SchemaRef};
use arrow::error::ArrowError;
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};

use crate::FastMap;
use crate::decode::marker::RECOVERY;
use crate::decode::schema::meta;
use crate::lake::mirror::through::{self, TruncateState};

/// Where one column of a surviving row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Row `n` of the changes.
    Change(usize),
    /// The key's row in the current-state table (an unchanged TOASTed
    /// value whose previous image is not among the changes).
    Existing,
    /// The current-state row of [`Changes::moved`]`[n]`: the old key of a
    /// primary-key update, whose image is not among the changes.
    Moved(usize),
    /// While reducing only: the image of the old key of the primary-key
    /// update whose create is change `n`, known once its delete is seen.
    Pending(usize),
}

/// What becomes of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The key's row is change `row`, except for `carried` columns (by
    /// index in the changes' schema), which come from elsewhere.
    Upsert {
        row: usize,
        carried: Vec<(usize, Source)>,
    },
    Delete,
}

/// Changelog rows reduced to one outcome per key.
pub struct Changes {
    /// The changelog rows, in Kafka order.
    pub rows: RecordBatch,
    /// Each key's outcome, by the key's row encoding.
    pub outcomes: FastMap<OwnedRow, Outcome>,
    /// The key's columns, in the order the keys are encoded and compared.
    pub key: Vec<String>,
    /// Shared with the file rewrites, which run on blocking threads.
    pub converter: Arc<RowConverter>,
    /// Old keys of primary-key updates whose current-state rows hold
    /// values to carry ([`Source::Moved`]).
    pub moved: Vec<OwnedRow>,
    /// Creates of primary-key updates whose delete is not among the
    /// changes (their rows): their unchanged TOASTed values have no image
    /// here and stay NULL (the changelog holds Debezium's placeholder as
    /// NULL). A create a TRUNCATE removed is not one.
    pub unpaired: Vec<usize>,
}

/// Why changelog rows cannot be reduced by their key.
#[derive(Debug)]
pub enum ReduceError {
    Arrow(ArrowError),
    /// A change without a value in a key column. A primary key column is
    /// never NULL in PostgreSQL, so its type (or name) changed: the
    /// changelog keeps a changed type in a sibling column
    /// (`<name>__<type>`, see `lake::table::conform`), and the key's
    /// values are there from that change on.
    EmptyKey {
        column: String,
        partition: Option<i32>,
        offset: Option<i64>,
        /// The changelog's `<column>__*` columns.
        siblings: Vec<String>,
    },
}

impl ReduceError {
    pub fn into_mirror(self, table: &str) -> super::MirrorError {
        match self {
            ReduceError::Arrow(e) => super::MirrorError::arrow(table)(e),
            ReduceError::EmptyKey {
                column,
                partition,
                offset,
                siblings,
            } => super::MirrorError::KeyChanged {
                table: table.to_string(),
                column,
                at: match (partition, offset) {
                    (Some(p), Some(o)) => format!("partition {p}, offset {o}"),
                    _ => "a row of the changelog".to_string(),
                },
                siblings: if siblings.is_empty() {
                    "no sibling column: renamed?".to_string()
                } else {
                    format!("now in `{}`", siblings.join("`, `"))
                },
            },
        }
    }
}

impl From<ArrowError> for ReduceError {
    fn from(e: ArrowError) -> Self {
        ReduceError::Arrow(e)
    }
}

/// The row encoding of the `key` columns of `batch`: ordered like the key
/// values, comparable across batches of the same key types.
pub fn key_converter(schema: &SchemaRef, key: &[String]) -> Result<RowConverter, ArrowError> {
    let fields = key
        .iter()
        .map(|k| {
            Ok(SortField::new(
                schema.field_with_name(k)?.data_type().clone(),
            ))
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    RowConverter::new(fields)
}

pub fn key_rows(
    converter: &RowConverter,
    batch: &RecordBatch,
    key: &[String],
) -> Result<Rows, ArrowError> {
    let columns = key
        .iter()
        .map(|k| {
            batch
                .column_by_name(k)
                .cloned()
                .ok_or_else(|| ArrowError::SchemaError(format!("no key column `{k}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    converter.convert_columns(&columns)
}

impl Changes {
    /// Keeps only the keys `keep` holds (by their encoding): their
    /// outcomes and their unpaired creates.
    pub fn retain_keys(&mut self, keep: impl Fn(&[u8]) -> bool) -> Result<(), ArrowError> {
        self.outcomes.retain(|k, _| keep(k.as_ref()));
        if !self.unpaired.is_empty() {
            let rows = arrow::compute::take_record_batch(
                &self.rows,
                &arrow::array::UInt32Array::from_iter_values(
                    self.unpaired.iter().map(|&i| i as u32),
                ),
            )?;
            let keys = key_rows(&self.converter, &rows, &self.key)?;
            let mut n = 0;
            self.unpaired.retain(|_| {
                n += 1;
                keep(keys.row(n - 1).as_ref())
            });
        }
        Ok(())
    }

    /// Reduces `rows` (changelog rows already in Kafka order) by `key`.
    /// A change without a value in a key column is an error
    /// ([`ReduceError::EmptyKey`]): it would be taken for a row whose key
    /// is NULL, and every such change for the same row.
    pub fn reduce(
        rows: RecordBatch,
        key: &[String],
        truncate: Option<TruncateState>,
    ) -> Result<Changes, ReduceError> {
        let converter = key_converter(&rows.schema(), key)?;
        let keys = key_rows(&converter, &rows, key)?;
        let schema = rows.schema();
        let column = |name: &str| {
            rows.column_by_name(name)
                .cloned()
                .ok_or_else(|| ArrowError::SchemaError(format!("no column `{name}`")))
        };
        let op = column(meta::OP)?;
        let op = op.as_string::<i32>();
        // Rows without a key: a recovery marker, a TRUNCATE.
        let is_marker =
            |i: usize| op.is_valid(i) && matches!(op.value(i), RECOVERY | through::TRUNCATE);
        for name in key {
            let values = column(name)?;
            if values.null_count() == 0 {
                continue;
            }
            let Some(i) = (0..rows.num_rows()).find(|&i| values.is_null(i) && !is_marker(i)) else {
                continue;
            };
            let position = |name: &str| rows.column_by_name(name).filter(|c| c.is_valid(i));
            let prefix = format!("{name}__");
            return Err(ReduceError::EmptyKey {
                column: name.clone(),
                partition: position(meta::KAFKA_PARTITION)
                    .and_then(|c| c.as_primitive_opt::<Int32Type>().map(|a| a.value(i))),
                offset: position(meta::KAFKA_OFFSET)
                    .and_then(|c| c.as_primitive_opt::<Int64Type>().map(|a| a.value(i))),
                siblings: schema
                    .fields()
                    .iter()
                    .map(|f| f.name())
                    .filter(|n| n.starts_with(&prefix))
                    .cloned()
                    .collect(),
            });
        }
        let unchanged = rows.column_by_name(meta::UNCHANGED).cloned();
        let unchanged = unchanged.as_ref().map(|u| u.as_list::<i32>());
        let lsn = column(meta::LSN).ok();
        let lsn = lsn.as_ref().and_then(|l| l.as_primitive_opt::<Int64Type>());
        let moves = KeyMoves::find(&rows, op, unchanged, lsn);
        // Changes a TRUNCATE removed: before it in the source, wherever
        // they sit in Kafka.
        let commit = column(meta::COMMIT_TS)
            .ok()
            .and_then(|c| arrow::compute::cast(&c, &arrow::datatypes::DataType::Int64).ok());
        let commit = commit.as_ref().map(|c| c.as_primitive::<Int64Type>());
        let truncated = |i: usize| {
            truncate.is_some_and(|t| {
                t.covers(
                    lsn.filter(|l| l.is_valid(i)).map(|l| l.value(i)),
                    commit.filter(|c| c.is_valid(i)).map(|c| c.value(i)),
                )
            })
        };

        let mut outcomes: FastMap<OwnedRow, Outcome> = FastMap::default();
        // Old keys' images just before their deletes, by the create's row.
        let mut images: HashMap<usize, Image> = HashMap::new();
        let mut moved: Vec<OwnedRow> = Vec::new();
        for i in 0..rows.num_rows() {
            if is_marker(i) || truncated(i) {
                // A marker or TRUNCATE: no key, no row (see `reconcile`).
                continue;
            }
            let k = keys.row(i).owned();
            if op.is_valid(i) && op.value(i) == "d" {
                if let Some(&create) = moves.create_of.get(&i) {
                    // The old key's own current-state row, where its image
                    // (or part of it) is, is another key's to the create.
                    let mut existing = || {
                        moved.push(k.clone());
                        moved.len() - 1
                    };
                    let image = match outcomes.get(&k) {
                        Some(Outcome::Upsert { row, carried }) => {
                            let mut from = None;
                            Image::Change {
                                row: *row,
                                carried: carried
                                    .iter()
                                    .map(|&(c, s)| match s {
                                        Source::Existing => (
                                            c,
                                            Source::Moved(*from.get_or_insert_with(&mut existing)),
                                        ),
                                        s => (c, s),
                                    })
                                    .collect(),
                            }
                        }
                        Some(Outcome::Delete) => Image::Gone,
                        None => Image::Moved(existing()),
                    };
                    images.insert(create, image);
                }
                outcomes.insert(k, Outcome::Delete);
                continue;
            }
            let mut carried = Vec::new();
            if let Some(list) = unchanged
                && list.is_valid(i)
            {
                let names = list.value(i);
                let names = names.as_string::<i32>();
                let is_move = moves.creates.contains(&i);
                for n in 0..names.len() {
                    if !names.is_valid(n) {
                        continue;
                    }
                    let Ok(c) = schema.index_of(names.value(n)) else {
                        continue;
                    };
                    let from = if is_move {
                        Source::Pending(i)
                    } else {
                        match outcomes.get(&k) {
                            Some(Outcome::Upsert { row, carried }) => carried
                                .iter()
                                .find(|(col, _)| *col == c)
                                .map_or(Source::Change(*row), |(_, s)| *s),
                            // Deleted since: nothing to carry; the row keeps
                            // what the changelog has.
                            Some(Outcome::Delete) => Source::Change(i),
                            None => Source::Existing,
                        }
                    };
                    if from != Source::Change(i) {
                        carried.push((c, from));
                    }
                }
            }
            outcomes.insert(k, Outcome::Upsert { row: i, carried });
        }
        let mut unpaired: Vec<usize> = moves
            .creates
            .iter()
            .copied()
            .filter(|i| !images.contains_key(i) && !truncated(*i))
            .collect();
        unpaired.sort_unstable();
        if !moves.creates.is_empty() {
            for outcome in outcomes.values_mut() {
                if let Outcome::Upsert { carried, .. } = outcome {
                    carried.retain_mut(|(c, source)| match resolve(&images, *c, *source) {
                        Some(s) => {
                            *source = s;
                            true
                        }
                        None => false,
                    });
                }
            }
        }
        Ok(Changes {
            rows,
            outcomes,
            key: key.to_vec(),
            converter: Arc::new(converter),
            moved,
            unpaired,
        })
    }
}

/// A key's image just before its delete.
#[derive(Debug, Clone)]
enum Image {
    /// Change `row`, but for its `carried` columns.
    Change {
        row: usize,
        carried: Vec<(usize, Source)>,
    },
    /// The current-state row of [`Changes::moved`]`[n]`.
    Moved(usize),
    /// Deleted already: no image.
    Gone,
}

/// Where column `c` comes from, for a source that may wait on an old
/// key's image; `None`: nowhere (the change's own value stays). A chain of
/// key updates (1 to 2, then 2 to 3) is followed to its first image.
fn resolve(images: &HashMap<usize, Image>, c: usize, mut source: Source) -> Option<Source> {
    // Each step goes to an earlier update of the chain, so the chain ends;
    // the bound only guards against a cycle this code does not make.
    for _ in 0..=images.len() {
        let Source::Pending(create) = source else {
            return Some(source);
        };
        source = match images.get(&create)? {
            Image::Change { row, carried } => carried
                .iter()
                .find(|(col, _)| *col == c)
                .map_or(Source::Change(*row), |(_, s)| *s),
            Image::Moved(n) => Source::Moved(*n),
            Image::Gone => return None,
        };
    }
    None
}

/// The primary-key updates among some changelog rows: creates that list
/// unchanged columns, and the delete of the same LSN.
#[derive(Default)]
struct KeyMoves {
    creates: std::collections::HashSet<usize>,
    /// Delete row to its create's row.
    create_of: HashMap<usize, usize>,
}

impl KeyMoves {
    fn find(
        rows: &RecordBatch,
        op: &arrow::array::StringArray,
        unchanged: Option<&arrow::array::ListArray>,
        lsn: Option<&arrow::array::Int64Array>,
    ) -> KeyMoves {
        let mut moves = KeyMoves::default();
        let (Some(unchanged), Some(lsn)) = (unchanged, lsn) else {
            return moves;
        };
        let is = |i: usize, code: &str| op.is_valid(i) && op.value(i) == code;
        let mut by_lsn: HashMap<i64, usize> = HashMap::new();
        for i in 0..rows.num_rows() {
            if is(i, "c") && unchanged.is_valid(i) && !unchanged.value(i).is_empty() {
                moves.creates.insert(i);
                if lsn.is_valid(i) {
                    by_lsn.insert(lsn.value(i), i);
                }
            }
        }
        if by_lsn.is_empty() {
            return moves;
        }
        // One delete per LSN; two would make the pairing a guess, and no
        // image is better than a wrong one.
        let mut deletes: HashMap<i64, Option<usize>> = HashMap::new();
        for i in 0..rows.num_rows() {
            if is(i, "d") && lsn.is_valid(i) && by_lsn.contains_key(&lsn.value(i)) {
                deletes
                    .entry(lsn.value(i))
                    .and_modify(|d| *d = None)
                    .or_insert(Some(i));
            }
        }
        for (l, d) in deletes {
            if let Some(d) = d {
                moves.create_of.insert(d, by_lsn[&l]);
            }
        }
        moves
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use arrow::array::{ArrayRef, Int64Array, ListBuilder, StringArray, StringBuilder};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Changelog rows: `(id, op, note, unchanged)`.
    pub(crate) fn rows(changes: &[(i64, &str, &str, &[&str])]) -> RecordBatch {
        let mut unchanged = ListBuilder::new(StringBuilder::new());
        for (_, _, _, u) in changes {
            for c in *u {
                unchanged.values().append_value(c);
            }
            unchanged.append(true);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.0))),
            Arc::new(StringArray::from_iter_values(changes.iter().map(|c| c.2))),
            Arc::new(StringArray::from_iter_values(changes.iter().map(|c| c.1))),
            Arc::new(unchanged.finish()),
        ];
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
            Field::new(meta::OP, DataType::Utf8, true),
            Field::new(
                meta::UNCHANGED,
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ]);
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    fn outcome(c: &Changes, id: i64) -> Option<Outcome> {
        let key = c
            .converter
            .convert_columns(&[Arc::new(Int64Array::from(vec![id])) as ArrayRef])
            .unwrap();
        c.outcomes.get(&key.row(0).owned()).cloned()
    }

    #[test]
    fn the_last_change_per_key_wins() {
        let c = Changes::reduce(
            rows(&[
                (1, "c", "a", &[]),
                (2, "c", "b", &[]),
                (1, "u", "a2", &[]),
                (2, "d", "b", &[]),
                (3, "d", "x", &[]),
                (3, "c", "y", &[]),
            ]),
            &["id".to_string()],
            None,
        )
        .unwrap();
        let upsert = |row| {
            Some(Outcome::Upsert {
                row,
                carried: vec![],
            })
        };
        assert_eq!(outcome(&c, 1), upsert(2));
        assert_eq!(outcome(&c, 2), Some(Outcome::Delete));
        assert_eq!(outcome(&c, 3), upsert(5), "re-created after its delete");
    }

    #[test]
    fn a_change_without_its_key_is_an_error_that_names_the_column() {
        // `id` changed type: the changelog holds the new changes' keys in
        // `id__long`, and `id` is NULL in them.
        let good = rows(&[(1, "c", "a", &[]), (2, "c", "b", &[])]);
        let schema = good.schema();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("id__long", DataType::Int64, true));
        let mut columns = good.columns().to_vec();
        columns[0] = Arc::new(Int64Array::from(vec![Some(1), None]));
        columns.push(Arc::new(Int64Array::from(vec![None, Some(2)])));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        match Changes::reduce(batch, &["id".to_string()], None) {
            Err(ReduceError::EmptyKey {
                column, siblings, ..
            }) => {
                assert_eq!(column, "id");
                assert_eq!(siblings, ["id__long"]);
            }
            other => panic!("{:?}", other.map(|c| c.outcomes)),
        }
        let message = ReduceError::EmptyKey {
            column: "id".into(),
            partition: Some(2),
            offset: Some(17),
            siblings: vec!["id__long".into()],
        }
        .into_mirror("t")
        .to_string();
        assert!(
            message.starts_with(
                "key column `id` of `t` is empty in the change at partition 2, offset 17; \
                 its type or name changed (now in `id__long`)"
            ),
            "{message}"
        );
    }

    #[test]
    fn unchanged_toasted_values_come_from_the_previous_image() {
        let c = Changes::reduce(
            rows(&[
                (1, "c", "long", &[]),
                (1, "u", "__debezium_unavailable_value", &["note"]),
                (1, "u", "__debezium_unavailable_value", &["note"]),
                (2, "u", "__debezium_unavailable_value", &["note"]),
            ]),
            &["id".to_string()],
            None,
        )
        .unwrap();
        assert_eq!(
            outcome(&c, 1),
            Some(Outcome::Upsert {
                row: 2,
                carried: vec![(1, Source::Change(0))]
            }),
            "through two updates, from the create"
        );
        assert_eq!(
            outcome(&c, 2),
            Some(Outcome::Upsert {
                row: 3,
                carried: vec![(1, Source::Existing)]
            }),
            "from the current-state table's row"
        );
    }
}
