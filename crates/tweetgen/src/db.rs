//! PostgreSQL access: connecting with retry, and writing one batch of the
//! workload in one transaction.
//!
//! [`connect`] retries unreachable servers with backoff but fails at once on
//! a rejected password. [`write_batch`] either commits the whole batch or
//! nothing, and reports what it did as [`BatchOutcome`] so the caller updates
//! its id pools only after the commit.

use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::config::{DatabaseConfig, WorkloadConfig};
use crate::model::{Faker, NewTweet, NewUser, ProfileEdit, TweetEdit};
use crate::pools::Pools;

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

/// True for errors after which reconnecting and retrying the batch is right:
/// the connection broke, or the server is shutting down or starting.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // No SQLSTATE: an I/O or protocol failure on our side of the socket.
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
        }
    }
}

fn is_auth_failure(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    )
}

/// Connects, retrying with exponential backoff (capped at 5 s) for up to
/// `connect_timeout_secs`. Returns early on shutdown or bad credentials.
pub async fn connect(
    cfg: &DatabaseConfig,
    password: Option<&SecretString>,
    shutdown: &mut watch::Receiver<bool>,
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
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match pg.connect(NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::warn!(error = %err, "PostgreSQL connection closed");
                    }
                });
                tracing::info!(%addr, db = %cfg.dbname, user = %cfg.user, "connected to PostgreSQL");
                return Ok(client);
            }
            Err(err) if is_auth_failure(&err) => {
                return Err(DbError::Auth {
                    user: cfg.user.clone(),
                    source: err,
                });
            }
            Err(err) => {
                if started.elapsed() >= Duration::from_secs(cfg.connect_timeout_secs) {
                    return Err(DbError::Unreachable {
                        addr,
                        secs: cfg.connect_timeout_secs,
                        source: err,
                    });
                }
                tracing::warn!(%addr, error = %err, retry_in_ms = backoff.as_millis() as u64,
                    "PostgreSQL unreachable, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Err(DbError::Shutdown),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What one committed batch did, by table and operation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub users_inserted: Vec<(i64, String)>,
    pub tweets_inserted: Vec<i64>,
    pub tweets_deleted: Vec<i64>,
    pub likes_inserted: u64,
    pub tweets_updated: u64,
    pub users_updated: u64,
}

impl BatchOutcome {
    pub fn rows(&self) -> u64 {
        (self.users_inserted.len() + self.tweets_inserted.len() + self.tweets_deleted.len()) as u64
            + self.likes_inserted
            + self.tweets_updated
            + self.users_updated
    }
}

/// Writes one batch of the configured mix in one transaction. Nothing is
/// visible to Debezium unless everything is.
pub async fn write_batch(
    client: &mut Client,
    faker: &mut Faker,
    pools: &Pools,
    mix: &WorkloadConfig,
) -> Result<BatchOutcome, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut out = BatchOutcome::default();

    let users: Vec<NewUser> = (0..mix.new_users).map(|_| faker.user()).collect();
    out.users_inserted = insert_users(&tx, &users).await?;

    // Authors and mentions come from known users plus those just inserted.
    let mut authors = pools.user_ids();
    authors.extend(out.users_inserted.iter().map(|(id, _)| *id));
    let mut names: Vec<&str> = pools.usernames();
    names.extend(out.users_inserted.iter().map(|(_, n)| n.as_str()));
    let known_tweets = pools.tweet_ids();

    if !authors.is_empty() {
        let mut tweets = Vec::with_capacity(mix.new_tweets as usize);
        for _ in 0..mix.new_tweets {
            let author = faker.pick(&authors).expect("authors not empty");
            let reply_to = if faker.chance(mix.reply_ratio) {
                faker.pick(&known_tweets)
            } else {
                None
            };
            tweets.push(faker.tweet(author, reply_to, &names));
        }
        out.tweets_inserted = insert_tweets(&tx, &tweets).await?;
    }

    let mut likeable = known_tweets.clone();
    likeable.extend(&out.tweets_inserted);
    if !authors.is_empty() && !likeable.is_empty() {
        let mut pairs = Vec::with_capacity(mix.likes as usize);
        for _ in 0..mix.likes {
            let user = faker.pick(&authors).expect("not empty");
            let tweet = faker.pick(&likeable).expect("not empty");
            if !pairs.contains(&(user, tweet)) {
                pairs.push((user, tweet));
            }
        }
        out.likes_inserted = insert_likes(&tx, &pairs).await?;
    }

    for _ in 0..mix.counter_updates {
        let Some(id) = faker.pick(&likeable) else {
            break;
        };
        out.tweets_updated += match faker.tweet_edit() {
            TweetEdit::Counters { likes, retweets } => {
                tx.execute(
                    "UPDATE tweets SET like_count = like_count + $2, \
                     retweet_count = retweet_count + $3 WHERE id = $1",
                    &[&id, &likes, &retweets],
                )
                .await?
            }
            TweetEdit::Body(body) => {
                tx.execute(
                    "UPDATE tweets SET body = $2, edited_at = now() WHERE id = $1",
                    &[&id, &body],
                )
                .await?
            }
        };
    }

    for _ in 0..mix.profile_edits {
        let Some(id) = faker.pick(&authors) else {
            break;
        };
        out.users_updated += match faker.profile_edit() {
            ProfileEdit::Counters {
                followers_delta,
                reputation,
            } => {
                tx.execute(
                    "UPDATE users SET followers_count = greatest(followers_count + $2, 0), \
                     reputation = $3, updated_at = now() WHERE id = $1",
                    &[&id, &followers_delta, &reputation],
                )
                .await?
            }
            ProfileEdit::Profile { bio, location } => {
                tx.execute(
                    "UPDATE users SET bio = $2, location = $3, updated_at = now() WHERE id = $1",
                    &[&id, &bio, &location],
                )
                .await?
            }
        };
    }

    // Delete only tweets from earlier batches: deleting one inserted in this
    // very transaction would never be seen by CDC as a row at all.
    let mut doomed: Vec<i64> = Vec::new();
    for _ in 0..mix.tweet_deletes {
        if let Some(id) = faker.pick(&known_tweets)
            && !doomed.contains(&id)
        {
            doomed.push(id);
        }
    }
    if !doomed.is_empty() {
        let rows = tx
            .query(
                "DELETE FROM tweets WHERE id = ANY($1) RETURNING id",
                &[&doomed],
            )
            .await?;
        out.tweets_deleted = rows.iter().map(|r| r.get(0)).collect();
    }

    tx.commit().await?;
    Ok(out)
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

pub const USER_COLUMNS: &[&str] = &[
    "username",
    "display_name",
    "email",
    "bio",
    "location",
    "lang",
    "verified",
    "followers_count",
    "reputation",
];

pub const TWEET_COLUMNS: &[&str] = &[
    "user_id",
    "reply_to_id",
    "body",
    "lang",
    "hashtags",
    "mentions",
    "sensitive",
    "latitude",
    "longitude",
];

/// A tweet's values in [`TWEET_COLUMNS`] order, for INSERT and COPY alike.
pub fn tweet_params(t: &NewTweet) -> [&(dyn ToSql + Sync); 9] {
    [
        &t.user_id,
        &t.reply_to_id,
        &t.body,
        &t.lang,
        &t.hashtags,
        &t.mentions,
        &t.sensitive,
        &t.latitude,
        &t.longitude,
    ]
}

pub async fn insert_users(
    tx: &Transaction<'_>,
    users: &[NewUser],
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
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
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(users.len() * 9);
    for u in users {
        params.extend_from_slice(&[
            &u.username,
            &u.display_name,
            &u.email,
            &u.bio,
            &u.location,
            &u.lang,
            &u.verified,
            &u.followers_count,
            &u.reputation,
        ]);
    }
    let rows = tx.query(&sql, &params).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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

async fn insert_likes(
    tx: &Transaction<'_>,
    pairs: &[(i64, i64)],
) -> Result<u64, tokio_postgres::Error> {
    if pairs.is_empty() {
        return Ok(0);
    }
    let sql = multi_row_insert(
        "likes",
        &["user_id", "tweet_id"],
        pairs.len(),
        "ON CONFLICT DO NOTHING",
    );
    let params: Vec<&(dyn ToSql + Sync)> = pairs
        .iter()
        .flat_map(|(u, t)| [u as &(dyn ToSql + Sync), t as &(dyn ToSql + Sync)])
        .collect();
    tx.execute(&sql, &params).await
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
