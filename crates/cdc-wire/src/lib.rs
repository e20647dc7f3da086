//! The contract of the pipeline's Kafka records between the programs that
//! write them and the one that reads them, kept in one place so the two
//! sides cannot drift apart:
//!
//! - the schema-id format of the connector's converter
//!   (`debezium/converter/.../SchemaIdConverter.java`, which cannot use
//!   this crate and repeats the names and bytes): an Avro value carries its
//!   schema's fingerprint in a [`Frame`] before the Avro body; a JSON value
//!   names it in the [`SCHEMA_HEADER`] header (as Avro values did before
//!   the frame, with [`ENCODING_HEADER`]); and the schema topic's default
//!   name;
//! - the recovery marker ([`RecoveryMarker`]) that `cdc-slot-guard` appends
//!   to every partition once a re-snapshot is wholly in Kafka, and that
//!   `cdc-sink` writes into the changelog. Its rules (at least one
//!   partition, a non-empty id) are checked here, by the reader, in
//!   [`RecoveryMarker::from_record`].
//!
//! The test helpers use the same names, so a test that builds a record by
//! hand builds what the programs do.

use serde::{Deserialize, Serialize};

/// Names a value's schema (its fingerprint on the schema topic).
pub const SCHEMA_HEADER: &str = "cdclake.schema";
/// Says a schema-id value is not JSON; its only value is [`AVRO`].
pub const ENCODING_HEADER: &str = "cdclake.encoding";
/// [`ENCODING_HEADER`]'s value for Avro's binary encoding.
pub const AVRO: &str = "avro";
/// Where the converter publishes each schema once, by fingerprint.
pub const DEFAULT_SCHEMA_TOPIC: &str = "_cdclake.schemas";

/// The first byte of a [`Frame`]. A JSON text never starts with it, and
/// neither does an unframed Avro value of the converter's earlier versions
/// (a Debezium envelope starts with a union branch, the optional envelope's
/// or its `before` field's: 0 or 1, zig-zag encoded as 0x00 or 0x02), so a
/// framed value is told from every other value the pipeline carries by its
/// first bytes.
pub const FRAME_MAGIC: u8 = 0xCD;
/// The frame's version, its second byte.
pub const FRAME_VERSION: u8 = 1;
/// The length of the fingerprint in a frame: 32 hex digits, as under
/// [`SCHEMA_HEADER`].
pub const FINGERPRINT_LEN: usize = 32;
/// The frame's length before the Avro body: magic, version, flags, fingerprint.
pub const FRAME_LEN: usize = 3 + FINGERPRINT_LEN;
/// The frame's flag saying the record carries Kafka headers (Debezium's
/// key-update headers, say): without it a reader need not read them.
pub const FRAME_HAS_HEADERS: u8 = 1;

/// An Avro value of the schema-id format:
/// `[FRAME_MAGIC, FRAME_VERSION, flags, fingerprint (32 hex digits), body]`.
///
/// Why in the value and not in headers: librdkafka parses a message's
/// headers into an allocated list when they are first asked for, which
/// cost the sink about 8% of its CPU per message, and most records have
/// no other header. The flag tells the reader whether to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The schema's fingerprint on the schema topic.
    pub fingerprint: &'a [u8],
    /// Whether the record carries Kafka headers.
    pub has_headers: bool,
    /// The value in the Avro encoding of the schema.
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The frame of `value`, or `None` when `value` is not a framed value
    /// (JSON, an unframed Avro value, a marker).
    pub fn parse(value: &'a [u8]) -> Option<Frame<'a>> {
        match value {
            [FRAME_MAGIC, FRAME_VERSION, flags, rest @ ..]
                if rest.len() >= FINGERPRINT_LEN && flags & !FRAME_HAS_HEADERS == 0 =>
            {
                let (fingerprint, body) = rest.split_at(FINGERPRINT_LEN);
                Some(Frame {
                    fingerprint,
                    has_headers: flags & FRAME_HAS_HEADERS != 0,
                    body,
                })
            }
            _ => None,
        }
    }

    /// The value's bytes: what the converter writes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_LEN + self.body.len());
        let flags = if self.has_headers {
            FRAME_HAS_HEADERS
        } else {
            0
        };
        out.extend_from_slice(&[FRAME_MAGIC, FRAME_VERSION, flags]);
        out.extend_from_slice(self.fingerprint);
        out.extend_from_slice(self.body);
        out
    }
}

/// Makes a record a marker, not a Debezium event; its value says which.
pub const MARKER_HEADER: &str = "cdclake.marker";
/// [`MARKER_HEADER`]'s value for a recovery marker.
pub const RECOVERY: &str = "recovery";

/// What the slot guard says about one recovery: a marker record's value,
/// as JSON (camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryMarker {
    /// Names the recovery: the same in every partition.
    pub id: String,
    /// The replication slot that was lost and made again.
    pub slot: String,
    /// A WAL position after every change delivered before the loss and
    /// before every change delivered after it: a row whose last change is
    /// older was not re-delivered by the snapshot, so it was deleted while
    /// the slot was lost.
    pub slot_start_lsn: i64,
    /// The same moment on PostgreSQL's clock (Unix ms), for the rows an
    /// incremental snapshot read: Debezium gives them no LSN, only the
    /// time they were read (on the Connect worker's clock).
    pub slot_start_ms: i64,
    /// How many partitions the topic has: markers from all of them mean
    /// the whole snapshot of the table is applied.
    pub partitions: i32,
    /// When the guard saw the snapshot complete (Unix ms).
    pub completed_at_ms: i64,
}

impl RecoveryMarker {
    /// The marker of a record with [`MARKER_HEADER`] = `kind` and this
    /// value, or why it is not one.
    pub fn from_record(kind: &[u8], value: Option<&[u8]>) -> Result<RecoveryMarker, String> {
        if kind != RECOVERY.as_bytes() {
            return Err(format!(
                "unknown marker kind `{}`",
                String::from_utf8_lossy(kind)
            ));
        }
        let value = value.ok_or("a recovery marker without a value")?;
        let marker: RecoveryMarker =
            serde_json::from_slice(value).map_err(|e| format!("recovery marker: {e}"))?;
        if marker.partitions < 1 || marker.id.is_empty() {
            return Err(format!(
                "recovery marker `{}` names {} partitions",
                marker.id, marker.partitions
            ));
        }
        Ok(marker)
    }

    /// The record's value.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a marker serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> RecoveryMarker {
        RecoveryMarker {
            id: "twitter_cdc@42".into(),
            slot: "twitter_cdc".into(),
            slot_start_lsn: 42,
            slot_start_ms: 1_000,
            partitions: 3,
            completed_at_ms: 2_000,
        }
    }

    const FP: &[u8; 32] = b"4fb6e78bc76c3ec67688269a468a0cb9";

    #[test]
    fn a_frame_goes_both_ways() {
        for has_headers in [false, true] {
            let frame = Frame {
                fingerprint: FP,
                has_headers,
                body: &[0x02, 0x10, 0xff],
            };
            let bytes = frame.to_bytes();
            assert_eq!(bytes.len(), FRAME_LEN + 3);
            assert_eq!(bytes[2], u8::from(has_headers));
            assert_eq!(Frame::parse(&bytes), Some(frame));
        }
        // A frame with an empty body is still one (the decoder says what is wrong).
        let empty = Frame {
            fingerprint: FP,
            has_headers: false,
            body: &[],
        };
        assert_eq!(Frame::parse(&empty.to_bytes()), Some(empty));
    }

    #[test]
    fn what_is_not_framed_is_not_taken_for_a_frame() {
        let framed = Frame {
            fingerprint: FP,
            has_headers: false,
            body: b"x",
        }
        .to_bytes();
        // JSON, an unframed Avro envelope (`before` null or present), a marker.
        for value in [
            &b"{\"before\":null}"[..],
            &[0x00, 0x02, 0x10],
            &[0x02, 0x00],
            b"",
        ] {
            assert_eq!(Frame::parse(value), None, "{value:?}");
        }
        // Too short for its fingerprint, another version, unknown flags.
        assert_eq!(Frame::parse(&framed[..FRAME_LEN - 1]), None);
        let mut other = framed.clone();
        other[1] = 2;
        assert_eq!(Frame::parse(&other), None);
        let mut flags = framed;
        flags[2] = 0x80;
        assert_eq!(Frame::parse(&flags), None);
    }

    #[test]
    fn a_marker_goes_both_ways_in_camel_case() {
        let m = marker();
        let json = m.to_json();
        assert_eq!(
            json,
            r#"{"id":"twitter_cdc@42","slot":"twitter_cdc","slotStartLsn":42,"slotStartMs":1000,"partitions":3,"completedAtMs":2000}"#
        );
        assert_eq!(
            RecoveryMarker::from_record(RECOVERY.as_bytes(), Some(json.as_bytes())),
            Ok(m)
        );
    }

    #[test]
    fn what_is_not_a_marker_says_why() {
        let json = marker().to_json();
        let bad = |kind: &[u8], value: Option<&[u8]>| {
            RecoveryMarker::from_record(kind, value).unwrap_err()
        };
        assert!(bad(b"other", Some(json.as_bytes())).contains("unknown marker kind `other`"));
        assert!(bad(b"recovery", None).contains("without a value"));
        assert!(bad(b"recovery", Some(b"{}")).contains("recovery marker:"));
        let none = RecoveryMarker {
            partitions: 0,
            ..marker()
        };
        assert!(bad(b"recovery", Some(none.to_json().as_bytes())).contains("names 0 partitions"));
    }
}
