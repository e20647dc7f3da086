//! A primary-key column whose type changed, folded back into one column.
//!
//! `ALTER TABLE t ALTER COLUMN id TYPE bigint` is how a table whose
//! `integer` ids run out is mended. The changelog never rounds a value, so
//! it keeps the new changes' `id` in a sibling column, `id__long`
//! ([`conform`](crate::lake::table::conform)), and files written since
//! have no `id` at all. A current-state table keyed by `id` alone would
//! take those changes for rows without a key.
//!
//! When one of the column's types holds every other exactly (`long` holds
//! `integer`), the mirror reads the changelog with the column and its
//! siblings folded into one column of that type ([`KeyTypes`]): a row keeps
//! its identity across the change (an update of `id` 5 after it replaces
//! the row written as `integer` 5), and the mirror's `id` is `long`, as the
//! table's is. The first sync that sees the change rebuilds the mirror
//! (its files' key ranges are encodings of the old type). Other changes
//! (`integer` to `text`) are not folded: the sync stops with an error
//! naming the column ([`MirrorError::KeyChanged`](super::MirrorError)).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::compute::kernels::zip::zip;
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use arrow::error::ArrowError;
use deltalake::DeltaTableError;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{StructField, StructType};

use crate::decode::schema::meta;
use crate::lake::files::{ReadFile, sort_by_kafka_position};
use crate::lake::table::{is_sibling, to_arrow, widens};

/// How a mirror reads its changelog's key columns: for each that changed
/// type, its siblings folded into it (see the module's overview). Empty
/// for a table whose key never changed type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyTypes {
    folds: Vec<Fold>,
    /// A key column has siblings no type of it holds: the mirror cannot
    /// follow it, so it is not rebuilt for the others either (each
    /// rebuild would end at the same error).
    blocked: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Fold {
    column: String,
    /// The changelog's sibling columns of `column`.
    siblings: Vec<String>,
    /// The type that holds every value of the column and its siblings.
    to: DataType,
}

impl KeyTypes {
    /// The folds of `key`'s columns in the changelog whose Delta schema is
    /// `table`.
    pub fn of(table: &StructType, key: &[String]) -> Result<KeyTypes, DeltaTableError> {
        let mut folds = Vec::new();
        let mut blocked = false;
        for column in key {
            let Some(own) = table.field(column) else {
                continue;
            };
            let siblings: Vec<&StructField> =
                table.fields().filter(|f| is_sibling(column, f)).collect();
            if siblings.is_empty() {
                continue;
            }
            let mut types = vec![to_arrow(own)?.data_type().clone()];
            for s in &siblings {
                types.push(to_arrow(s)?.data_type().clone());
            }
            // The one type every other widens into, if there is one.
            let holds_all = |t: &DataType| types.iter().all(|o| o == t || widens(o, t));
            match types.iter().find(|t| holds_all(t)) {
                Some(to) => folds.push(Fold {
                    column: column.clone(),
                    siblings: siblings.iter().map(|s| s.name().clone()).collect(),
                    to: to.clone(),
                }),
                None => blocked = true,
            }
        }
        Ok(KeyTypes { folds, blocked })
    }

    /// Whether a mirror of Delta schema `mirror` was written before a fold:
    /// a key column of another type, or one of its siblings as a column.
    /// Never while a key column cannot be followed.
    pub fn changes(&self, mirror: &StructType) -> Result<bool, DeltaTableError> {
        if self.blocked {
            return Ok(false);
        }
        for fold in &self.folds {
            if fold.siblings.iter().any(|s| mirror.field(s).is_some()) {
                return Ok(true);
            }
            if let Some(own) = mirror.field(&fold.column)
                && to_arrow(own)?.data_type() != &fold.to
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The key columns whose type the folds change, and the new types.
    pub fn describe(&self) -> String {
        self.folds
            .iter()
            .map(|f| format!("`{}` as {}", f.column, f.to))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The changelog's Delta schema as the mirror reads it: each folded
    /// column of its type, its siblings gone.
    pub fn table(&self, table: &StructType) -> Result<StructType, DeltaTableError> {
        if self.folds.is_empty() {
            return Ok(table.clone());
        }
        let mut fields = Vec::new();
        for f in table.fields() {
            if self.is_sibling(f.name()) {
                continue;
            }
            match self.fold_of(f.name()) {
                Some(fold) => {
                    let field: StructField =
                        (&Field::new(&fold.column, fold.to.clone(), true)).try_into_kernel()?;
                    fields.push(field);
                }
                None => fields.push(f.clone()),
            }
        }
        Ok(StructType::try_new(fields)?)
    }

    /// `batch` with each folded column the first value among it and its
    /// siblings, of the folded type, and the siblings gone. A batch
    /// folded already comes out the same.
    pub fn batch(&self, batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        if self.folds.is_empty() {
            return Ok(batch.clone());
        }
        let schema = batch.schema();
        let mut fields = Vec::with_capacity(schema.fields().len());
        let mut columns = Vec::with_capacity(schema.fields().len());
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            if self.is_sibling(field.name()) {
                continue;
            }
            match self.fold_of(field.name()) {
                Some(fold) => {
                    fields.push(Field::new(&fold.column, fold.to.clone(), true));
                    columns.push(fold.values(batch)?);
                }
                None => {
                    fields.push(field.as_ref().clone());
                    columns.push(column.clone());
                }
            }
        }
        // Files written after the change hold the siblings alone.
        for fold in &self.folds {
            if schema.index_of(&fold.column).is_err()
                && fold.siblings.iter().any(|s| schema.index_of(s).is_ok())
            {
                fields.push(Field::new(&fold.column, fold.to.clone(), true));
                columns.push(fold.values(batch)?);
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
    }

    /// `rows` (changelog rows) in the order a key's changes apply in.
    /// Debezium puts a key's changes in the partition its key's bytes
    /// choose, so Kafka order is a key's source order, but a key column's
    /// new type changes those bytes: a row's changes before and after the
    /// change can sit in different partitions. So with a fold, rows are
    /// ordered by LSN, which is source order for any one row (a second
    /// change of a row waits for the first's commit), and by Kafka position
    /// among equal LSNs (a primary-key update's halves) and rows without
    /// one (markers).
    pub fn order(&self, rows: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        let by_position = sort_by_kafka_position(rows)?;
        if self.folds.is_empty() {
            return Ok(by_position);
        }
        let Some(lsn) = by_position
            .column_by_name(meta::LSN)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
        else {
            return Ok(by_position);
        };
        let at = |i: u32| lsn.is_valid(i as usize).then(|| lsn.value(i as usize));
        let mut order: Vec<u32> = (0..by_position.num_rows() as u32).collect();
        // Stable: equal LSNs keep Kafka order.
        order.sort_by_key(|&i| at(i));
        arrow::compute::take_record_batch(&by_position, &UInt32Array::from(order))
    }

    /// `file` with every batch folded.
    pub fn file(&self, mut file: ReadFile) -> Result<ReadFile, ArrowError> {
        if self.folds.is_empty() {
            return Ok(file);
        }
        file.batches = file
            .batches
            .iter()
            .map(|b| self.batch(b))
            .collect::<Result<_, _>>()?;
        file.schema = self
            .batch(&RecordBatch::new_empty(file.schema.clone()))?
            .schema();
        Ok(file)
    }

    fn is_sibling(&self, name: &str) -> bool {
        self.folds
            .iter()
            .any(|f| f.siblings.iter().any(|s| s == name))
    }

    fn fold_of(&self, name: &str) -> Option<&Fold> {
        self.folds.iter().find(|f| f.column == name)
    }
}

impl Fold {
    /// Per row, the first non-null value of the column and its siblings,
    /// cast to the folded type (exactly: every type widens into it).
    fn values(&self, batch: &RecordBatch) -> Result<ArrayRef, ArrowError> {
        let mut folded: Option<ArrayRef> = None;
        for name in std::iter::once(&self.column).chain(&self.siblings) {
            let Some(c) = batch.column_by_name(name) else {
                continue;
            };
            let c = arrow::compute::cast(c, &self.to)?;
            folded = Some(match folded {
                None => c,
                Some(before) => zip(&arrow::compute::is_not_null(&before)?, &before, &c)?,
            });
        }
        Ok(folded.unwrap_or_else(|| arrow::array::new_null_array(&self.to, batch.num_rows())))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::Int64Type;

    use super::*;

    fn delta(fields: Vec<Field>) -> StructType {
        (&Schema::new(fields)).try_into_kernel().unwrap()
    }

    fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> RecordBatch {
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    fn key() -> Vec<String> {
        vec!["id".to_string()]
    }

    /// `integer` to `bigint`: the changelog's `id` (Int32) and `id__long`
    /// (Int64) read as one Int64 `id`, from files of before the change
    /// (no sibling), after it (no `id`) and across it (both).
    #[test]
    fn a_widened_key_column_and_its_sibling_read_as_one_column() {
        let table = delta(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("a", DataType::Utf8, true),
            Field::new("id__long", DataType::Int64, true),
        ]);
        let types = KeyTypes::of(&table, &key()).unwrap();
        assert_eq!(types.describe(), "`id` as Int64");
        let read = types.table(&table).unwrap();
        assert_eq!(
            read.fields().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            ["id", "a"]
        );
        assert_eq!(
            to_arrow(read.field("id").unwrap()).unwrap().data_type(),
            &DataType::Int64
        );

        let before = batch(
            vec![
                Field::new("id", DataType::Int32, true),
                Field::new("a", DataType::Utf8, true),
            ],
            vec![
                Arc::new(Int32Array::from(vec![1, 5])),
                Arc::new(StringArray::from(vec!["x", "y"])),
            ],
        );
        let after = batch(
            vec![
                Field::new("a", DataType::Utf8, true),
                Field::new("id__long", DataType::Int64, true),
            ],
            vec![
                Arc::new(StringArray::from(vec!["z", "w"])),
                Arc::new(Int64Array::from(vec![5, 3_000_000_000])),
            ],
        );
        let across = batch(
            vec![
                Field::new("id", DataType::Int32, true),
                Field::new("id__long", DataType::Int64, true),
            ],
            vec![
                Arc::new(Int32Array::from(vec![Some(2), None])),
                Arc::new(Int64Array::from(vec![None, Some(7)])),
            ],
        );
        let ids = |b: &RecordBatch| -> Vec<Option<i64>> {
            let folded = types.batch(b).unwrap();
            assert!(folded.column_by_name("id__long").is_none());
            let id = folded.column_by_name("id").unwrap();
            id.as_primitive::<Int64Type>().iter().collect()
        };
        assert_eq!(ids(&before), [Some(1), Some(5)]);
        assert_eq!(ids(&after), [Some(5), Some(3_000_000_000)]);
        assert_eq!(ids(&across), [Some(2), Some(7)]);
        // Folding again changes nothing.
        let once = types.batch(&across).unwrap();
        assert_eq!(types.batch(&once).unwrap(), once);
        assert_eq!(
            types
                .batch(&after)
                .unwrap()
                .column_by_name("a")
                .unwrap()
                .len(),
            2
        );

        // A mirror written before the change is rebuilt; one after it is not.
        let old_mirror = delta(vec![Field::new("id", DataType::Int32, true)]);
        assert!(types.changes(&old_mirror).unwrap());
        assert!(!types.changes(&read).unwrap());
    }

    /// `integer` to `text` has no type holding both exactly: no fold, so
    /// the sync's check for an empty key column reports it.
    #[test]
    fn a_key_column_changed_to_an_unrelated_type_is_not_folded() {
        let table = delta(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("id__string", DataType::Utf8, true),
        ]);
        let types = KeyTypes::of(&table, &key()).unwrap();
        assert!(types.folds.is_empty() && types.blocked);
        // Nor is a column that only looks like a sibling.
        // A composite key with one column widened and one changed to an
        // unrelated type: the mirror is not rebuilt for the first, as it
        // could not follow the second.
        let composite = delta(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Int32, true),
            Field::new("a__long", DataType::Int64, true),
            Field::new("b__string", DataType::Utf8, true),
        ]);
        let types = KeyTypes::of(&composite, &["a".to_string(), "b".to_string()]).unwrap();
        let old_mirror = delta(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Int32, true),
        ]);
        assert!(!types.changes(&old_mirror).unwrap());
        let table = delta(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("id__old", DataType::Int64, true),
        ]);
        assert_eq!(KeyTypes::of(&table, &key()).unwrap(), KeyTypes::default());
    }
}
