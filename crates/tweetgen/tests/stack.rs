//! Integration tests against the real PostgreSQL of the local stack
//! (`tests/stack.sh up`). With the stack down they fail, saying so.
#![cfg(feature = "stack-tests")]

use std::process::Command;
use std::time::Duration;

use tokio::sync::watch;
use tweetgen::config::Config;
use tweetgen::workload::{Limits, run};

/// The restart test takes this exclusively; the others share it, so that
/// none of them is cut off by a restart it does not expect.
static STACK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. These tests need the local stack: run `tests/run.sh`, \
             or `tests/stack.sh up && eval \"$(tests/stack.sh env)\"` first"
        )
    })
}

fn config() -> Config {
    // Reads TWEETGEN_DATABASE__* from the environment, as the binary does.
    env("TWEETGEN_DATABASE__PASSWORD");
    let mut c = Config::from_figment(Config::figment(None)).unwrap();
    c.workload.interval_ms = 100;
    c.workload.tweet_deletes = 2;
    c
}

/// Superuser connection over the stack's private unix socket.
async fn superuser() -> tokio_postgres::Client {
    let conn = format!(
        "host={} port={} dbname=twitter user=postgres",
        env("STACK_PG_SUPERUSER_SOCKET"),
        env("TWEETGEN_DATABASE__PORT")
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL of the local stack is not reachable (tests/stack.sh up)");
    tokio::spawn(connection);
    client
}

/// (inserts, updates, deletes) so far, per table, from PostgreSQL's own
/// statistics.
async fn activity(c: &tokio_postgres::Client) -> Vec<(String, i64, i64, i64)> {
    // Statistics are sent by backends asynchronously; ask for a fresh view.
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    c.query(
        "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables \
         WHERE relname IN ('users', 'tweets', 'likes') ORDER BY relname",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

fn no_stop() -> watch::Receiver<bool> {
    // The sender is leaked on purpose: dropping it would read as "stop".
    let (tx, rx) = watch::channel(false);
    std::mem::forget(tx);
    rx
}

#[tokio::test]
async fn schema_applies_twice() {
    let _shared = STACK.read().await;
    let c = superuser().await;
    for _ in 0..2 {
        for f in ["001_schema.sql", "002_grants.sql", "003_publication.sql"] {
            let path = format!("{}/../../db/{f}", env!("CARGO_MANIFEST_DIR"));
            let sql = std::fs::read_to_string(&path).unwrap();
            c.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{f} failed on re-apply: {e}"));
        }
    }
    let pubtables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'twitter_cdc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubtables, 3);
}

#[tokio::test]
async fn bounded_run_inserts_updates_and_deletes_with_valid_keys() {
    let _shared = STACK.read().await;
    let su = superuser().await;
    let before = activity(&su).await;
    let summary = run(
        &config(),
        Limits {
            batches: Some(6),
            duration: None,
        },
        None,
        no_stop(),
    )
    .await
    .unwrap();
    assert_eq!(summary.batches, 6);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = activity(&su).await;
    let delta = |i: usize, f: fn(&(String, i64, i64, i64)) -> i64| f(&after[i]) - f(&before[i]);
    // Rows are ordered likes, tweets, users.
    assert!(
        delta(2, |r| r.1) >= 6,
        "users inserted: {before:?} -> {after:?}"
    );
    assert!(delta(1, |r| r.1) >= 30, "tweets inserted");
    assert!(delta(0, |r| r.1) > 0, "likes inserted");
    assert!(delta(1, |r| r.2) > 0, "tweets updated");
    assert!(delta(2, |r| r.2) > 0, "users updated");
    assert!(delta(1, |r| r.3) > 0, "tweets deleted");

    let orphans: i64 = su
        .query_one(
            "SELECT (SELECT count(*) FROM tweets t LEFT JOIN users u ON u.id = t.user_id WHERE u.id IS NULL) \
                  + (SELECT count(*) FROM tweets t LEFT JOIN tweets p ON p.id = t.reply_to_id \
                     WHERE t.reply_to_id IS NOT NULL AND p.id IS NULL) \
                  + (SELECT count(*) FROM likes l LEFT JOIN tweets t ON t.id = l.tweet_id WHERE t.id IS NULL)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "every foreign key points at a row");
    let (replies, tagged, toasted): (i64, i64, i64) = {
        let r = su
            .query_one(
                "SELECT (SELECT count(*) FROM tweets WHERE reply_to_id IS NOT NULL), \
                        (SELECT count(*) FROM tweets WHERE cardinality(hashtags) > 0), \
                        (SELECT count(*) FROM users WHERE length(bio) > 2000)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(
        replies > 0 && tagged > 0 && toasted > 0,
        "{replies} {tagged} {toasted}"
    );
}

#[tokio::test]
async fn survives_a_postgres_restart_mid_run() {
    let _exclusive = STACK.write().await;
    let cfg = config();
    let handle = tokio::spawn(async move {
        let mut cfg = cfg;
        cfg.workload.interval_ms = 200;
        run(
            &cfg,
            Limits {
                batches: Some(25),
                duration: None,
            },
            None,
            no_stop(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data = format!("{}/postgres", env("STACK_STATE"));
    let pg_ctl = "/usr/lib/postgresql/15/bin/pg_ctl";
    let status = if running_as_root() {
        Command::new("runuser")
            .args([
                "-u", "postgres", "--", pg_ctl, "-D", &data, "-m", "fast", "-w", "restart",
            ])
            .stdout(std::process::Stdio::null())
            .status()
    } else {
        Command::new(pg_ctl)
            .args(["-D", &data, "-m", "fast", "-w", "restart"])
            .stdout(std::process::Stdio::null())
            .status()
    }
    .unwrap();
    assert!(status.success(), "pg_ctl restart failed");
    let summary = tokio::time::timeout(Duration::from_secs(90), handle)
        .await
        .expect("generator finished after the restart")
        .unwrap()
        .expect("generator survived the restart");
    assert_eq!(summary.batches, 25, "every batch committed exactly once");
    assert!(
        summary.reconnects >= 1,
        "the restart was noticed: {summary:?}"
    );
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[test]
fn bad_config_names_the_key() {
    let _shared = STACK.blocking_read();
    let out = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .arg("--check-config")
        .env("TWEETGEN_WORKLOAD__NEW_USERS", "plenty")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("workload.new_users"), "{err}");
}

#[test]
fn wrong_password_is_a_clear_error_and_never_logged() {
    let _shared = STACK.blocking_read();
    let out = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .args(["--batches", "1"])
        .env("TWEETGEN_DATABASE__HOST", env("TWEETGEN_DATABASE__HOST"))
        .env("TWEETGEN_DATABASE__PORT", env("TWEETGEN_DATABASE__PORT"))
        .env("TWEETGEN_DATABASE__PASSWORD", "definitely-wrong-pw")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("rejected the credentials of user `tweetgen`"),
        "{all}"
    );
    assert!(
        !all.contains("definitely-wrong-pw"),
        "password leaked: {all}"
    );
}

#[test]
fn unreachable_database_is_retried_then_a_clear_error() {
    let _shared = STACK.blocking_read();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .args(["--batches", "1", "--port", "1"])
        .env("TWEETGEN_DATABASE__CONNECT_TIMEOUT_SECS", "3")
        .env("TWEETGEN_DATABASE__PASSWORD", "irrelevant")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "gave up before the deadline"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PostgreSQL unreachable, retrying"), "{err}");
    assert!(err.contains("still unreachable after 3s"), "{err}");
}
