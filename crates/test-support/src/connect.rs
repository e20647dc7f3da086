//! Kafka Connect's REST API on the stack (`STACK_CONNECT_URL`), through
//! `curl` as `tests/stack.sh` talks to it.

use std::process::{Command, Output};

use serde_json::Value;

use crate::stack::env;

/// The connector `tests/stack.sh` registers for the demo tables.
pub const CONNECTOR: &str = "twitter-postgres";

/// `method path` with an optional JSON body; `curl -f`, so an error status
/// is an unsuccessful exit.
pub fn rest(method: &str, path: &str, body: Option<&Value>) -> Output {
    let mut c = Command::new("curl");
    c.args(["-fsS", "-X", method, "-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        c.args(["--data", &b.to_string()]);
    }
    c.arg(format!("{}{path}", env("STACK_CONNECT_URL")))
        .output()
        .expect("run curl")
}

/// The source offset Connect has committed for `connector` (Debezium's
/// `{"lsn": …, "txId": …, …}` for PostgreSQL), or `None` before the first
/// commit. Connect commits a source record's offset only once that record
/// and every one the task produced before it are acknowledged by Kafka, so
/// an offset at or past a record's means everything up to it is in Kafka.
pub fn committed_source_offset(connector: &str) -> Option<Value> {
    let out = rest("GET", &format!("/connectors/{connector}/offsets"), None);
    assert!(
        out.status.success(),
        "offsets of {connector}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["offsets"]
        .as_array()
        .and_then(|o| o.first())
        .map(|o| o["offset"].clone())
}
