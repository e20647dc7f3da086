//! The generator's metrics, health and systemd notifications, against the
//! real PostgreSQL of the local stack (`tests/stack.sh up`).
//!
//! The binary runs with its endpoint on an ephemeral port. What `/metrics`
//! says, read by the Prometheus client library's own parser
//! (`tests/prom_parse.py`), must equal what the database committed: an audit
//! trigger in the test's database records every row the generator's own
//! statements changed, in the same transaction, so it holds exactly the
//! committed ones. The counters are compared while the generator is held
//! still: the test locks the ledger table, and the generator's next
//! transaction waits at its first statement with everything before it
//! committed and counted.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::pg::{TestDb, count};
use test_support::prom::Scrape;
use test_support::{http, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Records each row a client statement of `tweetgen` changes.
///
/// Inserts are the generator's alone, and an AFTER INSERT trigger fires only
/// for rows stored (not for those `ON CONFLICT DO NOTHING` skipped).
/// Updates and deletes are also PostgreSQL's doing on its behalf (foreign
/// key cascades and `SET NULL`, the follower-count trigger), which the
/// generator does not count. Those run as queries inside a trigger, so the
/// BEFORE ROW triggers of their rows fire at `pg_trigger_depth()` 2, while a
/// client statement's fire at 1. (AFTER ROW triggers cannot tell: a foreign
/// key queues its cascade's AFTER triggers on the client statement's level.)
const AUDIT: &str = "
CREATE TABLE metrics_audit (tbl text NOT NULL, op text NOT NULL);
CREATE FUNCTION metrics_audit() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  IF session_user = 'tweetgen' AND (TG_OP = 'INSERT' OR pg_trigger_depth() = 1) THEN
    INSERT INTO metrics_audit VALUES (TG_TABLE_NAME, lower(TG_OP));
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END $$;
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['users', 'tweets', 'likes', 'follows'] LOOP
    EXECUTE format('CREATE TRIGGER metrics_audit_insert AFTER INSERT ON %I
      FOR EACH ROW EXECUTE FUNCTION metrics_audit()', t);
    EXECUTE format('CREATE TRIGGER metrics_audit_change BEFORE UPDATE OR DELETE ON %I
      FOR EACH ROW EXECUTE FUNCTION metrics_audit()', t);
  END LOOP;
END $$;
";

/// A brand-new database `tweetgen_test_<name>` with the project's schema,
/// grants and the audit trigger; returns a superuser connection to it.
async fn fresh_db(name: &str) -> (String, tokio_postgres::Client) {
    let TestDb { name: db, su } = test_support::pg::fresh_db(name).await;
    su.batch_execute(AUDIT).await.unwrap();
    (db, su)
}

/// The `tweetgen` binary, with its endpoint on an ephemeral port.
struct Generator {
    child: Child,
    addr: SocketAddr,
    /// Everything it logged so far, for failure messages.
    log: Arc<Mutex<String>>,
}

impl Generator {
    async fn start(args: &[&str], envs: &[(&str, &str)]) -> Generator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
            .args(args)
            .env("TWEETGEN_METRICS__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                // "serving /metrics, /healthz and /readyz on http://127.0.0.1:PORT"
                if let Some((_, url)) = line.split_once("/readyz on http://")
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(url.trim().parse::<SocketAddr>().unwrap());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx)
            .await
            .unwrap_or_else(|_| panic!("no endpoint address logged:\n{}", log.lock().unwrap()))
            .unwrap_or_else(|_| panic!("exited before serving:\n{}", log.lock().unwrap()));
        Generator { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// One GET to its endpoint: status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        let reply = http::get(self.addr, path).await;
        (reply.status, reply.body)
    }

    /// Waits until `/readyz` says 200.
    async fn wait_ready(&self) {
        let body = test_support::wait::try_wait_until(
            "/readyz to answer 200",
            Duration::from_secs(30),
            async || match self.get("/readyz").await {
                (200, body) => Ok(body),
                (status, body) => Err(format!("{status} {body}")),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("never ready: {e}\n{}", self.log()));
        assert_eq!(body, "ready");
    }

    async fn scrape(&self) -> Scrape {
        test_support::prom::scrape(self.addr).await
    }

    /// SIGTERM, then the exit status: the generator finishes its batch and
    /// exits 0.
    async fn terminate(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exited after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}\n{}", self.log());
    }
}

const ROW_SERIES: [(&str, &str); 10] = [
    ("users", "insert"),
    ("users", "update"),
    ("users", "delete"),
    ("tweets", "insert"),
    ("tweets", "update"),
    ("tweets", "delete"),
    ("likes", "insert"),
    ("likes", "delete"),
    ("follows", "insert"),
    ("follows", "delete"),
];

async fn wait_for_ledger(su: &tokio_postgres::Client, rows: i64, g: &Generator) {
    test_support::wait::try_wait_until(
        &format!("{rows} batches in the ledger"),
        Duration::from_secs(60),
        async || match count(su, "SELECT count(*) FROM tweetgen_batches").await {
            n if n >= rows => Ok(()),
            n => Err(format!("{n} batches")),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", g.log()));
}

/// Locks the ledger in `tx` and waits until the generator's transaction
/// waits for it: from then on nothing commits and every counter is settled.
/// Returns the generator's backend pid.
async fn hold_still(tx: &tokio_postgres::Transaction<'_>, db: &str) -> i32 {
    tx.batch_execute("LOCK TABLE tweetgen_batches IN EXCLUSIVE MODE")
        .await
        .unwrap();
    wait_until(
        "the generator to wait for the ledger's lock",
        Duration::from_secs(30),
        async || {
            let waiting = tx
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                     AND application_name = 'tweetgen' AND wait_event_type = 'Lock'",
                    &[&db],
                )
                .await
                .unwrap();
            waiting.map(|row| row.get::<_, i32>(0)).ok_or("not waiting")
        },
    )
    .await
}

/// Every metric of the contract against the database, as seen from `tx`.
async fn assert_metrics_match(
    tx: &tokio_postgres::Transaction<'_>,
    m: &Scrape,
    reconnects: f64,
    retries: f64,
) {
    let batches = count(tx, "SELECT count(*) FROM tweetgen_batches").await as f64;
    assert_eq!(m.kind("tweetgen_batches_total"), "counter");
    assert_eq!(m.value("tweetgen_batches_total", &[]), batches);

    let audit: BTreeMap<(String, String), f64> = tx
        .query(
            "SELECT tbl, op, count(*) FROM metrics_audit GROUP BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as f64))
        .collect();
    for (table, op) in audit.keys() {
        assert!(
            ROW_SERIES.contains(&(table.as_str(), op.as_str())),
            "the generator wrote {table}/{op}, which has no series"
        );
    }
    assert_eq!(m.kind("tweetgen_rows_total"), "counter");
    for (table, op) in ROW_SERIES {
        let committed = audit
            .get(&(table.to_string(), op.to_string()))
            .copied()
            .unwrap_or(0.0);
        let counted = m.value("tweetgen_rows_total", &[("table", table), ("op", op)]);
        assert_eq!(
            counted, committed,
            "tweetgen_rows_total{{table={table},op={op}}}: {counted}, committed {committed}"
        );
    }

    // Every batch here committed with its answer heard, so each has a
    // BEGIN..COMMIT duration.
    let h = "tweetgen_transaction_duration_seconds";
    assert_eq!(m.kind(&format!("{h}_count")), "histogram");
    assert_eq!(m.value(&format!("{h}_count"), &[]), batches);
    assert_eq!(m.value(&format!("{h}_bucket"), &[("le", "+Inf")]), batches);
    assert!(m.value(&format!("{h}_bucket"), &[("le", "60")]) <= batches);
    assert!(m.value(&format!("{h}_sum"), &[]) > 0.0);

    assert_eq!(m.value("tweetgen_reconnects_total", &[]), reconnects);
    assert_eq!(m.value("tweetgen_retries_total", &[]), retries);
}

/// Batches of the default mix, a lost connection in the middle, and a
/// concurrent writer that makes planned deletes find nothing: every counter
/// equals what committed, twice.
#[tokio::test]
async fn metrics_equal_what_postgres_committed() {
    let (db, mut su) = fresh_db("tel_metrics").await;
    let g = Generator::start(
        &["--dbname", &db, "--interval", "20ms", "--seed", "3"],
        &[("TWEETGEN_WORKLOAD__NEW_USERS", "10")],
    )
    .await;
    assert_eq!(g.get("/healthz").await, (200, "ok".to_string()));
    g.wait_ready().await;
    wait_for_ledger(&su, 12, &g).await;

    // While it runs: held between two batches.
    let tx = su.transaction().await.unwrap();
    let pid = hold_still(&tx, &db).await;
    let m = g.scrape().await;
    assert_metrics_match(&tx, &m, 0.0, 0.0).await;
    assert!(
        m.value(
            "tweetgen_rows_total",
            &[("table", "likes"), ("op", "insert")]
        ) > 0.0
    );
    assert!(
        m.value(
            "tweetgen_rows_total",
            &[("table", "users"), ("op", "delete")]
        ) > 0.0
    );
    assert_eq!(g.get("/readyz").await, (200, "ready".to_string()));

    // The batch that waits is planned. Its likes and those the generator
    // remembers vanish under it (so its unlikes, and later ones, delete
    // nothing), and its connection is cut (so it is written again).
    tx.batch_execute("DELETE FROM likes").await.unwrap();
    tx.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let before = count(&tx, "SELECT count(*) FROM tweetgen_batches").await;
    tx.commit().await.unwrap();

    wait_for_ledger(&su, before + 5, &g).await;
    g.wait_ready().await;
    let tx = su.transaction().await.unwrap();
    hold_still(&tx, &db).await;
    let m = g.scrape().await;
    assert_metrics_match(&tx, &m, 1.0, 1.0).await;
    assert_eq!(g.get("/readyz").await, (200, "ready".to_string()));
    tx.rollback().await.unwrap();
    g.terminate().await;
}

/// Load mode counts its chunks and their rows the same way.
#[tokio::test]
async fn load_mode_metrics_equal_what_postgres_committed() {
    let (db, mut su) = fresh_db("tel_load").await;
    let g = Generator::start(
        &["--dbname", &db, "--rate", "0", "--seed", "4"],
        &[("TWEETGEN_LOAD__CHUNK_ROWS", "400")],
    )
    .await;
    wait_for_ledger(&su, 4, &g).await;
    let tx = su.transaction().await.unwrap();
    hold_still(&tx, &db).await;
    let m = g.scrape().await;
    assert_metrics_match(&tx, &m, 0.0, 0.0).await;
    assert!(
        m.value(
            "tweetgen_rows_total",
            &[("table", "tweets"), ("op", "insert")]
        ) > 0.0
    );
    tx.rollback().await.unwrap();
    g.terminate().await;
}

/// Before the first connection the endpoint already answers, and says why
/// it is not ready.
#[tokio::test]
async fn readyz_says_why_before_connecting() {
    let g = Generator::start(
        &["--port", "1", "--batches", "1"],
        &[
            ("TWEETGEN_DATABASE__CONNECT_TIMEOUT_SECS", "10"),
            ("TWEETGEN_DATABASE__PASSWORD", "irrelevant"),
        ],
    )
    .await;
    assert_eq!(g.get("/healthz").await, (200, "ok".to_string()));
    assert_eq!(
        g.get("/readyz").await,
        (503, "connecting to PostgreSQL".to_string())
    );
    let m = g.scrape().await;
    assert_eq!(m.value("tweetgen_batches_total", &[]), 0.0);
}

#[tokio::test]
async fn bad_or_busy_listen_address_names_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .arg("--check-config")
        .env("TWEETGEN_METRICS__LISTEN", "localhost:9465")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`metrics.listen`"), "{err}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .args(["--batches", "1"])
        .env("TWEETGEN_METRICS__LISTEN", &addr)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot serve `metrics.listen`") && err.contains(&addr),
        "{err}"
    );
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): READY=1 once connected,
/// then WATCHDOG=1 at least every half watchdog interval even though the
/// batch interval (60 s) is far longer.
#[tokio::test]
async fn notifies_systemd_ready_then_pings_the_watchdog_while_idle() {
    let (db, _su) = fresh_db("tel_notify").await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let g = Generator::start(
        &["--dbname", &db, "--interval", "60s"],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    )
    .await;
    let mut buf = vec![0u8; 512];
    let mut recv = async |within: Duration| {
        let n = tokio::time::timeout(within, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification within {within:?}"))
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(Duration::from_secs(30)).await, "READY=1\n");
    assert_eq!(g.get("/readyz").await, (200, "ready".to_string()));
    // The first batch runs at once, then the loop only waits. Every ping
    // must come within the 1 s bound (with scheduling slack).
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(recv(Duration::from_millis(1500)).await, "WATCHDOG=1\n");
        pings += 1;
    }
    assert!(pings >= 4, "{pings} pings in 4 s");
    g.terminate().await;
}

/// Writes are held while a replication slot of the generator's database is
/// close to being lost. The test gives its database a logical slot of its
/// own and sets the limit above what that slot can still take (its
/// `safe_wal_size` plus 1 GiB), so the generator must hold: it writes no
/// batch, says why, sets `tweetgen_throttled` and reports not ready;
/// SIGTERM still ends it cleanly. With the throttle off (0) the same
/// command writes its batches.
#[tokio::test]
async fn writes_are_held_while_a_slot_is_close_to_being_lost() {
    // A slot a failed run left behind would keep its database from being
    // dropped and made afresh.
    test_support::pg::superuser("twitter")
        .await
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE database = 'tweetgen_test_tel_throttle' AND NOT active",
        )
        .await
        .unwrap();
    let (db, su) = fresh_db("tel_throttle").await;
    let slot = format!("throttle_{}", test_support::unique());
    su.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .unwrap();
    let safe: Option<i64> = su
        .query_one(
            "SELECT safe_wal_size FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    let safe =
        safe.expect("the test's slot reports a safe_wal_size (max_slot_wal_keep_size is set)");
    let limit = (safe + (1 << 30)).to_string();
    let args = ["--dbname", &db, "--interval", "20ms", "--batches", "5"];

    let g = Generator::start(&args, &[("TWEETGEN_THROTTLE__MIN_SAFE_WAL_BYTES", &limit)]).await;
    wait_until(
        "tweetgen_throttled to be 1",
        Duration::from_secs(30),
        async || match g.scrape().await.value("tweetgen_throttled", &[]) {
            1.0 => Ok(()),
            v => Err(format!("{v}")),
        },
    )
    .await;
    assert!(g.log().contains("holding writes"), "{}", g.log());
    let (status, body) = g.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("holding writes"), "{body}");
    assert_eq!(count(&su, "SELECT count(*) FROM tweetgen_batches").await, 0);
    g.terminate().await;
    // The slot goes, so the same command is no longer held by it either.
    su.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();

    let g = Generator::start(&args, &[("TWEETGEN_THROTTLE__MIN_SAFE_WAL_BYTES", "0")]).await;
    wait_until(
        "the unthrottled generator to write its 5 batches",
        Duration::from_secs(60),
        async || match count(&su, "SELECT count(*) FROM tweetgen_batches").await {
            5 => Ok(()),
            n => Err(format!("{n} batches")),
        },
    )
    .await;
    drop(g);
}
