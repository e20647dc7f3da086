//! Load mode: bulk rows into every table at a target rate, for
//! benchmarking the pipeline.
//!
//! Each chunk is one transaction (with its ledger row, like a batch) of new
//! users, tweets, likes and follows, chosen as in the normal mode. Tweets go
//! in with binary `COPY` or multi-row `INSERT` ([`LoadMethod`]); likes and
//! follows are copied into a temporary table first so that a pair that
//! already exists is skipped rather than failing the COPY; users, a small
//! share, always use `INSERT .. ON CONFLICT` for the same reason.

use std::collections::HashSet;
use std::pin::pin;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};

use crate::config::{LoadMethod, WorkloadConfig};
use crate::db::{
    self, TWEET_COLUMNS, WriteFailure, commit, insert_edges, insert_ledger, insert_tweets,
    insert_users, tweet_params,
};
use crate::model::{Faker, NewTweet, NewUser};
use crate::plan::{PlannedUser, new_follow, new_like, new_tweet, new_user};
use crate::pools::{Committed, Edge, Follow, Like, Pools, TweetEntry, UserEntry};

/// PostgreSQL allows 65,535 bind parameters per statement.
const MAX_INSERT_ROWS: usize = 65_535 / TWEET_COLUMNS.len();
const MAX_EDGE_ROWS: usize = 65_535 / 2;

const TWEET_TYPES: &[Type] = &[
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::BOOL,
    Type::NUMERIC,
    Type::NUMERIC,
];

/// One chunk's rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadChunk {
    pub users: Vec<PlannedUser>,
    pub tweets: Vec<NewTweet>,
    pub likes: Vec<Like>,
    pub follows: Vec<Follow>,
}

impl LoadChunk {
    pub fn rows(&self) -> usize {
        self.users.len() + self.tweets.len() + self.likes.len() + self.follows.len()
    }
}

/// About `rows` rows: 2 % users, 15 % follows, 25 % likes, the rest tweets
/// (a mix like the normal mode's). With no users yet, only users.
pub fn plan_chunk(
    faker: &mut Faker,
    pools: &Pools,
    mix: &WorkloadConfig,
    rows: usize,
) -> LoadChunk {
    let n_users = if pools.user_count() == 0 {
        rows.max(1)
    } else {
        (rows / 50).max(1)
    };
    let mut chunk = LoadChunk {
        users: (0..n_users)
            .map(|_| new_user(faker, mix.popularity_alpha))
            .collect(),
        ..LoadChunk::default()
    };
    if pools.user_count() == 0 {
        return chunk;
    }
    let n_follows = rows * 15 / 100;
    let n_likes = if pools.tweet_count() > 0 { rows / 4 } else { 0 };
    let n_tweets = rows.saturating_sub(n_users + n_follows + n_likes);
    let mentionable: Vec<&str> = (0..16)
        .filter_map(|_| pools.famous_user(faker).map(|u| u.username.as_str()))
        .collect();
    for _ in 0..n_tweets {
        chunk
            .tweets
            .extend(new_tweet(faker, pools, mix, &mentionable));
    }
    let mut taken = HashSet::new();
    for _ in 0..n_follows {
        chunk.follows.extend(new_follow(faker, pools, &mut taken));
    }
    let mut taken = HashSet::new();
    for _ in 0..n_likes {
        chunk.likes.extend(new_like(faker, pools, &mut taken));
    }
    chunk
}

/// Writes `chunk` with ledger row `chunk_no` in one transaction and returns
/// what it committed.
pub async fn write_chunk(
    client: &mut Client,
    run_id: i64,
    chunk_no: i64,
    method: LoadMethod,
    chunk: &LoadChunk,
) -> Result<Committed, WriteFailure<Committed>> {
    let tx = client
        .transaction()
        .await
        .map_err(WriteFailure::before_commit)?;
    let committed = stage(&tx, run_id, chunk_no, method, chunk)
        .await
        .map_err(WriteFailure::before_commit)?;
    commit(tx, committed).await
}

async fn stage(
    tx: &Transaction<'_>,
    run_id: i64,
    chunk_no: i64,
    method: LoadMethod,
    chunk: &LoadChunk,
) -> Result<Committed, tokio_postgres::Error> {
    insert_ledger(tx, run_id, chunk_no).await?;
    let mut out = Committed::default();
    let new_users: Vec<NewUser> = chunk.users.iter().map(|p| p.user.clone()).collect();
    for part in new_users.chunks(65_535 / db::USER_COLUMNS.len()) {
        for u in insert_users(tx, part).await? {
            let p = chunk
                .users
                .iter()
                .find(|p| p.user.username == u.username)
                .expect("inserted users were planned");
            out.users.push(UserEntry::new(
                u.id,
                u.username,
                p.user.lang,
                p.fame,
                p.activity,
            ));
        }
    }
    out.tweets = match method {
        LoadMethod::Copy => copy_tweets(tx, &chunk.tweets).await?,
        LoadMethod::Insert => {
            let mut ids = Vec::with_capacity(chunk.tweets.len());
            for part in chunk.tweets.chunks(MAX_INSERT_ROWS) {
                ids.extend(insert_tweets(tx, part).await?);
            }
            chunk
                .tweets
                .iter()
                .zip(ids)
                .filter(|(t, _)| t.retweet_of_id.is_none())
                .map(|(t, id)| TweetEntry {
                    id,
                    author: t.user_id,
                    body: t.body.clone(),
                    lang: t.lang,
                })
                .collect()
        }
    };
    out.likes = load_edges(tx, method, &chunk.likes).await?;
    out.follows = load_edges(tx, method, &chunk.follows).await?;
    Ok(out)
}

/// COPY returns no ids: read the new tweets back (by id above the highest
/// before the COPY; this transaction sees its own rows).
async fn copy_tweets(
    tx: &Transaction<'_>,
    tweets: &[NewTweet],
) -> Result<Vec<TweetEntry>, tokio_postgres::Error> {
    if tweets.is_empty() {
        return Ok(Vec::new());
    }
    let before: i64 = tx
        .query_one("SELECT coalesce(max(id), 0) FROM tweets", &[])
        .await?
        .get(0);
    let sql = format!(
        "COPY tweets ({}) FROM STDIN (FORMAT binary)",
        TWEET_COLUMNS.join(", ")
    );
    let sink = tx.copy_in(&sql).await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, TWEET_TYPES));
    for t in tweets {
        writer.as_mut().write(&tweet_params(t)).await?;
    }
    writer.finish().await?;
    let rows = tx
        .query(
            "SELECT id, user_id, body, lang FROM tweets \
             WHERE id > $1 AND retweet_of_id IS NULL ORDER BY id",
            &[&before],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let lang: String = r.get(3);
            TweetEntry {
                id: r.get(0),
                author: r.get(1),
                body: r.get(2),
                lang: crate::text::lang_code(&lang),
            }
        })
        .collect())
}

/// Inserts likes or follows, skipping existing ones; returns those stored.
async fn load_edges<E: Edge>(
    tx: &Transaction<'_>,
    method: LoadMethod,
    edges: &[E],
) -> Result<Vec<E>, tokio_postgres::Error> {
    if edges.is_empty() {
        return Ok(Vec::new());
    }
    match method {
        LoadMethod::Copy => {
            tx.batch_execute(
                "SET LOCAL client_min_messages = warning; \
                 CREATE TEMP TABLE IF NOT EXISTS load_edges (a bigint, b bigint) ON COMMIT DELETE ROWS; \
                 TRUNCATE load_edges",
            )
            .await?;
            let sink = tx
                .copy_in("COPY load_edges (a, b) FROM STDIN (FORMAT binary)")
                .await?;
            let mut writer = pin!(BinaryCopyInWriter::new(sink, &[Type::INT8, Type::INT8]));
            for e in edges {
                let [a, b] = e.key();
                writer
                    .as_mut()
                    .write(&[&a as &(dyn ToSql + Sync), &b])
                    .await?;
            }
            writer.finish().await?;
            let [a, b] = E::COLUMNS;
            let rows = tx
                .query(
                    &format!(
                        "INSERT INTO {} ({a}, {b}) SELECT a, b FROM load_edges \
                         ON CONFLICT DO NOTHING RETURNING {a}, {b}",
                        E::TABLE
                    ),
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| E::from_key([r.get(0), r.get(1)]))
                .collect())
        }
        LoadMethod::Insert => {
            let mut stored = Vec::with_capacity(edges.len());
            for part in edges.chunks(MAX_EDGE_ROWS) {
                stored.extend(insert_edges(tx, part).await?);
            }
            Ok(stored)
        }
    }
}
