//! Debezium change events to typed rows, in any of three formats:
//!
//! - Kafka Connect's JsonConverter with schemas enabled: every value is
//!   `{"schema": S, "payload": P}`;
//! - the schema-id format of `debezium/converter` (SchemaIdConverter): the
//!   value is P alone, its header [`SCHEMA_HEADER`] names S by fingerprint,
//!   and S itself is published once on a compacted topic, which the
//!   pipeline reads and hands to [`Decoder::register`];
//! - the same with P in S's Avro encoding, read by `avro`: the stack's
//!   default, where the value is a [`Frame`] (S's fingerprint, then P) and
//!   the record has no header unless the frame says so; the converter's
//!   earlier versions sent P alone with the headers [`SCHEMA_HEADER`] and
//!   [`ENCODING_HEADER`] `avro`, which are read as well.
//!
//! A row's text and bytes borrow from the message where the format allows,
//! so a [`ChangeRow`] lives no longer than its Kafka message.
//!
//! [`Decoder`] parses each distinct envelope schema once and caches the
//! resulting [`TableSchema`] by a hash of its raw JSON, so the per-message
//! cost is the payload alone. [`Decoder::decode`] yields a [`Decoded`]: a
//! tombstone to skip, or a [`ChangeRow`] whose values already match the
//! schema, so appending it to a batch cannot fail half-way.
//!
//! Only a Kafka null value is a tombstone. Anything else that is not a
//! Debezium envelope (`{}`, `[]`, `{"payload":null}`, an empty value) is an
//! error, and the pipeline quarantines it.

mod avro;
pub mod marker;
pub mod schema;
mod values;

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

pub use self::values::{TIMESTAMP_INFINITY_MICROS, TIMESTAMP_NEG_INFINITY_MICROS, i128_from_be};
use self::values::{as_text, exact_number, is_unavailable, plain, to_datum, truncate};
use crate::decode::schema::{ColumnType, ConnectSchema, SchemaError, TableSchema};

/// The headers of the schema-id format (the converter's, see `cdc-wire`).
pub use cdc_wire::{ENCODING_HEADER, Frame, SCHEMA_HEADER};

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
    #[error("not a Debezium envelope: {0}")]
    Shape(String),
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
    #[error(
        "schema `{0}`, named by the message (its frame or `cdclake.schema` header), is not on the schema topic"
    )]
    UnknownSchema(String),
    #[error(
        "schema `{fingerprint}`, named by the message (its frame or `cdclake.schema` header), is not usable: {reason}"
    )]
    BadSchema { fingerprint: String, reason: String },
    #[error("a record with the `cdclake.marker` header that is not a valid marker: {0}")]
    Marker(String),
    #[error("not a change event in the Avro encoding of its schema: {0}")]
    Avro(String),
    #[error(
        "encoding `{0}` (the `cdclake.encoding` header, or the value's frame) is not one this sink reads"
    )]
    Encoding(String),
}

impl DecodeError {
    /// A short label for metrics: `json`, `envelope`, `schema`, `mismatch`,
    /// `op`, `schema_topic`, `marker`, `avro` or `encoding`.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::Envelope(_) | DecodeError::Shape(_) => "envelope",
            DecodeError::Schema(_) => "schema",
            DecodeError::Mismatch { .. } => "mismatch",
            DecodeError::Op(_) => "op",
            DecodeError::UnknownSchema(_) | DecodeError::BadSchema { .. } => "schema_topic",
            DecodeError::Marker(_) => "marker",
            DecodeError::Avro(_) => "avro",
            DecodeError::Encoding(_) => "encoding",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Read,
    /// A TRUNCATE of the table (Debezium sends it with
    /// `skipped.operations` not listing `t`): no row image; every change
    /// before it in the source is gone.
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// One value, already checked against its [`ColumnType`].
///
/// Text and bytes borrow from the Kafka message where its encoding allows
/// (Avro always, JSON without escapes): a row lives only until it is
/// appended to its segment's Arrow builders, and a copy per value was a
/// good share of the sink's allocations.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum<'a> {
    Null,
    Bool(bool),
    /// Integers, and dates (days), times and timestamps (µs).
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Bytes(Cow<'a, [u8]>),
    Decimal(i128),
    List(Vec<Datum<'a>>),
}

#[derive(Debug)]
pub struct ChangeRow<'a> {
    pub schema: Arc<TableSchema>,
    /// Identifies the schema within this process (hash of its JSON).
    pub schema_id: u64,
    pub op: Op,
    /// One per `schema.columns`, in order.
    pub values: Vec<Datum<'a>>,
    /// Indices of columns whose value was Debezium's unavailable
    /// placeholder; their `values` entry is `Null`.
    pub unchanged: Vec<usize>,
    /// Indices of NOT NULL columns that are NULL in this insert, update or
    /// snapshot read: a value lost before the sink (the pipeline reports
    /// it). Empty for deletes, whose image may carry only the key.
    pub null_in_required: Vec<usize>,
    pub commit_ts_ms: i64,
    pub lsn: Option<i64>,
    pub tx_id: Option<i64>,
    /// For either half of a primary-key update, the other half's key as
    /// Debezium's header gives it ([`MessageHeaders::new_key`],
    /// [`MessageHeaders::old_key`]).
    pub key_update: Option<Box<str>>,
}

impl Datum<'_> {
    /// About what the value takes in an Arrow builder.
    pub fn size(&self) -> usize {
        match self {
            Datum::Null | Datum::Bool(_) => 1,
            Datum::Int(_) | Datum::Float(_) => 8,
            Datum::Decimal(_) => 16,
            Datum::Str(s) => s.len() + 4,
            Datum::Bytes(b) => b.len() + 4,
            Datum::List(items) => items.iter().map(Datum::size).sum::<usize>() + 4,
        }
    }
}

#[derive(Debug)]
pub enum Decoded<'a> {
    Tombstone,
    Row(ChangeRow<'a>),
    /// Not a Debezium event: the slot guard's marker of a recovery.
    Marker(marker::RecoveryMarker),
}

/// The Kafka headers the sink reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageHeaders<'a> {
    /// [`SCHEMA_HEADER`]: the value's schema, in the schema-id format.
    pub schema_ref: Option<&'a [u8]>,
    /// [`marker::HEADER`]: the record is a marker, of this kind.
    pub marker: Option<&'a [u8]>,
    /// [`ENCODING_HEADER`]: the schema-id value's encoding, if not JSON.
    pub encoding: Option<&'a [u8]>,
    /// [`NEW_KEY_HEADER`]: on the delete of a primary-key update, the new
    /// key.
    pub new_key: Option<&'a [u8]>,
    /// [`OLD_KEY_HEADER`]: on the create of a primary-key update, the old
    /// key.
    pub old_key: Option<&'a [u8]>,
}

/// Whether a message's headers must be read: a framed value says whether
/// its record has any ([`Frame`]); any other value may rely on them.
pub fn needs_headers(value: Option<&[u8]>) -> bool {
    value.and_then(Frame::parse).is_none_or(|f| f.has_headers)
}

/// The schema a schema-id message names: its frame's fingerprint, or its
/// [`SCHEMA_HEADER`]. `None` for JSON with schemas, a marker, a tombstone.
pub fn schema_ref<'a>(value: Option<&'a [u8]>, headers: &MessageHeaders<'a>) -> Option<&'a [u8]> {
    match value.and_then(Frame::parse) {
        Some(frame) => Some(frame.fingerprint),
        None => headers.schema_ref,
    }
}

/// Debezium's header on the delete half of a primary-key update: the new
/// key (PostgreSQL connector, `io.debezium.connector.postgresql`).
pub const NEW_KEY_HEADER: &str = "__debezium.newkey";
/// Debezium's header on the create half of a primary-key update: the old
/// key.
pub const OLD_KEY_HEADER: &str = "__debezium.oldkey";

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

/// A row image, each value still raw JSON: it is converted once its
/// column type is known, so a `decimal.format=NUMERIC` number is read from
/// its digits and never passes through f64.
///
/// A list, not a map: Debezium writes the fields in schema order, so the
/// column at position `i` is almost always entry `i`, found without hashing.
struct Image<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Image<'a> {
    fn get(&self, i: usize, name: &str) -> &'a str {
        match self.0.get(i) {
            Some((k, v)) if k == name => v.get(),
            _ => self
                .0
                .iter()
                .find(|(k, _)| k == name)
                .map_or("null", |(_, v)| v.get()),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Image<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Image<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a row image (an object)")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Image<'a>, M::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(16));
                while let Some(entry) = m.next_entry::<Cow<'a, str>, &'a RawValue>()? {
                    out.push(entry);
                }
                Ok(Image(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Payload<'a> {
    /// Read only for a delete: under REPLICA IDENTITY FULL every update
    /// carries a whole old image too, which is skipped unparsed.
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<Image<'a>>,
    source: Source,
    #[serde(borrow)]
    op: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Source {
    ts_ms: i64,
    #[serde(default)]
    lsn: Option<i64>,
    #[serde(default, rename = "txId")]
    tx_id: Option<i64>,
}

/// A delete's old image, parsed from its raw JSON (`null`: none).
fn before(raw: Option<&RawValue>) -> Result<Option<Image<'_>>, DecodeError> {
    raw.map_or(Ok(None), |r| {
        serde_json::from_str::<Option<Image<'_>>>(r.get())
            .map_err(|e| DecodeError::Shape(format!("`payload.before` is not a row image: {e}")))
    })
}

/// A fingerprint as it appears in errors.
fn fingerprint_text(fingerprint: &[u8]) -> String {
    String::from_utf8_lossy(fingerprint).into_owned()
}

/// Schemas kept for the byte-prefix fast path: a handful of tables, each
/// with a schema or two in flight.
const MAX_PREFIXES: usize = 32;

/// Shapes with text siblings kept at most; past it the cache starts over.
const MAX_SIBLING_SHAPES: usize = 1024;

/// Key schemas kept; past it the cache starts over.
const MAX_KEY_SCHEMAS: usize = 256;

/// A Kafka key as Debezium's JSON converter writes it: the primary key
/// columns' schema and values.
#[derive(Deserialize)]
struct KeyEnvelope<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
}

/// The field names of a JSON object, in order (serde_json's map would
/// sort them); anything else is an error.
struct KeyNames(Vec<String>);

impl<'de> Deserialize<'de> for KeyNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = KeyNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeyNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    names.push(name);
                }
                Ok(KeyNames(names))
            }
        }
        d.deserialize_map(Names)
    }
}

#[derive(Deserialize)]
struct KeySchema {
    #[serde(default)]
    fields: Vec<KeyField>,
}

#[derive(Deserialize)]
struct KeyField {
    field: String,
}

/// A parsed schema and its id within this process.
type KnownSchema = (u64, Arc<TableSchema>);

#[derive(Default)]
pub struct Decoder {
    schemas: crate::FastMap<u64, Arc<TableSchema>>,
    /// Shapes with text siblings, by base schema id and sibling columns.
    sibling_shapes: HashMap<(u64, Vec<usize>), (u64, Arc<TableSchema>)>,
    /// Raw schema JSON of recently seen schemas, most recent last.
    prefixes: Vec<(Vec<u8>, u64, Arc<TableSchema>)>,
    /// Primary key columns, by the raw JSON of the key's schema.
    keys: crate::FastMap<String, Arc<[String]>>,
    /// `{"schema":` and the raw JSON of recently seen key schemas, with
    /// their columns: the byte-prefix fast path of [`Decoder::key_columns`].
    key_prefixes: Vec<(Vec<u8>, Arc<[String]>)>,
    /// Recently seen column lists of keys without their schema.
    schemaless_keys: Vec<Arc<[String]>>,
    /// Schemas of the schema topic, by fingerprint: a usable schema, or
    /// why it is not.
    published: crate::FastMap<Box<[u8]>, Result<KnownSchema, String>>,
    /// How to read the Avro encoding of each published schema, by
    /// fingerprint: built with the schema, used only by Avro values.
    avro: crate::FastMap<Box<[u8]>, Result<Arc<avro::Plan>, String>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Distinct schemas seen so far.
    pub fn schema_count(&self) -> usize {
        self.schemas.len()
    }

    /// The primary key columns a Kafka key names, in key order: what the
    /// current-state tables are keyed by. `None` for a table without a
    /// primary key (Debezium sends no key) or a key that is not Debezium's.
    pub fn key_columns(&mut self, key: Option<&[u8]>) -> Option<Arc<[String]>> {
        let key = key?;
        // The JSON converter writes `{"schema":S,"payload":P}`, S the same
        // bytes for every key of a table: a known S is found by comparing
        // bytes, without parsing the key.
        if let Some(columns) = self.key_prefixes.iter().find_map(|(prefix, columns)| {
            (key.starts_with(prefix) && key.get(prefix.len()) == Some(&b',')).then_some(columns)
        }) {
            return Some(columns.clone());
        }
        let envelope: KeyEnvelope<'_> = serde_json::from_slice(key).ok()?;
        let Some(raw) = envelope.schema.map(RawValue::get) else {
            return self.schemaless_key(key);
        };
        let columns = self.key_schema(raw)?;
        let prefix = [br#"{"schema":"#.as_slice(), raw.as_bytes()].concat();
        // Only a key written that way can be found again by its bytes.
        if key.starts_with(&prefix) {
            if self.key_prefixes.len() >= MAX_PREFIXES {
                self.key_prefixes.remove(0);
            }
            self.key_prefixes.push((prefix, columns.clone()));
        }
        Some(columns)
    }

    /// The primary key columns of a key the JSON converter wrote without
    /// its schema (`key.converter.schemas.enable=false`): the names of its
    /// fields, in their order, which is the key's.
    fn schemaless_key(&mut self, key: &[u8]) -> Option<Arc<[String]>> {
        let KeyNames(names) = serde_json::from_slice(key).ok()?;
        if names.is_empty() {
            return None;
        }
        if let Some(known) = self.schemaless_keys.iter().find(|k| ***k == *names) {
            return Some(known.clone());
        }
        let columns: Arc<[String]> = names.into();
        if self.schemaless_keys.len() >= MAX_PREFIXES {
            self.schemaless_keys.remove(0);
        }
        self.schemaless_keys.push(columns.clone());
        Some(columns)
    }

    /// The primary key columns of a key schema (its raw JSON).
    fn key_schema(&mut self, raw: &str) -> Option<Arc<[String]>> {
        if let Some(columns) = self.keys.get(raw) {
            return Some(columns.clone());
        }
        let schema: KeySchema = serde_json::from_str(raw).ok()?;
        if schema.fields.is_empty() {
            return None;
        }
        let columns: Arc<[String]> = schema.fields.into_iter().map(|f| f.field).collect();
        if self.keys.len() >= MAX_KEY_SCHEMAS {
            self.keys.clear();
        }
        self.keys.insert(raw.to_string(), columns.clone());
        Some(columns)
    }

    /// Learns a schema published on the schema topic under `fingerprint`.
    /// One that does not parse is remembered too: its messages are
    /// quarantined with the reason, instead of waiting for it forever.
    pub fn register(&mut self, fingerprint: &[u8], raw: &str) {
        if self.published.contains_key(fingerprint) {
            return;
        }
        let entry = self.schema(raw).map_err(|e| e.to_string());
        let plan = match &entry {
            Ok((_, table)) => serde_json::from_str::<ConnectSchema>(raw)
                .map_err(|e| e.to_string())
                .and_then(|connect| avro::Plan::new(&connect, table))
                .map(Arc::new),
            Err(reason) => Err(reason.clone()),
        };
        self.avro.insert(fingerprint.into(), plan);
        if let Err(reason) = &entry {
            // Not a warning by itself: the schema topic is shared by every
            // topic the converter writes, Debezium's heartbeats included,
            // whose schemas are not change-event envelopes. A message that
            // names one is quarantined with this reason, which is where it
            // becomes an error (counted, and logged there).
            tracing::debug!(fingerprint = %String::from_utf8_lossy(fingerprint), %reason,
                "a schema on the schema topic is not a change-event envelope; messages naming it will be quarantined");
        }
        self.published.insert(fingerprint.into(), entry);
    }

    /// Records that the schema topic, read to its end, does not hold
    /// `fingerprint`.
    pub fn mark_missing(&mut self, fingerprint: &[u8]) {
        tracing::warn!(fingerprint = %String::from_utf8_lossy(fingerprint),
            "a message names a schema that is not on the schema topic; such messages will be quarantined");
        self.published.insert(
            fingerprint.into(),
            Err("not on the schema topic, read to its end".into()),
        );
    }

    /// Whether the schema topic's `fingerprint` has been registered.
    pub fn knows(&self, fingerprint: &[u8]) -> bool {
        self.published.contains_key(fingerprint)
    }

    /// Decodes one Kafka message, in whichever format its frame or its
    /// headers say.
    pub fn decode_message<'a>(
        &mut self,
        value: Option<&'a [u8]>,
        headers: &MessageHeaders<'_>,
    ) -> Result<Decoded<'a>, DecodeError> {
        if let Some(frame) = value.and_then(Frame::parse) {
            return self.decode_avro(Some(frame.body), Some(frame.fingerprint));
        }
        // No other value starts with the frame's first byte: this is a
        // frame of a later converter, or a broken one.
        if let Some([cdc_wire::FRAME_MAGIC, version, ..]) = value {
            return Err(DecodeError::Encoding(format!(
                "frame version {version} (or flags, or a value shorter than its frame)"
            )));
        }
        match headers.encoding {
            None | Some(b"json") => self.decode_with(value, headers.schema_ref),
            Some(e) if e == cdc_wire::AVRO.as_bytes() => {
                self.decode_avro(value, headers.schema_ref)
            }
            Some(other) => Err(DecodeError::Encoding(
                String::from_utf8_lossy(other).into_owned(),
            )),
        }
    }

    /// Decodes a schema-id value in the Avro encoding of its schema.
    fn decode_avro<'a>(
        &mut self,
        value: Option<&'a [u8]>,
        schema_ref: Option<&[u8]>,
    ) -> Result<Decoded<'a>, DecodeError> {
        let Some(bytes) = value else {
            return Ok(Decoded::Tombstone);
        };
        let fingerprint = schema_ref.ok_or(DecodeError::Envelope(
            "an Avro value without the `cdclake.schema` header",
        ))?;
        let (id, schema) = self.published_schema(fingerprint)?;
        let plan = match self.avro.get(fingerprint) {
            Some(Ok(plan)) => plan.clone(),
            Some(Err(reason)) => return Err(DecodeError::Avro(reason.clone())),
            None => return Err(DecodeError::UnknownSchema(fingerprint_text(fingerprint))),
        };
        let event = avro::read(&plan, &schema, bytes).map_err(DecodeError::Avro)?;
        let avro::RowImage { values, unchanged } = match (event.op, event.image) {
            (Op::Truncate, _) => avro::RowImage {
                values: vec![Datum::Null; schema.columns.len()],
                unchanged: Vec::new(),
            },
            (_, image) => image.ok_or(DecodeError::Envelope("row image missing for op"))?,
        };
        let source = Source {
            ts_ms: event.ts_ms,
            lsn: event.lsn,
            tx_id: event.tx_id,
        };
        Ok(self.row(id, schema, event.op, values, unchanged, &source))
    }

    /// The registered schema a schema-id message names.
    fn published_schema(&self, fingerprint: &[u8]) -> Result<(u64, Arc<TableSchema>), DecodeError> {
        match self.published.get(fingerprint) {
            Some(Ok((id, schema))) => Ok((*id, schema.clone())),
            Some(Err(reason)) => Err(DecodeError::BadSchema {
                fingerprint: fingerprint_text(fingerprint),
                reason: reason.clone(),
            }),
            None => Err(DecodeError::UnknownSchema(fingerprint_text(fingerprint))),
        }
    }

    /// Decodes one Kafka message value of the JSON-with-schemas format;
    /// `None` is a Kafka tombstone.
    pub fn decode<'a>(&mut self, value: Option<&'a [u8]>) -> Result<Decoded<'a>, DecodeError> {
        self.decode_with(value, None)
    }

    /// Decodes one Kafka message value. `schema_ref` is the value of its
    /// [`SCHEMA_HEADER`] header: with one, the value is the payload alone
    /// and the schema is the registered one; without, the value carries
    /// its schema.
    pub fn decode_with<'a>(
        &mut self,
        value: Option<&'a [u8]>,
        schema_ref: Option<&[u8]>,
    ) -> Result<Decoded<'a>, DecodeError> {
        let Some(bytes) = value else {
            return Ok(Decoded::Tombstone);
        };
        if bytes.is_empty() {
            return Err(DecodeError::Envelope(
                "empty value (a tombstone is a null value, not an empty one)",
            ));
        }
        if let Some(fingerprint) = schema_ref {
            let (id, schema) = self.published_schema(fingerprint)?;
            if bytes.trim_ascii_start().first() != Some(&b'{') {
                return Err(DecodeError::Shape(
                    "a schema-id message whose value is not a JSON object".into(),
                ));
            }
            return self.decode_payload(id, schema, bytes);
        }
        // Fast path: the JSON converter writes `{"schema":S,"payload":P}`, and
        // S repeats verbatim. When S is byte-for-byte a schema already parsed
        // (and validated), only P is parsed. Anything else takes the general
        // path, which validates the whole message.
        let (schema_id, schema, payload) =
            match self.known_prefix(bytes) {
                Some((id, schema, payload)) => (id, schema, payload),
                None => {
                    let envelope = parse_envelope(bytes)?;
                    let raw_schema = envelope.schema.filter(|s| s.get() != "null").ok_or(
                        DecodeError::Envelope("no `schema` (is schemas.enable=true?)"),
                    )?;
                    let payload = envelope
                        .payload
                        .ok_or(DecodeError::Envelope("no `payload`"))?;
                    let (id, schema) = self.schema(raw_schema.get())?;
                    (id, schema, payload.get().as_bytes())
                }
            };
        self.decode_payload(schema_id, schema, payload)
    }

    /// The payload (before, after, source, op) under its schema.
    fn decode_payload<'a>(
        &mut self,
        schema_id: u64,
        schema: Arc<TableSchema>,
        payload: &'a [u8],
    ) -> Result<Decoded<'a>, DecodeError> {
        if payload == b"null" {
            return Err(DecodeError::Envelope(
                "`payload` is null, but the Kafka value is not (a tombstone has a null value)",
            ));
        }
        // UTF-8 checked once for the whole payload: parsing a `str` then
        // skips the check per string, which parsing bytes does for each.
        let text = match std::str::from_utf8(payload) {
            Ok(text) => text,
            Err(e) => {
                return Err(DecodeError::Json(serde::de::Error::custom(format!(
                    "the payload is not UTF-8: {e}"
                ))));
            }
        };
        let payload: Payload<'_> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                DecodeError::Shape(format!("`payload` is not a change event: {e}"))
            } else {
                DecodeError::Json(e)
            }
        })?;
        let (op, image) = match payload.op.as_ref() {
            "c" => (Op::Create, payload.after),
            "u" => (Op::Update, payload.after),
            "r" => (Op::Read, payload.after),
            "d" => (Op::Delete, before(payload.before)?),
            "t" => {
                let values = vec![Datum::Null; schema.columns.len()];
                return Ok(self.row(
                    schema_id,
                    schema,
                    Op::Truncate,
                    values,
                    Vec::new(),
                    &payload.source,
                ));
            }
            other => return Err(DecodeError::Op(other.to_string())),
        };
        let image = image.ok_or(DecodeError::Envelope("row image missing for op"))?;
        let mut values = Vec::with_capacity(schema.columns.len());
        let mut unchanged = Vec::new();
        for (i, col) in schema.columns.iter().enumerate() {
            let raw = image.get(i, &col.name);
            let mismatch = |expected: String| DecodeError::Mismatch {
                column: col.name.clone(),
                expected,
                found: truncate(raw.to_string(), 80),
            };
            if let Some(d) = exact_number(&col.ty, raw).or_else(|| plain(&col.ty, raw)) {
                values.push(d.map_err(mismatch)?);
                continue;
            }
            let v: Value = serde_json::from_str(raw).map_err(DecodeError::Json)?;
            if is_unavailable(&col.ty, &v) {
                unchanged.push(i);
                values.push(Datum::Null);
            } else {
                values.push(to_datum(&col.ty, &v).map_err(mismatch)?);
            }
        }
        Ok(self.row(schema_id, schema, op, values, unchanged, &payload.source))
    }

    /// A decoded row image as a [`ChangeRow`], with the checks every format
    /// shares.
    fn row<'a>(
        &mut self,
        schema_id: u64,
        schema: Arc<TableSchema>,
        op: Op,
        mut values: Vec<Datum<'a>>,
        unchanged: Vec<usize>,
        source: &Source,
    ) -> Decoded<'a> {
        let null_in_required = if matches!(op, Op::Delete | Op::Truncate) {
            Vec::new()
        } else {
            schema
                .columns
                .iter()
                .enumerate()
                .filter(|(i, c)| !c.optional && values[*i] == Datum::Null && !unchanged.contains(i))
                .map(|(i, _)| i)
                .collect()
        };
        let (schema_id, schema) = if schema.has_numeric_text {
            self.move_specials(schema_id, schema, &mut values)
        } else {
            (schema_id, schema)
        };
        Decoded::Row(ChangeRow {
            schema,
            schema_id,
            op,
            values,
            unchanged,
            null_in_required,
            commit_ts_ms: source.ts_ms,
            lsn: source.lsn,
            tx_id: source.tx_id,
            key_update: None,
        })
    }

    fn schema(&mut self, raw: &str) -> Result<(u64, Arc<TableSchema>), DecodeError> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        let id = h.finish();
        if let Some(s) = self.schemas.get(&id) {
            return Ok((id, s.clone()));
        }
        let connect: ConnectSchema = serde_json::from_str(raw)
            .map_err(|e| DecodeError::Shape(format!("`schema` is not a Connect schema: {e}")))?;
        let table = Arc::new(TableSchema::from_envelope(&connect)?);
        if !table.fallbacks.is_empty() {
            // Once per distinct schema: the decoder parses each only once.
            tracing::warn!(columns = ?table.fallbacks, schema = %connect.name.as_deref().unwrap_or("?"),
                "columns of a kind the sink does not know are kept as JSON text");
        }
        self.schemas.insert(id, table.clone());
        if self.prefixes.len() >= MAX_PREFIXES {
            self.prefixes.remove(0);
        }
        self.prefixes
            .push((raw.as_bytes().to_vec(), id, table.clone()));
        Ok((id, table))
    }

    /// Moves NaN and ±Infinity out of `decimal` columns (and lists of
    /// them) into text siblings, and returns the shape of the row: the
    /// schema itself when there were none.
    fn move_specials(
        &mut self,
        schema_id: u64,
        schema: Arc<TableSchema>,
        values: &mut Vec<Datum<'_>>,
    ) -> (u64, Arc<TableSchema>) {
        let special = |d: &Datum| matches!(d, Datum::Str(_));
        let moved: Vec<usize> = schema
            .columns
            .iter()
            .enumerate()
            .filter(|(i, c)| match (&c.ty, &values[*i]) {
                (ColumnType::NumericText { .. }, d) => special(d),
                (ColumnType::List(item), Datum::List(items)) if item.holds_numeric_text() => {
                    items.iter().any(special)
                }
                _ => false,
            })
            .map(|(i, _)| i)
            .collect();
        if moved.is_empty() {
            return (schema_id, schema);
        }
        for &i in &moved {
            let text = match std::mem::replace(&mut values[i], Datum::Null) {
                Datum::List(items) => Datum::List(
                    items
                        .iter()
                        .map(|d| as_text(&schema.columns[i].ty, d))
                        .collect(),
                ),
                d => d,
            };
            values.push(text);
        }
        if self.sibling_shapes.len() >= MAX_SIBLING_SHAPES {
            self.sibling_shapes.clear();
        }
        let key = (schema_id, moved);
        let (id, shape) = self
            .sibling_shapes
            .entry(key)
            .or_insert_with_key(|(id, moved)| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (id, moved).hash(&mut h);
                (h.finish(), Arc::new(schema.with_text_siblings(moved)))
            });
        (*id, shape.clone())
    }

    /// Matches `{"schema":<known schema>,"payload":` and returns the payload
    /// bytes; the most recently matched schema is tried first.
    fn known_prefix<'a>(&mut self, bytes: &'a [u8]) -> Option<(u64, Arc<TableSchema>, &'a [u8])> {
        const HEAD: &[u8] = b"{\"schema\":";
        const MID: &[u8] = b",\"payload\":";
        let rest = bytes.strip_prefix(HEAD)?;
        let body = rest.strip_suffix(b"}")?;
        let hit = self
            .prefixes
            .iter()
            .rposition(|(raw, _, _)| body.starts_with(raw) && body[raw.len()..].starts_with(MID))?;
        let (raw, id, schema) = &self.prefixes[hit];
        let payload = &body[raw.len() + MID.len()..];
        let found = (*id, schema.clone(), payload);
        let last = self.prefixes.len() - 1;
        self.prefixes.swap(hit, last);
        Some(found)
    }
}

/// Parses the outer envelope, telling "not JSON" apart from "JSON of the
/// wrong shape" so that the quarantine record says what was wrong.
fn parse_envelope(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    // serde would read a struct from an array too: `[]` must not pass.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(DecodeError::Shape(
                "JSON, but not an object with `schema` and `payload`".into(),
            )),
            Err(e) => Err(DecodeError::Json(e)),
        };
    }
    match serde_json::from_slice::<Envelope<'_>>(bytes) {
        Ok(e) => Ok(e),
        Err(e) if e.is_data() => Err(DecodeError::Shape(format!(
            "JSON, but not an object with `schema` and `payload`: {e}"
        ))),
        Err(e) => Err(DecodeError::Json(e)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::values::*;
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;

    #[test]
    fn keys_name_the_primary_key_columns() {
        let mut d = Decoder::new();
        let key = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"user_id"},{"type":"int64","optional":false,"field":"tweet_id"}],"optional":false,"name":"twitter.likes.Key"},"payload":{"user_id":1,"tweet_id":2}}"#;
        let cols = d.key_columns(Some(key)).unwrap();
        assert_eq!(&*cols, ["user_id".to_string(), "tweet_id".to_string()]);
        assert!(
            Arc::ptr_eq(&cols, &d.key_columns(Some(key)).unwrap()),
            "cached"
        );
        assert_eq!(d.key_columns(None), None, "no primary key: no key");
        assert_eq!(d.key_columns(Some(b"42")), None);
        // Without its schema (`key.converter.schemas.enable=false`): the
        // fields' names, in the key's order, not sorted.
        let bare = br#"{"user_id":1,"tweet_id":2}"#;
        let cols = d.key_columns(Some(bare)).unwrap();
        assert_eq!(&*cols, ["user_id".to_string(), "tweet_id".to_string()]);
        assert!(Arc::ptr_eq(
            &cols,
            &d.key_columns(Some(br#"{"user_id":7,"tweet_id":9}"#))
                .unwrap()
        ));
        assert_eq!(d.key_columns(Some(b"{}")), None, "no columns: no key");
        // A key schema that begins like a known one (its first key column)
        // is not taken for it: the known schema's bytes end where its JSON
        // does.
        let one = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"}]},"payload":{"id":1}}"#;
        let two = br#"{"schema":{"type":"struct","fields":[{"type":"int64","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"at"}]},"payload":{"id":1,"at":2}}"#;
        for _ in 0..2 {
            assert_eq!(&*d.key_columns(Some(one)).unwrap(), ["id".to_string()]);
            assert_eq!(
                &*d.key_columns(Some(two)).unwrap(),
                ["id".to_string(), "at".to_string()]
            );
        }
    }

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

    /// Real events captured from the local stack by tests/capture-fixtures.sh.
    pub(crate) const TYPE_ZOO: &str = include_str!("../../tests/fixtures/type_zoo.jsonl");
    pub(crate) const TWITTER: &str = include_str!("../../tests/fixtures/twitter.jsonl");

    fn decode_all<'a>(d: &mut Decoder, corpus: &'a str) -> Vec<Decoded<'a>> {
        corpus
            .lines()
            // An empty fixture line stands for a Kafka null value.
            .map(|l| {
                d.decode(Some(l.as_bytes()).filter(|b| !b.is_empty()))
                    .expect(l)
            })
            .collect()
    }

    fn rows(decoded: Vec<Decoded<'_>>) -> Vec<ChangeRow<'_>> {
        decoded
            .into_iter()
            .filter_map(|d| match d {
                Decoded::Row(r) => Some(r),
                Decoded::Tombstone | Decoded::Marker(_) => None,
            })
            .collect()
    }

    fn value<'a, 'r>(row: &'r ChangeRow<'a>, column: &str) -> &'r Datum<'a> {
        let i = row
            .schema
            .columns
            .iter()
            .position(|c| c.name == column)
            .unwrap();
        &row.values[i]
    }

    fn texts(items: &[Option<&str>]) -> Datum<'static> {
        Datum::List(
            items
                .iter()
                .map(|i| i.map_or(Datum::Null, |s| Datum::Str(s.to_string().into())))
                .collect(),
        )
    }

    fn names<'r>(row: &'r ChangeRow<'_>) -> Vec<&'r str> {
        row.schema.columns.iter().map(|c| c.name.as_str()).collect()
    }

    /// Real events through the project's converter (tests/capture-fixtures.sh
    /// exact): a snapshot read, an insert, an update, a delete, a tombstone.
    pub(crate) const EXACT: &str = include_str!("../../tests/fixtures/exact_zoo.jsonl");

    #[test]
    fn numeric_specials_land_as_text_beside_the_decimal() {
        let mut d = Decoder::new();
        let rows = rows_of(&mut d, EXACT);
        assert_eq!(rows.len(), 4);
        let (read, insert, update) = (&rows[0], &rows[1], &rows[2]);

        // numeric(10,3) NaN: the decimal is NULL, `n__string` holds NaN. A
        // domain over numeric(12,2) and a numeric(6,2)[] with a NaN element
        // the same (the list's sibling holds the whole list as text).
        assert_eq!(value(read, "n"), &Datum::Null);
        assert_eq!(value(read, "n__string"), &Datum::Str("NaN".into()));
        assert_eq!(value(read, "cost"), &Datum::Null);
        assert_eq!(value(read, "cost__string"), &Datum::Str("NaN".into()));
        assert_eq!(value(read, "amounts"), &Datum::Null);
        assert_eq!(
            value(read, "amounts__string"),
            &texts(&[Some("1.25"), Some("NaN")])
        );
        assert_eq!(
            &names(read)[15..],
            ["n__string", "amounts__string", "cost__string"],
            "siblings follow the table's own columns"
        );
        // Unconstrained and p > 38 numerics are text already: specials in place.
        assert_eq!(value(read, "free"), &Datum::Str("Infinity".into()));
        assert_eq!(value(read, "wide"), &Datum::Str("NaN".into()));
        assert_eq!(
            value(read, "nums"),
            &texts(&[
                Some("1.5"),
                Some("12345678901234567890.123456789"),
                Some("NaN"),
                Some("-Infinity"),
                None
            ])
        );
        assert_eq!(
            read.schema.arrow.field(1).data_type(),
            &arrow::datatypes::DataType::Decimal128(10, 3)
        );

        // Bit strings keep every bit, leading zeros included.
        assert_eq!(value(read, "vb"), &Datum::Str("00001011".into()));
        assert_eq!(value(insert, "vb"), &Datum::Str("1011".into()));
        assert_eq!(value(insert, "b4"), &Datum::Str("0000".into()));
        assert_eq!(value(read, "b1"), &Datum::Bool(true));

        // Without a special value a row keeps the table's own shape.
        assert_eq!(names(insert).len(), 15);
        assert_eq!(value(insert, "n"), &Datum::Decimal(1500));
        assert_eq!(value(insert, "n_req"), &Datum::Decimal(-2125));
        assert_eq!(value(insert, "cost"), &Datum::Decimal(350));
        assert_eq!(value(insert, "free"), &Datum::Str("-Infinity".into()));
        assert_eq!(
            value(insert, "wide"),
            &Datum::Str("12345678901234567890123456789012345.12345".into())
        );
        assert_eq!(
            value(insert, "amounts"),
            &Datum::List(vec![Datum::Decimal(125), Datum::Null])
        );
        // Only the column with a special value gets a sibling.
        assert_eq!(value(update, "n"), &Datum::Decimal(2500));
        assert_eq!(
            value(update, "amounts__string"),
            &texts(&[Some("3.50"), Some("NaN"), None])
        );
        assert!(!names(update).contains(&"n__string"));
        // The same shape is one schema id (one file per flush), another
        // shape another.
        let again = rows_of(&mut d, EXACT);
        assert_eq!(again[0].schema_id, read.schema_id);
        assert_ne!(read.schema_id, insert.schema_id);
        assert_ne!(read.schema_id, update.schema_id);
    }

    fn rows_of<'a>(d: &mut Decoder, corpus: &'a str) -> Vec<ChangeRow<'a>> {
        rows(decode_all(d, corpus))
    }

    #[test]
    fn a_sibling_name_the_table_already_has_is_not_reused() {
        // The snapshot read, as if the table had a column `n__string` of
        // its own (text, after `n`).
        let read = EXACT.lines().next().unwrap();
        let own = r#"{"type":"string","optional":true,"field":"n__string"}"#;
        let read = read
            .replacen(r#""field":"n"},"#, &format!(r#""field":"n"}},{own},"#), 2)
            .replacen(r#""n":"NaN","#, r#""n":"NaN","n__string":"mine","#, 1);
        let mut d = Decoder::new();
        let row = rows_of(&mut d, &read).pop().unwrap();
        assert_eq!(value(&row, "n__string"), &Datum::Str("mine".into()));
        assert_eq!(value(&row, "n__string_"), &Datum::Str("NaN".into()));
    }

    #[test]
    fn null_in_a_not_null_column_is_flagged_except_in_deletes() {
        let mut d = Decoder::new();
        let rows = rows_of(&mut d, EXACT);
        assert!(rows.iter().all(|r| r.null_in_required.is_empty()));
        let delete = &rows[3];
        assert_eq!(delete.op, Op::Delete);
        assert_eq!(
            value(delete, "n_req"),
            &Datum::Null,
            "DEFAULT identity: key only"
        );
        // The insert as it would be had the connector lost `n_req`.
        let insert = EXACT.lines().nth(1).unwrap();
        assert!(insert.contains(r#""n_req":"-2.125""#));
        let lost = insert.replace(r#""n_req":"-2.125""#, r#""n_req":null"#);
        let row = rows_of(&mut d, &lost).pop().unwrap();
        assert_eq!(row.null_in_required, [2]);
        // A nullable column's NULL is no loss.
        let lost = insert.replace(r#""n":"1.500""#, r#""n":null"#);
        assert!(
            rows_of(&mut d, &lost)
                .pop()
                .unwrap()
                .null_in_required
                .is_empty()
        );
    }

    /// A JSON string without escapes is the message's own text, not a
    /// copy; one with escapes is unescaped into a value of its own.
    #[test]
    fn json_text_borrows_from_the_message_unless_escaped() {
        let mut d = Decoder::new();
        let rows = rows_of(&mut d, TYPE_ZOO);
        let full = rows
            .iter()
            .find(|r| r.op == Op::Create && value(r, "id") == &Datum::Int(1))
            .unwrap();
        let Datum::Str(Cow::Borrowed(label)) = value(full, "label") else {
            panic!("copied: {:?}", value(full, "label"));
        };
        assert_eq!(*label, "héllo");
        assert!(TYPE_ZOO.as_bytes().as_ptr_range().contains(&label.as_ptr()));
        assert!(matches!(value(full, "note"), Datum::Str(Cow::Owned(n)) if n == "multi\nline"));
    }

    #[test]
    fn every_type_decodes_from_real_events() {
        let mut d = Decoder::new();
        let all = decode_all(&mut d, TYPE_ZOO);
        assert_eq!(
            all.iter()
                .filter(|x| matches!(x, Decoded::Tombstone))
                .count(),
            1
        );
        let rows = rows(all);
        let full = rows
            .iter()
            .find(|r| r.op == Op::Create && value(r, "id") == &Datum::Int(1))
            .expect("the fully populated insert");
        assert_eq!(value(full, "small"), &Datum::Int(-7));
        assert_eq!(value(full, "medium"), &Datum::Int(123_456));
        assert_eq!(value(full, "real_num"), &Datum::Float(1.5));
        assert_eq!(value(full, "double_num"), &Datum::Float(-2.25e10));
        assert_eq!(value(full, "flag"), &Datum::Bool(true));
        assert_eq!(value(full, "label"), &Datum::Str("héllo".into()));
        assert_eq!(value(full, "note"), &Datum::Str("multi\nline".into()));
        // numeric(10,3) 12345.678
        assert_eq!(value(full, "price"), &Datum::Decimal(12_345_678));
        assert_eq!(
            value(full, "free_numeric"),
            &Datum::Str("3.14159265358979".into())
        );
        // 2024-02-29 is day 19782 of the epoch.
        assert_eq!(value(full, "day"), &Datum::Int(19_782));
        assert_eq!(value(full, "at_time"), &Datum::Int(47_655_123_456));
        assert_eq!(value(full, "local_ts"), &Datum::Int(1_709_212_455_654_321));
        // 13:14:15.654321+02 is 11:14:15.654321Z.
        assert_eq!(value(full, "zoned_ts"), &Datum::Int(1_709_205_255_654_321));
        assert_eq!(
            value(full, "blob"),
            &Datum::Bytes(vec![0xde, 0xad, 0xbe, 0xef].into())
        );
        assert_eq!(
            value(full, "tags"),
            &Datum::List(vec![
                Datum::Str("a".into()),
                Datum::Str("b,c".into()),
                Datum::Str("日本".into())
            ])
        );
        assert_eq!(
            value(full, "scores"),
            &Datum::List(vec![Datum::Int(1), Datum::Int(2), Datum::Int(3)])
        );
        assert_eq!(
            value(full, "doc"),
            &Datum::Str(r#"{"k": [1, {"x": null}]}"#.into())
        );
        assert_eq!(
            value(full, "uid"),
            &Datum::Str("6f1c2a8e-2b1d-4f6e-9a51-0c7d3e5b9f10".into())
        );
        assert!(full.lsn.is_some() && full.tx_id.is_some() && full.commit_ts_ms > 0);

        let nulls = rows
            .iter()
            .find(|r| r.op == Op::Create && value(r, "id") == &Datum::Int(2))
            .unwrap();
        assert_eq!(value(nulls, "price"), &Datum::Decimal(-1));
        assert_eq!(value(nulls, "free_numeric"), &Datum::Str("-42".into()));
        assert_eq!(value(nulls, "tags"), &Datum::List(vec![]));
        assert_eq!(value(nulls, "label"), &Datum::Null);

        let update = rows.iter().find(|r| r.op == Op::Update).unwrap();
        assert_eq!(value(update, "price"), &Datum::Decimal(99_999_999));
        assert_eq!(value(update, "flag"), &Datum::Bool(false));
    }

    #[test]
    fn deletes_use_the_before_image() {
        let mut d = Decoder::new();
        let rows = rows(decode_all(&mut d, TYPE_ZOO));
        let delete = rows.iter().find(|r| r.op == Op::Delete).unwrap();
        // REPLICA IDENTITY DEFAULT: the key only.
        assert_eq!(value(delete, "id"), &Datum::Int(2));
        assert_eq!(value(delete, "price"), &Datum::Null);

        let rows = super::tests::rows(decode_all(&mut d, TWITTER));
        let tweet_delete = rows.iter().find(|r| r.op == Op::Delete).unwrap();
        // tweets is REPLICA IDENTITY FULL: the whole old row.
        assert_eq!(
            value(tweet_delete, "body"),
            &Datum::Str("fixture tweet #cdc".into())
        );
        assert_eq!(value(tweet_delete, "latitude"), &Datum::Decimal(52_520_008));
    }

    /// A TRUNCATE (`op` `t`, no image) is a row of its own: every column
    /// NULL, the source position kept, nothing reported lost.
    #[test]
    fn a_truncate_is_a_row_without_values() {
        let line = TWITTER.lines().next().unwrap();
        let mut event: serde_json::Value = serde_json::from_str(line).unwrap();
        let payload = event.get_mut("payload").unwrap();
        payload["op"] = "t".into();
        payload["before"] = serde_json::Value::Null;
        payload["after"] = serde_json::Value::Null;
        let lsn = payload["source"]["lsn"].as_i64();
        let text = event.to_string();
        let mut d = Decoder::new();
        let Ok(Decoded::Row(row)) = d.decode(Some(text.as_bytes())) else {
            panic!("not a row: {text}");
        };
        assert_eq!(row.op, Op::Truncate);
        assert_eq!(row.op.code(), "t");
        assert!(row.values.iter().all(|v| *v == Datum::Null), "{row:?}");
        assert!(row.null_in_required.is_empty());
        assert_eq!(row.lsn, lsn);
    }

    #[test]
    fn schema_change_is_a_new_schema_not_an_error() {
        let mut d = Decoder::new();
        let rows = rows(decode_all(&mut d, TYPE_ZOO));
        let after_change = rows
            .iter()
            .find(|r| r.schema.columns.iter().any(|c| c.name == "added_later"))
            .expect("an event with the added column");
        assert_eq!(
            value(after_change, "added_later"),
            &Datum::Str("new".into())
        );
        let ids: std::collections::HashSet<u64> = rows.iter().map(|r| r.schema_id).collect();
        assert_eq!(ids.len(), 2, "one schema before and one after ALTER TABLE");
        assert_eq!(d.schema_count(), 2);
    }

    #[test]
    fn unchanged_toast_is_marked_not_written() {
        let mut d = Decoder::new();
        let rows = rows(decode_all(&mut d, TWITTER));
        let update = rows
            .iter()
            .find(|r| r.op == Op::Update)
            .expect("the update that left the bio alone");
        let bio = update
            .schema
            .columns
            .iter()
            .position(|c| c.name == "bio")
            .unwrap();
        assert_eq!(update.unchanged, vec![bio]);
        assert_eq!(update.values[bio], Datum::Null);
        let insert = rows
            .iter()
            .find(|r| r.op == Op::Create && r.schema.columns.iter().any(|c| c.name == "username"))
            .unwrap();
        assert!(matches!(value(insert, "bio"), Datum::Str(s) if s.len() > 2000));
        assert_eq!(value(insert, "reputation"), &Datum::Decimal(8_725));
    }

    #[test]
    fn a_value_that_breaks_its_schema_is_rejected() {
        let line = TYPE_ZOO.lines().find(|l| l.contains("héllo")).unwrap();
        let broken = line.replacen("\"medium\":123456", "\"medium\":\"many\"", 1);
        let err = Decoder::new().decode(Some(broken.as_bytes())).unwrap_err();
        assert!(err.to_string().contains("`medium`"), "{err}");
        let overflow = line.replacen("\"small\":-7", "\"small\":70000", 1);
        assert!(Decoder::new().decode(Some(overflow.as_bytes())).is_err());
    }

    #[test]
    fn fast_path_matches_full_parse_and_still_validates() {
        let line = TYPE_ZOO.lines().find(|l| l.contains("héllo")).unwrap();
        let mut warm = Decoder::new();
        warm.decode(Some(line.as_bytes())).unwrap(); // learns the schema
        assert!(
            warm.known_prefix(line.as_bytes()).is_some(),
            "second sight takes the fast path"
        );
        let fast = rows(vec![warm.decode(Some(line.as_bytes())).unwrap()]);
        let slow = rows(vec![Decoder::new().decode(Some(line.as_bytes())).unwrap()]);
        assert_eq!(fast[0].values, slow[0].values);
        assert_eq!(fast[0].schema_id, slow[0].schema_id);

        let corrupt = line.replacen("\"payload\":{", "\"payload\":{{", 1);
        assert!(matches!(
            warm.decode(Some(corrupt.as_bytes())),
            Err(DecodeError::Json(_))
        ));
        let null_payload = format!("{}null}}", &line[..line.find("\"payload\":").unwrap() + 10]);
        let err = warm.decode(Some(null_payload.as_bytes())).unwrap_err();
        assert!(err.to_string().contains("`payload` is null"), "{err}");
    }

    #[test]
    fn special_values_land_instead_of_quarantining_the_row() {
        let mut d = Decoder::new();
        let rows = rows(decode_all(&mut d, TYPE_ZOO));
        let special: Vec<&ChangeRow> = rows
            .iter()
            .filter(|r| r.op == Op::Update && value(r, "span") != &Datum::Null)
            .collect();
        assert_eq!(special.len(), 2, "two updates with special values");
        let (a, b) = (special[0], special[1]);
        assert!(matches!(value(a, "special_real"), Datum::Float(f) if f.is_nan()));
        assert_eq!(value(a, "special_double"), &Datum::Float(f64::INFINITY));
        assert_eq!(value(b, "special_real"), &Datum::Float(f64::NEG_INFINITY));
        assert_eq!(value(a, "edge_ts"), &Datum::Int(TIMESTAMP_INFINITY_MICROS));
        assert_eq!(
            value(b, "edge_ts"),
            &Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS)
        );
        assert_eq!(
            value(a, "edge_local"),
            &Datum::Int(TIMESTAMP_NEG_INFINITY_MICROS)
        );
        // interval.handling.mode=string: ISO 8601 with the months kept.
        assert_eq!(value(a, "span"), &Datum::Str("P1Y2M3DT4H5M6.789S".into()));
        assert_eq!(value(b, "span"), &Datum::Str("P0Y0M-2DT0H0M1S".into()));
        assert_eq!(value(a, "addr"), &Datum::Str("192.168.10.0/24".into()));
        assert_eq!(value(a, "plain_json"), &Datum::Str(r#"{"a": 1}"#.into()));
        assert_eq!(
            value(a, "amounts"),
            &Datum::List(vec![Datum::Decimal(125), Datum::Decimal(-350), Datum::Null])
        );
        assert_eq!(
            value(a, "flags"),
            &Datum::List(vec![Datum::Bool(true), Datum::Bool(false)])
        );
        assert_eq!(value(a, "days"), &Datum::List(vec![Datum::Int(19_782)]));
        assert_eq!(
            value(a, "blobs"),
            &Datum::List(vec![Datum::Bytes(vec![0x00, 0xff].into())])
        );
        assert!(matches!(value(a, "spot"), Datum::Str(s) if s.contains("\"x\":1.5")));
    }

    #[test]
    fn only_a_null_value_is_a_tombstone() {
        let mut d = Decoder::new();
        assert!(matches!(d.decode(None), Ok(Decoded::Tombstone)));
        for (input, says) in [
            (&b""[..], "empty value"),
            (b"{}", "no `schema`"),
            (b"[]", "not an object"),
            (br#"{"payload":null}"#, "no `schema`"),
            (br#"{"schema":null,"payload":null}"#, "no `schema`"),
            (
                br#"{"schema":{"type":"struct","fields":[]},"payload":null}"#,
                "`payload`",
            ),
            (b"42", "not an object"),
            (b"{not json", "not valid JSON"),
        ] {
            let err = d.decode(Some(input)).unwrap_err().to_string();
            assert!(
                err.contains(says),
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(900_000));
        let err = d.decode(Some(big.as_bytes())).unwrap_err().to_string();
        assert!(err.contains("no `schema`"), "{err}");
    }

    #[test]
    fn numeric_format_decimals_are_exact() {
        let ty = ColumnType::Decimal {
            precision: 20,
            scale: 4,
        };
        assert_eq!(
            exact_number(&ty, "1234567890123.4567"),
            Some(Ok(Datum::Decimal(12_345_678_901_234_567)))
        );
        assert!(matches!(exact_number(&ty, "1.23456"), Some(Err(_))));
        let wide = ColumnType::WideDecimal { scale: 2 };
        assert_eq!(
            exact_number(&wide, "-123456789012345678901234567890123456789012.5"),
            Some(Ok(Datum::Str(
                "-123456789012345678901234567890123456789012.50".into()
            )))
        );
    }

    #[test]
    fn exponent_form_decimals_are_exact() {
        let ty = ColumnType::Decimal {
            precision: 20,
            scale: 8,
        };
        assert_eq!(exact_number(&ty, "1E-8"), Some(Ok(Datum::Decimal(1))));
        assert_eq!(
            exact_number(&ty, "-1.25E+2"),
            Some(Ok(Datum::Decimal(-12_500_000_000)))
        );
        assert!(
            matches!(exact_number(&ty, "1E-9"), Some(Err(_))),
            "would drop a digit"
        );
    }

    #[test]
    fn wide_decimals_from_bytes_are_exact() {
        // 2^127 does not fit an i128.
        let mut b = vec![0u8; 17];
        b[1] = 0x80;
        assert_eq!(
            big_decimal_text(&b, 0),
            "170141183460469231731687303715884105728"
        );
        let neg: Vec<u8> = {
            // -(2^127) - 1 in 17 bytes of two's complement.
            let mut m = b.clone();
            m.iter_mut().for_each(|x| *x = !*x);
            m
        };
        assert_eq!(
            big_decimal_text(&neg, 3),
            "-170141183460469231731687303715884105.729"
        );
    }

    /// Splits a JSON-with-schemas event into its schema and payload JSON,
    /// as the schema-id converter publishes and sends them.
    fn split(event: &str) -> (String, String) {
        let v: Value = serde_json::from_str(event).unwrap();
        (v["schema"].to_string(), v["payload"].to_string())
    }

    #[test]
    fn schema_id_messages_decode_as_their_json_with_schemas_twins() {
        let mut with_schemas = Decoder::new();
        let mut by_id = Decoder::new();
        for (i, line) in TWITTER.lines().enumerate() {
            let (schema, payload) = split(line);
            let fingerprint = format!("fp{i}");
            by_id.register(fingerprint.as_bytes(), &schema);
            let a = with_schemas.decode(Some(line.as_bytes())).unwrap();
            let b = by_id
                .decode_with(Some(payload.as_bytes()), Some(fingerprint.as_bytes()))
                .unwrap();
            match (a, b) {
                (Decoded::Row(a), Decoded::Row(b)) => {
                    assert_eq!(a.schema.arrow, b.schema.arrow, "line {i}");
                    assert_eq!(a.values, b.values, "line {i}");
                    assert_eq!((a.op, a.lsn, a.commit_ts_ms), (b.op, b.lsn, b.commit_ts_ms));
                    assert_eq!(a.unchanged, b.unchanged);
                }
                (a, b) => panic!("line {i}: {a:?} vs {b:?}"),
            }
        }
        assert!(
            by_id.schema_count() < TWITTER.lines().count(),
            "equal schemas under different fingerprints are parsed once"
        );
        // A tombstone stays a tombstone, header or not.
        assert!(matches!(
            by_id.decode_with(None, Some(b"fp0")),
            Ok(Decoded::Tombstone)
        ));
    }

    #[test]
    fn schema_id_messages_without_a_usable_schema_are_errors_that_say_why() {
        let line = TWITTER.lines().next().unwrap();
        let (schema, payload) = split(line);
        let mut d = Decoder::new();
        let err = d
            .decode_with(Some(payload.as_bytes()), Some(b"nowhere"))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::UnknownSchema(ref f) if f == "nowhere"),
            "{err}"
        );
        assert_eq!(err.kind(), "schema_topic");

        d.mark_missing(b"nowhere");
        assert!(d.knows(b"nowhere"));
        let err = d
            .decode_with(Some(payload.as_bytes()), Some(b"nowhere"))
            .unwrap_err();
        assert!(err.to_string().contains("not on the schema topic"), "{err}");

        d.register(b"bad", r#"{"type":"string"}"#);
        let err = d
            .decode_with(Some(payload.as_bytes()), Some(b"bad"))
            .unwrap_err();
        assert!(matches!(err, DecodeError::BadSchema { .. }), "{err}");

        d.register(b"good", &schema);
        for value in [&b"[]"[..], b"42", b"null"] {
            let err = d.decode_with(Some(value), Some(b"good")).unwrap_err();
            assert_eq!(err.kind(), "envelope", "{value:?}: {err}");
        }
        // The whole JSON-with-schemas message under a schema-id header is
        // not a payload: an error, not a row of nulls.
        assert!(d.decode_with(Some(line.as_bytes()), Some(b"good")).is_err());
    }
}
