//! The schema-id format with Avro values (framed, or unframed with
//! `cdclake.encoding: avro` from earlier converters): the
//! payload in Avro's binary encoding, under the Avro schema that follows
//! from the published Connect schema by the rules of the converter
//! (`debezium/converter/.../AvroBinary.java`). So the Connect schema the
//! schema topic already carries is all it takes to read one, field by field
//! in schema order: no names, no text to parse.
//!
//! A [`Plan`] is that walk, built once per schema: which top-level fields
//! are the row images, the source block and the op, and the shape of every
//! field in between, to skip.

use super::values::{
    PG_TIMESTAMP_INFINITY, PG_TIMESTAMP_NEG_INFINITY, big_decimal_text, checked_precision,
    is_placeholder_ints, numeric_text,
};
use super::{
    Datum, Op, TIMESTAMP_INFINITY_MICROS, TIMESTAMP_NEG_INFINITY_MICROS, UNAVAILABLE, i128_from_be,
};
use crate::decode::schema::{ColumnType, ConnectSchema, TableSchema};

/// How one Connect schema is laid out in Avro's binary encoding.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Shape {
    Bool,
    /// int or long: a zig-zag varint.
    Long,
    Float,
    Double,
    /// string or bytes: a length, then the bytes.
    Bytes,
    Array(Box<Shape>),
    Record(Vec<Shape>),
    /// `["null", T]`.
    Optional(Box<Shape>),
}

impl Shape {
    fn of(s: &ConnectSchema) -> Result<Shape, String> {
        let shape = match s.kind.as_str() {
            "boolean" => Shape::Bool,
            "int8" | "int16" | "int32" | "int64" => Shape::Long,
            "float" | "float32" => Shape::Float,
            "double" | "float64" => Shape::Double,
            "string" | "bytes" => Shape::Bytes,
            "array" => Shape::Array(Box::new(Shape::of(
                s.items
                    .as_deref()
                    .ok_or("an array schema without `items`")?,
            )?)),
            // A map's key and value schemas are not kept (ConnectSchema).
            "map" => return Err("a map (not read from Avro yet)".into()),
            // Every value takes at least a byte, so a block count can be
            // checked against the bytes left (a hostile count cannot spin).
            "struct" if s.fields.is_empty() => return Err("a struct without fields".into()),
            "struct" => Shape::Record(s.fields.iter().map(Shape::of).collect::<Result<_, _>>()?),
            other => return Err(format!("a `{other}` schema")),
        };
        Ok(if s.optional {
            Shape::Optional(Box::new(shape))
        } else {
            shape
        })
    }
}

/// One top-level field of the envelope.
#[derive(Debug)]
enum Part {
    /// `before` or `after`: the row's columns, by index in the table schema.
    Image {
        after: bool,
        optional: bool,
        columns: Vec<Shape>,
    },
    Source(SourcePlan),
    Op,
    Skip(Shape),
}

#[derive(Debug)]
struct SourcePlan {
    optional: bool,
    fields: Vec<SourceField>,
}

#[derive(Debug)]
enum SourceField {
    TsMs(Shape),
    Lsn(Shape),
    TxId(Shape),
    Skip(Shape),
}

/// The walk over one envelope schema's Avro values.
#[derive(Debug)]
pub struct Plan {
    parts: Vec<Part>,
}

impl Plan {
    /// The plan of a Debezium envelope schema, whose row columns are
    /// `table`'s (built from the same schema).
    pub fn new(envelope: &ConnectSchema, table: &TableSchema) -> Result<Plan, String> {
        let mut parts = Vec::with_capacity(envelope.fields.len());
        for f in &envelope.fields {
            let part = match f.field.as_deref() {
                Some(which @ ("before" | "after")) => {
                    if f.fields.len() != table.columns.len() {
                        return Err(format!("`{which}` does not have the table's columns"));
                    }
                    Part::Image {
                        after: which == "after",
                        optional: f.optional,
                        columns: f
                            .fields
                            .iter()
                            .zip(&table.columns)
                            .map(|(c, col)| {
                                let shape = Shape::of(c).map_err(|e| column_err(c, e))?;
                                if readable(&col.ty, &shape) {
                                    Ok(shape)
                                } else {
                                    Err(column_err(c, format!("{:?} from Avro {shape:?}", col.ty)))
                                }
                            })
                            .collect::<Result<_, String>>()?,
                    }
                }
                Some("source") => Part::Source(SourcePlan {
                    optional: f.optional,
                    fields: f
                        .fields
                        .iter()
                        .map(|s| {
                            let shape = Shape::of(s)?;
                            Ok(match s.field.as_deref() {
                                Some("ts_ms") => SourceField::TsMs(shape),
                                Some("lsn") => SourceField::Lsn(shape),
                                Some("txId") => SourceField::TxId(shape),
                                _ => SourceField::Skip(shape),
                            })
                        })
                        .collect::<Result<_, String>>()?,
                }),
                Some("op") if f.kind == "string" && !f.optional => Part::Op,
                _ => Part::Skip(Shape::of(f)?),
            };
            parts.push(part);
        }
        Ok(Plan { parts })
    }
}

fn column_err(c: &ConnectSchema, e: String) -> String {
    format!(
        "column `{}`: {e} (not read from Avro)",
        c.field.as_deref().unwrap_or("?")
    )
}

/// Whether [`Reader::cell`] reads a column of type `ty` from `shape`: the
/// plan refuses any other pair when the schema is registered, so no
/// message meets one. (The converter sends such tables as JSON.)
fn readable(ty: &ColumnType, shape: &Shape) -> bool {
    let shape = match shape {
        Shape::Optional(inner) => inner.as_ref(),
        s => s,
    };
    match (ty, shape) {
        (ColumnType::Bool, Shape::Bool)
        | (
            ColumnType::Int8
            | ColumnType::Int16
            | ColumnType::Int32
            | ColumnType::Date
            | ColumnType::Int64
            | ColumnType::LocalTimestamp(_)
            | ColumnType::Time(_),
            Shape::Long,
        )
        | (ColumnType::Float32, Shape::Float)
        | (ColumnType::Float64, Shape::Double)
        | (
            ColumnType::Utf8
            | ColumnType::Json
            | ColumnType::Binary
            | ColumnType::Decimal { .. }
            | ColumnType::WideDecimal { .. }
            | ColumnType::NumericText { .. }
            | ColumnType::ZonedTimestamp,
            Shape::Bytes,
        ) => true,
        (ColumnType::VariableDecimal, Shape::Record(fields)) => {
            matches!(fields.as_slice(), [Shape::Long, Shape::Bytes])
        }
        (ColumnType::List(item), Shape::Array(item_shape)) => readable(item, item_shape),
        _ => false,
    }
}

/// One value of a row image: a datum, or Debezium's placeholder for an
/// unchanged TOASTed value.
pub(super) enum Cell<'a> {
    Value(Datum<'a>),
    Unavailable,
}

/// A row image's values, one per column, and the columns whose value was
/// the unavailable placeholder (`Null` among the values).
pub(super) struct RowImage<'a> {
    pub values: Vec<Datum<'a>>,
    pub unchanged: Vec<usize>,
}

/// What an Avro payload holds, before the decoder's checks.
pub(super) struct Event<'a> {
    pub op: Op,
    pub image: Option<RowImage<'a>>,
    pub ts_ms: i64,
    pub lsn: Option<i64>,
    pub tx_id: Option<i64>,
}

/// Reads one payload under `plan`; `table` gives each column's type.
pub(super) fn read<'a>(
    plan: &Plan,
    table: &TableSchema,
    payload: &'a [u8],
) -> Result<Event<'a>, String> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let (mut before, mut after, mut op) = (None, None, None);
    let (mut ts_ms, mut lsn, mut tx_id) = (None, None, None);
    for part in &plan.parts {
        match part {
            Part::Image {
                after: true,
                optional,
                columns,
            } => after = r.image(*optional, columns, table)?,
            // Read only for a delete (below): under REPLICA IDENTITY FULL
            // every update carries a whole old image too.
            Part::Image {
                after: false,
                optional,
                columns,
            } => {
                before = Some((r.pos, *optional, columns));
                if !(*optional && r.long()? == 0) {
                    columns.iter().try_for_each(|c| r.skip(c))?;
                }
            }
            Part::Source(source) => {
                if source.optional && r.long()? == 0 {
                    continue;
                }
                for f in &source.fields {
                    match f {
                        SourceField::TsMs(s) => ts_ms = r.opt_long(s)?,
                        SourceField::Lsn(s) => lsn = r.opt_long(s)?,
                        SourceField::TxId(s) => tx_id = r.opt_long(s)?,
                        SourceField::Skip(s) => r.skip(s)?,
                    }
                }
            }
            Part::Op => op = Some(r.bytes()?),
            Part::Skip(s) => r.skip(s)?,
        }
    }
    if r.pos != payload.len() {
        return Err(format!(
            "{} bytes left after the envelope",
            payload.len() - r.pos
        ));
    }
    let (op, image) = match op.ok_or("no `op`")? {
        b"c" => (Op::Create, after),
        b"u" => (Op::Update, after),
        b"r" => (Op::Read, after),
        b"d" => match before {
            Some((pos, optional, columns)) => {
                let mut r = Reader { buf: payload, pos };
                (Op::Delete, r.image(optional, columns, table)?)
            }
            None => (Op::Delete, None),
        },
        b"t" => (Op::Truncate, None),
        other => {
            return Err(format!(
                "unsupported op `{}`",
                String::from_utf8_lossy(other)
            ));
        }
    };
    Ok(Event {
        op,
        image,
        ts_ms: ts_ms.ok_or("no `source.ts_ms`")?,
        lsn,
        tx_id,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or("the value ends early")?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn long(&mut self) -> Result<i64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("the value ends early")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| format!("a negative length {n}"))?;
        self.take(n)
    }

    fn text(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("a string that is not UTF-8: {e}"))
    }

    /// A block count; a negative one is followed by the block's size.
    fn block(&mut self) -> Result<usize, String> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        // Every item takes a byte at least (no empty structs, see Shape).
        usize::try_from(n.unsigned_abs())
            .ok()
            .filter(|&n| n <= self.buf.len() - self.pos)
            .ok_or_else(|| format!("a block of {n} items in fewer bytes"))
    }

    /// A row image: null (an optional one), or one cell per column.
    fn image(
        &mut self,
        optional: bool,
        columns: &[Shape],
        table: &TableSchema,
    ) -> Result<Option<RowImage<'a>>, String> {
        if optional && self.long()? == 0 {
            return Ok(None);
        }
        let mut values = Vec::with_capacity(columns.len());
        let mut unchanged = Vec::new();
        for (i, (shape, col)) in columns.iter().zip(&table.columns).enumerate() {
            match self
                .cell(shape, &col.ty)
                .map_err(|e| format!("column `{}`: {e}", col.name))?
            {
                Cell::Value(d) => values.push(d),
                Cell::Unavailable => {
                    unchanged.push(i);
                    values.push(Datum::Null);
                }
            }
        }
        Ok(Some(RowImage { values, unchanged }))
    }

    /// A long, or null under an optional shape.
    fn opt_long(&mut self, shape: &Shape) -> Result<Option<i64>, String> {
        match shape {
            Shape::Optional(inner) => {
                if self.long()? == 0 {
                    Ok(None)
                } else {
                    self.opt_long(inner)
                }
            }
            Shape::Long => self.long().map(Some),
            other => {
                self.skip(other)?;
                Ok(None)
            }
        }
    }

    fn skip(&mut self, shape: &Shape) -> Result<(), String> {
        match shape {
            Shape::Bool => self.take(1).map(drop),
            Shape::Long => self.long().map(drop),
            Shape::Float => self.take(4).map(drop),
            Shape::Double => self.take(8).map(drop),
            Shape::Bytes => self.bytes().map(drop),
            Shape::Array(item) => loop {
                let n = self.block()?;
                if n == 0 {
                    return Ok(());
                }
                for _ in 0..n {
                    self.skip(item)?;
                }
            },
            Shape::Record(fields) => fields.iter().try_for_each(|f| self.skip(f)),
            Shape::Optional(inner) => {
                if self.long()? == 0 {
                    Ok(())
                } else {
                    self.skip(inner)
                }
            }
        }
    }

    /// One column's value, checked against its type.
    fn cell(&mut self, shape: &Shape, ty: &ColumnType) -> Result<Cell<'a>, String> {
        let shape = match shape {
            Shape::Optional(inner) => {
                if self.long()? == 0 {
                    return Ok(Cell::Value(Datum::Null));
                }
                inner.as_ref()
            }
            s => s,
        };
        let expected = || format!("{ty:?}");
        let int = |n: i64, lo: i64, hi: i64| {
            if (lo..=hi).contains(&n) {
                Ok(Cell::Value(Datum::Int(n)))
            } else {
                Err(expected())
            }
        };
        let d = match (ty, shape) {
            (ColumnType::Bool, Shape::Bool) => Datum::Bool(self.take(1)?[0] != 0),
            (ColumnType::Int8, Shape::Long) => return int(self.long()?, -128, 127),
            (ColumnType::Int16, Shape::Long) => return int(self.long()?, -32768, 32767),
            (ColumnType::Int32 | ColumnType::Date, Shape::Long) => {
                return int(self.long()?, i32::MIN as i64, i32::MAX as i64);
            }
            (ColumnType::Int64, Shape::Long) => Datum::Int(self.long()?),
            (ColumnType::Float32, Shape::Float) => Datum::Float(f64::from(f32::from_le_bytes(
                self.take(4)?.try_into().expect("four bytes"),
            ))),
            (ColumnType::Float64, Shape::Double) => {
                Datum::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("eight")))
            }
            (ColumnType::Utf8 | ColumnType::Json, Shape::Bytes) => {
                let s = self.text()?;
                if s == UNAVAILABLE {
                    return Ok(Cell::Unavailable);
                }
                Datum::Str(s.into())
            }
            (ColumnType::Binary, Shape::Bytes) => {
                let b = self.bytes()?;
                if b == UNAVAILABLE.as_bytes() {
                    return Ok(Cell::Unavailable);
                }
                Datum::Bytes(b.into())
            }
            (ColumnType::Decimal { precision, .. }, Shape::Bytes) => {
                let b = self.bytes()?;
                if b == UNAVAILABLE.as_bytes() {
                    return Ok(Cell::Unavailable);
                }
                let unscaled = i128_from_be(b).ok_or_else(expected)?;
                checked_precision(unscaled, *precision, ty)?
            }
            (ColumnType::WideDecimal { scale }, Shape::Bytes) => {
                let b = self.bytes()?;
                if b.is_empty() {
                    return Err(expected());
                }
                Datum::Str(big_decimal_text(b, *scale).into())
            }
            (ColumnType::NumericText { precision, scale }, Shape::Bytes) => {
                let s = self.text()?;
                if s == UNAVAILABLE {
                    return Ok(Cell::Unavailable);
                }
                numeric_text(s, *precision, *scale, ty)?
            }
            (ColumnType::ZonedTimestamp, Shape::Bytes) => match self.text()? {
                UNAVAILABLE => return Ok(Cell::Unavailable),
                "infinity" => Datum::Int(TIMESTAMP_INFINITY_MICROS),
                "-infinity" => Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS),
                s => chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| Datum::Int(t.timestamp_micros()))
                    .map_err(|_| expected())?,
            },
            (ColumnType::LocalTimestamp(unit), Shape::Long) => match self.long()? {
                PG_TIMESTAMP_INFINITY => Datum::Int(TIMESTAMP_INFINITY_MICROS),
                PG_TIMESTAMP_NEG_INFINITY => Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS),
                n => Datum::Int(unit.to_micros(n)),
            },
            (ColumnType::Time(unit), Shape::Long) => Datum::Int(unit.to_micros(self.long()?)),
            (ColumnType::VariableDecimal, Shape::Record(fields))
                if fields.len() == 2
                    && matches!(fields[0], Shape::Long)
                    && matches!(fields[1], Shape::Bytes) =>
            {
                let scale = u32::try_from(self.long()?).map_err(|_| expected())?;
                let b = self.bytes()?;
                if b.is_empty() {
                    return Err(expected());
                }
                Datum::Str(big_decimal_text(b, scale).into())
            }
            (ColumnType::List(item), Shape::Array(item_shape)) => {
                let mut items = ListItems::default();
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        items.push(self.cell(item_shape, item)?, item);
                    }
                }
                return items.finish(item);
            }
            _ => {
                return Err(format!(
                    "{ty:?} from Avro {shape:?} (not read from Avro yet)"
                ));
            }
        };
        Ok(Cell::Value(d))
    }
}

/// An array column's items, read as the JSON path reads the same array:
/// Debezium's placeholder for an unchanged TOASTed array is the array of
/// the placeholder alone (text, bytes), or its bytes as integers (`int[]`,
/// `bigint[]`); a placeholder among other items is an item like any other.
/// The items go straight into the list they become, no cell kept aside.
#[derive(Default)]
struct ListItems<'a> {
    values: Vec<Datum<'a>>,
    /// Items that were the placeholder (each one's value is the
    /// placeholder's text or bytes, or `Null` for another item type).
    placeholders: usize,
}

impl<'a> ListItems<'a> {
    fn push(&mut self, cell: Cell<'a>, item: &ColumnType) {
        self.values.push(match cell {
            Cell::Value(d) => d,
            Cell::Unavailable => {
                self.placeholders += 1;
                match item {
                    ColumnType::Utf8 | ColumnType::Json => Datum::Str(UNAVAILABLE.into()),
                    ColumnType::Binary => Datum::Bytes(UNAVAILABLE.as_bytes().into()),
                    _ => Datum::Null,
                }
            }
        });
    }

    fn finish(self, item: &ColumnType) -> Result<Cell<'a>, String> {
        if self.placeholders == 1 && self.values.len() == 1 {
            return Ok(Cell::Unavailable);
        }
        let ints = self.values.iter().map(|d| match d {
            Datum::Int(n) => Some(*n),
            _ => None,
        });
        if is_placeholder_ints(ints) {
            return Ok(Cell::Unavailable);
        }
        if self.placeholders > 0
            && !matches!(
                item,
                ColumnType::Utf8 | ColumnType::Json | ColumnType::Binary
            )
        {
            return Err(format!("{item:?} (a placeholder among the items)"));
        }
        Ok(Cell::Value(Datum::List(self.values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Avro's zig-zag varint, as the converter writes it.
    fn varint(out: &mut Vec<u8>, n: i64) {
        let mut v = ((n << 1) ^ (n >> 63)) as u64;
        while v & !0x7f != 0 {
            out.push((v & 0x7f) as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        varint(out, s.len() as i64);
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for n in [0, 1, -1, 63, -64, 64, 300, i64::MAX, i64::MIN] {
            let mut b = Vec::new();
            varint(&mut b, n);
            assert_eq!(Reader { buf: &b, pos: 0 }.long().unwrap(), n);
        }
        assert!(
            Reader {
                buf: &[0x80],
                pos: 0
            }
            .long()
            .is_err(),
            "ends early"
        );
    }

    const ENVELOPE: &str = r#"{"type":"struct","fields":[
              {"type":"struct","optional":true,"field":"before","fields":[
                {"type":"int64","optional":false,"field":"id"},
                {"type":"string","optional":true,"field":"body"},
                {"type":"array","optional":true,"field":"tags","items":{"type":"string","optional":true}},
                {"type":"string","optional":true,"name":"io.debezium.time.ZonedTimestamp","field":"at"}]},
              {"type":"struct","optional":true,"field":"after","fields":[
                {"type":"int64","optional":false,"field":"id"},
                {"type":"string","optional":true,"field":"body"},
                {"type":"array","optional":true,"field":"tags","items":{"type":"string","optional":true}},
                {"type":"string","optional":true,"name":"io.debezium.time.ZonedTimestamp","field":"at"}]},
              {"type":"struct","optional":false,"field":"source","fields":[
                {"type":"string","optional":false,"field":"version"},
                {"type":"int64","optional":false,"field":"ts_ms"},
                {"type":"int64","optional":true,"field":"txId"},
                {"type":"int64","optional":true,"field":"lsn"}]},
              {"type":"struct","optional":true,"field":"transaction","fields":[
                {"type":"string","optional":false,"field":"id"}]},
              {"type":"string","optional":false,"field":"op"},
              {"type":"int64","optional":true,"field":"ts_ms"}]}"#;

    /// An update of the tweets' shape, written field by field as the
    /// converter does.
    fn update() -> Vec<u8> {
        let mut b = Vec::new();
        varint(&mut b, 0); // before: null
        varint(&mut b, 1); // after
        varint(&mut b, 42); // id
        varint(&mut b, 1);
        string(&mut b, "héllo");
        varint(&mut b, 1); // tags
        varint(&mut b, 2);
        varint(&mut b, 1);
        string(&mut b, "a");
        varint(&mut b, 0); // a null item
        varint(&mut b, 0);
        varint(&mut b, 1);
        string(&mut b, UNAVAILABLE); // at: unchanged TOASTed
        string(&mut b, "3.4.3.Final"); // source
        varint(&mut b, 1_795_754_234_911);
        varint(&mut b, 1);
        varint(&mut b, 758);
        varint(&mut b, 0); // lsn null
        varint(&mut b, 1); // transaction
        string(&mut b, "t1");
        string(&mut b, "u");
        varint(&mut b, 0);
        b
    }

    /// The update decodes to its values and its source position.
    #[test]
    fn an_envelope_decodes_to_its_row_and_position() {
        let schema: ConnectSchema = serde_json::from_str(ENVELOPE).unwrap();
        let table = TableSchema::from_envelope(&schema).unwrap();
        let plan = Plan::new(&schema, &table).unwrap();
        let b = update();
        let e = read(&plan, &table, &b).unwrap();
        assert_eq!(e.op, Op::Update);
        assert_eq!(
            (e.ts_ms, e.lsn, e.tx_id),
            (1_795_754_234_911, None, Some(758))
        );
        let image = e.image.unwrap();
        assert_eq!(
            image.values,
            [
                Datum::Int(42),
                Datum::Str("héllo".into()),
                Datum::List(vec![Datum::Str("a".into()), Datum::Null]),
                Datum::Null,
            ]
        );
        assert_eq!(image.unchanged, [3]);
        // One byte too many, or too few, is an error, not a row.
        let mut long = b.clone();
        long.push(0);
        assert!(read(&plan, &table, &long).is_err());
        assert!(read(&plan, &table, &b[..b.len() - 2]).is_err());
    }

    /// Through the decoder, as the pipeline calls it: the header picks the
    /// Avro reader, and the unchanged column is listed as such.
    #[test]
    fn the_decoder_reads_avro_values_by_their_header() {
        use crate::decode::{Decoded, Decoder, MessageHeaders};
        let mut d = Decoder::new();
        d.register(b"fp1", ENVELOPE);
        let headers = MessageHeaders {
            schema_ref: Some(b"fp1"),
            encoding: Some(b"avro"),
            ..MessageHeaders::default()
        };
        let value = update();
        let Decoded::Row(row) = d.decode_message(Some(&value), &headers).unwrap() else {
            panic!("not a row");
        };
        assert_eq!((row.op, row.lsn, row.tx_id), (Op::Update, None, Some(758)));
        assert_eq!(row.values[0], Datum::Int(42));
        assert_eq!(row.unchanged, [3]);
        // Text is the message's own bytes, not a copy.
        let Datum::Str(std::borrow::Cow::Borrowed(text)) = &row.values[1] else {
            panic!("text copied out of the message: {:?}", row.values[1]);
        };
        assert_eq!(*text, "héllo");
        assert!(value.as_ptr_range().contains(&text.as_ptr()));
        assert!(matches!(
            d.decode_message(None, &headers).unwrap(),
            Decoded::Tombstone
        ));
        let other = MessageHeaders {
            encoding: Some(b"protobuf"),
            ..headers
        };
        let err = d.decode_message(Some(&update()), &other).unwrap_err();
        assert_eq!(err.kind(), "encoding");
        // A JSON payload under the Avro header is not taken for a row.
        let json = br#"{"before":null,"after":{"id":1},"op":"c"}"#;
        assert_eq!(
            d.decode_message(Some(json), &headers).unwrap_err().kind(),
            "avro"
        );
    }

    /// The converter's framed value, as the pipeline hands it over: no
    /// header at all, the schema and the encoding named by the frame, the
    /// row the same as from the unframed value with its headers.
    #[test]
    fn the_decoder_reads_a_framed_avro_value_without_headers() {
        use crate::decode::{Decoded, Decoder, Frame, MessageHeaders, needs_headers, schema_ref};
        const FP: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
        let mut d = Decoder::new();
        d.register(FP, ENVELOPE);
        let body = update();
        let value = Frame {
            fingerprint: FP,
            has_headers: false,
            body: &body,
        }
        .to_bytes();
        let none = MessageHeaders::default();
        assert!(!needs_headers(Some(&value)));
        assert_eq!(schema_ref(Some(&value), &none), Some(&FP[..]));
        let Decoded::Row(framed) = d.decode_message(Some(&value), &none).unwrap() else {
            panic!("not a row");
        };
        let headers = MessageHeaders {
            schema_ref: Some(FP),
            encoding: Some(b"avro"),
            ..MessageHeaders::default()
        };
        let Decoded::Row(unframed) = d.decode_message(Some(&body), &headers).unwrap() else {
            panic!("not a row");
        };
        assert_eq!(framed.values, unframed.values);
        assert_eq!(
            (framed.op, framed.tx_id, &framed.unchanged),
            (Op::Update, Some(758), &vec![3])
        );
        // A frame saying its record has headers has them read; every
        // unframed value has.
        let flagged = Frame {
            fingerprint: FP,
            has_headers: true,
            body: &body,
        }
        .to_bytes();
        assert!(needs_headers(Some(&flagged)));
        assert!(needs_headers(Some(&body)));
        assert!(needs_headers(None));
        // A frame naming a schema the topic does not have is an error, and
        // one whose body is not the schema's Avro is too: neither is a row.
        let unknown = Frame {
            fingerprint: b"ffffffffffffffffffffffffffffffff",
            has_headers: false,
            body: &body,
        };
        let err = d
            .decode_message(Some(&unknown.to_bytes()), &none)
            .unwrap_err();
        assert_eq!(err.kind(), "schema_topic");
        let short = Frame {
            fingerprint: FP,
            has_headers: false,
            body: &body[..body.len() - 2],
        };
        let err = d
            .decode_message(Some(&short.to_bytes()), &none)
            .unwrap_err();
        assert_eq!(err.kind(), "avro");
        // A frame of another version is said to be one, not taken for JSON.
        let mut later = value.clone();
        later[1] = 2;
        let err = d.decode_message(Some(&later), &none).unwrap_err();
        assert_eq!(err.kind(), "encoding");
        assert!(err.to_string().contains("frame version 2"), "{err}");
    }

    /// A struct column (Debezium's `point`) is not read from Avro: the
    /// schema's plan says so at once, and the converter sends such a table
    /// as JSON.
    #[test]
    fn a_struct_column_is_refused_when_the_schema_is_registered() {
        let schema: ConnectSchema = serde_json::from_str(
            r#"{"type":"struct","fields":[
              {"type":"struct","optional":true,"field":"after","fields":[
                {"type":"int64","optional":false,"field":"id"},
                {"type":"struct","optional":true,"name":"io.debezium.data.geometry.Point","field":"p",
                 "fields":[{"type":"double","optional":false,"field":"x"},{"type":"double","optional":false,"field":"y"}]}]},
              {"type":"string","optional":false,"field":"op"}]}"#,
        )
        .unwrap();
        let table = TableSchema::from_envelope(&schema).unwrap();
        let err = Plan::new(&schema, &table).unwrap_err();
        assert!(
            err.contains("column `p`") && err.contains("not read from Avro"),
            "{err}"
        );
    }

    /// Arrays as the JSON path reads them: the placeholder alone, or its
    /// bytes as integers, is an unchanged TOASTed array; a placeholder
    /// among other texts is a text.
    /// The items of `cells` as the reader gathers them.
    fn list<'a>(cells: Vec<Cell<'a>>, item: &ColumnType) -> Result<Cell<'a>, String> {
        let mut items = ListItems::default();
        for c in cells {
            items.push(c, item);
        }
        items.finish(item)
    }

    #[test]
    fn array_placeholders_match_the_json_path() {
        let ints: Vec<Cell> = UNAVAILABLE
            .bytes()
            .map(|b| Cell::Value(Datum::Int(i64::from(b))))
            .collect();
        assert!(matches!(
            list(ints, &ColumnType::Int32),
            Ok(Cell::Unavailable)
        ));
        assert!(matches!(
            list(vec![Cell::Unavailable], &ColumnType::Utf8),
            Ok(Cell::Unavailable)
        ));
        assert!(matches!(
            list(vec![Cell::Unavailable], &ColumnType::ZonedTimestamp),
            Ok(Cell::Unavailable)
        ));
        let Ok(Cell::Value(Datum::List(items))) = list(
            vec![Cell::Unavailable, Cell::Value(Datum::Str("x".into()))],
            &ColumnType::Utf8,
        ) else {
            panic!("not a list");
        };
        assert_eq!(
            items,
            [Datum::Str(UNAVAILABLE.into()), Datum::Str("x".into())]
        );
        let Ok(Cell::Value(Datum::List(items))) = list(
            vec![Cell::Value(Datum::Int(1)), Cell::Value(Datum::Null)],
            &ColumnType::Int32,
        ) else {
            panic!("not a list");
        };
        assert_eq!(items, [Datum::Int(1), Datum::Null]);
        assert!(
            list(
                vec![Cell::Unavailable, Cell::Unavailable],
                &ColumnType::Int32
            )
            .is_err()
        );
        assert!(
            list(
                vec![Cell::Value(Datum::Int(1)), Cell::Unavailable],
                &ColumnType::ZonedTimestamp
            )
            .is_err()
        );
        // A block count larger than the bytes left is refused, not looped.
        let mut b = Vec::new();
        varint(&mut b, 1 << 40);
        let shape = Shape::Array(Box::new(Shape::Long));
        assert!(Reader { buf: &b, pos: 0 }.skip(&shape).is_err());
    }
}
