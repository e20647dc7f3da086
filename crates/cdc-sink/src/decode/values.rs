//! Column values: Debezium's JSON encodings of each column type, read
//! into exact [`Datum`]s. Numbers are read from their digits, never through
//! f64; what a type cannot hold is an error naming the column's type.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use super::{Datum, UNAVAILABLE, UNAVAILABLE_B64};
use crate::decode::schema::{ColumnType, is_numeric_special};

/// `decimal.format=NUMERIC` writes decimals as JSON numbers; they are read
/// from their digits here, before anything could round them through f64.
pub(super) fn exact_number(ty: &ColumnType, raw: &str) -> Option<Result<Datum<'static>, String>> {
    let numeric = raw.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !numeric
        || !matches!(
            ty,
            ColumnType::Decimal { .. } | ColumnType::WideDecimal { .. }
        )
    {
        return None;
    }
    // Jackson may write a BigDecimal in exponent form (`1E-8`): fold the
    // exponent into the digits, exactly.
    let plain_text;
    let raw = match without_exponent(raw) {
        Some(p) => {
            plain_text = p;
            plain_text.as_str()
        }
        None => raw,
    };
    match ty {
        ColumnType::Decimal { precision, scale } if numeric => Some(
            parse_decimal(raw, *scale as u32)
                .ok_or_else(|| format!("{ty:?}"))
                .and_then(|u| checked_precision(u, *precision, ty)),
        ),
        ColumnType::WideDecimal { scale } if numeric => Some(
            parse_decimal_text(raw, *scale)
                .map(|s| Datum::Str(s.into()))
                .ok_or_else(|| format!("{ty:?}")),
        ),
        _ => None,
    }
}

pub(super) fn checked_precision(
    unscaled: i128,
    precision: u8,
    ty: &ColumnType,
) -> Result<Datum<'static>, String> {
    if unscaled.unsigned_abs() >= 10u128.pow(precision as u32) {
        return Err(format!("{ty:?} (value exceeds the precision)"));
    }
    Ok(Datum::Decimal(unscaled))
}

/// The common cases read straight from the raw JSON, without building a
/// `Value`: null, integers, booleans, and strings without escapes that are
/// not Debezium's placeholder. `None` sends the value down the general path.
pub(super) fn plain<'a>(ty: &ColumnType, raw: &'a str) -> Option<Result<Datum<'a>, String>> {
    if raw == "null" {
        return Some(Ok(Datum::Null));
    }
    let int = |lo: i64, hi: i64| {
        raw.parse::<i64>().ok().map(|n| {
            if (lo..=hi).contains(&n) {
                Ok(Datum::Int(n))
            } else {
                Err(format!("{ty:?}"))
            }
        })
    };
    let text = || {
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        (!inner.contains('\\') && inner != UNAVAILABLE).then_some(inner)
    };
    match ty {
        ColumnType::Int8 => int(i8::MIN as i64, i8::MAX as i64),
        ColumnType::Int16 => int(i16::MIN as i64, i16::MAX as i64),
        ColumnType::Int32 | ColumnType::Date => int(i32::MIN as i64, i32::MAX as i64),
        ColumnType::Int64 => int(i64::MIN, i64::MAX),
        ColumnType::Bool => match raw {
            "true" => Some(Ok(Datum::Bool(true))),
            "false" => Some(Ok(Datum::Bool(false))),
            _ => None,
        },
        ColumnType::Utf8 => text().map(|s| Ok(Datum::Str(s.into()))),
        ColumnType::ZonedTimestamp => text().and_then(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| Ok(Datum::Int(t.timestamp_micros())))
        }),
        ColumnType::NumericText { precision, scale } => {
            text().map(|s| numeric_text(s, *precision, *scale, ty))
        }
        ColumnType::Decimal { precision, .. } => text().and_then(|s| {
            if s == UNAVAILABLE_B64 {
                return None;
            }
            let unscaled = BASE64.decode(s).ok().and_then(|b| i128_from_be(&b))?;
            Some(checked_precision(unscaled, *precision, ty))
        }),
        _ => None,
    }
}

/// PostgreSQL `infinity`/`-infinity` for `timestamp`, as the JDBC driver
/// (and so Debezium) encodes them, whatever the unit.
pub(super) const PG_TIMESTAMP_INFINITY: i64 = 9_223_372_036_825_200_000;
pub(super) const PG_TIMESTAMP_NEG_INFINITY: i64 = -9_223_372_036_832_400_000;
/// Where `infinity` and `-infinity` land: the largest and smallest
/// timestamps every Delta reader accepts (9999-12-31T23:59:59.999999 and
/// 0001-01-01T00:00:00), documented in docs/design.md (Types).
pub const TIMESTAMP_INFINITY_MICROS: i64 = 253_402_300_799_999_999;
pub const TIMESTAMP_NEG_INFINITY_MICROS: i64 = -62_135_596_800_000_000;

pub(super) fn float(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => v.as_f64(),
    }
}

pub(super) fn is_unavailable(ty: &ColumnType, v: &Value) -> bool {
    match (ty, v) {
        (ColumnType::Binary | ColumnType::Decimal { .. }, Value::String(s)) => {
            s == UNAVAILABLE_B64 || s == UNAVAILABLE
        }
        // Debezium's placeholder for an unchanged TOASTed array: the text
        // alone (text[]; base64 for bytea[]), or its bytes as integers
        // (int[], bigint[]).
        (ColumnType::List(_), Value::Array(items)) => {
            matches!(items.as_slice(), [Value::String(s)] if s == UNAVAILABLE || s == UNAVAILABLE_B64)
                || is_placeholder_ints(items.iter().map(Value::as_i64))
        }
        (_, Value::String(s)) => s == UNAVAILABLE,
        _ => false,
    }
}

/// Debezium's placeholder for an unchanged TOASTed `int[]` or `bigint[]`:
/// the placeholder text's bytes, as integers.
/// Takes the items' integers (`None` for an item that is not one), so
/// that a caller looks at its list without collecting it: most lists are
/// not the placeholder's length, and no item of them is read.
pub(super) fn is_placeholder_ints<I>(items: I) -> bool
where
    I: ExactSizeIterator<Item = Option<i64>>,
{
    items.len() == UNAVAILABLE.len()
        && items
            .zip(UNAVAILABLE.bytes())
            .all(|(v, b)| v == Some(i64::from(b)))
}

pub(super) fn truncate(mut s: String, max: usize) -> String {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
        s.push('…');
    }
    s
}

/// Converts one JSON value; the error is what was expected.
pub(super) fn to_datum(ty: &ColumnType, v: &Value) -> Result<Datum<'static>, String> {
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
            float(v).map(Datum::Float).ok_or_else(expected)
        }
        ColumnType::Utf8 => v
            .as_str()
            .map(|s| Datum::Str(s.to_string().into()))
            .ok_or_else(expected),
        ColumnType::Json => Ok(Datum::Str(v.to_string().into())),
        ColumnType::Binary => v
            .as_str()
            .and_then(|s| BASE64.decode(s).ok())
            .map(|b| Datum::Bytes(b.into()))
            .ok_or_else(expected),
        ColumnType::Decimal { precision, .. } => {
            // A NUMERIC-format number never gets here (see `exact_number`),
            // except inside an array, where serde_json has already read it.
            let unscaled = match v {
                Value::String(s) => BASE64.decode(s).ok().and_then(|b| i128_from_be(&b)),
                Value::Number(n) => match ty {
                    ColumnType::Decimal { scale, .. } => {
                        parse_decimal(&n.to_string(), *scale as u32)
                    }
                    _ => None,
                },
                _ => None,
            }
            .ok_or_else(expected)?;
            checked_precision(unscaled, *precision, ty)
        }
        ColumnType::NumericText { precision, scale } => v
            .as_str()
            .ok_or_else(expected)
            .and_then(|s| numeric_text(s, *precision, *scale, ty)),
        ColumnType::WideDecimal { scale } => v
            .as_str()
            .and_then(|s| BASE64.decode(s).ok())
            .map(|b| Datum::Str(big_decimal_text(&b, *scale).into()))
            .ok_or_else(expected),
        ColumnType::LocalTimestamp(unit) => v
            .as_i64()
            .map(|n| match n {
                PG_TIMESTAMP_INFINITY => Datum::Int(TIMESTAMP_INFINITY_MICROS),
                PG_TIMESTAMP_NEG_INFINITY => Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS),
                n => Datum::Int(unit.to_micros(n)),
            })
            .ok_or_else(expected),
        ColumnType::Time(unit) => v
            .as_i64()
            .map(|n| Datum::Int(unit.to_micros(n)))
            .ok_or_else(expected),
        ColumnType::ZonedTimestamp => match v.as_str() {
            Some("infinity") => Ok(Datum::Int(TIMESTAMP_INFINITY_MICROS)),
            Some("-infinity") => Ok(Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS)),
            Some(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| Datum::Int(t.timestamp_micros()))
                .map_err(|_| expected()),
            None => Err(expected()),
        },
        ColumnType::VariableDecimal => {
            let scale = v.get("scale").and_then(Value::as_u64);
            let bytes = v
                .get("value")
                .and_then(Value::as_str)
                .and_then(|s| BASE64.decode(s).ok());
            match (scale, bytes) {
                (Some(scale), Some(b)) if !b.is_empty() => {
                    Ok(Datum::Str(big_decimal_text(&b, scale as u32).into()))
                }
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

/// A `cdclake.Numeric` value: the decimal at the column's scale, or NaN and
/// ±Infinity as their text (moved to the sibling column by the decoder).
pub(super) fn numeric_text(
    s: &str,
    precision: u8,
    scale: i8,
    ty: &ColumnType,
) -> Result<Datum<'static>, String> {
    if is_numeric_special(s) {
        return Ok(Datum::Str(s.to_string().into()));
    }
    let plain = without_exponent(s);
    parse_decimal(plain.as_deref().unwrap_or(s), scale as u32)
        .ok_or_else(|| format!("{ty:?}"))
        .and_then(|u| checked_precision(u, precision, ty))
}

/// One value of a `NumericText` list as PostgreSQL's text, for the sibling.
pub(super) fn as_text<'a>(ty: &ColumnType, d: &Datum<'a>) -> Datum<'a> {
    match (ty, d) {
        (ColumnType::List(item), Datum::List(items)) => {
            Datum::List(items.iter().map(|d| as_text(item, d)).collect())
        }
        (ColumnType::List(item), d) => as_text(item, d),
        (ColumnType::NumericText { scale, .. }, Datum::Decimal(u)) => {
            Datum::Str(format_decimal(*u, *scale as u32).into())
        }
        (_, d) => d.clone(),
    }
}

/// `1.5E+3` as `1500`, `-12E-3` as `-0.012`; `None` without an exponent
/// (or with one that is not an integer).
pub(super) fn without_exponent(raw: &str) -> Option<String> {
    let (mantissa, exp) = raw.split_once(['e', 'E'])?;
    let exp: i64 = exp.parse().ok()?;
    let (neg, m) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (int, frac) = m.split_once('.').unwrap_or((m, ""));
    let digits = format!("{int}{frac}");
    // Position of the decimal point within `digits` after the shift.
    let point = int.len() as i64 + exp;
    if point.abs() > 4096 {
        return None;
    }
    let text = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        format!(
            "{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    };
    Some(if neg { format!("-{text}") } else { text })
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
pub(super) fn parse_decimal(s: &str, scale: u32) -> Option<i128> {
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

/// Like [`parse_decimal`] for any number of digits: the exact decimal text
/// at `scale`, or `None` if digits would be dropped.
pub(super) fn parse_decimal_text(s: &str, scale: u32) -> Option<String> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || frac.len() > scale as usize || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let pad = "0".repeat(scale as usize - frac.len());
    let sign = if neg { "-" } else { "" };
    Some(if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}{pad}")
    })
}

/// Big-endian two's complement of any length to exact decimal text.
pub(super) fn big_decimal_text(bytes: &[u8], scale: u32) -> String {
    if let Some(u) = i128_from_be(bytes) {
        return format_decimal(u, scale);
    }
    let negative = bytes[0] & 0x80 != 0;
    // Magnitude: two's complement negated when negative.
    let mut mag: Vec<u8> = if negative {
        let mut m: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for b in m.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
        m
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10 on the base-256 digits.
    let mut digits = Vec::new();
    while mag.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in mag.iter_mut() {
            let cur = (rem << 8) | *b as u32;
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
    }
    while digits.len() <= scale as usize {
        digits.push(b'0');
    }
    digits.reverse();
    let text = String::from_utf8(digits).expect("ASCII digits");
    let (int, frac) = text.split_at(text.len() - scale as usize);
    let sign = if negative { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

pub(super) fn format_decimal(unscaled: i128, scale: u32) -> String {
    if scale == 0 {
        return unscaled.to_string();
    }
    let digits = unscaled.unsigned_abs().to_string();
    let pad = (scale as usize + 1).saturating_sub(digits.len());
    let digits = format!("{}{digits}", "0".repeat(pad));
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    format!("{}{int}.{frac}", if unscaled < 0 { "-" } else { "" })
}
