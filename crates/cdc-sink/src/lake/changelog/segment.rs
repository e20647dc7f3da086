//! The changelog's rows in memory: one open [`Segment`] per Kafka
//! partition, until the [`RollPolicy`](super::roll::RollPolicy) closes it.
//!
//! A segment covers a contiguous offset range of one partition. Its rows are
//! grouped by (schema, event date) into [`Group`]s, each of which becomes one
//! Parquet file in the table's `_cdc_date=` partition, so a schema change or a
//! date change never fails a write: it just starts another file.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayBuilder, ArrayRef, Int32Builder, Int64Builder, ListBuilder, StringArray, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;

use crate::decode::ChangeRow;
use crate::decode::marker::{self, MarkerRow};
use crate::decode::schema::{TableSchema, meta};
use crate::lake::changelog::DataFile;
use crate::lake::changelog::column::ColumnBuilder;
use crate::lake::changelog::roll::{RollPolicy, RollReason};

/// Rows of one schema and one event date.
pub struct Group {
    pub schema: Arc<TableSchema>,
    pub schema_id: u64,
    pub date: NaiveDate,
    columns: Vec<ColumnBuilder>,
    op: StringBuilder,
    commit_ts: TimestampMicrosecondBuilder,
    lsn: Int64Builder,
    tx_id: Int64Builder,
    partition: Int32Builder,
    offset: Int64Builder,
    unchanged: ListBuilder<StringBuilder>,
    /// `_cdc_key_update` of the rows that have one, by row: rare, so kept
    /// apart, and the column is written only when a row has it.
    key_updates: Vec<(usize, Box<str>)>,
    rows: usize,
}

impl Group {
    fn new(schema: Arc<TableSchema>, schema_id: u64, date: NaiveDate) -> Group {
        let columns = schema
            .columns
            .iter()
            .map(|c| ColumnBuilder::new(&c.ty))
            .collect();
        Group {
            schema,
            schema_id,
            date,
            columns,
            op: StringBuilder::new(),
            commit_ts: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            lsn: Int64Builder::new(),
            tx_id: Int64Builder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            unchanged: ListBuilder::new(StringBuilder::new()),
            key_updates: Vec::new(),
            rows: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Appends a row; returns about what it takes buffered, CDC columns
    /// included (measured here, in the one pass over its values).
    fn append(&mut self, row: &ChangeRow, partition: i32, offset: i64) -> usize {
        const CDC_COLUMNS: usize = 48;
        let mut size = CDC_COLUMNS;
        for (builder, value) in self.columns.iter_mut().zip(&row.values) {
            builder.append(value);
            size += value.size();
        }
        self.op.append_value(row.op.code());
        self.commit_ts
            .append_value(row.commit_ts_ms.saturating_mul(1000));
        self.lsn.append_option(row.lsn);
        self.tx_id.append_option(row.tx_id);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        if row.unchanged.is_empty() {
            self.unchanged.append_null();
        } else {
            for &i in &row.unchanged {
                let column = &self.schema.columns[i];
                self.unchanged.values().append_value(&column.name);
                // Its text sibling (NaN and ±Infinity) was not sent either:
                // a reader carries both from the row's previous version.
                if column.ty.holds_numeric_text() {
                    self.unchanged
                        .values()
                        .append_value(self.schema.text_sibling(i));
                }
            }
            self.unchanged.append(true);
        }
        if let Some(k) = &row.key_update {
            self.key_updates.push((self.rows, k.clone()));
        }
        self.rows += 1;
        size
    }

    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        let mut arrays: Vec<ArrayRef> = self.columns.iter_mut().map(|b| b.finish()).collect();
        arrays.push(Arc::new(self.op.finish()));
        arrays.push(Arc::new(self.commit_ts.finish()));
        arrays.push(Arc::new(self.lsn.finish()));
        arrays.push(Arc::new(self.tx_id.finish()));
        arrays.push(Arc::new(self.partition.finish()));
        arrays.push(Arc::new(self.offset.finish()));
        arrays.push(Arc::new(self.unchanged.finish()));
        if self.key_updates.is_empty() {
            return RecordBatch::try_new(self.schema.arrow.clone(), arrays);
        }
        let mut keys = vec![None; arrays[0].len()];
        for (row, key) in self.key_updates.drain(..) {
            keys[row] = Some(key);
        }
        arrays.push(Arc::new(StringArray::from_iter(keys)));
        let mut fields = self.schema.arrow.fields().to_vec();
        fields.push(Arc::new(Field::new(meta::KEY_UPDATE, DataType::Utf8, true)));
        let metadata = self.schema.arrow.metadata().clone();
        RecordBatch::try_new(
            Arc::new(Schema::new_with_metadata(fields, metadata)),
            arrays,
        )
    }
}

const MS_PER_DAY: i64 = 86_400_000;

/// Which group the last row went to, by its schema and its day since the
/// epoch (the same day is the same event date).
#[derive(Clone, Copy)]
struct LastGroup {
    schema_id: u64,
    day: i64,
    index: usize,
}

/// The open buffer of one partition: offsets `first..=last`.
pub struct Segment {
    pub first: i64,
    pub last: i64,
    pub opened: Instant,
    pub bytes: usize,
    /// The newest source commit time (ms) among the rows.
    pub newest_source_ms: i64,
    /// The table's primary key columns, as the last keyed message named
    /// them; written into each file for the current-state tables.
    pub key: Option<Arc<[String]>>,
    groups: Vec<Group>,
    /// The group the last row went to.
    last_group: Option<LastGroup>,
    /// Recovery markers, written as rows of their own file.
    markers: Vec<MarkerRow>,
}

impl Segment {
    pub fn new(offset: i64) -> Segment {
        Segment {
            first: offset,
            last: offset,
            opened: Instant::now(),
            bytes: 0,
            newest_source_ms: i64::MIN,
            key: None,
            groups: Vec::new(),
            last_group: None,
            markers: Vec::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.groups.iter().map(Group::rows).sum::<usize>() + self.markers.len()
    }

    /// Appends a recovery marker. It does not move
    /// [`Segment::newest_source_ms`]: it is not a source change.
    pub fn push_marker(&mut self, row: MarkerRow) {
        self.cover(row.offset);
        self.markers.push(row);
    }

    /// Extends the segment over `offset` without a row (a tombstone or a
    /// quarantined message), so that committing it covers that offset.
    pub fn cover(&mut self, offset: i64) {
        self.last = self.last.max(offset);
    }

    /// Appends a row. What it adds to [`Segment::bytes`] is the row's
    /// decoded size, not the message's: a Debezium message carries its whole
    /// schema (kilobytes) for a row of a few hundred bytes, and it is the
    /// decoded rows that the buffer holds.
    pub fn push(&mut self, row: &ChangeRow, partition: i32, offset: i64) {
        // Rows come in runs of one schema and one day: the last row's group
        // is found by comparing two integers, not by a calendar date.
        let day = row.commit_ts_ms.div_euclid(MS_PER_DAY);
        let idx = match self.last_group {
            Some(last) if last.schema_id == row.schema_id && last.day == day => last.index,
            _ => {
                let index = self.group_of(row);
                self.last_group = Some(LastGroup {
                    schema_id: row.schema_id,
                    day,
                    index,
                });
                index
            }
        };
        self.bytes += self.groups[idx].append(row, partition, offset);
        self.cover(offset);
        self.newest_source_ms = self.newest_source_ms.max(row.commit_ts_ms);
    }

    /// The index of the group of `row`'s schema and event date, a new one
    /// if none is yet.
    fn group_of(&mut self, row: &ChangeRow) -> usize {
        let date = chrono::DateTime::from_timestamp_millis(row.commit_ts_ms)
            .map(|t| t.date_naive())
            .unwrap_or_default();
        // Groups stay in first-seen order, which makes file numbering
        // within a segment deterministic on replay.
        match self
            .groups
            .iter()
            .position(|g| g.schema_id == row.schema_id && g.date == date)
        {
            Some(i) => i,
            None => {
                self.groups
                    .push(Group::new(row.schema.clone(), row.schema_id, date));
                self.groups.len() - 1
            }
        }
    }

    /// The segment's rows as record batches, one per group.
    pub fn into_files(self) -> Result<Vec<DataFile>, ArrowError> {
        let key = self.key;
        let mut files = self
            .groups
            .into_iter()
            .map(|mut g| {
                Ok(DataFile {
                    date: g.date,
                    batch: g.finish()?,
                    key: key.clone(),
                })
            })
            .collect::<Result<Vec<_>, ArrowError>>()?;
        if let Some(first) = self.markers.first() {
            files.push(DataFile {
                date: crate::decode::marker::date(&first.marker),
                batch: marker::batch(&self.markers)?,
                key,
            });
        }
        Ok(files)
    }

    pub fn roll_reason(&self, policy: &RollPolicy) -> Option<RollReason> {
        policy.check(self.rows(), self.bytes, self.opened.elapsed())
    }

    /// Whether the segment is full (rows or bytes), not asking its age.
    pub fn full(&self, policy: &RollPolicy) -> Option<RollReason> {
        policy.full(self.rows(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_bytes_are_decoded_rows_not_messages() {
        let mut d = crate::decode::Decoder::new();
        let mut seg = Segment::new(0);
        let mut raw = 0;
        for (i, line) in crate::decode::tests::TWITTER.lines().enumerate() {
            if let Ok(crate::decode::Decoded::Row(r)) = d.decode(Some(line.as_bytes())) {
                seg.push(&r, 0, i as i64);
                raw += line.len();
            }
        }
        assert!(seg.rows() > 0);
        // A message carries its schema: kilobytes for a row of hundreds.
        assert!(seg.bytes * 3 < raw, "{} decoded vs {raw} raw", seg.bytes);
        assert!(seg.bytes > seg.rows() * 48);
    }

    /// An unchanged TOASTed `numeric(6,2)[]` (Debezium's placeholder, as
    /// the converter sends it) lists its text sibling as unchanged too: a
    /// NaN it held lives there, and a reader must carry it as well.
    #[test]
    fn an_unchanged_numeric_column_lists_its_text_sibling() {
        use arrow::array::{Array, AsArray};
        let update = crate::decode::tests::EXACT.lines().nth(2).unwrap();
        let update = update.replace(
            r#""amounts":["3.50","NaN",null]"#,
            &format!(r#""amounts":["{}"]"#, crate::decode::UNAVAILABLE),
        );
        let mut d = crate::decode::Decoder::new();
        let Ok(crate::decode::Decoded::Row(row)) = d.decode(Some(update.as_bytes())) else {
            panic!("not a row");
        };
        let mut seg = Segment::new(0);
        seg.push(&row, 0, 0);
        let files = seg.into_files().unwrap();
        let unchanged = files[0]
            .batch
            .column_by_name(crate::decode::schema::meta::UNCHANGED)
            .unwrap()
            .as_list::<i32>()
            .value(0);
        let names: Vec<&str> = unchanged.as_string::<i32>().iter().flatten().collect();
        assert_eq!(names, ["amounts", "amounts__string"]);
        assert_eq!(unchanged.len(), 2);
    }

    /// A key update's half carries the other half's key; a file without
    /// one has no such column.
    #[test]
    fn a_key_update_column_appears_with_its_first_row() {
        use arrow::array::{Array, AsArray};
        let mut d = crate::decode::Decoder::new();
        let mut rows: Vec<ChangeRow> = crate::decode::tests::TWITTER
            .lines()
            .filter_map(|line| match d.decode(Some(line.as_bytes())) {
                Ok(crate::decode::Decoded::Row(r)) => Some(r),
                _ => None,
            })
            .take(3)
            .collect();
        let mut plain = Segment::new(0);
        plain.push(&rows[0], 0, 0);
        let files = plain.into_files().unwrap();
        assert!(files[0].batch.column_by_name(meta::KEY_UPDATE).is_none());

        let mut seg = Segment::new(0);
        let mut moved = rows.remove(1);
        moved.key_update = Some(r#"{"id":7}"#.into());
        seg.push(&rows[0], 0, 0);
        seg.push(&moved, 0, 1);
        let files = seg.into_files().unwrap();
        let file = files
            .iter()
            .find(|f| f.batch.num_rows() == 2)
            .expect("both rows in one file");
        let column = file.batch.column_by_name(meta::KEY_UPDATE).unwrap();
        let keys = column.as_string::<i32>();
        assert!(keys.is_null(0));
        assert_eq!(keys.value(1), r#"{"id":7}"#);
        assert_eq!(
            file.batch.schema().metadata(),
            rows[0].schema.arrow.metadata(),
            "the table's schema metadata kept"
        );
    }

    /// Rows alternating between two days, one of them before the epoch,
    /// land in one file per day, each holding exactly its rows.
    #[test]
    fn rows_alternating_between_days_land_in_their_days_files() {
        let mut d = crate::decode::Decoder::new();
        let mut seg = Segment::new(0);
        let days = [
            NaiveDate::from_ymd_opt(2026, 12, 7).unwrap(),
            NaiveDate::from_ymd_opt(1969, 12, 31).unwrap(),
        ];
        let line = crate::decode::tests::TWITTER.lines().next().unwrap();
        let Ok(crate::decode::Decoded::Row(mut r)) = d.decode(Some(line.as_bytes())) else {
            panic!("not a row");
        };
        // One schema's rows, whose run is broken by the day alone: one
        // row on one day, then two on the other, and so on.
        let mut pushed = [0, 0];
        for i in 0..9 {
            let which = (i % 3).min(1);
            // The last millisecond of the day, so a day off by one shows.
            let end = days[which]
                .succ_opt()
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap();
            r.commit_ts_ms = end.and_utc().timestamp_millis() - 1;
            seg.push(&r, 0, i as i64);
            pushed[which] += 1;
        }
        assert!(pushed.iter().all(|&n| n > 0), "{pushed:?}");
        let files = seg.into_files().unwrap();
        let mut landed: Vec<_> = files.iter().map(|f| (f.date, f.batch.num_rows())).collect();
        landed.sort();
        assert_eq!(landed.len(), 2, "{landed:?}");
        let mut by_day = [0, 0];
        for (date, rows) in landed {
            let which = days
                .iter()
                .position(|d| *d == date)
                .expect("one of the days");
            by_day[which] += rows;
        }
        assert_eq!(by_day, pushed);
    }

    #[test]
    fn cover_extends_without_rows() {
        let mut s = Segment::new(5);
        s.cover(9);
        assert_eq!((s.first, s.last, s.rows()), (5, 9, 0));
    }
}
