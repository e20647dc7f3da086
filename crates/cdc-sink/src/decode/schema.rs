//! Kafka Connect schemas (as the JSON converter embeds them) and their Arrow
//! counterparts.
//!
//! [`ConnectSchema`] is the wire form; [`ColumnType`] is what a column is to
//! the sink, chosen from the Connect type and its logical name; and
//! [`TableSchema`] is one table's columns plus the CDC metadata columns, with
//! the Arrow schema that every Parquet file of that shape carries.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

/// A Connect schema node, as serialised by `JsonConverter` with
/// `schemas.enable=true`.
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectSchema {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub fields: Vec<ConnectSchema>,
    #[serde(default)]
    pub items: Option<Box<ConnectSchema>>,
    #[serde(default)]
    pub parameters: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("envelope schema has no `after` or `before` struct")]
    NoRowStruct,
    #[error("column `{column}`: decimal precision {precision} / scale {scale} out of range")]
    DecimalRange {
        column: String,
        precision: u32,
        scale: i64,
    },
}

/// How one column is decoded and stored.
///
/// Delta Lake has no TIME and no INTERVAL type and decimals stop at 38
/// digits, so a few kinds land as a neighbouring type every reader knows;
/// docs/design.md (Types) lists each choice.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    /// `real`/`double`, including NaN and ±Infinity (which the JSON
    /// converter spells as strings).
    Float32,
    Float64,
    Utf8,
    /// Connect `bytes`, base64 in JSON.
    Binary,
    /// Connect `Decimal` (bytes, big-endian two's complement, base64 in
    /// JSON; or a JSON number with `decimal.format=NUMERIC`).
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// `cdclake.Numeric` (the project's Debezium converter,
    /// `debezium/converter`): PostgreSQL's decimal text of a `numeric(p,s)`
    /// with p <= 38, stored as `decimal(p,s)`. NaN and ±Infinity, which
    /// no decimal holds, go to a text sibling column (see
    /// [`TableSchema::with_text_siblings`]).
    NumericText {
        precision: u8,
        scale: i8,
    },
    /// A Connect `Decimal` wider than 38 digits: kept exactly, as text.
    WideDecimal {
        scale: u32,
    },
    /// Days since the epoch (`io.debezium.time.Date`, Connect `Date`).
    Date,
    /// `timestamp` (no time zone): a wall-clock time, stored as Delta
    /// `timestamp_ntz` in µs. `unit` says what the wire holds.
    LocalTimestamp(WireTime),
    /// `timestamptz`: an ISO-8601 string with offset
    /// (`io.debezium.time.ZonedTimestamp`), stored as a UTC instant in µs.
    ZonedTimestamp,
    /// `time`: microseconds since midnight as a plain `long` (Delta has no
    /// TIME type). `unit` says what the wire holds.
    Time(WireTime),
    List(Box<ColumnType>),
    /// `io.debezium.data.VariableScaleDecimal` (numeric without a declared
    /// scale): a struct of scale and bytes, kept exactly as a decimal string.
    VariableDecimal,
    /// Nested structs and maps, and any kind this mapper does not know:
    /// kept as their JSON text.
    Json,
}

/// The unit of an integer time value on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireTime {
    Millis,
    Micros,
    Nanos,
}

impl WireTime {
    /// Converts a wire value to microseconds (nanoseconds are truncated:
    /// Delta timestamps are µs).
    pub fn to_micros(self, v: i64) -> i64 {
        match self {
            WireTime::Millis => v.saturating_mul(1000),
            WireTime::Micros => v,
            WireTime::Nanos => v.div_euclid(1000),
        }
    }
}

impl ColumnType {
    pub fn from_connect(column: &str, s: &ConnectSchema) -> Result<ColumnType, SchemaError> {
        let name = s.name.as_deref().unwrap_or("");
        let t = match (s.kind.as_str(), name) {
            ("int32", "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => {
                ColumnType::Date
            }
            ("int32", "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => {
                ColumnType::Time(WireTime::Millis)
            }
            ("int64", "io.debezium.time.MicroTime") => ColumnType::Time(WireTime::Micros),
            ("int64", "io.debezium.time.NanoTime") => ColumnType::Time(WireTime::Nanos),
            ("int64", "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
                ColumnType::LocalTimestamp(WireTime::Millis)
            }
            ("int64", "io.debezium.time.MicroTimestamp") => {
                ColumnType::LocalTimestamp(WireTime::Micros)
            }
            ("int64", "io.debezium.time.NanoTimestamp") => {
                ColumnType::LocalTimestamp(WireTime::Nanos)
            }
            ("string", "io.debezium.time.ZonedTimestamp") => ColumnType::ZonedTimestamp,
            ("bytes", "org.apache.kafka.connect.data.Decimal") => {
                let scale: i64 = s
                    .parameters
                    .get("scale")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                // Debezium omits the precision for numeric columns declared
                // without one; 38 is the widest Decimal128.
                let precision: u32 = s
                    .parameters
                    .get("connect.decimal.precision")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(38);
                if !(0..=1000).contains(&scale) {
                    return Err(SchemaError::DecimalRange {
                        column: column.to_string(),
                        precision,
                        scale,
                    });
                }
                if (1..=38).contains(&precision) && scale <= precision as i64 {
                    ColumnType::Decimal {
                        precision: precision as u8,
                        scale: scale as i8,
                    }
                } else {
                    ColumnType::WideDecimal {
                        scale: scale as u32,
                    }
                }
            }
            ("struct", "io.debezium.data.VariableScaleDecimal") => ColumnType::VariableDecimal,
            ("string", NUMERIC) => {
                let param = |k: &str| s.parameters.get(k).and_then(|v| v.parse::<i64>().ok());
                match (param("precision"), param("scale").unwrap_or(0)) {
                    (Some(p @ 1..=38), s @ 0..=38) if s <= p => ColumnType::NumericText {
                        precision: p as u8,
                        scale: s as i8,
                    },
                    // Unconstrained or wider than Decimal128: the exact
                    // text, specials included, as before the converter.
                    _ => ColumnType::Utf8,
                }
            }
            ("boolean", _) => ColumnType::Bool,
            ("int8", _) => ColumnType::Int8,
            ("int16", _) => ColumnType::Int16,
            ("int32", _) => ColumnType::Int32,
            ("int64", _) => ColumnType::Int64,
            ("float" | "float32", _) => ColumnType::Float32,
            ("double" | "float64", _) => ColumnType::Float64,
            // Json, Uuid, Enum, Xml, ZonedTime, ... are all text.
            ("string", _) => ColumnType::Utf8,
            ("bytes", _) => ColumnType::Binary,
            ("array", _) => match s.items.as_deref() {
                Some(items) => ColumnType::List(Box::new(ColumnType::from_connect(column, items)?)),
                None => ColumnType::Json,
            },
            // Structs and maps are JSON on purpose; anything else is a kind
            // this mapper does not know, kept as its JSON text rather than
            // failing the table (`TableSchema::fallbacks` names it).
            _ => ColumnType::Json,
        };
        Ok(t)
    }

    /// Whether this is the JSON-text fallback for a kind the mapper does not
    /// know (structs and maps are JSON by design, not by fallback).
    fn is_fallback(s: &ConnectSchema) -> bool {
        match s.kind.as_str() {
            "boolean" | "int8" | "int16" | "int32" | "int64" | "float" | "float32" | "double"
            | "float64" | "string" | "bytes" | "struct" | "map" => false,
            "array" => s.items.as_deref().is_none_or(ColumnType::is_fallback),
            _ => true,
        }
    }

    /// A `NumericText` column, or a list of them.
    pub fn holds_numeric_text(&self) -> bool {
        match self {
            ColumnType::NumericText { .. } => true,
            ColumnType::List(item) => item.holds_numeric_text(),
            _ => false,
        }
    }

    pub fn arrow(&self) -> DataType {
        match self {
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Int8 => DataType::Int8,
            ColumnType::Int16 => DataType::Int16,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8
            | ColumnType::Json
            | ColumnType::VariableDecimal
            | ColumnType::WideDecimal { .. } => DataType::Utf8,
            ColumnType::Binary => DataType::Binary,
            ColumnType::Decimal { precision, scale }
            | ColumnType::NumericText { precision, scale } => {
                DataType::Decimal128(*precision, *scale)
            }
            ColumnType::Date => DataType::Date32,
            ColumnType::LocalTimestamp(_) => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnType::ZonedTimestamp => utc_micros(),
            ColumnType::Time(_) => DataType::Int64,
            ColumnType::List(item) => {
                DataType::List(Arc::new(Field::new("item", item.arrow(), true)))
            }
        }
    }
}

/// Schema names of the project's Debezium converter (`debezium/converter`).
pub const NUMERIC: &str = "cdclake.Numeric";
pub const BITS: &str = "cdclake.Bits";

/// Suffix of the sibling column that holds, as text, the values a column's
/// type cannot hold (numeric NaN and ±Infinity in a `decimal` column): the
/// same `<name>__<type>` form schema evolution uses for a changed type.
pub const TEXT_SIBLING: &str = "__string";

/// PostgreSQL's numeric values that no decimal type can hold.
pub fn is_numeric_special(s: &str) -> bool {
    matches!(s, "NaN" | "Infinity" | "-Infinity")
}

/// Delta's `timestamp`: µs, adjusted to UTC.
pub fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")))
}

/// Names of the CDC metadata columns appended after the table's own.
pub mod meta {
    /// `c` insert, `u` update, `d` delete, `r` snapshot read; `recovery`
    /// for a recovery marker (`decode::marker`).
    pub const OP: &str = "_cdc_op";
    /// Source commit time (Debezium `source.ts_ms`), UTC, µs.
    pub const COMMIT_TS: &str = "_cdc_commit_ts";
    pub const LSN: &str = "_cdc_lsn";
    pub const TX_ID: &str = "_cdc_tx_id";
    pub const KAFKA_PARTITION: &str = "_cdc_kafka_partition";
    pub const KAFKA_OFFSET: &str = "_cdc_kafka_offset";
    /// Columns whose value Debezium did not have (unchanged TOASTed values):
    /// they are null in this row and should be carried over from the
    /// previous version of the row.
    pub const UNCHANGED: &str = "_cdc_unchanged_cols";
    /// The Delta partition column: the UTC date of the source commit. A
    /// `_cdc_` name, so that a table's own `date` column never collides
    /// with it.
    pub const DATE: &str = "_cdc_date";
    /// A recovery marker's JSON, in its row only (`decode::marker`); the
    /// column appears in a changelog with its first marker.
    pub const RECOVERY: &str = "_cdc_recovery";
    /// On either half of a primary-key update (the delete of the old key,
    /// the create of the new), the other half's key as Debezium's header
    /// writes it (`{"id":7}`); the column appears in a changelog with its
    /// first key update. The current-state table pairs the halves by it.
    pub const KEY_UPDATE: &str = "_cdc_key_update";
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// Whether PostgreSQL allows NULL here (Connect `optional`). The lake
    /// column is nullable either way; a NULL in an insert or update of a
    /// NOT NULL column means a value was lost upstream, and is reported.
    pub optional: bool,
}

/// One table shape: its columns in Connect order and the Arrow schema of
/// the files written for it (the Delta table adds the `date` partition
/// column, which lives in the file path, not in the file).
#[derive(Debug)]
pub struct TableSchema {
    pub columns: Vec<Column>,
    pub arrow: SchemaRef,
    /// Columns of a kind the mapper does not know, kept as JSON text.
    pub fallbacks: Vec<String>,
    /// Whether a value may need a text sibling (a `NumericText` column or
    /// list of them), so rows of other tables skip the check.
    pub has_numeric_text: bool,
}

impl TableSchema {
    /// Builds the table schema from a Debezium envelope schema.
    pub fn from_envelope(envelope: &ConnectSchema) -> Result<TableSchema, SchemaError> {
        let row = envelope
            .fields
            .iter()
            .find(|f| f.field.as_deref() == Some("after"))
            .or_else(|| {
                envelope
                    .fields
                    .iter()
                    .find(|f| f.field.as_deref() == Some("before"))
            })
            .ok_or(SchemaError::NoRowStruct)?;
        let mut columns = Vec::with_capacity(row.fields.len());
        let mut fallbacks = Vec::new();
        for f in &row.fields {
            let name = f.field.clone().unwrap_or_default();
            let ty = ColumnType::from_connect(&name, f)?;
            if ColumnType::is_fallback(f) {
                fallbacks.push(name.clone());
            }
            // The project's converter marks every schema optional (a delete
            // may lack the value) and says NOT NULL in a parameter.
            let not_null = f.parameters.get("not_null").is_some_and(|v| v == "true");
            columns.push(Column {
                name,
                ty,
                optional: f.optional && !not_null,
            });
        }
        let has_numeric_text = columns.iter().any(|c| c.ty.holds_numeric_text());
        // Every table column is nullable: a delete under REPLICA IDENTITY
        // DEFAULT carries only the key, whatever the column's constraint.
        let mut fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow(), true))
            .collect();
        fields.extend(metadata_fields());
        Ok(TableSchema {
            columns,
            arrow: Arc::new(Schema::new(fields)),
            fallbacks,
            has_numeric_text,
        })
    }

    /// The name of column `i`'s text sibling: `<name>__string`, with more
    /// `_` while the table has a column of that name of its own.
    pub fn text_sibling(&self, i: usize) -> String {
        let mut name = format!("{}{TEXT_SIBLING}", self.columns[i].name);
        while self.columns.iter().any(|c| c.name == name) {
            name.push('_');
        }
        name
    }

    /// This shape plus a text sibling `<name>__string` for each column in
    /// `columns` (indices of `NumericText` columns or lists of them), after
    /// the table's own columns: the shape of rows whose value in those
    /// columns is NaN or ±Infinity. The decimal column is NULL in such a
    /// row and the sibling holds PostgreSQL's text (a list column's
    /// sibling holds the whole list as text). Rows of another shape are
    /// another file, and the table gains the sibling column on first use.
    pub fn with_text_siblings(&self, columns: &[usize]) -> TableSchema {
        let mut all = self.columns.clone();
        for &i in columns {
            let ty = match self.columns[i].ty {
                ColumnType::List(_) => ColumnType::List(Box::new(ColumnType::Utf8)),
                _ => ColumnType::Utf8,
            };
            all.push(Column {
                name: self.text_sibling(i),
                ty,
                optional: true,
            });
        }
        let mut fields: Vec<Field> = all
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow(), true))
            .collect();
        fields.extend(metadata_fields());
        TableSchema {
            columns: all,
            arrow: Arc::new(Schema::new(fields)),
            fallbacks: self.fallbacks.clone(),
            has_numeric_text: self.has_numeric_text,
        }
    }
}

/// Nullable, although the sink always sets the first four: Spark's Delta
/// reader treats a NOT NULL column as the `invariants` table feature and
/// refuses a table whose protocol does not list it, and delta-rs writes
/// that feature only with DataFusion.
pub(crate) fn metadata_fields() -> [Field; 7] {
    [
        Field::new(meta::OP, DataType::Utf8, true),
        Field::new(meta::COMMIT_TS, utc_micros(), true),
        Field::new(meta::LSN, DataType::Int64, true),
        Field::new(meta::TX_ID, DataType::Int64, true),
        Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
        Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
        Field::new(
            meta::UNCHANGED,
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(json: &str) -> ColumnType {
        let s: ConnectSchema = serde_json::from_str(json).unwrap();
        ColumnType::from_connect("c", &s).unwrap()
    }

    #[test]
    fn logical_types_map_to_arrow() {
        assert_eq!(
            col(r#"{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"6","connect.decimal.precision":"9"}}"#).arrow(),
            DataType::Decimal128(9, 6)
        );
        assert_eq!(
            col(r#"{"type":"string","name":"io.debezium.time.ZonedTimestamp"}"#).arrow(),
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")))
        );
        assert_eq!(
            col(r#"{"type":"int64","name":"io.debezium.time.NanoTimestamp"}"#),
            ColumnType::LocalTimestamp(WireTime::Nanos)
        );
        assert_eq!(
            col(r#"{"type":"int64","name":"io.debezium.time.MicroTimestamp"}"#).arrow(),
            DataType::Timestamp(TimeUnit::Microsecond, None),
            "timestamp without time zone stays a wall-clock time"
        );
        assert_eq!(
            col(r#"{"type":"int64","name":"io.debezium.time.MicroTime"}"#).arrow(),
            DataType::Int64
        );
        assert_eq!(
            col(r#"{"type":"int32","name":"io.debezium.time.Date"}"#).arrow(),
            DataType::Date32
        );
        assert_eq!(
            col(r#"{"type":"array","items":{"type":"string"}}"#),
            ColumnType::List(Box::new(ColumnType::Utf8))
        );
        assert_eq!(
            col(r#"{"type":"string","name":"io.debezium.data.Json"}"#),
            ColumnType::Utf8
        );
        assert_eq!(col(r#"{"type":"int16"}"#), ColumnType::Int16);
        assert_eq!(col(r#"{"type":"float"}"#), ColumnType::Float32);
    }

    #[test]
    fn decimal_without_precision_is_widest() {
        assert_eq!(
            col(
                r#"{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"}}"#
            ),
            ColumnType::Decimal {
                precision: 38,
                scale: 2
            }
        );
    }

    #[test]
    fn converter_numerics_keep_their_decimal_type() {
        let numeric = |params: &str| {
            col(&format!(
                r#"{{"type":"string","optional":true,"name":"cdclake.Numeric"{params}}}"#
            ))
        };
        // The same Delta type as Debezium's `Decimal` gave a lake before.
        assert_eq!(
            numeric(r#","parameters":{"precision":"10","scale":"3"}"#).arrow(),
            DataType::Decimal128(10, 3)
        );
        // Unconstrained, and wider than Decimal128: the exact text.
        assert_eq!(numeric("").arrow(), DataType::Utf8);
        assert_eq!(
            numeric(r#","parameters":{"precision":"40","scale":"5"}"#).arrow(),
            DataType::Utf8
        );
        assert_eq!(
            col(r#"{"type":"string","name":"cdclake.Bits","parameters":{"length":"16"}}"#).arrow(),
            DataType::Utf8
        );
    }

    #[test]
    fn wide_decimals_are_exact_text() {
        assert_eq!(
            col(
                r#"{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"4","connect.decimal.precision":"50"}}"#
            ),
            ColumnType::WideDecimal { scale: 4 }
        );
    }

    #[test]
    fn unknown_kinds_fall_back_to_json_text() {
        let envelope: ConnectSchema = serde_json::from_str(
            r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
                {"type":"int64","field":"id"},
                {"type":"geography2","field":"odd"},
                {"type":"struct","field":"pt","fields":[]}]}]}"#,
        )
        .unwrap();
        let t = TableSchema::from_envelope(&envelope).unwrap();
        assert_eq!(t.columns[1].ty, ColumnType::Json);
        assert_eq!(
            t.fallbacks,
            vec!["odd".to_string()],
            "structs are JSON by design"
        );
    }

    #[test]
    fn wire_time_converts_to_micros() {
        assert_eq!(WireTime::Millis.to_micros(5), 5_000);
        assert_eq!(WireTime::Nanos.to_micros(-1), -1);
        assert_eq!(WireTime::Nanos.to_micros(1_999), 1);
    }
}
