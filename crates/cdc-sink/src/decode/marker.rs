//! Recovery markers: the record `cdc-slot-guard` appends to every
//! partition of every captured topic once the re-snapshot that follows a
//! lost replication slot is wholly in Kafka.
//!
//! A marker is not a Debezium event: it is recognised by its Kafka header
//! ([`HEADER`] = [`RECOVERY`]) and its value is the JSON of
//! [`RecoveryMarker`]. The sink writes it into the table's changelog as one
//! row (`_cdc_op = 'recovery'`, the marker in `_cdc_recovery`, the table's
//! own columns null), so that a reader of the changelog sees where a
//! recovery happened, and the current-state writer uses it to remove the
//! rows deleted while the slot was lost (see `lake::mirror`).
//!
//! Why a marker in each partition: a partition holds its changes in order,
//! so the marker comes after every snapshot row of that partition. Once a
//! table's markers of one recovery have been applied from all of its
//! partitions, every row the snapshot delivered is in the mirror.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Array, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use chrono::NaiveDate;

use crate::decode::DecodeError;
use crate::decode::schema::{meta, metadata_fields};

/// The marker header and kind, and the marker's wire format, are the slot
/// guard's as well: both take them from `cdc-wire`.
pub use cdc_wire::{MARKER_HEADER as HEADER, RECOVERY, RecoveryMarker};

/// The marker a record with the marker header carries; `kind` is the
/// header's value.
pub fn parse(kind: &[u8], value: Option<&[u8]>) -> Result<RecoveryMarker, DecodeError> {
    RecoveryMarker::from_record(kind, value).map_err(DecodeError::Marker)
}

/// The UTC date of the changelog partition a marker's row goes to.
pub fn date(marker: &RecoveryMarker) -> NaiveDate {
    chrono::DateTime::from_timestamp_millis(marker.completed_at_ms)
        .map(|t| t.date_naive())
        .unwrap_or_default()
}

/// One marker as received: at this partition and offset.
#[derive(Debug, Clone)]
pub struct MarkerRow {
    pub marker: RecoveryMarker,
    pub partition: i32,
    pub offset: i64,
}

/// Marker rows as changelog rows: the CDC columns and `_cdc_recovery`
/// (the table's own columns are absent, so null).
pub fn batch(rows: &[MarkerRow]) -> Result<RecordBatch, ArrowError> {
    let mut unchanged = ListBuilder::new(StringBuilder::new());
    rows.iter().for_each(|_| unchanged.append_null());
    // The changelog's CDC columns, then the marker's own.
    let mut fields = metadata_fields().to_vec();
    fields.push(Field::new(meta::RECOVERY, DataType::Utf8, true));
    let schema = Schema::new(fields);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| RECOVERY))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter()
                    .map(|r| r.marker.completed_at_ms.saturating_mul(1000)),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.marker.slot_start_lsn),
        )),
        Arc::new(Int64Array::new_null(rows.len())),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.partition),
        )),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        Arc::new(unchanged.finish()),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.marker.to_json()),
        )),
    ];
    RecordBatch::try_new(Arc::new(schema), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_parses_and_anything_else_is_an_error_that_says_why() {
        let json = br#"{"id":"twitter_cdc@0/1A2B","slot":"twitter_cdc","slotStartLsn":6699,"slotStartMs":5,"partitions":3,"completedAtMs":1764979200000}"#;
        let m = parse(b"recovery", Some(json)).unwrap();
        assert_eq!(m.slot_start_lsn, 6699);
        assert_eq!(m.partitions, 3);
        assert_eq!(date(&m), NaiveDate::from_ymd_opt(2025, 12, 6).unwrap());

        for (kind, value, says) in [
            (
                &b"other"[..],
                Some(&json[..]),
                "unknown marker kind `other`",
            ),
            (b"recovery", None, "without a value"),
            (b"recovery", Some(b"{}"), "missing field"),
            (
                b"recovery",
                Some(br#"{"id":"x","slot":"s","slotStartLsn":1,"slotStartMs":1,"partitions":0,"completedAtMs":0}"#),
                "names 0 partitions",
            ),
        ] {
            let e = parse(kind, value).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn marker_rows_are_changelog_rows_without_table_columns() {
        let marker = RecoveryMarker {
            id: "r".into(),
            slot: "s".into(),
            slot_start_lsn: 42,
            slot_start_ms: 4,
            partitions: 2,
            completed_at_ms: 1_000,
        };
        let rows: Vec<MarkerRow> = (0..2)
            .map(|p| MarkerRow {
                marker: marker.clone(),
                partition: p,
                offset: 10 + p as i64,
            })
            .collect();
        let b = batch(&rows).unwrap();
        assert_eq!(b.num_rows(), 2);
        use arrow::array::AsArray;
        assert_eq!(
            b.column_by_name(meta::OP)
                .unwrap()
                .as_string::<i32>()
                .value(1),
            "recovery"
        );
        assert_eq!(
            b.column_by_name(meta::LSN)
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            42
        );
    }
}
