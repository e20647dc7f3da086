//! Load mode: bulk tweets at a target rate, for benchmarking the pipeline.
//!
//! Each chunk is one transaction written with binary `COPY` or a multi-row
//! `INSERT` ([`LoadMethod`]); the README has the measured rates of both.

use std::pin::pin;

use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use crate::config::LoadMethod;
use crate::db::{TWEET_COLUMNS, insert_tweets, tweet_params};
use crate::model::NewTweet;

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

/// Writes `tweets` in one transaction and returns how many rows were stored.
pub async fn write_chunk(
    client: &mut Client,
    method: LoadMethod,
    tweets: &[NewTweet],
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
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
                n += insert_tweets(&tx, part).await?.len() as u64;
            }
            n
        }
    };
    tx.commit().await?;
    Ok(rows)
}
