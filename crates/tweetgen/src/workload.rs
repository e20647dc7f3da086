//! The run loop: one batch per tick (or one chunk per pacing step in load
//! mode), reconnecting when PostgreSQL goes away, stopping cleanly on
//! shutdown.
//!
//! A batch is never interrupted half-way by a signal: shutdown is only
//! observed between batches and while waiting to reconnect, and a batch that
//! a broken connection cut short was rolled back by the server, so it is
//! written again in full on the new connection.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::config::{Config, ConfigError};
use crate::db::{self, DbError, is_transient};
use crate::load;
use crate::model::Faker;
use crate::pools::Pools;

/// When to stop, besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub batches: Option<u64>,
    pub duration: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub batches: u64,
    pub rows: u64,
    pub reconnects: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("writing a batch failed")]
    Batch(#[source] tokio_postgres::Error),
}

/// A connection that is (re)opened on demand.
struct Session<'a> {
    config: &'a Config,
    password: Option<SecretString>,
    client: Option<Client>,
    /// Connections replaced after the first one.
    reconnects: u64,
}

impl Session<'_> {
    async fn client(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<&mut Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            if self.client.is_some() {
                self.reconnects += 1;
            }
            self.client =
                Some(db::connect(&self.config.database, self.password.as_ref(), shutdown).await?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    /// Decides what a failed write means: retry on a new connection, or stop.
    fn on_error(&mut self, err: tokio_postgres::Error) -> Result<(), RunError> {
        if is_transient(&err) {
            tracing::warn!(error = %err, "connection lost mid-batch; the batch was rolled back and will be retried");
            if self.client.take().is_some() {
                self.reconnects += 1;
            }
            Ok(())
        } else {
            Err(RunError::Batch(err))
        }
    }
}

fn done(limits: &Limits, summary: &Summary, started: Instant) -> bool {
    limits.batches.is_some_and(|n| summary.batches >= n)
        || limits.duration.is_some_and(|d| started.elapsed() >= d)
}

/// Runs the configured workload until a limit or shutdown. `rate` switches
/// to load mode: that many tweets per second (0 = as fast as possible).
pub async fn run(
    config: &Config,
    limits: Limits,
    rate: Option<u64>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Summary, RunError> {
    let mut session = Session {
        config,
        password: config.database.resolve_password()?,
        client: None,
        reconnects: 0,
    };
    let mut faker = Faker::new(config.workload.seed, config.workload.long_bio_ratio);
    let mut pools = loop {
        let client = match session.client(&mut shutdown).await {
            Ok(c) => c,
            Err(DbError::Shutdown) => return Ok(Summary::default()),
            Err(e) => return Err(e.into()),
        };
        match Pools::load(client).await {
            Ok(p) => break p,
            Err(e) => session.on_error(e)?,
        }
    };
    let started = Instant::now();
    let mut summary = Summary::default();
    let result = match rate {
        None => {
            run_batches(
                &mut session,
                &mut faker,
                &mut pools,
                limits,
                &mut shutdown,
                &mut summary,
                started,
            )
            .await
        }
        Some(rate) => {
            run_load(
                &mut session,
                &mut faker,
                &mut pools,
                limits,
                rate,
                &mut shutdown,
                &mut summary,
                started,
            )
            .await
        }
    };
    summary.elapsed = started.elapsed();
    summary.reconnects = session.reconnects;
    match result {
        Ok(()) | Err(RunError::Db(DbError::Shutdown)) => Ok(summary),
        Err(e) => Err(e),
    }
}

async fn run_batches(
    session: &mut Session<'_>,
    faker: &mut Faker,
    pools: &mut Pools,
    limits: Limits,
    shutdown: &mut watch::Receiver<bool>,
    summary: &mut Summary,
    started: Instant,
) -> Result<(), RunError> {
    let mix = session.config.workload.clone();
    let mut ticker = tokio::time::interval(session.config.interval());
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    while !done(&limits, summary, started) {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = ticker.tick() => {}
        }
        // Retry the same tick until it commits or the error is not transient.
        let mut stale_retries = 0;
        loop {
            let client = session.client(shutdown).await?;
            match db::write_batch(client, faker, pools, &mix).await {
                Ok(outcome) => {
                    pools.apply(&outcome);
                    summary.batches += 1;
                    summary.rows += outcome.rows();
                    tracing::debug!(?outcome, "batch committed");
                    break;
                }
                Err(err)
                    if err.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
                        && stale_retries < 3 =>
                {
                    // Another writer deleted a row our pools still hold.
                    // The batch rolled back; refresh the pools and redo it.
                    stale_retries += 1;
                    tracing::debug!(error = %err, "pools were stale, reloading");
                    let client = session.client(shutdown).await?;
                    match Pools::load(client).await {
                        Ok(fresh) => *pools = fresh,
                        Err(e) => session.on_error(e)?,
                    }
                }
                Err(err) => session.on_error(err)?,
            }
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            tracing::info!(batches = summary.batches, rows = summary.rows, "progress");
            last_report = Instant::now();
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_load(
    session: &mut Session<'_>,
    faker: &mut Faker,
    pools: &mut Pools,
    limits: Limits,
    rate: u64,
    shutdown: &mut watch::Receiver<bool>,
    summary: &mut Summary,
    started: Instant,
) -> Result<(), RunError> {
    let load = session.config.load.clone();
    // Tweets need authors: seed a thousand users once if the table is empty.
    while pools.user_ids().is_empty() {
        let users: Vec<_> = (0..1000).map(|_| faker.user()).collect();
        let client = session.client(shutdown).await?;
        let inserted = async {
            let tx = client.transaction().await?;
            let ids = db::insert_users(&tx, &users).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(ids)
        }
        .await;
        match inserted {
            Ok(ids) => pools.add_users(ids),
            Err(e) => session.on_error(e)?,
        }
    }
    let authors = pools.user_ids();
    let names: Vec<String> = pools.usernames().iter().map(|s| s.to_string()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let parents = pools.tweet_ids();
    // At a set rate, ten chunks a second keep the pacing smooth.
    let chunk = match rate {
        0 => load.chunk_rows as u64,
        r => (r / 10).clamp(1, load.chunk_rows as u64),
    };
    let mut last_report = Instant::now();
    while !done(&limits, summary, started) && !*shutdown.borrow() {
        let tweets: Vec<_> = (0..chunk)
            .map(|_| {
                let author = faker.pick(&authors).expect("authors seeded");
                let parent = if faker.chance(0.2) {
                    faker.pick(&parents)
                } else {
                    None
                };
                faker.tweet(author, parent, &names)
            })
            .collect();
        loop {
            let client = session.client(shutdown).await?;
            match load::write_chunk(client, load.method, &tweets).await {
                Ok(n) => {
                    summary.rows += n;
                    summary.batches += 1;
                    break;
                }
                Err(err) => session.on_error(err)?,
            }
        }
        if rate > 0 {
            let due = Duration::from_secs_f64(summary.rows as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                rows = summary.rows,
                rows_per_sec = (summary.rows as f64 / secs) as u64,
                "load progress"
            );
            last_report = Instant::now();
        }
    }
    Ok(())
}
