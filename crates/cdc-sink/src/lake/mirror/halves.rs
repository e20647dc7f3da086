//! Both halves of a primary-key update in one sync.
//!
//! A primary-key update is a delete of the old key and a create of the new
//! one, sharing an LSN (one WAL record), each marked with the other's key
//! (`_cdc_key_update`, from Debezium's `__debezium.newkey` and
//! `__debezium.oldkey` headers). The create's unchanged TOASTed values are
//! the old key's, and only a sync that holds both halves can carry them
//! (see [`super::changes`]): before the delete the create does not know
//! the old key, after it the old key's row is gone. The halves can sit in
//! different partitions, and so in different changelog commits, so a sync
//! must not apply one without the other. [`KeyUpdates`] finds the first
//! commit that would.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;

use crate::decode::schema::meta;

/// The halves of primary-key updates among some changelog rows, by LSN.
#[derive(Debug, Default)]
pub struct KeyUpdates {
    /// Delete halves: LSN to the changelog version holding it.
    deletes: HashMap<i64, i64>,
    creates: HashMap<i64, Create>,
}

#[derive(Debug, Clone, Copy)]
struct Create {
    version: i64,
    /// It lists unchanged columns, so it needs its delete's image.
    needs_image: bool,
}

impl KeyUpdates {
    /// Notes the halves among `batch`, rows of changelog version `version`.
    pub fn add(&mut self, version: i64, batch: &RecordBatch) {
        let Some(marks) = batch.column_by_name(meta::KEY_UPDATE) else {
            return;
        };
        if marks.null_count() == marks.len() {
            return;
        }
        let (Some(op), Some(lsn)) = (
            batch
                .column_by_name(meta::OP)
                .and_then(|c| c.as_string_opt::<i32>()),
            batch
                .column_by_name(meta::LSN)
                .and_then(|c| c.as_primitive_opt::<Int64Type>()),
        ) else {
            return;
        };
        let unchanged = batch
            .column_by_name(meta::UNCHANGED)
            .and_then(|c| c.as_list_opt::<i32>());
        for i in (0..batch.num_rows()).filter(|&i| marks.is_valid(i) && lsn.is_valid(i)) {
            let at = lsn.value(i);
            match op.value(i) {
                "d" => {
                    self.deletes.insert(at, version);
                }
                "c" => {
                    let needs_image =
                        unchanged.is_some_and(|u| u.is_valid(i) && !u.value(i).is_empty());
                    self.creates.insert(
                        at,
                        Create {
                            version,
                            needs_image,
                        },
                    );
                }
                _ => {}
            }
        }
    }

    /// The earliest version holding a half whose other half is not among
    /// the rows added: a delete without its create (whose values may need
    /// the deleted row), or a create that needs its delete's image.
    pub fn first_unpaired(&self) -> Option<i64> {
        let deletes = self
            .deletes
            .iter()
            .filter(|(lsn, _)| !self.creates.contains_key(*lsn))
            .map(|(_, v)| *v);
        let creates = self
            .creates
            .iter()
            .filter(|(lsn, c)| c.needs_image && !self.deletes.contains_key(*lsn))
            .map(|(_, c)| c.version);
        deletes.chain(creates).min()
    }

    /// The first version a sync must not apply yet: at or before every
    /// unpaired half, and never between a delete and its create (both
    /// halves in or both out). `None`: every half is paired.
    pub fn hold_from(&self) -> Option<i64> {
        let mut cut = self.first_unpaired()?;
        // Pulling the cut before a pair can put another pair across it:
        // again until none is.
        loop {
            let across = self
                .deletes
                .iter()
                .filter_map(|(lsn, d)| Some((*d, self.creates.get(lsn)?.version)))
                .filter(|(d, c)| (*d).min(*c) < cut && (*d).max(*c) >= cut)
                .map(|(d, c)| d.min(c))
                .min();
            match across {
                Some(earlier) => cut = earlier,
                None => return Some(cut),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, ListBuilder, StringArray, StringBuilder};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// Changelog rows `(op, lsn, key update, unchanged columns)`.
    fn rows(changes: &[(&str, i64, Option<&str>, &[&str])]) -> RecordBatch {
        let mut unchanged = ListBuilder::new(StringBuilder::new());
        for (_, _, _, u) in changes {
            for c in *u {
                unchanged.values().append_value(c);
            }
            unchanged.append(!u.is_empty());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(changes.iter().map(|c| c.0))),
            Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.1))),
            Arc::new(unchanged.finish()),
            Arc::new(StringArray::from_iter(changes.iter().map(|c| c.2))),
        ];
        let schema = Schema::new(vec![
            Field::new(meta::OP, DataType::Utf8, true),
            Field::new(meta::LSN, DataType::Int64, true),
            Field::new(
                meta::UNCHANGED,
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
            Field::new(meta::KEY_UPDATE, DataType::Utf8, true),
        ]);
        RecordBatch::try_new(Arc::new(schema), columns).unwrap()
    }

    #[test]
    fn a_half_without_its_other_half_holds_its_version_back() {
        let mut updates = KeyUpdates::default();
        updates.add(4, &rows(&[("u", 10, None, &[]), ("c", 11, None, &[])]));
        assert_eq!(updates.first_unpaired(), None, "no key update");
        // The delete of 7 (to 1000) in version 5, its create not yet.
        updates.add(5, &rows(&[("d", 20, Some(r#"{"id":1000}"#), &[])]));
        assert_eq!(updates.first_unpaired(), Some(5));
        // A create that needs its delete's image, in version 6.
        updates.add(6, &rows(&[("c", 30, Some(r#"{"id":8}"#), &["big"])]));
        assert_eq!(updates.first_unpaired(), Some(5));
        updates.add(7, &rows(&[("c", 20, Some(r#"{"id":7}"#), &["big"])]));
        assert_eq!(updates.first_unpaired(), Some(6), "5 is paired now");
        assert_eq!(updates.hold_from(), Some(5), "but with 7, past 6");
        updates.add(7, &rows(&[("d", 30, Some(r#"{"id":2000}"#), &[])]));
        assert_eq!(updates.first_unpaired(), None);
        assert_eq!(updates.hold_from(), None);
        // A create with every value sends them all: it waits for nothing.
        updates.add(8, &rows(&[("c", 40, Some(r#"{"id":9}"#), &[])]));
        assert_eq!(updates.first_unpaired(), None);
    }

    /// A pair across the first unpaired half's version is held back whole.
    #[test]
    fn the_hold_never_splits_a_pair() {
        let mut updates = KeyUpdates::default();
        updates.add(5, &rows(&[("d", 20, Some("{}"), &[])]));
        updates.add(6, &rows(&[("d", 30, Some("{}"), &[])]));
        updates.add(7, &rows(&[("c", 20, Some("{}"), &["big"])]));
        assert_eq!(updates.first_unpaired(), Some(6));
        assert_eq!(updates.hold_from(), Some(5), "5's create is in 7");
    }
}
