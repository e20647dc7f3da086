//! The lake read back by independent readers: `tests/lake_read.py`, with
//! the `deltalake` Python package and DuckDB's delta extension, never the
//! sink's own code. Both read only through the Delta log, so files a
//! crashed attempt left behind are not seen. S3 settings come from the
//! `CDC_SINK_S3__*` variables of the stack's environment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use crate::stack::repo_root;

/// The readers' python (with `deltalake`, `duckdb` and `prometheus-client`):
/// `CDC_LAKE_READERS_PYTHON`, else what `tests/readers.sh` installs (once
/// per test binary; the script itself skips an install already done).
pub fn readers_python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        if let Ok(python) = std::env::var("CDC_LAKE_READERS_PYTHON") {
            return python;
        }
        let out = Command::new("bash")
            .arg(repo_script("readers.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/readers.sh");
        assert!(out.status.success(), "installing the lake readers failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// `tests/<name>` of the repository.
pub fn repo_script(name: &str) -> PathBuf {
    repo_root().join("tests").join(name)
}

/// `tests/lake_read.py ARGS...`: one JSON value per output line.
pub fn lake_read(args: &[&str]) -> Vec<Value> {
    let out = Command::new(readers_python())
        .arg(repo_script("lake_read.py"))
        .args(args)
        .output()
        .expect("run tests/lake_read.py");
    assert!(
        out.status.success(),
        "lake_read.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The primary key columns of a table of the demo schema (`db/001_schema.sql`);
/// `id` for any other table (the tests' own tables have it).
pub fn primary_key(table: &str) -> &'static [&'static str] {
    match table {
        "likes" => &["user_id", "tweet_id"],
        "follows" => &["follower_id", "followee_id"],
        _ => &["id"],
    }
}

/// One change row, read back through the Delta log (`lake_read.py rows`).
/// Every value is canonical text, the form the tests compare with
/// PostgreSQL's.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LakeRow {
    pub table: String,
    pub values: BTreeMap<String, Option<String>>,
    pub op: String,
    pub lsn: Option<i64>,
    pub partition: i32,
    pub offset: i64,
    /// Columns that arrived as Debezium's unchanged-TOAST placeholder.
    pub unchanged: Vec<String>,
    /// `_cdc_key_update`: on either half of a primary-key update, the
    /// other half's key.
    #[serde(default)]
    pub key_update: Option<String>,
}

impl LakeRow {
    /// The row's key as the lake writes it: "1", or "3,17" for two columns.
    pub fn key(&self) -> String {
        primary_key(&self.table)
            .iter()
            .map(|k| self.values[*k].clone().expect("key column set"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every change row of `tables` under `prefix`, as `reader` ("deltalake"
/// or "duckdb") sees them.
pub fn lake_rows(reader: &str, prefix: &str, tables: &[&str]) -> Vec<LakeRow> {
    let mut args = vec!["rows", "--reader", reader, "--prefix", prefix];
    args.extend(tables);
    lake_read(&args)
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

/// Each column of `table` and its Arrow type as the `deltalake` reader
/// sees it (`lake_read.py schema`).
pub fn lake_schema(prefix: &str, table: &str) -> BTreeMap<String, String> {
    let out = lake_read(&["schema", "--prefix", prefix, table]);
    serde_json::from_value(out[0]["fields"].clone()).unwrap()
}

/// The latest state of each key of `table`, by key, as the shipped query
/// computes it in DuckDB (`lake_read.py latest`).
pub fn latest_by_query(
    prefix: &str,
    table: &str,
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut args = vec!["latest", "--prefix", prefix];
    for k in primary_key(table) {
        args.extend(["--key", k]);
    }
    args.push(table);
    lake_read(&args)
        .into_iter()
        .map(|v| {
            let row: BTreeMap<String, Option<String>> = serde_json::from_value(v).unwrap();
            let key = primary_key(table)
                .iter()
                .map(|k| row[*k].clone().expect("key column set"))
                .collect::<Vec<_>>()
                .join(",");
            (key, row)
        })
        .collect()
}

/// The files a table's log holds, the `txn` version of each app id, and
/// the table's properties.
#[derive(Debug)]
pub struct TableState {
    pub files: BTreeSet<String>,
    pub txn: BTreeMap<String, Option<i64>>,
    pub configuration: BTreeMap<String, String>,
}

/// `lake_read.py state` of `table`, with the `txn` versions of `app_ids`.
pub fn table_state(prefix: &str, table: &str, app_ids: &[String]) -> TableState {
    let mut args = vec!["state", "--prefix", prefix];
    for a in app_ids {
        args.extend(["--app-id", a.as_str()]);
    }
    args.push(table);
    let v = lake_read(&args).remove(0);
    TableState {
        files: v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect(),
        txn: serde_json::from_value(v["txn"].clone()).unwrap(),
        configuration: serde_json::from_value(v["configuration"].clone()).unwrap(),
    }
}

/// Whether `table` under `prefix` (with `mirror`, its current-state
/// table) has a Delta log yet (`lake_read.py exists`).
pub fn table_exists(prefix: &str, table: &str, mirror: bool) -> bool {
    let mut args = vec!["exists", "--prefix", prefix, table];
    if mirror {
        args.push("--mirror");
    }
    lake_read(&args)[0].as_bool().unwrap()
}

/// One row of a current-state table, as a reader sees it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MirrorRow {
    pub table: String,
    /// The table's columns, without `_cdc_*`, as canonical text.
    pub values: BTreeMap<String, Option<String>>,
    pub lsn: Option<i64>,
}

impl MirrorRow {
    /// The row's key as the lake writes it: "1", or "3,17" for two columns.
    pub fn key(&self) -> String {
        primary_key(&self.table)
            .iter()
            .map(|k| self.values[*k].clone().expect("key column set"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every row of the current-state table of `table` under `prefix`, as
/// `reader` ("deltalake", "duckdb" or "polars") sees it, opened with no
/// options (`lake_read.py table`).
pub fn mirror_rows(reader: &str, prefix: &str, table: &str) -> Vec<MirrorRow> {
    lake_read(&["table", "--reader", reader, "--prefix", prefix, table])
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}
