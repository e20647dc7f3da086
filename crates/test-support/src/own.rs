//! A capture of a test's own, beside the stack's: a PostgreSQL 15 on a
//! free port ([`OwnPostgres`], with settings the test chooses, such as a
//! small `max_slot_wal_keep_size`), a Debezium connector for it on the
//! stack's Kafka Connect with its own slot, publication, signal table and
//! topics ([`OwnConnector`]), and a sink on its one topic ([`OwnSink`]).
//! A test can lose that slot, restart that connector or stop it without
//! touching the stack's own capture, which later tests rely on.
//!
//! The table is always `(id bigint PRIMARY KEY, name text, n integer)`, so
//! [`mirror_diff`] can compare its current-state table with PostgreSQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::connect::rest;
use crate::stack::{env, repo_root, unique};
use crate::wait::wait_until;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL 15 of the test's own, on a free port, its socket in its
/// data directory. Stopped and removed on drop.
pub struct OwnPostgres {
    dir: PathBuf,
    pub port: u16,
}

fn as_postgres(cmd: &str) -> Command {
    // PostgreSQL refuses to run as root, which the CI runner is.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", cmd]);
        c
    } else {
        Command::new(cmd)
    };
    c.stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OwnPostgres {
    /// initdb and start, logical decoding on, `max_slot_wal_keep_size` as
    /// given (`"-1"`: unlimited).
    pub fn start(max_slot_wal_keep_size: &str) -> OwnPostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("own-pg-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        let mut init = as_postgres(&format!("{PG_BIN}/initdb"));
        init.args(["-D", data.to_str().unwrap(), "-U", "postgres"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["-E", "UTF8"]);
        run_ok(init, "initdb");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n\
             max_slot_wal_keep_size = '{max_slot_wal_keep_size}'\nmax_wal_size = '256MB'\nfsync = off\n",
            dir.display()
        );
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&conf);
        std::fs::write(&auto, text).unwrap();
        let mut start = as_postgres(&format!("{PG_BIN}/pg_ctl"));
        start
            .args(["-D", data.to_str().unwrap(), "-w", "-t", "60", "-l"])
            .arg(dir.join("log").to_str().unwrap())
            .arg("start");
        run_ok(start, "pg_ctl start");
        OwnPostgres { dir, port }
    }

    /// The superuser in database `postgres`, over the unix socket.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host={} port={} dbname=postgres user=postgres",
                self.dir.display(),
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("the test's own PostgreSQL");
        tokio::spawn(conn);
        client
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let mut stop = as_postgres(&format!("{PG_BIN}/pg_ctl"));
        stop.args(["-D", self.dir.join("data").to_str().unwrap()])
            .args(["-m", "immediate", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A connector of the test's own and the names of everything it uses.
pub struct OwnConnector {
    /// The captured table, in database `postgres`.
    pub table: String,
    pub signal: String,
    /// The slot, and the publication of the same name.
    pub slot: String,
    pub name: String,
    pub topic_prefix: String,
    /// The sink's output prefix.
    pub lake_prefix: String,
}

impl OwnConnector {
    /// Names for a capture of `table` (a plain identifier).
    pub fn new(table: &str) -> OwnConnector {
        let run = unique();
        let dashed = table.replace('_', "-");
        OwnConnector {
            table: table.to_string(),
            signal: format!("{table}_signal"),
            slot: format!("{table}_{run}"),
            name: format!("{dashed}-{run}"),
            topic_prefix: format!("{}{run}", table.replace('_', "")),
            lake_prefix: format!("{dashed}-{run}"),
        }
    }

    pub fn topic(&self) -> String {
        format!("{}.{}", self.topic_prefix, self.table)
    }

    /// The role `debezium` (the stack's password, which Connect's worker
    /// resolves for every connector), the table with `rows` rows, the
    /// signal table and the publication, in `pg`'s database.
    pub async fn create_objects(&self, pg: &tokio_postgres::Client, rows: i64) {
        let (t, sig) = (&self.table, &self.signal);
        pg.batch_execute(&format!(
            "CREATE ROLE debezium LOGIN REPLICATION PASSWORD '{pw}';
             CREATE TABLE {t} (id bigint PRIMARY KEY, name text NOT NULL, n integer NOT NULL);
             INSERT INTO {t} SELECT g, 'row ' || g, 0 FROM generate_series(1, {rows}) g;
             CREATE TABLE {sig} (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data text);
             GRANT SELECT ON {t} TO debezium;
             GRANT SELECT, INSERT, DELETE ON {sig} TO debezium;
             CREATE PUBLICATION {slot} FOR TABLE {t}, {sig};",
            pw = env("CDC_SLOT_GUARD_DATABASE__PASSWORD"),
            slot = self.slot,
        ))
        .await
        .unwrap();
    }

    /// The repository's connector configuration, pointed at the test's
    /// PostgreSQL, slot, publication, signal table and topics, with
    /// `snapshot.mode` as given.
    pub fn config(&self, port: u16, snapshot_mode: &str) -> Value {
        let text =
            std::fs::read_to_string(repo_root().join("debezium/twitter-postgres.json")).unwrap();
        let mut c: Value = serde_json::from_str(&text).unwrap();
        let p = &self.topic_prefix;
        for (k, v) in [
            ("database.port", port.to_string()),
            ("database.dbname", "postgres".to_string()),
            ("slot.name", self.slot.clone()),
            ("publication.name", self.slot.clone()),
            ("snapshot.mode", snapshot_mode.to_string()),
            ("topic.prefix", p.clone()),
            ("table.include.list", format!("public.{}", self.table)),
            ("signal.data.collection", format!("public.{}", self.signal)),
            ("transforms.route.regex", format!("{p}\\.public\\.(.*)")),
            ("transforms.route.replacement", format!("{p}.$1")),
            (
                "predicates.isSignal.pattern",
                format!("{p}\\.public\\.{}", self.signal),
            ),
            (
                "value.converter.schema.bootstrap.servers",
                env("CDC_SINK_KAFKA__BROKERS"),
            ),
            ("heartbeat.interval.ms", "1000".to_string()),
        ] {
            c[k] = Value::String(v);
        }
        c
    }

    /// Registers (or reconfigures) the connector.
    pub fn register(&self, config: &Value) {
        let put = rest(
            "PUT",
            &format!("/connectors/{}/config", self.name),
            Some(config),
        );
        assert!(
            put.status.success(),
            "registering connector {}: {}",
            self.name,
            String::from_utf8_lossy(&put.stderr)
        );
    }

    /// `PUT /connectors/NAME/<action>` (stop, resume) or
    /// `POST .../restart?includeTasks=true` for "restart".
    pub fn act(&self, action: &str) {
        let out = match action {
            "restart" => rest(
                "POST",
                &format!("/connectors/{}/restart?includeTasks=true", self.name),
                None,
            ),
            _ => rest("PUT", &format!("/connectors/{}/{action}", self.name), None),
        };
        assert!(
            out.status.success(),
            "{action} connector {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The connector's state and its tasks' states.
    pub fn state(&self) -> (String, Vec<String>) {
        let out = rest("GET", &format!("/connectors/{}/status", self.name), None);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let tasks = v["tasks"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|t| t["state"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        (
            v["connector"]["state"].as_str().unwrap_or("").to_string(),
            tasks,
        )
    }

    /// Waits for RUNNING (the connector and every task run) or STOPPED (no
    /// task left, so nothing reads the slot).
    pub async fn wait(&self, want: &str) {
        wait_until(
            &format!("connector {} to be {want}", self.name),
            Duration::from_secs(120),
            async || {
                let (connector, tasks) = self.state();
                let ok = connector == want
                    && match want {
                        "STOPPED" => tasks.is_empty(),
                        _ => !tasks.is_empty() && tasks.iter().all(|t| t == want),
                    };
                if ok {
                    Ok(())
                } else {
                    Err(format!("connector {connector}, tasks {tasks:?}"))
                }
            },
        )
        .await;
    }

    /// The connector's configuration as Connect has it now.
    pub fn current_config(&self) -> Value {
        self.try_current_config().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`OwnConnector::current_config`], or why Connect did not answer:
    /// while a reconfiguration rebalances its workers, Connect answers
    /// 500 for a moment, which a probe waits out.
    pub fn try_current_config(&self) -> Result<Value, String> {
        let out = rest("GET", &format!("/connectors/{}/config", self.name), None);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Deletes the connector and its topics (the table's and Debezium's
    /// heartbeats), whatever state the test left them in.
    pub async fn delete(&self) {
        let _ = rest("DELETE", &format!("/connectors/{}", self.name), None);
        let heartbeats = format!("__debezium-heartbeat.{}", self.topic_prefix);
        let _ = crate::kafka::admin()
            .delete_topics(
                &[&self.topic(), &heartbeats],
                &rdkafka::admin::AdminOptions::new(),
            )
            .await;
    }
}

/// The sink binary (`bin`) on the connector's one topic, killed on drop.
pub struct OwnSink(Option<Child>);

impl OwnSink {
    pub fn spawn(bin: &str, c: &OwnConnector) -> OwnSink {
        OwnSink(Some(
            Command::new(bin)
                .env("CDC_SINK_OUTPUT__PREFIX", &c.lake_prefix)
                .env("CDC_SINK_KAFKA__GROUP_ID", &c.name)
                .env("CDC_SINK_KAFKA__TOPICS", format!("[\"{}\"]", c.topic()))
                .env("CDC_SINK_FLUSH__MAX_AGE_MS", "2000")
                .env("CDC_SINK_METRICS__LISTEN", "")
                .stdin(Stdio::null())
                .spawn()
                .expect("start cdc-sink"),
        ))
    }
}

impl Drop for OwnSink {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How the current-state table of the connector's table differs from
/// `pg`'s rows (same keys, every column), if it does, read with the
/// `deltalake` package; `Err` too while there is no table yet.
pub async fn mirror_diff(pg: &tokio_postgres::Client, c: &OwnConnector) -> Result<(), String> {
    if !crate::lake::table_exists(&c.lake_prefix, &c.table, true) {
        return Err("no current-state table yet".to_string());
    }
    let want: BTreeMap<String, (String, String)> = pg
        .query(
            &format!("SELECT id::text, name, n::text FROM {}", c.table),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut got = BTreeMap::new();
    for r in crate::lake::mirror_rows("deltalake", &c.lake_prefix, &c.table) {
        let v = |col: &str| r.values[col].clone().unwrap_or_default();
        if got.insert(v("id"), (v("name"), v("n"))).is_some() {
            return Err(format!("key {} twice", v("id")));
        }
    }
    if got == want {
        return Ok(());
    }
    let differ = want
        .iter()
        .find(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("key {k}: PostgreSQL {v:?}, mirror {:?}", got.get(k)));
    Err(format!(
        "{} rows in the mirror, {} in PostgreSQL; first difference: {differ:?}",
        got.len(),
        want.len()
    ))
}
