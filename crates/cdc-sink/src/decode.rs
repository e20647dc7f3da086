//! Debezium change events (JSON converter, schemas enabled) to typed rows.
//!
//! [`Decoder`] parses each distinct envelope schema once and caches the
//! resulting [`TableSchema`] by a hash of its raw JSON, so the per-message
//! cost is the payload alone. [`Decoder::decode`] yields a [`Decoded`]: a
//! tombstone to skip, or a [`ChangeRow`] whose values already match the
//! schema, so appending it to a batch cannot fail half-way.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::schema::{ColumnType, ConnectSchema, SchemaError, TableSchema};

/// What Debezium sends for a column whose value it does not have: an
/// unchanged TOASTed value under REPLICA IDENTITY DEFAULT.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";
/// The same placeholder in a `bytes` column, base64 encoded.
const UNAVAILABLE_B64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not a Debezium envelope: {0}")]
    Envelope(&'static str),
    #[error("unsupported schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("column `{column}` does not match its declared schema ({expected}): {found}")]
    Mismatch {
        column: String,
        expected: String,
        found: String,
    },
    #[error("unsupported op `{0}`")]
    Op(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Read,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// One value, already checked against its [`ColumnType`].
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    Bool(bool),
    /// Integers, and dates (days), times and timestamps (µs).
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Decimal(i128),
    List(Vec<Datum>),
}

#[derive(Debug)]
pub struct ChangeRow {
    pub schema: Arc<TableSchema>,
    /// Identifies the schema within this process (hash of its JSON).
    pub schema_id: u64,
    pub op: Op,
    /// One per `schema.columns`, in order.
    pub values: Vec<Datum>,
    /// Indices of columns whose value was Debezium's unavailable
    /// placeholder; their `values` entry is `Null`.
    pub unchanged: Vec<usize>,
    pub commit_ts_ms: i64,
    pub lsn: Option<i64>,
    pub tx_id: Option<i64>,
}

#[derive(Debug)]
pub enum Decoded {
    Tombstone,
    Row(ChangeRow),
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    before: Option<Map<String, Value>>,
    #[serde(default)]
    after: Option<Map<String, Value>>,
    source: Source,
    op: String,
}

#[derive(Deserialize)]
struct Source {
    ts_ms: i64,
    #[serde(default)]
    lsn: Option<i64>,
    #[serde(default, rename = "txId")]
    tx_id: Option<i64>,
}

#[derive(Default)]
pub struct Decoder {
    schemas: HashMap<u64, Arc<TableSchema>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Distinct schemas seen so far.
    pub fn schema_count(&self) -> usize {
        self.schemas.len()
    }

    /// Decodes one Kafka message value; `None` is a Kafka tombstone.
    pub fn decode(&mut self, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let Some(bytes) = value.filter(|b| !b.is_empty()) else {
            return Ok(Decoded::Tombstone);
        };
        let envelope: Envelope<'_> = serde_json::from_slice(bytes)?;
        let payload = match envelope.payload {
            Some(p) if p.get() != "null" => p,
            _ => return Ok(Decoded::Tombstone),
        };
        let raw_schema = envelope
            .schema
            .filter(|s| s.get() != "null")
            .ok_or(DecodeError::Envelope("no schema (is schemas.enable=true?)"))?;
        let (schema_id, schema) = self.schema(raw_schema.get())?;
        let payload: Payload = serde_json::from_str(payload.get())?;
        let (op, image) = match payload.op.as_str() {
            "c" => (Op::Create, payload.after),
            "u" => (Op::Update, payload.after),
            "r" => (Op::Read, payload.after),
            "d" => (Op::Delete, payload.before),
            other => return Err(DecodeError::Op(other.to_string())),
        };
        let image = image.ok_or(DecodeError::Envelope("row image missing for op"))?;
        let mut values = Vec::with_capacity(schema.columns.len());
        let mut unchanged = Vec::new();
        for (i, col) in schema.columns.iter().enumerate() {
            let v = image.get(&col.name).unwrap_or(&Value::Null);
            if is_unavailable(&col.ty, v) {
                unchanged.push(i);
                values.push(Datum::Null);
            } else {
                values.push(
                    to_datum(&col.ty, v).map_err(|expected| DecodeError::Mismatch {
                        column: col.name.clone(),
                        expected,
                        found: truncate(v.to_string(), 80),
                    })?,
                );
            }
        }
        Ok(Decoded::Row(ChangeRow {
            schema,
            schema_id,
            op,
            values,
            unchanged,
            commit_ts_ms: payload.source.ts_ms,
            lsn: payload.source.lsn,
            tx_id: payload.source.tx_id,
        }))
    }

    fn schema(&mut self, raw: &str) -> Result<(u64, Arc<TableSchema>), DecodeError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        let id = h.finish();
        if let Some(s) = self.schemas.get(&id) {
            return Ok((id, s.clone()));
        }
        let connect: ConnectSchema = serde_json::from_str(raw)?;
        let table = Arc::new(TableSchema::from_envelope(&connect)?);
        self.schemas.insert(id, table.clone());
        Ok((id, table))
    }
}

fn is_unavailable(ty: &ColumnType, v: &Value) -> bool {
    match (ty, v) {
        (ColumnType::Binary | ColumnType::Decimal { .. }, Value::String(s)) => {
            s == UNAVAILABLE_B64 || s == UNAVAILABLE
        }
        (ColumnType::List(_), Value::Array(items)) => {
            items.len() == 1 && items[0].as_str() == Some(UNAVAILABLE)
        }
        (_, Value::String(s)) => s == UNAVAILABLE,
        _ => false,
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
        s.push('…');
    }
    s
}

/// Converts one JSON value; the error is what was expected.
fn to_datum(ty: &ColumnType, v: &Value) -> Result<Datum, String> {
    if v.is_null() {
        return Ok(Datum::Null);
    }
    let expected = || format!("{ty:?}");
    let int = |lo: i64, hi: i64| {
        v.as_i64()
            .filter(|n| (lo..=hi).contains(n))
            .map(Datum::Int)
            .ok_or_else(expected)
    };
    match ty {
        ColumnType::Bool => v.as_bool().map(Datum::Bool).ok_or_else(expected),
        ColumnType::Int8 => int(i8::MIN as i64, i8::MAX as i64),
        ColumnType::Int16 => int(i16::MIN as i64, i16::MAX as i64),
        ColumnType::Int32 | ColumnType::Date => int(i32::MIN as i64, i32::MAX as i64),
        ColumnType::Int64 => int(i64::MIN, i64::MAX),
        ColumnType::Float32 | ColumnType::Float64 => {
            v.as_f64().map(Datum::Float).ok_or_else(expected)
        }
        ColumnType::Utf8 => v
            .as_str()
            .map(|s| Datum::Str(s.to_string()))
            .ok_or_else(expected),
        ColumnType::Json => Ok(Datum::Str(v.to_string())),
        ColumnType::Binary => v
            .as_str()
            .and_then(|s| BASE64.decode(s).ok())
            .map(Datum::Bytes)
            .ok_or_else(expected),
        ColumnType::Decimal { precision, scale } => {
            let unscaled = match v {
                Value::String(s) => BASE64.decode(s).ok().and_then(|b| i128_from_be(&b)),
                Value::Number(n) => parse_decimal(&n.to_string(), *scale as u32),
                _ => None,
            }
            .ok_or_else(expected)?;
            if unscaled.unsigned_abs() >= 10u128.pow(*precision as u32) {
                return Err(format!("{} (value exceeds the precision)", expected()));
            }
            Ok(Datum::Decimal(unscaled))
        }
        ColumnType::Timestamp(unit) | ColumnType::Time(unit) => v
            .as_i64()
            .map(|n| Datum::Int(unit.to_micros(n)))
            .ok_or_else(expected),
        ColumnType::ZonedTimestamp => v
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| Datum::Int(t.timestamp_micros()))
            .ok_or_else(expected),
        ColumnType::VariableDecimal => {
            let scale = v.get("scale").and_then(Value::as_u64);
            let unscaled = v
                .get("value")
                .and_then(Value::as_str)
                .and_then(|s| BASE64.decode(s).ok())
                .and_then(|b| i128_from_be(&b));
            match (scale, unscaled) {
                (Some(scale), Some(u)) => Ok(Datum::Str(format_decimal(u, scale as u32))),
                _ => Err(expected()),
            }
        }
        ColumnType::List(item) => {
            let items = v.as_array().ok_or_else(expected)?;
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                out.push(to_datum(item, it)?);
            }
            Ok(Datum::List(out))
        }
    }
}

/// Big-endian two's complement, as Connect `Decimal` serialises the
/// unscaled value.
pub fn i128_from_be(bytes: &[u8]) -> Option<i128> {
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    Some(i128::from_be_bytes(buf))
}

/// Parses a plain decimal literal ("-12.5") into an unscaled integer at
/// `scale`, refusing to drop digits.
fn parse_decimal(s: &str, scale: u32) -> Option<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > scale as usize || int.is_empty() {
        return None;
    }
    let mut n: i128 = 0;
    for c in int.chars().chain(frac.chars()) {
        n = n.checked_mul(10)?.checked_add(c.to_digit(10)? as i128)?;
    }
    n = n.checked_mul(10i128.checked_pow(scale - frac.len() as u32)?)?;
    Some(if neg { -n } else { n })
}

fn format_decimal(unscaled: i128, scale: u32) -> String {
    if scale == 0 {
        return unscaled.to_string();
    }
    let digits = unscaled.unsigned_abs().to_string();
    let pad = (scale as usize + 1).saturating_sub(digits.len());
    let digits = format!("{}{digits}", "0".repeat(pad));
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    format!("{}{int}.{frac}", if unscaled < 0 { "-" } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_bytes_are_twos_complement() {
        assert_eq!(i128_from_be(&[0x13, 0x88]), Some(5000));
        assert_eq!(i128_from_be(&[0xff]), Some(-1));
        assert_eq!(i128_from_be(&[0xec, 0x78]), Some(-5000));
        assert_eq!(i128_from_be(&[]), None);
    }

    #[test]
    fn decimal_literals_parse_exactly() {
        assert_eq!(parse_decimal("12.5", 2), Some(1250));
        assert_eq!(parse_decimal("-0.01", 2), Some(-1));
        assert_eq!(parse_decimal("7", 3), Some(7000));
        assert_eq!(parse_decimal("1.234", 2), None);
        assert_eq!(parse_decimal("1e5", 2), None);
    }

    #[test]
    fn variable_decimals_format() {
        assert_eq!(format_decimal(-5, 3), "-0.005");
        assert_eq!(format_decimal(12345, 2), "123.45");
        assert_eq!(format_decimal(42, 0), "42");
    }

    #[test]
    fn placeholder_detection() {
        assert!(is_unavailable(
            &ColumnType::Utf8,
            &Value::String(UNAVAILABLE.into())
        ));
        assert!(is_unavailable(
            &ColumnType::Binary,
            &Value::String(BASE64.encode(UNAVAILABLE))
        ));
        assert!(is_unavailable(
            &ColumnType::List(Box::new(ColumnType::Utf8)),
            &serde_json::json!([UNAVAILABLE])
        ));
        assert!(!is_unavailable(
            &ColumnType::Utf8,
            &Value::String("bio".into())
        ));
    }

    #[test]
    fn empty_and_null_values_are_tombstones() {
        let mut d = Decoder::new();
        assert!(matches!(d.decode(None), Ok(Decoded::Tombstone)));
        assert!(matches!(d.decode(Some(b"")), Ok(Decoded::Tombstone)));
        assert!(matches!(
            d.decode(Some(br#"{"schema":null,"payload":null}"#)),
            Ok(Decoded::Tombstone)
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        assert!(matches!(
            d.decode(Some(b"{not json")),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            d.decode(Some(br#"{"payload":{"op":"c"}}"#)),
            Err(DecodeError::Envelope(_))
        ));
    }
}
