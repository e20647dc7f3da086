//! The run loop: one batch per tick (or one chunk per pacing step in load
//! mode), reconnecting when PostgreSQL goes away, stopping cleanly on
//! shutdown.
//!
//! A batch is planned once ([`plan`]) and then attempted until it commits.
//! Only connection-level and serialization errors are retried, with capped
//! backoff; any other error ends the run. If the connection broke while
//! COMMIT was in flight, the batch's ledger row (`tweetgen_batches`) tells on
//! the next connection whether it committed, so it is neither written twice
//! nor skipped. Shutdown is observed between batches, never inside one.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use chrono::Timelike;

use backon::RetryableWithContext;
use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::{self, Watchdog};
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::config::{Config, ConfigError, LoadMethod};
use crate::db::{self, BatchOutcome, CommitHook, DbError, WriteFailure, is_retryable};
use crate::load::{self, LoadChunk};
use crate::model::Faker;
use crate::plan::{self, BatchPlan};
use crate::pools::{Committed, Pools};
use crate::telemetry;
use crate::throttle::{Throttle, Verdict};

/// Consecutive failed attempts at one batch before the run gives up.
const MAX_ATTEMPTS: usize = 20;

/// When to stop, besides a signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub batches: Option<u64>,
    pub duration: Option<Duration>,
}

/// Everything [`run_with`] takes besides the configuration.
#[derive(Clone, Default)]
pub struct RunOptions {
    pub limits: Limits,
    /// Load mode: about that many rows per second (0 = as fast as possible).
    pub rate: Option<u64>,
    /// Test hook: called before each COMMIT of a batch.
    pub before_commit: Option<CommitHook>,
    /// Set ready while connected, not ready (with why) otherwise and after
    /// a batch failed for good. Whoever serves `/readyz` holds a clone.
    pub readiness: Readiness,
    /// Pinged once per loop iteration; the loop never sleeps past half its
    /// interval. [`Watchdog::from_env`] under systemd.
    pub watchdog: Watchdog,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Random per run; the key of its rows in `tweetgen_batches`.
    pub run_id: i64,
    pub batches: u64,
    pub rows: u64,
    pub reconnects: u64,
    /// Batches whose COMMIT went unanswered and were resolved by the ledger.
    pub ambiguous_commits: u64,
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
    #[error("writing batch {batch_no} failed, not retried: the error is not connection-level")]
    Batch {
        batch_no: i64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("batch {batch_no} still failing after {attempts} attempts")]
    GaveUp {
        batch_no: i64,
        attempts: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("loading the ids of existing rows failed")]
    Load(#[source] tokio_postgres::Error),
}

/// A connection that is (re)opened on demand.
struct Session<'a> {
    config: &'a Config,
    password: Option<SecretString>,
    client: Option<Client>,
    /// Connections replaced after the first one.
    reconnects: u64,
    shutdown: watch::Receiver<bool>,
    readiness: Readiness,
    watchdog: Watchdog,
    /// systemd was told READY=1 (once, at the first connection).
    notified_ready: bool,
}

impl<'a> Session<'a> {
    async fn client(&mut self) -> Result<&mut Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            if self.client.take().is_some() {
                self.lost_connection("PostgreSQL closed the connection; reconnecting");
            }
            let client = db::connect(
                &self.config.database,
                self.password.as_ref(),
                &mut self.shutdown,
                self.watchdog,
            )
            .await?;
            self.client = Some(client);
            self.readiness.set_ready();
            if !self.notified_ready {
                systemd::ready();
                self.notified_ready = true;
            }
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    /// The connection in hand is gone; the next [`Session::client`] opens
    /// another.
    fn lost_connection(&mut self, why: impl Into<String>) {
        self.reconnects += 1;
        telemetry::reconnect();
        self.readiness.set_not_ready(why);
    }

    /// Waits while the throttle holds writes (a replication slot close to
    /// being lost), pinging the watchdog; returns at once otherwise.
    /// `Err(Shutdown)` when shutdown is asked for meanwhile.
    async fn hold_while_throttled(&mut self, throttle: &mut Throttle) -> Result<(), DbError> {
        if !throttle.enabled() {
            return Ok(());
        }
        let mut held = false;
        loop {
            let client = self.client().await?;
            match throttle.check(client).await {
                Verdict::Write => {
                    if held {
                        self.readiness.set_ready();
                    }
                    return Ok(());
                }
                Verdict::Hold { safe_wal_bytes } if !held => {
                    held = true;
                    self.readiness.set_not_ready(format!(
                        "holding writes: a replication slot can take only {safe_wal_bytes} more bytes of WAL"
                    ));
                }
                Verdict::Hold { .. } => {}
            }
            self.watchdog.ping();
            let wait = self.watchdog.bound(throttle.interval());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.wait_for(|stop| *stop) => return Err(DbError::Shutdown),
            }
        }
    }

    /// After a retryable error: a broken connection is replaced on the next
    /// attempt; after a serialization failure the connection is still good.
    fn on_retryable(&mut self, err: &tokio_postgres::Error) {
        let conflict = err.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        });
        if !conflict && self.client.take().is_some() {
            self.lost_connection(format!(
                "lost the connection to PostgreSQL ({err}); reconnecting"
            ));
        }
    }

    /// Runs `op` on a connection, retried with backoff while its error is
    /// retryable. For statements that can simply be sent again.
    async fn retry<'s, T>(
        &'s mut self,
        what: &'static str,
        op: impl for<'c> Fn(&'c mut Client) -> BoxFuture<'c, Result<T, tokio_postgres::Error>> + Sync,
    ) -> Result<T, RunError>
    where
        'a: 's,
    {
        let op = &op;
        let watchdog = self.watchdog;
        let (_, result) = {
            with_context::<&'s mut Self, _, _, _>(|session| async move {
                let r = match session.client().await {
                    Ok(client) => op(client).await.map_err(AttemptError::Pg),
                    Err(e) => Err(AttemptError::Connect(e)),
                };
                if let Err(AttemptError::Pg(e)) = &r
                    && is_retryable(e)
                {
                    session.on_retryable(e);
                }
                (session, r)
            })
        }
        .retry(db::backoff().with_max_times(MAX_ATTEMPTS))
        .context(self)
        .when(AttemptError::is_retryable)
        .notify(|err, wait| {
            watchdog.ping();
            tracing::warn!(error = %err, what, retry_in_ms = wait.as_millis() as u64, "retrying");
        })
        .await;
        result.map_err(|e| match e {
            AttemptError::Connect(e) => RunError::Db(e),
            AttemptError::Pg(source) => RunError::Load(source),
        })
    }
}

/// Fixes the context type of a closure for backon's `RetryableWithContext`:
/// written inline, the closure's argument would get a lifetime of its own
/// and could not be handed back.
fn with_context<C, F, Fut, T>(f: F) -> F
where
    F: FnMut(C) -> Fut,
    Fut: Future<Output = (C, T)>,
{
    f
}

/// Why one attempt failed. Internal: becomes a [`RunError`] when retrying
/// ends.
#[derive(Debug)]
enum AttemptError {
    Connect(DbError),
    Pg(tokio_postgres::Error),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => e.fmt(f),
            AttemptError::Pg(e) => e.fmt(f),
        }
    }
}

impl AttemptError {
    fn is_retryable(&self) -> bool {
        matches!(self, AttemptError::Pg(e) if is_retryable(e))
    }
}

/// The state one batch's attempts share.
struct Attempts<'s, 'a, O> {
    session: &'s mut Session<'a>,
    count: u32,
    /// What the last attempt wrote if its COMMIT went unanswered.
    unanswered: Option<O>,
    ambiguous: bool,
}

impl<O> Attempts<'_, '_, O> {
    async fn once(
        &mut self,
        run_id: i64,
        batch_no: i64,
        job: &impl Job<Output = O>,
    ) -> Result<O, AttemptError> {
        self.count += 1;
        let client = self.session.client().await.map_err(AttemptError::Connect)?;
        if let Some(outcome) = self.unanswered.take() {
            self.ambiguous = true;
            match db::batch_committed(client, run_id, batch_no).await {
                Ok(true) => {
                    tracing::warn!(
                        batch_no,
                        "unanswered COMMIT had committed; not writing the batch again"
                    );
                    return Ok(outcome);
                }
                Ok(false) => {
                    tracing::warn!(
                        batch_no,
                        "unanswered COMMIT had rolled back; writing the batch again"
                    );
                }
                Err(e) => {
                    self.unanswered = Some(outcome);
                    return Err(AttemptError::Pg(e));
                }
            }
        }
        let begun = Instant::now();
        let outcome = job.write(client, self.count).await.map_err(|failure| {
            self.unanswered = failure.commit_sent;
            AttemptError::Pg(failure.error)
        })?;
        // Only here is BEGIN..COMMIT known: a commit resolved through the
        // ledger above has no duration to report.
        telemetry::transaction(begun.elapsed());
        Ok(outcome)
    }
}

type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// One transaction of the workload that also writes ledger row `batch_no`.
trait Job: Sync {
    type Output: Send;
    /// `attempt` counts from 1.
    fn write<'c>(
        &'c self,
        client: &'c mut Client,
        attempt: u32,
    ) -> BoxFuture<'c, Result<Self::Output, WriteFailure<Self::Output>>>;
}

struct BatchJob<'p> {
    run_id: i64,
    plan: &'p BatchPlan,
    hook: Option<&'p CommitHook>,
}

impl Job for BatchJob<'_> {
    type Output = BatchOutcome;
    fn write<'c>(
        &'c self,
        client: &'c mut Client,
        attempt: u32,
    ) -> BoxFuture<'c, Result<BatchOutcome, WriteFailure<BatchOutcome>>> {
        let hook = self.hook.map(|h| (h, attempt));
        Box::pin(db::write_batch(client, self.run_id, self.plan, hook))
    }
}

struct LoadJob<'p> {
    run_id: i64,
    chunk_no: i64,
    method: LoadMethod,
    chunk: &'p LoadChunk,
}

impl Job for LoadJob<'_> {
    type Output = Committed;
    fn write<'c>(
        &'c self,
        client: &'c mut Client,
        _: u32,
    ) -> BoxFuture<'c, Result<Committed, WriteFailure<Committed>>> {
        Box::pin(load::write_chunk(
            client,
            self.run_id,
            self.chunk_no,
            self.method,
            self.chunk,
        ))
    }
}

/// A transaction that committed.
struct Landed<O> {
    outcome: O,
    /// A COMMIT went unanswered on the way and the ledger resolved it.
    ambiguous: bool,
}

/// Runs `job` until it commits exactly once, retrying what can be retried.
/// Returns its outcome and whether a COMMIT went unanswered on the way.
async fn commit_once<'s, 'a, O: Send>(
    session: &'s mut Session<'a>,
    run_id: i64,
    batch_no: i64,
    job: &impl Job<Output = O>,
) -> Result<Landed<O>, RunError> {
    let watchdog = session.watchdog;
    let attempts = Attempts {
        session,
        count: 0,
        unanswered: None,
        ambiguous: false,
    };
    let (attempts, result) = {
        with_context::<Attempts<'s, 'a, O>, _, _, _>(|mut a| async move {
            let r = a.once(run_id, batch_no, job).await;
            if let Err(AttemptError::Pg(e)) = &r
                && is_retryable(e)
            {
                a.session.on_retryable(e);
            }
            (a, r)
        })
    }
    .retry(db::backoff().with_max_times(MAX_ATTEMPTS))
    .context(attempts)
    .when(AttemptError::is_retryable)
    .notify(|err, wait| {
        telemetry::retry();
        watchdog.ping();
        tracing::warn!(batch_no, error = %err, retry_in_ms = wait.as_millis() as u64,
            "batch failed, retrying");
    })
    .await;
    match result {
        Ok(outcome) => Ok(Landed {
            outcome,
            ambiguous: attempts.ambiguous,
        }),
        Err(AttemptError::Connect(e)) => Err(RunError::Db(e)),
        Err(AttemptError::Pg(source)) if is_retryable(&source) => Err(RunError::GaveUp {
            batch_no,
            attempts: MAX_ATTEMPTS + 1,
            source,
        }),
        Err(AttemptError::Pg(source)) => Err(RunError::Batch { batch_no, source }),
    }
}

fn done(limits: &Limits, summary: &Summary, started: Instant) -> bool {
    limits.batches.is_some_and(|n| summary.batches >= n)
        || limits.duration.is_some_and(|d| started.elapsed() >= d)
}

/// Runs the configured workload until a limit or shutdown. `rate` switches
/// to load mode: about that many rows per second (0 = as fast as possible).
pub async fn run(
    config: &Config,
    limits: Limits,
    rate: Option<u64>,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, RunError> {
    let options = RunOptions {
        limits,
        rate,
        ..RunOptions::default()
    };
    run_with(config, options, shutdown).await
}

/// [`run`] with every option.
pub async fn run_with(
    config: &Config,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Summary, RunError> {
    let mut session = Session {
        config,
        password: config.database.resolve_password()?,
        client: None,
        reconnects: 0,
        shutdown,
        readiness: options.readiness.clone(),
        watchdog: options.watchdog,
        notified_ready: false,
    };
    let mut faker = Faker::new(config.workload.seed, config.workload.long_bio_ratio);
    let mut pools = match session
        .retry("load pools", |c| Box::pin(Pools::load(c)))
        .await
    {
        Ok(p) => p,
        Err(RunError::Db(DbError::Shutdown)) => return Ok(Summary::default()),
        Err(e) => {
            session.readiness.set_not_ready(error_chain(&e));
            return Err(e);
        }
    };
    let started = Instant::now();
    // Not from the seeded source: two runs with one seed are still two runs.
    let mut summary = Summary {
        run_id: rand::random::<i64>().abs(),
        ..Summary::default()
    };
    let result = match options.rate {
        None => {
            run_batches(
                &mut session,
                &mut faker,
                &mut pools,
                &options,
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
                options.limits,
                rate,
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
        Err(e) => {
            session.readiness.set_not_ready(error_chain(&e));
            Err(e)
        }
    }
}

async fn run_batches(
    session: &mut Session<'_>,
    faker: &mut Faker,
    pools: &mut Pools,
    options: &RunOptions,
    summary: &mut Summary,
    started: Instant,
) -> Result<(), RunError> {
    let mix = session.config.workload.clone();
    let interval = session.config.interval();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // An interval longer than half the watchdog's is slept in pieces, each
    // followed by a ping.
    let wake = session.watchdog.bound(interval);
    let mut last_report = Instant::now();
    let mut shutdown = session.shutdown.clone();
    let mut throttle = Throttle::new(&session.config.throttle);
    while !done(&options.limits, summary, started) {
        session.watchdog.ping();
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = ticker.tick() => {}
            _ = tokio::time::sleep(wake), if wake < interval => continue,
        }
        session.hold_while_throttled(&mut throttle).await?;
        let batch_no = summary.batches as i64 + 1;
        let rate = if mix.diurnal_amplitude > 0.0 {
            let now = chrono::Utc::now();
            let hour = f64::from(now.hour()) + f64::from(now.minute()) / 60.0;
            plan::diurnal_factor(mix.diurnal_amplitude, hour)
        } else {
            1.0
        };
        let plan = plan::plan(faker, pools, &mix, batch_no, rate);
        let hook = options.before_commit.as_ref();
        let run_id = summary.run_id;
        let job = BatchJob {
            run_id,
            plan: &plan,
            hook,
        };
        let Landed { outcome, ambiguous } = commit_once(session, run_id, batch_no, &job).await?;
        telemetry::batch_committed(&outcome);
        pools.apply(&outcome.committed(&plan));
        summary.batches += 1;
        summary.rows += outcome.rows();
        summary.ambiguous_commits += u64::from(ambiguous);
        tracing::debug!(batch_no, ?outcome, "batch committed");
        if last_report.elapsed() >= Duration::from_secs(30) {
            tracing::info!(batches = summary.batches, rows = summary.rows, "progress");
            last_report = Instant::now();
        }
    }
    Ok(())
}

async fn run_load(
    session: &mut Session<'_>,
    faker: &mut Faker,
    pools: &mut Pools,
    limits: Limits,
    rate: u64,
    summary: &mut Summary,
    started: Instant,
) -> Result<(), RunError> {
    let load = session.config.load.clone();
    let mix = session.config.workload.clone();
    let run_id = summary.run_id;
    let mut shutdown = session.shutdown.clone();
    let watchdog = session.watchdog;
    // At a set rate, ten chunks a second keep the pacing smooth.
    let chunk_rows = match rate {
        0 => load.chunk_rows as u64,
        r => (r / 10).clamp(1, load.chunk_rows as u64),
    } as usize;
    let mut last_report = Instant::now();
    let mut throttle = Throttle::new(&session.config.throttle);
    while !done(&limits, summary, started) && !*shutdown.borrow() {
        watchdog.ping();
        session.hold_while_throttled(&mut throttle).await?;
        // Before any user exists, a first chunk of users only.
        let rows = if pools.user_count() == 0 {
            chunk_rows.clamp(100, 1000)
        } else {
            chunk_rows
        };
        let chunk = load::plan_chunk(faker, pools, &mix, rows);
        let chunk_no = summary.batches as i64 + 1;
        let job = LoadJob {
            run_id,
            chunk_no,
            method: load.method,
            chunk: &chunk,
        };
        let Landed {
            outcome: committed,
            ambiguous,
        } = commit_once(session, run_id, chunk_no, &job).await?;
        telemetry::chunk_committed(&committed, chunk.tweets.len());
        summary.rows += (committed.users.len()
            + chunk.tweets.len()
            + committed.likes.len()
            + committed.follows.len()) as u64;
        pools.apply(&committed);
        summary.batches += 1;
        summary.ambiguous_commits += u64::from(ambiguous);
        if rate > 0 {
            let due = started + Duration::from_secs_f64(summary.rows as f64 / rate as f64);
            // In pieces of at most half the watchdog interval, pinging after each.
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep(watchdog.bound(wait)) => watchdog.ping(),
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
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

/// `err` and its causes on one line, for `/readyz`.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
