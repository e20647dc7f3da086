//! Load mode: bulk tweets at a target rate, for benchmarking the pipeline.
//!
//! Each chunk is one transaction written with binary `COPY` or a multi-row
//! `INSERT` ([`LoadMethod`]); the README has the measured rates of both.

use std::pin::pin;

use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use crate::config::LoadMethod;
use crate::db::{
    InsertedUser, TWEET_COLUMNS, WriteFailure, commit, insert_ledger, insert_tweets, insert_users,
    tweet_params,
};
use crate::model::{NewTweet, NewUser};

/// PostgreSQL allows 65,535 bind parameters per statement.
const MAX_INSERT_ROWS: usize = 65_535 / TWEET_COLUMNS.len();

const TWEET_TYPES: &[Type] = &[
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

/// Writes `users` with ledger row `chunk_no` in one transaction.
pub async fn write_users(
    client: &mut Client,
    run_id: i64,
    chunk_no: i64,
    users: &[NewUser],
) -> Result<Vec<InsertedUser>, WriteFailure<Vec<InsertedUser>>> {
    let tx = client
        .transaction()
        .await
        .map_err(WriteFailure::before_commit)?;
    let staged = async {
        insert_ledger(&tx, run_id, chunk_no).await?;
        insert_users(&tx, users).await
    };
    let inserted = staged.await.map_err(WriteFailure::before_commit)?;
    commit(tx, inserted).await
}

/// Writes `tweets` with ledger row `chunk_no` in one transaction and
/// returns how many rows were stored.
pub async fn write_chunk(
    client: &mut Client,
    run_id: i64,
    chunk_no: i64,
    method: LoadMethod,
    tweets: &[NewTweet],
) -> Result<u64, WriteFailure<u64>> {
    let tx = client
        .transaction()
        .await
        .map_err(WriteFailure::before_commit)?;
    let rows = stage(&tx, run_id, chunk_no, method, tweets)
        .await
        .map_err(WriteFailure::before_commit)?;
    commit(tx, rows).await
}

async fn stage(
    tx: &tokio_postgres::Transaction<'_>,
    run_id: i64,
    chunk_no: i64,
    method: LoadMethod,
    tweets: &[NewTweet],
) -> Result<u64, tokio_postgres::Error> {
    insert_ledger(tx, run_id, chunk_no).await?;
    let rows = match method {
        LoadMethod::Copy => {
            let sql = format!(
                "COPY tweets ({}) FROM STDIN (FORMAT binary)",
                TWEET_COLUMNS.join(", ")
            );
            let sink = tx.copy_in(&sql).await?;
            let mut writer = pin!(BinaryCopyInWriter::new(sink, TWEET_TYPES));
            for t in tweets {
                writer.as_mut().write(&tweet_params(t)).await?;
            }
            writer.finish().await?
        }
        LoadMethod::Insert => {
            let mut n = 0;
            for part in tweets.chunks(MAX_INSERT_ROWS) {
                n += insert_tweets(tx, part).await?.len() as u64;
            }
            n
        }
    };
    Ok(rows)
}
