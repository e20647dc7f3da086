//! What one batch of changes costs a current-state table, by the table's
//! size: `tests/bench/mirror.sh` runs it (see docs/benchmarks.md).
//!
//! `seed --rows N` writes a changelog `likes_N` of N `likes`-shaped inserts
//! (key `(user_id, tweet_id)`) in the order they were made: ten likes per
//! tweet, each of one of the 200 newest tweets, by users spread over the
//! id space (50 likes per user). It writes them through the sink's own
//! changelog writer, one commit per million rows, and syncs the mirror
//! after each commit, as a sink would; then checkpoints both.
//!
//! `apply --rows N` then commits batches of `--keys` changed keys to the
//! changelog, in tweetgen's mix for likes (15 likes to 1 unlike: likes by
//! users drawn from a heavy tail of activity, scattered over the id space,
//! of recent tweets; unlikes of one of the newest 100,000 likes, which is
//! what tweetgen remembers and draws its unlikes from, or with
//! `--unlikes anywhere` of any like), and syncs the mirror after each. The first batch runs in a fresh process (the key
//! ranges of the mirror's files are read from their footers); later ones
//! run as in a sink that has been running (ranges known). For each it
//! prints one JSON line: the S3 requests and bytes of the sync (counted by
//! a wrapper around the store, every request delta-rs and the mirror
//! make), the wall time, the peak RSS during the sync, and what the sync
//! did.
//!
//! Needs MinIO configured the sink's way (`tests/stack.sh env`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arrow::array::{Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use cdc_sink::config::SinkConfig;
use cdc_sink::decode::schema::{meta, utc_micros};
use cdc_sink::lake::changelog::{Changelog, DataFile, PartitionWrite};
use cdc_sink::lake::files::{FileWriter, writer_properties};
use cdc_sink::lake::mirror::Mirror;
use cdc_sink::lake::storage;
use cdc_sink::lake::table::LakeRoot;
use cdc_sink::source::position::{Claim, Tp};
use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use deltalake::DeltaTableBuilder;
use test_support::counted::{Counters, counted_scheme};
use url::Url;

const LIKES_PER_USER: i64 = 50;
/// A like is of one of this many newest tweets.
const RECENT_TWEETS: i64 = 200;
/// How many of the newest likes tweetgen remembers and unlikes from.
const REMEMBERED_LIKES: i64 = 100_000;
const SEED_COMMIT_ROWS: i64 = 1_000_000;
const GROUP: &str = "bench-mirror";

#[derive(Parser)]
struct Args {
    /// The lake prefix the tables go under.
    #[arg(long, default_value = "bench-mirror", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes the changelog `likes_<rows>` and syncs its mirror.
    Seed {
        #[arg(long)]
        rows: i64,
    },
    /// Commits batches of changed keys and syncs the mirror after each.
    Apply {
        #[arg(long)]
        rows: i64,
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        #[arg(long, default_value_t = 3)]
        batches: usize,
        /// Which likes an unlike takes back.
        #[arg(long, value_enum, default_value_t = Unlikes::Recent)]
        unlikes: Unlikes,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Unlikes {
    /// One of the newest 100,000 (tweetgen's pool of likes it remembers).
    Recent,
    /// Any like, uniformly.
    Anywhere,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = SinkConfig::from_figment(SinkConfig::figment(None))?;
    cfg.output.prefix = args.prefix.clone();
    let counters = Arc::new(Counters::default());
    let root = counted_root(&cfg, &args.prefix, counters.clone())?;
    let changelog = Changelog::new(
        root.clone(),
        GROUP,
        FileWriter::new(writer_properties(&cfg.output)),
        &cfg.lake,
    );
    let mirror = Mirror::configured(root.clone(), &cfg);
    match args.command {
        Cmd::Seed { rows } => seed(&root, &changelog, &mirror, rows).await,
        Cmd::Apply {
            rows,
            keys,
            batches,
            unlikes,
        } => {
            let table = table_name(rows);
            let tp = Tp::new(format!("bench.{table}"), 0);
            let mut last = changelog
                .positions(&table, std::slice::from_ref(&tp))
                .await?[0]
                .ok_or_else(|| anyhow::anyhow!("{table} is not seeded"))?;
            let mut rng = Rng(0x5eed ^ rows as u64);
            let mut next_tweet = rows / 10 + 1;
            for batch in 0..batches {
                let (batch_rows, first_new) =
                    changes(&mut rng, rows, keys, unlikes, next_tweet, last);
                next_tweet = first_new;
                let n = batch_rows.num_rows() as i64;
                write(&changelog, &table, &tp, last, batch_rows).await?;
                last += n;
                counters.reset();
                reset_peak_rss();
                let started = Instant::now();
                let synced = mirror.sync(&table, false).await?;
                let wall = started.elapsed();
                anyhow::ensure!(!synced.conflict && !synced.behind, "{synced:?}");
                let mirror_files = live_files(&root, &LakeRoot::mirror_of(&table)).await?;
                println!(
                    "{}",
                    serde_json::json!({
                        "rows": rows,
                        "batch": batch,
                        "ranges": if batch == 0 { "read from footers" } else { "known" },
                        "keys": keys,
                        "unlikes": match unlikes {
                            Unlikes::Recent => "recent",
                            Unlikes::Anywhere => "anywhere",
                        },
                        "upserts": synced.upserts,
                        "deletes": synced.deletes,
                        "wall_ms": wall.as_millis() as u64,
                        "peak_rss_mib": peak_rss_kib() / 1024,
                        "get_requests": counters.gets.load(Ordering::Relaxed),
                        "get_bytes": counters.get_bytes.load(Ordering::Relaxed),
                        "put_requests": counters.puts.load(Ordering::Relaxed),
                        "put_bytes": counters.put_bytes.load(Ordering::Relaxed),
                        "list_requests": counters.lists.load(Ordering::Relaxed),
                        "mirror_files": mirror_files,
                        "files_removed": synced.files_removed,
                        "files_added": synced.files_added,
                        "rows_written": synced.rows_written,
                        "bytes_written": synced.bytes_written,
                    })
                );
            }
            Ok(())
        }
    }
}

fn table_name(rows: i64) -> String {
    format!("likes_{rows}")
}

async fn seed(
    root: &LakeRoot,
    changelog: &Changelog,
    mirror: &Mirror,
    rows: i64,
) -> anyhow::Result<()> {
    let table = table_name(rows);
    let tp = Tp::new(format!("bench.{table}"), 0);
    let mut done = changelog
        .positions(&table, std::slice::from_ref(&tp))
        .await?[0]
        .map_or(0, |last| last + 1);
    let started = Instant::now();
    while done < rows {
        let n = SEED_COMMIT_ROWS.min(rows - done);
        let (users, tweets): (Vec<i64>, Vec<i64>) =
            (done..done + n).map(|i| seed_key(rows, i)).unzip();
        let ops = vec!["r"; n as usize];
        let batch = likes_batch(users, tweets, &ops, done)?;
        write(changelog, &table, &tp, done - 1, batch).await?;
        done += n;
        loop {
            let synced = mirror.sync(&table, false).await?;
            if !synced.behind {
                break;
            }
        }
        eprintln!("{table}: {done} rows, {:.0?}", started.elapsed());
    }
    for t in [table.clone(), LakeRoot::mirror_of(&table)] {
        let mut handle = root.handle(&t)?;
        handle.load().await?;
        deltalake::checkpoints::create_checkpoint(&handle, None).await?;
    }
    Ok(())
}

/// The `i`-th like of a seeded table, in the order they were made: one of
/// the [`RECENT_TWEETS`] newest (log-uniform in age) when `i / 10 + 1` is
/// the newest, by user `i mod users` scattered over the ids. A user's likes
/// are `rows / 500` tweets apart, more than their ages span from 100,000
/// rows up, so no pair is made twice.
fn seed_key(rows: i64, i: i64) -> (i64, i64) {
    let users = (rows / LIKES_PER_USER).max(1);
    // A multiplicative hash of `i` for the age; a prime above any user
    // count scatters the users (a bijection modulo `users`).
    let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11;
    let unit = h as f64 / (1u64 << 53) as f64;
    let age = (unit * (RECENT_TWEETS as f64).ln()).exp() as i64 - 1;
    let tweet = (i / 10 + 1 - age).max(1);
    let user = ((i % users) as u64).wrapping_mul(2_654_435_761) % users as u64;
    (user as i64 + 1, tweet)
}

/// One batch of `keys` changed keys in tweetgen's mix for likes, and the
/// next new tweet id.
fn changes(
    rng: &mut Rng,
    rows: i64,
    keys: usize,
    unlikes: Unlikes,
    next_tweet: i64,
    last_offset: i64,
) -> (RecordBatch, i64) {
    let users = rows / LIKES_PER_USER;
    let mut seen = HashSet::new();
    let (mut u, mut t, mut ops) = (Vec::new(), Vec::new(), Vec::new());
    // Tweets posted since: likes go to the newest, most of them.
    let recent = RECENT_TWEETS;
    let remembered = REMEMBERED_LIKES.min(rows);
    while u.len() < keys {
        let key = if rng.below(16) == 0 {
            ops.push("d");
            let i = match unlikes {
                Unlikes::Recent => rows - 1 - rng.below(remembered as u64) as i64,
                Unlikes::Anywhere => rng.below(rows as u64) as i64,
            };
            seed_key(rows, i)
        } else {
            ops.push("c");
            // Activity rank from a heavy tail (log-uniform), scattered
            // over the id space: active users are not the oldest ones.
            let rank = (rng.unit() * (users as f64).ln()).exp() as u64;
            let user = (rank.wrapping_mul(2_654_435_761) % users as u64) as i64 + 1;
            let age = (rng.unit() * (recent as f64).ln()).exp() as i64;
            (user, next_tweet + recent - age)
        };
        if seen.insert(key) {
            u.push(key.0);
            t.push(key.1);
        } else {
            ops.pop();
        }
    }
    let batch = likes_batch(u, t, &ops, last_offset + 1).expect("a valid batch");
    (batch, next_tweet + recent)
}

fn likes_batch(
    users: Vec<i64>,
    tweets: Vec<i64>,
    ops: &[&str],
    first_offset: i64,
) -> anyhow::Result<RecordBatch> {
    let n = users.len();
    let offsets: Vec<i64> = (first_offset..first_offset + n as i64).collect();
    let schema = Schema::new(vec![
        Field::new("user_id", DataType::Int64, true),
        Field::new("tweet_id", DataType::Int64, true),
        Field::new("created_at", utc_micros(), true),
        Field::new(meta::OP, DataType::Utf8, true),
        Field::new(meta::COMMIT_TS, utc_micros(), true),
        Field::new(meta::LSN, DataType::Int64, true),
        Field::new(meta::TX_ID, DataType::Int64, true),
        Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
        Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
    ]);
    let ts = |o: &i64| 1_780_000_000_000_000 + o * 1000;
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(Int64Array::from(users)),
            Arc::new(Int64Array::from(tweets)),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(offsets.iter().map(ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(ops.iter().copied())),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(offsets.iter().map(ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(
                offsets.iter().map(|o| 1_000_000 + o * 64),
            )),
            Arc::new(Int64Array::from_iter_values(
                offsets.iter().map(|o| o / 100),
            )),
            Arc::new(Int32Array::from(vec![0; n])),
            Arc::new(Int64Array::from(offsets)),
        ],
    )?)
}

/// Commits `batch` (offsets after `last`) as one flush of partition 0.
async fn write(
    changelog: &Changelog,
    table: &str,
    tp: &Tp,
    last: i64,
    batch: RecordBatch,
) -> anyhow::Result<()> {
    let n = batch.num_rows() as i64;
    let write = PartitionWrite {
        tp: tp.clone(),
        claim: Claim {
            expected: (last >= 0).then_some(last),
            last: last + n,
        },
        files: vec![DataFile {
            date: NaiveDate::from_ymd_opt(2026, 12, 5).expect("a date"),
            batch,
            key: Some(Arc::from(vec![
                "user_id".to_string(),
                "tweet_id".to_string(),
            ])),
        }],
    };
    let outcome = changelog.write(table, &[write]).await?;
    anyhow::ensure!(outcome.fenced.is_empty(), "fenced: another writer");
    Ok(())
}

async fn live_files(root: &LakeRoot, table: &str) -> anyhow::Result<usize> {
    let mut t = root.handle(table)?;
    t.load().await?;
    Ok(t.snapshot()?.log_data().iter().count())
}

/// A lake root whose store counts its requests: the bucket is reached as
/// `counted-bench-s3://<bucket>/`, which resolves to the sink's S3 store, wrapped.
fn counted_root(
    cfg: &SinkConfig,
    prefix: &str,
    counters: Arc<Counters>,
) -> anyhow::Result<LakeRoot> {
    storage::register();
    let scheme = counted_scheme("s3", "bench", counters).map_err(anyhow::Error::msg)?;
    let url = Url::parse(&format!("{scheme}://{}/{prefix}/", cfg.s3.bucket))?;
    // The builder must know the scheme too, or it refuses the URL.
    DeltaTableBuilder::from_url(url.clone())?;
    Ok(LakeRoot::at(url, storage::options(&cfg.s3)?))
}

/// splitmix64: a reproducible stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Resets the kernel's peak-RSS mark (VmHWM) of this process.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
