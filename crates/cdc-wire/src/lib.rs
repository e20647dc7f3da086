//! The contract of the pipeline's Kafka records between the programs that
//! write them and the one that reads them, kept in one place so the two
//! sides cannot drift apart:
//!
//! - the headers of the schema-id format, which the connector's converter
//!   (`debezium/converter/.../SchemaIdConverter.java`, which cannot use
//!   this crate and repeats the names) adds to every value: [`SCHEMA_HEADER`],
//!   [`ENCODING_HEADER`], and the schema topic's default name;
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
