//! Integration tests against the real PostgreSQL of the local stack
//! (`tests/stack.sh up`). With the stack down they fail, saying so.
#![cfg(feature = "stack-tests")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use test_support::pg::{TestDb, count, fresh_db};
use test_support::{env, wait_until};
use tokio::sync::{mpsc, oneshot, watch};
use tweetgen::config::Config;
use tweetgen::db::{BeforeCommit, CommitHook, is_retryable};
use tweetgen::workload::{Limits, RunOptions, Summary, run, run_with};

/// The restart test takes this exclusively; the others share it, so that
/// none of them is cut off by a restart it does not expect.
static STACK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The metrics endpoint of a generator binary a test starts: several run at
/// once, and the default port may be a running pipeline's.
const ANY_PORT: &str = "127.0.0.1:0";

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
    test_support::pg::superuser("twitter").await
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
        for f in [
            "001_schema.sql",
            "002_grants.sql",
            "003_publication.sql",
            "004_signal.sql",
        ] {
            let path = format!("{}/../../db/{f}", env!("CARGO_MANIFEST_DIR"));
            let sql = std::fs::read_to_string(&path).unwrap();
            c.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{f} failed on re-apply: {e}"));
        }
    }
    // The captured tables and Debezium's signal table (db/capture.sh), once
    // each: re-applying the files adds none and drops none.
    let pubtables: Vec<String> = c
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'twitter_cdc'
              ORDER BY tablename",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        pubtables,
        ["cdc_signal", "follows", "likes", "tweets", "users"]
    );
}

/// Rows inserted and deleted per table since the database was created,
/// from PostgreSQL's statistics: cascades count as deletes.
#[derive(Debug, Clone, Copy)]
struct TableStats {
    inserted: i64,
    deleted: i64,
}

async fn stats(c: &tokio_postgres::Client) -> std::collections::BTreeMap<String, TableStats> {
    c.batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    c.query(
        "SELECT relname::text, n_tup_ins, n_tup_del FROM pg_stat_user_tables",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let stats = TableStats {
            inserted: r.get(1),
            deleted: r.get(2),
        };
        (r.get(0), stats)
    })
    .collect()
}

/// Users whose follower or following count disagrees with `follows`.
const COUNTS_OFF: &str = "SELECT count(*) FROM users u WHERE \
    followers_count <> (SELECT count(*) FROM follows WHERE followee_id = u.id) \
    OR following_count <> (SELECT count(*) FROM follows WHERE follower_id = u.id)";

/// N batches of the default mix (more users per batch, so that early
/// batches find enough unused pairs) in an empty database: exactly N ledger
/// rows and, per table, the inserts the mix implies. A batch only refers to
/// rows committed before it: batch 1 writes users only, batch 2 has no
/// tweets to like yet.
#[tokio::test]
async fn n_batches_write_n_ledger_rows_and_the_configured_rows() {
    let _shared = STACK.read().await;
    let TestDb { name: db, su } = fresh_db("counts").await;
    let mut cfg = config_for(&db, 3);
    cfg.workload.new_users = 20;
    let w = cfg.workload.clone();
    let n = 12i64;
    let summary = run(&cfg, batches(n as u64), None, no_stop()).await.unwrap();
    assert_eq!(
        ledger(&su, summary.run_id).await,
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(count(&su, "SELECT count(*) FROM tweetgen_batches").await, n);

    // The statistics are flushed by the generator's backend (at exit, or
    // now and then while it runs), all tables at once: once its backend is
    // gone and the ledger's inserts are all counted, so are the others.
    wait_until(
        "the generator's backend to exit and its statistics to be flushed",
        Duration::from_secs(30),
        async || {
            let backends = count(
                &su,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = '{db}' AND usename = 'tweetgen'"
                ),
            )
            .await;
            let ledger = stats(&su).await["tweetgen_batches"].inserted;
            if backends == 0 && ledger == n {
                Ok(())
            } else {
                Err(format!(
                    "{backends} backends, {ledger} ledger inserts counted"
                ))
            }
        },
    )
    .await;
    let stats = stats(&su).await;
    let inserted = |t: &str| stats[t].inserted;
    let per = |k: u32, batches: i64| i64::from(k) * batches;
    assert_eq!(inserted("users"), per(w.new_users, n));
    assert_eq!(inserted("tweets"), per(w.new_tweets, n - 1));
    assert_eq!(inserted("follows"), per(w.follows, n - 1));
    assert_eq!(inserted("likes"), per(w.likes, n - 2));
    let user_deletes = n / i64::from(w.user_delete_every);
    assert_eq!(stats["users"].deleted, user_deletes);
    for table in ["users", "tweets", "likes", "follows"] {
        let TableStats {
            inserted: ins,
            deleted: del,
        } = stats[table];
        let live = count(&su, &format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(live, ins - del, "{table}: {ins} inserted, {del} deleted");
    }
    // Unlikes and unfollows happened beyond what cascades removed.
    assert!(stats["likes"].deleted >= per(w.unlikes, n - 3));
    assert!(stats["follows"].deleted >= per(w.unfollows, n - 2));

    assert_eq!(
        count(&su, COUNTS_OFF).await,
        0,
        "counters agree with follows"
    );
    let orphans = count(
        &su,
        "SELECT (SELECT count(*) FROM tweets t LEFT JOIN users u ON u.id = t.user_id WHERE u.id IS NULL) \
              + (SELECT count(*) FROM tweets t LEFT JOIN tweets p ON p.id = t.reply_to_id \
                 WHERE t.reply_to_id IS NOT NULL AND p.id IS NULL) \
              + (SELECT count(*) FROM likes l LEFT JOIN tweets t ON t.id = l.tweet_id WHERE t.id IS NULL) \
              + (SELECT count(*) FROM follows f LEFT JOIN users u ON u.id = f.followee_id WHERE u.id IS NULL)",
    )
    .await;
    assert_eq!(orphans, 0, "every foreign key points at a row");
    for (what, sql) in [
        (
            "replies",
            "SELECT count(*) FROM tweets WHERE reply_to_id IS NOT NULL",
        ),
        (
            "thread posts",
            "SELECT count(*) FROM tweets t JOIN tweets p ON p.id = t.reply_to_id WHERE p.user_id = t.user_id",
        ),
        (
            "retweets",
            "SELECT count(*) FROM tweets WHERE retweet_of_id IS NOT NULL",
        ),
        (
            "quotes",
            "SELECT count(*) FROM tweets WHERE quote_of_id IS NOT NULL",
        ),
        (
            "hashtags",
            "SELECT count(*) FROM tweets WHERE cardinality(hashtags) > 0",
        ),
        (
            "edits",
            "SELECT count(*) FROM tweets WHERE edited_at IS NOT NULL OR like_count > 0",
        ),
        (
            "TOASTed bios",
            "SELECT count(*) FROM users WHERE length(bio) > 2000",
        ),
        (
            "geo tags",
            "SELECT count(*) FROM tweets WHERE latitude IS NOT NULL",
        ),
        ("languages", "SELECT count(DISTINCT lang) - 4 FROM tweets"),
    ] {
        assert!(count(&su, sql).await > 0, "no {what}");
    }
    // Text matches its tag: Japanese has kana, Arabic its script.
    let mislabelled = count(
        &su,
        "SELECT count(*) FROM tweets WHERE (lang = 'ja' AND body !~ '[ぁ-んァ-ン]') \
         OR (lang = 'ar' AND body !~ '[ء-ي]') OR body ~* 'lorem|ipsum'",
    )
    .await;
    assert_eq!(mislabelled, 0);
}

/// Two runs with one seed, each in an empty database, write identical rows,
/// ids included; another seed writes other rows.
#[tokio::test]
async fn same_seed_writes_identical_data() {
    let _shared = STACK.read().await;
    let mut dumps = Vec::new();
    for (name, seed) in [("seed_a", 21), ("seed_b", 21), ("seed_c", 22)] {
        let TestDb { name: db, su } = fresh_db(name).await;
        run_clean(&db, seed, 15).await;
        dumps.push(full_dump(&su).await);
    }
    assert!(dumps[0].len() > 300, "{} rows", dumps[0].len());
    assert!(dumps[0] == dumps[1], "same seed, different data");
    assert!(dumps[0] != dumps[2], "the seed has no effect");
}

/// Attention is heavy-tailed: the top 1 % of users receive at least 20 % of
/// all follows and of all likes (uniform choice would give them about 1 %).
#[tokio::test]
async fn the_top_percent_of_users_get_a_fifth_of_follows_and_likes() {
    let _shared = STACK.read().await;
    let TestDb { name: db, su } = fresh_db("heavy_tail").await;
    let mut cfg = config_for(&db, 5);
    cfg.workload.new_users = 30;
    cfg.workload.new_tweets = 40;
    cfg.workload.follows = 60;
    cfg.workload.likes = 80;
    run(&cfg, batches(40), None, no_stop()).await.unwrap();
    let users = count(&su, "SELECT count(*) FROM users").await;
    let top = (users / 100).max(1);
    for (what, per_user) in [
        (
            "follows",
            "SELECT followee_id AS u, count(*) AS n FROM follows GROUP BY 1",
        ),
        (
            "likes",
            "SELECT t.user_id AS u, count(*) AS n FROM likes l JOIN tweets t ON t.id = l.tweet_id GROUP BY 1",
        ),
    ] {
        let r = su
            .query_one(
                &format!(
                    "SELECT (SELECT coalesce(sum(n), 0) FROM (SELECT n FROM ({per_user}) x \
                     ORDER BY n DESC LIMIT $1) y)::float8 / sum(n)::float8, sum(n) FROM ({per_user}) z"
                ),
                &[&top],
            )
            .await
            .unwrap();
        let (share, total): (f64, rust_decimal::Decimal) = (r.get(0), r.get(1));
        assert!(
            share >= 0.2,
            "top {top} of {users} users receive {:.1} % of {total} {what}",
            share * 100.0
        );
    }
}

#[tokio::test]
async fn survives_a_postgres_restart_mid_run() {
    let _exclusive = STACK.write().await;
    let su = superuser().await;
    let ledger_rows = "SELECT count(*) FROM tweetgen_batches";
    let before = count(&su, ledger_rows).await;
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
    // Mid-run: some batches are in, most are still to come.
    wait_until(
        "the generator to commit 5 batches",
        Duration::from_secs(60),
        async || match count(&su, ledger_rows).await - before {
            n if n >= 5 => Ok(()),
            n => Err(format!("{n} batches")),
        },
    )
    .await;
    drop(su);
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
    let su = superuser().await;
    assert_eq!(
        ledger(&su, summary.run_id).await,
        (1..=25).collect::<Vec<i64>>(),
        "every batch committed exactly once, none skipped"
    );
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
        .env("TWEETGEN_METRICS__LISTEN", ANY_PORT)
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
        .env("TWEETGEN_METRICS__LISTEN", ANY_PORT)
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

/// The batch numbers of run `run_id` in the ledger, in order.
async fn ledger(c: &tokio_postgres::Client, run_id: i64) -> Vec<i64> {
    c.query(
        "SELECT batch_no FROM tweetgen_batches WHERE run_id = $1 ORDER BY batch_no",
        &[&run_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn config_for(db: &str, seed: u64) -> Config {
    let mut c = config();
    c.database.dbname = db.to_string();
    c.workload.interval_ms = 20;
    c.workload.seed = Some(seed);
    c
}

fn batches(n: u64) -> Limits {
    Limits {
        batches: Some(n),
        duration: None,
    }
}

/// Everything the workload wrote, row by row, without generated ids and
/// timestamps (ids of a retried batch differ: sequences do not roll back).
/// Rows refer to each other by username and tweet body instead.
async fn logical_dump(c: &tokio_postgres::Client) -> Vec<String> {
    let queries = [
        "SELECT 'user', username, display_name, email, bio, location, lang, verified::text, \
         followers_count::text, following_count::text, reputation::text FROM users",
        "SELECT 'tweet', u.username, t.body, t.lang, t.hashtags::text, t.mentions::text, \
         t.like_count::text, t.retweet_count::text, t.sensitive::text, t.latitude::text, \
         t.longitude::text, p.body, r.body, q.body FROM tweets t JOIN users u ON u.id = t.user_id \
         LEFT JOIN tweets p ON p.id = t.reply_to_id LEFT JOIN tweets r ON r.id = t.retweet_of_id \
         LEFT JOIN tweets q ON q.id = t.quote_of_id",
        "SELECT 'like', u.username, t.body FROM likes l JOIN users u ON u.id = l.user_id \
         JOIN tweets t ON t.id = l.tweet_id",
        "SELECT 'follow', a.username, b.username FROM follows f \
         JOIN users a ON a.id = f.follower_id JOIN users b ON b.id = f.followee_id",
    ];
    let mut rows = Vec::new();
    for q in queries {
        for r in c.query(q, &[]).await.unwrap() {
            let cols: Vec<String> = (0..r.len())
                .map(|i| r.get::<_, Option<String>>(i).unwrap_or_else(|| "∅".into()))
                .collect();
            rows.push(cols.join("|"));
        }
    }
    rows.sort();
    rows
}

/// Every row of every workload table with its ids, as text, in key order.
async fn full_dump(c: &tokio_postgres::Client) -> Vec<String> {
    let mut rows = Vec::new();
    for (table, key) in [
        ("users", "id"),
        ("tweets", "id"),
        ("likes", "user_id, tweet_id"),
        ("follows", "follower_id, followee_id"),
    ] {
        // Timestamps are the server's clock, not the generator's choice.
        let sql = format!(
            "SELECT (to_jsonb(x) - 'created_at' - 'updated_at' - 'edited_at')::text \
             FROM {table} x ORDER BY {key}"
        );
        for r in c.query(&sql, &[]).await.unwrap() {
            rows.push(format!("{table} {}", r.get::<_, String>(0)));
        }
    }
    rows
}

/// A hook that stops batch `batch_no` on its first attempt right before
/// COMMIT and hands the test the backend and a switch to let it go on.
fn pause_before_commit(
    batch_no: i64,
) -> (
    CommitHook,
    mpsc::Receiver<(BeforeCommit, oneshot::Sender<()>)>,
) {
    let (tx, rx) = mpsc::channel(1);
    let hook: CommitHook = Arc::new(move |at: BeforeCommit| {
        let tx = tx.clone();
        Box::pin(async move {
            if at.batch_no == batch_no && at.attempt == 1 {
                let (go, wait) = oneshot::channel();
                tx.send((at, go)).await.unwrap();
                wait.await.unwrap();
            }
        })
    });
    (hook, rx)
}

/// What `pg_stat_activity` says of a backend.
#[derive(Debug, PartialEq)]
struct Backend {
    state: String,
    /// It has written in its current transaction.
    has_xid: bool,
}

async fn backend(su: &tokio_postgres::Client, pid: i32) -> Option<Backend> {
    su.query_opt(
        "SELECT state, backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $1",
        &[&pid],
    )
    .await
    .unwrap()
    .map(|r| Backend {
        state: r.get(0),
        has_xid: r.get(1),
    })
}

async fn run_clean(db: &str, seed: u64, n: u64) -> Summary {
    run(&config_for(db, seed), batches(n), None, no_stop())
        .await
        .unwrap()
}

/// The backend is killed while the batch waits for COMMIT: the server rolls
/// it back, the generator reconnects, finds no ledger row and writes the
/// batch again, once. Same data as an undisturbed run with the same seed.
#[tokio::test]
async fn commit_cut_by_terminating_the_backend_writes_the_batch_once() {
    let _shared = STACK.read().await;
    let TestDb { name: db, su } = fresh_db("cut_commit").await;
    let (hook, mut paused) = pause_before_commit(3);
    let cfg = config_for(&db, 7);
    let generator = tokio::spawn(async move {
        let options = RunOptions {
            limits: batches(6),
            before_commit: Some(hook),
            ..RunOptions::default()
        };
        run_with(&cfg, options, no_stop()).await
    });
    let (at, go) = tokio::time::timeout(Duration::from_secs(60), paused.recv())
        .await
        .expect("batch 3 reached COMMIT")
        .unwrap();
    // Proof that the kill hits the commit path: the backend has written the
    // whole batch (it holds a transaction id) and waits for the next command,
    // which is COMMIT; nothing of batch 3 is visible yet.
    assert_eq!(
        backend(&su, at.backend_pid).await,
        Some(Backend {
            state: "idle in transaction".into(),
            has_xid: true
        })
    );
    assert_eq!(ledger(&su, at.run_id).await, vec![1, 2]);
    let killed: bool = su
        .query_one("SELECT pg_terminate_backend($1, 10000)", &[&at.backend_pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    go.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(60), generator)
        .await
        .unwrap()
        .unwrap()
        .expect("the generator survived the kill");
    assert_eq!(
        ledger(&su, summary.run_id).await,
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(
        summary.ambiguous_commits, 1,
        "COMMIT failed and was resolved"
    );
    assert!(summary.reconnects >= 1);

    let TestDb {
        name: clean_db,
        su: clean,
    } = fresh_db("cut_commit_clean").await;
    run_clean(&clean_db, 7, 6).await;
    assert_eq!(logical_dump(&su).await, logical_dump(&clean).await);
}

/// A TCP proxy in front of PostgreSQL that can swallow the server's answers
/// and then cut every open connection, like a network failure that strikes
/// after the server committed but before the client heard so.
struct Proxy {
    port: u16,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    async fn start() -> Proxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = format!("127.0.0.1:{}", env("TWEETGEN_DATABASE__PORT"));
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let swallow2 = swallow.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let swallow = swallow2.clone();
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let up = async {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = cr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            sw.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = sr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !swallow.load(Ordering::SeqCst) {
                                cw.write_all(&buf[..n]).await?;
                            }
                        }
                    };
                    // Dropping both halves closes both sockets.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, swallow, cut }
    }
}

/// The server commits batch 3 but its answer never arrives: the generator
/// must learn from the ledger that the batch is in, and not write it again.
#[tokio::test]
async fn commit_acknowledgement_lost_is_resolved_by_the_ledger() {
    use std::sync::atomic::Ordering;
    let _shared = STACK.read().await;
    let TestDb { name: db, su } = fresh_db("lost_ack").await;
    let proxy = Proxy::start().await;
    let (hook, mut paused) = pause_before_commit(3);
    let mut cfg = config_for(&db, 11);
    cfg.database.port = proxy.port;
    let generator = tokio::spawn(async move {
        let options = RunOptions {
            limits: batches(6),
            before_commit: Some(hook),
            ..RunOptions::default()
        };
        run_with(&cfg, options, no_stop()).await
    });
    let (at, go) = tokio::time::timeout(Duration::from_secs(60), paused.recv())
        .await
        .expect("batch 3 reached COMMIT")
        .unwrap();
    proxy.swallow.store(true, Ordering::SeqCst);
    go.send(()).unwrap();
    // Wait until the server has committed: the ledger row is visible.
    wait_until(
        "batch 3 to commit",
        Duration::from_secs(30),
        async || match ledger(&su, at.run_id).await {
            l if l == [1, 2, 3] => Ok(()),
            l => Err(format!("ledger {l:?}")),
        },
    )
    .await;
    assert_eq!(
        backend(&su, at.backend_pid).await.map(|b| b.state),
        Some("idle".to_string()),
        "the backend finished COMMIT and is out of the transaction"
    );
    proxy.swallow.store(false, Ordering::SeqCst);
    proxy.cut.send_modify(|g| *g += 1);
    let summary = tokio::time::timeout(Duration::from_secs(60), generator)
        .await
        .unwrap()
        .unwrap()
        .expect("the generator survived the lost answer");
    assert_eq!(
        ledger(&su, summary.run_id).await,
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(summary.ambiguous_commits, 1);

    let TestDb {
        name: clean_db,
        su: clean,
    } = fresh_db("lost_ack_clean").await;
    run_clean(&clean_db, 11, 6).await;
    assert_eq!(logical_dump(&su).await, logical_dump(&clean).await);
}

/// Which real server errors count as retryable.
#[tokio::test]
async fn only_connection_and_serialization_errors_are_retryable() {
    let _shared = STACK.read().await;
    let conn = format!(
        "host=127.0.0.1 port={} dbname=twitter user=tweetgen password={}",
        env("TWEETGEN_DATABASE__PORT"),
        env("TWEETGEN_DATABASE__PASSWORD")
    );
    let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Client-side: an i64 where the server wants int4. No SQLSTATE, no socket
    // error: the old classification retried this forever.
    let encoding = c.query_one("SELECT $1::int4", &[&1i64]).await.unwrap_err();
    assert!(encoding.code().is_none());
    assert!(!is_retryable(&encoding), "{encoding:?}");
    let constraint = c
        .batch_execute("CREATE TEMP TABLE t (x int PRIMARY KEY); INSERT INTO t VALUES (1), (1)")
        .await
        .unwrap_err();
    assert!(!is_retryable(&constraint), "{constraint:?}");
    let serialization = c
        .batch_execute(
            "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$",
        )
        .await
        .unwrap_err();
    assert!(is_retryable(&serialization), "{serialization:?}");

    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    superuser()
        .await
        .execute("SELECT pg_terminate_backend($1, 10000)", &[&pid])
        .await
        .unwrap();
    let gone = c.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(is_retryable(&gone), "{gone:?}");
}

/// A permanent error (here a missing privilege) is not retried: the binary
/// exits non-zero at once and says which batch failed and why.
#[tokio::test]
async fn a_permanent_error_exits_non_zero_with_a_clear_error() {
    let _shared = STACK.read().await;
    let TestDb { name: db, su } = fresh_db("permanent").await;
    su.batch_execute("REVOKE INSERT ON users FROM tweetgen")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tweetgen"))
        .args(["--batches", "2", "--dbname", &db])
        .env("TWEETGEN_METRICS__LISTEN", ANY_PORT)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("writing batch 1 failed, not retried")
            && err.contains("permission denied for table users"),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
