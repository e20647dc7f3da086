//! Messages that cannot be read, kept whole next to the tables.
//!
//! Each goes to `_quarantine/<topic>/p<partition>/<offset>.json` with its
//! raw key and value (base64), the headers that say how its value is read
//! (its schema's fingerprint, its encoding, a marker's kind), and the
//! reason. The key is a function of the
//! offset, so quarantining the same message again after a replay rewrites
//! the same object.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::decode::marker::HEADER as MARKER_HEADER;
use crate::decode::{
    ENCODING_HEADER, MessageHeaders, NEW_KEY_HEADER, OLD_KEY_HEADER, SCHEMA_HEADER,
};
use crate::source::position::Tp;

/// What is kept of a message that could not be decoded: everything needed
/// to replay it by hand once the cause is fixed.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
    /// The key and value exactly as received, base64 encoded.
    pub key_base64: Option<String>,
    pub value_base64: Option<String>,
    /// The sink's headers the message had, by name, their values as text:
    /// without them a schema-id or Avro value cannot be read again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

pub fn quarantine_key(prefix: &Path, tp: &Tp, offset: i64) -> Path {
    prefix
        .clone()
        .join("_quarantine")
        .join(&*tp.topic)
        .join(format!("p{:03}", tp.partition))
        .join(format!("{offset:020}.json"))
}

pub struct Quarantine {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl Quarantine {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Quarantine {
        Quarantine {
            store,
            prefix: Path::from(prefix.trim_matches('/')),
        }
    }

    pub async fn put(
        &self,
        tp: &Tp,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &MessageHeaders<'_>,
        error: &str,
    ) -> Result<Path, object_store::Error> {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let headers = [
            (SCHEMA_HEADER, headers.schema_ref),
            (ENCODING_HEADER, headers.encoding),
            (MARKER_HEADER, headers.marker),
            (NEW_KEY_HEADER, headers.new_key),
            (OLD_KEY_HEADER, headers.old_key),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name.to_string(), String::from_utf8_lossy(v?).into_owned())))
        .collect();
        let record = QuarantineRecord {
            topic: tp.topic.to_string(),
            partition: tp.partition,
            offset,
            error: error.to_string(),
            key_base64: key.map(b64),
            value_base64: value.map(b64),
            headers,
        };
        let path = quarantine_key(&self.prefix, tp, offset);
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        self.store.put(&path, PutPayload::from(body)).await?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn quarantine_keeps_raw_bytes_under_the_offset() {
        let store = Arc::new(InMemory::new());
        let q = Quarantine::new(store.clone(), "");
        let tp = Tp::new("twitter.users", 1);
        let headers = MessageHeaders {
            schema_ref: Some(b"f00d"),
            encoding: Some(b"avro"),
            ..MessageHeaders::default()
        };
        let path = q
            .put(&tp, 7, Some(b"k"), Some(b"{}"), &headers, "why")
            .await
            .unwrap();
        assert_eq!(
            path.as_ref(),
            "_quarantine/twitter.users/p001/00000000000000000007.json"
        );
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        let rec: QuarantineRecord = serde_json::from_slice(&got).unwrap();
        assert_eq!(rec.value_base64.as_deref(), Some("e30="));
        assert_eq!(rec.error, "why");
        assert_eq!(
            rec.headers,
            BTreeMap::from([
                ("cdclake.encoding".to_string(), "avro".to_string()),
                ("cdclake.schema".to_string(), "f00d".to_string()),
            ])
        );
    }
}
