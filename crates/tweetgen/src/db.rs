//! PostgreSQL access: connecting, classifying errors, and writing one
//! planned batch in one transaction together with its ledger row.
//!
//! [`connect`] retries an unreachable server with capped backoff until
//! `connect_timeout_secs`, but fails at once on a rejected password.
//! [`write_batch`] commits a whole [`BatchPlan`] or nothing; [`batch_committed`]
//! answers, after a connection was lost during COMMIT, whether it landed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use cdc_telemetry::systemd::Watchdog;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::config::DatabaseConfig;
use crate::model::{NewTweet, NewUser, ProfileEdit, TweetEdit};
use crate::plan::BatchPlan;
use crate::pools::{Committed, Edge, Follow, Like, TweetEntry, UserEntry};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "PostgreSQL rejected the credentials of user `{user}` (check database.password / database.password_file)"
    )]
    Auth {
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL at {addr} still unreachable after {secs}s")]
    Unreachable {
        addr: String,
        secs: u64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("shutdown requested while connecting")]
    Shutdown,
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Backoff between attempts: 200 ms doubling to at most 5 s, with jitter so
/// that several generators do not reconnect in lockstep.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
}

/// True only when retrying the same work can succeed: the connection broke
/// (socket error, server shutting down or starting, SQLSTATE class 08), or
/// the server aborted the transaction for a serialization conflict or a
/// deadlock. Everything else (a constraint, a type or encoding error on our
/// side, a permission) would fail again the same way.
pub fn is_retryable(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // No SQLSTATE: only an I/O failure of the socket is connection-level;
        // client-side errors (encoding a parameter, say) are not.
        None => std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>()),
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
        }
    }
}

fn is_auth_failure(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    )
}

/// Connects, retrying with [`backoff`] until `connect_timeout_secs` have
/// passed. Returns early on shutdown or bad credentials. Each retry pings
/// `watchdog`: waiting out an outage is progress, not a hang.
pub async fn connect(
    cfg: &DatabaseConfig,
    password: Option<&SecretString>,
    shutdown: &mut watch::Receiver<bool>,
    watchdog: Watchdog,
) -> Result<Client, DbError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.dbname)
        .user(&cfg.user)
        .application_name("tweetgen")
        .connect_timeout(Duration::from_secs(5));
    if let Some(pw) = password {
        pg.password(pw.expose_secret());
    }
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let deadline = Duration::from_secs(cfg.connect_timeout_secs);
    let started = Instant::now();
    let attempt = || pg.connect(NoTls);
    let connecting = attempt
        .retry(backoff().without_max_times())
        // A wall-clock deadline rather than a sum of sleeps: each attempt
        // itself can take up to the 5 s connect timeout.
        .when(|err| !is_auth_failure(err) && started.elapsed() < deadline)
        .notify(|err, wait| {
            watchdog.ping();
            tracing::warn!(%addr, error = %err, retry_in_ms = wait.as_millis() as u64,
                "PostgreSQL unreachable, retrying");
        });
    let result = tokio::select! {
        r = connecting => r,
        _ = shutdown.wait_for(|stop| *stop) => return Err(DbError::Shutdown),
    };
    match result {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(error = %err, "PostgreSQL connection closed");
                }
            });
            tracing::info!(%addr, db = %cfg.dbname, user = %cfg.user, "connected to PostgreSQL");
            Ok(client)
        }
        Err(err) if is_auth_failure(&err) => Err(DbError::Auth {
            user: cfg.user.clone(),
            source: err,
        }),
        Err(err) => Err(DbError::Unreachable {
            addr,
            secs: cfg.connect_timeout_secs,
            source: err,
        }),
    }
}

/// Where a batch stands when [`CommitHook`] is called.
#[derive(Debug, Clone, Copy)]
pub struct BeforeCommit {
    pub run_id: i64,
    pub batch_no: i64,
    /// 1 for the first attempt at this batch.
    pub attempt: u32,
    /// The server process running the transaction, for `pg_terminate_backend`.
    pub backend_pid: i32,
}

/// Called with every statement of a batch executed and COMMIT not yet sent.
/// Tests use it to cut the connection at exactly that point.
pub type CommitHook =
    Arc<dyn Fn(BeforeCommit) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What one committed batch did, by table and operation. The ids are what
/// PostgreSQL assigned, so later batches can refer to these rows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub users_inserted: Vec<InsertedUser>,
    /// In the order of the plan's tweets.
    pub tweets_inserted: Vec<i64>,
    pub tweets_deleted: Vec<i64>,
    pub users_deleted: Vec<i64>,
    /// The likes and follows PostgreSQL stored (one that already existed
    /// is skipped) or removed.
    pub likes_inserted: Vec<Like>,
    pub likes_deleted: Vec<Like>,
    pub follows_inserted: Vec<Follow>,
    pub follows_deleted: Vec<Follow>,
    pub tweets_updated: u64,
    pub users_updated: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertedUser {
    pub id: i64,
    pub username: String,
}

impl BatchOutcome {
    /// Rows written directly (cascades and trigger updates not counted).
    pub fn rows(&self) -> u64 {
        (self.users_inserted.len()
            + self.tweets_inserted.len()
            + self.tweets_deleted.len()
            + self.users_deleted.len()
            + self.likes_inserted.len()
            + self.likes_deleted.len()
            + self.follows_inserted.len()
            + self.follows_deleted.len()) as u64
            + self.tweets_updated
            + self.users_updated
    }

    /// What the pools learn from this outcome of `plan`.
    pub fn committed(&self, plan: &BatchPlan) -> Committed {
        let users = self
            .users_inserted
            .iter()
            .filter_map(|u| {
                let p = plan.users.iter().find(|p| p.user.username == u.username)?;
                Some(UserEntry::new(
                    u.id,
                    u.username.clone(),
                    p.user.lang,
                    p.fame,
                    p.activity,
                ))
            })
            .collect();
        let tweets = plan
            .tweets
            .iter()
            .zip(&self.tweets_inserted)
            .filter(|(t, _)| t.retweet_of_id.is_none())
            .map(|(t, id)| TweetEntry {
                id: *id,
                author: t.user_id,
                body: t.body.clone(),
                lang: t.lang,
            })
            .collect();
        Committed {
            users,
            tweets,
            likes: self.likes_inserted.clone(),
            unlikes: self.likes_deleted.clone(),
            follows: self.follows_inserted.clone(),
            unfollows: self.follows_deleted.clone(),
            tweets_deleted: self.tweets_deleted.clone(),
            users_deleted: self.users_deleted.clone(),
        }
    }
}

/// A failed transaction of the workload.
#[derive(Debug)]
pub struct WriteFailure<O> {
    pub error: tokio_postgres::Error,
    /// Set when the error came from COMMIT itself: the server may or may not
    /// have committed, and this is what the transaction wrote if it did.
    pub commit_sent: Option<O>,
}

impl<O> WriteFailure<O> {
    /// For errors before COMMIT was sent: nothing was committed.
    pub fn before_commit(error: tokio_postgres::Error) -> Self {
        WriteFailure {
            error,
            commit_sent: None,
        }
    }
}

/// Commits `tx`, whose writes are described by `out`.
pub async fn commit<O>(tx: Transaction<'_>, out: O) -> Result<O, WriteFailure<O>> {
    match tx.commit().await {
        Ok(()) => Ok(out),
        Err(error) => Err(WriteFailure {
            error,
            commit_sent: Some(out),
        }),
    }
}

/// Writes the ledger row of batch `batch_no`: first in every transaction,
/// so that two writers of the same batch collide at once.
pub async fn insert_ledger(
    tx: &Transaction<'_>,
    run_id: i64,
    batch_no: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO tweetgen_batches (run_id, batch_no) VALUES ($1, $2)",
        &[&run_id, &batch_no],
    )
    .await?;
    Ok(())
}

/// Writes `plan` and its ledger row in one transaction. Nothing is visible
/// to Debezium unless everything is.
pub async fn write_batch(
    client: &mut Client,
    run_id: i64,
    plan: &BatchPlan,
    hook: Option<(&CommitHook, u32)>,
) -> Result<BatchOutcome, WriteFailure<BatchOutcome>> {
    let before_commit = WriteFailure::before_commit;
    let tx = client.transaction().await.map_err(before_commit)?;
    let out = stage(&tx, run_id, plan).await.map_err(before_commit)?;
    if let Some((hook, attempt)) = hook {
        let backend_pid: i32 = tx
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(before_commit)?
            .get(0);
        hook(BeforeCommit {
            run_id,
            batch_no: plan.batch_no,
            attempt,
            backend_pid,
        })
        .await;
    }
    commit(tx, out).await
}

async fn stage(
    tx: &Transaction<'_>,
    run_id: i64,
    plan: &BatchPlan,
) -> Result<BatchOutcome, tokio_postgres::Error> {
    insert_ledger(tx, run_id, plan.batch_no).await?;
    let users: Vec<NewUser> = plan.users.iter().map(|p| p.user.clone()).collect();
    let mut out = BatchOutcome {
        users_inserted: insert_users(tx, &users).await?,
        tweets_inserted: insert_tweets(tx, &plan.tweets).await?,
        ..BatchOutcome::default()
    };
    out.likes_inserted = insert_edges(tx, &plan.likes).await?;
    out.likes_deleted = delete_edges(tx, &plan.unlikes).await?;
    out.follows_inserted = insert_edges(tx, &plan.follows).await?;
    out.follows_deleted = delete_edges(tx, &plan.unfollows).await?;

    for edit in &plan.tweet_edits {
        out.tweets_updated += match &edit.edit {
            TweetEdit::Counters { likes, retweets } => {
                tx.execute(
                    "UPDATE tweets SET like_count = like_count + $2, \
                     retweet_count = retweet_count + $3 WHERE id = $1",
                    &[&edit.tweet_id, likes, retweets],
                )
                .await?
            }
            TweetEdit::Body(body) => {
                tx.execute(
                    "UPDATE tweets SET body = $2, edited_at = now() WHERE id = $1",
                    &[&edit.tweet_id, body],
                )
                .await?
            }
        };
    }
    for edit in &plan.profile_edits {
        out.users_updated += match &edit.edit {
            ProfileEdit::Reputation(reputation) => {
                tx.execute(
                    "UPDATE users SET reputation = $2, updated_at = now() WHERE id = $1",
                    &[&edit.user_id, reputation],
                )
                .await?
            }
            ProfileEdit::Profile { bio, location } => {
                tx.execute(
                    "UPDATE users SET bio = $2, location = $3, updated_at = now() WHERE id = $1",
                    &[&edit.user_id, bio, location],
                )
                .await?
            }
        };
    }
    // Deletes last: what they cascade to includes rows of this batch.
    if !plan.tweet_deletes.is_empty() {
        let rows = tx
            .query(
                "DELETE FROM tweets WHERE id = ANY($1) RETURNING id",
                &[&plan.tweet_deletes],
            )
            .await?;
        out.tweets_deleted = rows.iter().map(|r| r.get(0)).collect();
    }
    if !plan.user_deletes.is_empty() {
        let rows = tx
            .query(
                "DELETE FROM users WHERE id = ANY($1) RETURNING id",
                &[&plan.user_deletes],
            )
            .await?;
        out.users_deleted = rows.iter().map(|r| r.get(0)).collect();
    }
    Ok(out)
}

/// Whether batch `batch_no` of run `run_id` committed. Only meaningful on a
/// connection opened after the one that sent its COMMIT had gone.
pub async fn batch_committed(
    client: &Client,
    run_id: i64,
    batch_no: i64,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT 1 FROM tweetgen_batches WHERE run_id = $1 AND batch_no = $2",
            &[&run_id, &batch_no],
        )
        .await?;
    Ok(row.is_some())
}

/// Builds `INSERT INTO table (cols) VALUES ($1, ..), (..)` for `rows` rows.
pub fn multi_row_insert(table: &str, columns: &[&str], rows: usize, suffix: &str) -> String {
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    let width = columns.len();
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(r * width + c + 1).to_string());
        }
        sql.push(')');
    }
    sql.push(' ');
    sql.push_str(suffix);
    sql
}

/// `followers_count` and `following_count` are left to the trigger on
/// `follows`.
pub const USER_COLUMNS: &[&str] = &[
    "username",
    "display_name",
    "email",
    "bio",
    "location",
    "lang",
    "verified",
    "reputation",
];

pub const TWEET_COLUMNS: &[&str] = &[
    "user_id",
    "reply_to_id",
    "retweet_of_id",
    "quote_of_id",
    "body",
    "lang",
    "hashtags",
    "mentions",
    "sensitive",
    "latitude",
    "longitude",
];

/// A tweet's values in [`TWEET_COLUMNS`] order, for INSERT and COPY alike.
pub fn tweet_params(t: &NewTweet) -> [&(dyn ToSql + Sync); 11] {
    [
        &t.user_id,
        &t.reply_to_id,
        &t.retweet_of_id,
        &t.quote_of_id,
        &t.body,
        &t.lang,
        &t.hashtags,
        &t.mentions,
        &t.sensitive,
        &t.latitude,
        &t.longitude,
    ]
}

/// A user's values in [`USER_COLUMNS`] order, for INSERT and COPY alike.
pub fn user_params(u: &NewUser) -> [&(dyn ToSql + Sync); 8] {
    [
        &u.username,
        &u.display_name,
        &u.email,
        &u.bio,
        &u.location,
        &u.lang,
        &u.verified,
        &u.reputation,
    ]
}

pub async fn insert_users(
    tx: &Transaction<'_>,
    users: &[NewUser],
) -> Result<Vec<InsertedUser>, tokio_postgres::Error> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    // A username collision skips that user rather than failing the batch.
    let sql = multi_row_insert(
        "users",
        USER_COLUMNS,
        users.len(),
        "ON CONFLICT (username) DO NOTHING RETURNING id, username",
    );
    let params: Vec<&(dyn ToSql + Sync)> = users.iter().flat_map(user_params).collect();
    let rows = tx.query(&sql, &params).await?;
    Ok(rows
        .iter()
        .map(|r| InsertedUser {
            id: r.get(0),
            username: r.get(1),
        })
        .collect())
}

pub async fn insert_tweets(
    tx: &Transaction<'_>,
    tweets: &[NewTweet],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    if tweets.is_empty() {
        return Ok(Vec::new());
    }
    let sql = multi_row_insert("tweets", TWEET_COLUMNS, tweets.len(), "RETURNING id");
    let params: Vec<&(dyn ToSql + Sync)> = tweets.iter().flat_map(tweet_params).collect();
    let rows = tx.query(&sql, &params).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Inserts likes or follows, skipping those that already exist, and
/// returns those inserted.
pub async fn insert_edges<E: Edge>(
    tx: &Transaction<'_>,
    edges: &[E],
) -> Result<Vec<E>, tokio_postgres::Error> {
    if edges.is_empty() {
        return Ok(Vec::new());
    }
    let [a, b] = E::COLUMNS;
    let suffix = format!("ON CONFLICT DO NOTHING RETURNING {a}, {b}");
    let sql = multi_row_insert(E::TABLE, &E::COLUMNS, edges.len(), &suffix);
    let keys: Vec<[i64; 2]> = edges.iter().map(Edge::key).collect();
    let params: Vec<&(dyn ToSql + Sync)> = keys
        .iter()
        .flat_map(|[a, b]| [a as &(dyn ToSql + Sync), b as &(dyn ToSql + Sync)])
        .collect();
    let rows = tx.query(&sql, &params).await?;
    Ok(rows
        .iter()
        .map(|r| E::from_key([r.get(0), r.get(1)]))
        .collect())
}

/// Deletes likes or follows and returns those that existed.
async fn delete_edges<E: Edge>(
    tx: &Transaction<'_>,
    edges: &[E],
) -> Result<Vec<E>, tokio_postgres::Error> {
    if edges.is_empty() {
        return Ok(Vec::new());
    }
    let firsts: Vec<i64> = edges.iter().map(|e| e.key()[0]).collect();
    let seconds: Vec<i64> = edges.iter().map(|e| e.key()[1]).collect();
    let [a, b] = E::COLUMNS;
    let sql = format!(
        "DELETE FROM {} WHERE ({a}, {b}) IN \
         (SELECT * FROM unnest($1::bigint[], $2::bigint[])) RETURNING {a}, {b}",
        E::TABLE
    );
    let rows = tx.query(&sql, &[&firsts, &seconds]).await?;
    Ok(rows
        .iter()
        .map(|r| E::from_key([r.get(0), r.get(1)]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_placeholders_row_major() {
        assert_eq!(
            multi_row_insert("t", &["a", "b"], 2, "RETURNING a"),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) RETURNING a"
        );
    }
}
