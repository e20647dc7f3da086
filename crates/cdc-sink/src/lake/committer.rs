//! The write path behind the loop. Flushes are handed over here and the
//! loop goes back to consuming: each flush is staged (its files encoded off
//! the runtime and put, several at once) while earlier ones are still
//! being committed, and flushes are committed strictly in the order they
//! were handed over, so a partition's writes land in offset order. The
//! tables of one flush commit concurrently, one Delta transaction each.
//!
//! A write whose commit fails for good ends the process: what was not
//! committed is read again from Kafka by the next run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use futures::{StreamExt, stream};
use tokio::sync::mpsc;

use crate::lake::LakeError;
use crate::lake::changelog::{Changelog, CommitOutcome, PartitionWrite, Staged};
use crate::retry::{Dependency, with_retry};
use crate::source::position::{Ticket, Tp};

/// Flushes staged ahead of the one being committed.
const STAGE_AHEAD: usize = 2;

#[derive(Debug, thiserror::Error)]
#[error("the lake failed for {secs}s; giving up")]
pub struct LakeFailed {
    pub secs: u64,
    #[source]
    pub source: Box<LakeError>,
}

/// One partition's part of a flush.
pub struct Write {
    /// Matches the outcome to the position that staged it.
    pub ticket: Ticket,
    /// The write's first offset: where a fenced partition resumes at the
    /// latest.
    pub first: i64,
    /// The newest source commit time (ms) of its rows.
    pub newest_source_ms: i64,
    pub write: PartitionWrite,
}

/// One table's part of a flush.
pub struct TableFlush {
    pub table: String,
    pub writes: Vec<Write>,
}

/// What the loop hands over: the segments flushed together.
pub struct Flush {
    /// Each becomes one Delta transaction.
    pub tables: Vec<TableFlush>,
    /// Partitions whose flushed offsets hold no rows (tombstones,
    /// quarantined messages), with their last offset: nothing goes to the
    /// lake, only Kafka's committed offset moves, in order with the rest.
    pub rowless: Vec<(Tp, i64)>,
    /// Decoded bytes the flush holds until it is committed.
    pub bytes: usize,
    /// When its oldest segment opened.
    pub opened: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Committed,
    /// Another writer had advanced the partition: nothing of it landed.
    Fenced,
}

/// What became of one [`Write`].
#[derive(Debug, Clone)]
pub struct Landed {
    pub tp: Tp,
    pub ticket: Ticket,
    pub first: i64,
    pub last: i64,
    pub newest_source_ms: i64,
    pub fate: Fate,
}

/// One table's commit, for logs and metrics.
#[derive(Debug)]
pub struct TableCommit {
    pub table: String,
    pub outcome: CommitOutcome,
    /// From the start of staging to the end of the commit.
    pub took: Duration,
}

/// A flush, committed.
#[derive(Debug)]
pub struct Flushed {
    pub landed: Vec<Landed>,
    pub rowless: Vec<(Tp, i64)>,
    pub tables: Vec<TableCommit>,
}

/// The handle the loop holds.
pub struct Committer {
    flushes: Option<mpsc::UnboundedSender<Flush>>,
    flushed: mpsc::UnboundedReceiver<Result<Flushed, LakeFailed>>,
    /// Flushes handed over and not yet reported back, oldest first (they
    /// are reported in that order).
    in_flight: VecDeque<InFlight>,
}

struct InFlight {
    bytes: usize,
    opened: Instant,
}

impl Committer {
    pub fn spawn(lake: Arc<Changelog>, give_up: Duration) -> Committer {
        let (flushes, rx) = mpsc::unbounded_channel();
        // Unbounded both ways: the loop bounds what is in flight by bytes
        // (see `pipeline`), and a bounded result channel could deadlock a
        // loop that waits to hand over the next flush.
        let (tx, flushed) = mpsc::unbounded_channel();
        tokio::spawn(run(lake, give_up, rx, tx));
        Committer {
            flushes: Some(flushes),
            flushed,
            in_flight: VecDeque::new(),
        }
    }

    pub fn submit(&mut self, flush: Flush) {
        let held = InFlight {
            bytes: flush.bytes,
            opened: flush.opened,
        };
        if let Some(tx) = &self.flushes
            && tx.send(flush).is_ok()
        {
            self.in_flight.push_back(held);
        }
        // Otherwise the task has stopped; `next` reports why.
    }

    /// Flushes handed over and not yet reported back.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Decoded bytes the flushes in flight hold.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight.iter().map(|f| f.bytes).sum()
    }

    /// When the oldest row not yet committed was buffered, if one is in
    /// flight.
    pub fn oldest_in_flight(&self) -> Option<Instant> {
        self.in_flight.front().map(|f| f.opened)
    }

    /// The next committed flush, in order. `None` once [`Committer::close`]
    /// was called and everything is reported, or if the task died.
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Flushed, LakeFailed>> {
        let done = self.flushed.recv().await;
        if done.is_some() {
            self.in_flight.pop_front();
        }
        done
    }

    /// No more flushes: [`Committer::next`] drains what is in flight.
    pub fn close(&mut self) {
        self.flushes = None;
    }
}

async fn run(
    lake: Arc<Changelog>,
    give_up: Duration,
    mut rx: mpsc::UnboundedReceiver<Flush>,
    tx: mpsc::UnboundedSender<Result<Flushed, LakeFailed>>,
) {
    // Each staging is a task of its own: it must make progress while this
    // loop awaits a commit (a staging that was merely a future here would
    // sit unpolled meanwhile, and one holding a table's lock, to create the
    // table, would block that commit forever). `buffered` only keeps them
    // in order.
    let stager = lake.clone();
    let mut staged = stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(move |flush| {
            let lake = stager.clone();
            tokio::spawn(async move { stage(&lake, give_up, flush).await })
        })
        .buffered(STAGE_AHEAD);
    while let Some(next) = staged.next().await {
        let next = next.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let result = match next {
            Ok(s) => commit(&lake, give_up, s).await,
            Err(e) => Err(e),
        };
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

struct StagedTable {
    staged: Staged,
    writes: Vec<Write>,
    started: Instant,
}

struct StagedFlush {
    tables: Vec<StagedTable>,
    rowless: Vec<(Tp, i64)>,
}

async fn stage(
    lake: &Changelog,
    give_up: Duration,
    flush: Flush,
) -> Result<StagedFlush, LakeFailed> {
    let tables = try_join_all(flush.tables.into_iter().map(
        |TableFlush { table, writes }| async move {
            let started = Instant::now();
            let parts: Vec<PartitionWrite> = writes.iter().map(|w| w.write.clone()).collect();
            let staged = with_retry(Dependency::Lake, give_up, LakeError::is_retryable, || {
                lake.stage(&table, &parts)
            })
            .await
            .map_err(|g| LakeFailed {
                secs: g.secs,
                source: Box::new(g.error),
            })?;
            Ok::<_, LakeFailed>(StagedTable {
                staged,
                writes,
                started,
            })
        },
    ))
    .await?;
    Ok(StagedFlush {
        tables,
        rowless: flush.rowless,
    })
}

async fn commit(
    lake: &Changelog,
    give_up: Duration,
    flush: StagedFlush,
) -> Result<Flushed, LakeFailed> {
    let tables = try_join_all(flush.tables.into_iter().map(|t| async move {
        let outcome = with_retry(Dependency::Lake, give_up, LakeError::is_retryable, || {
            lake.commit(&t.staged)
        })
        .await
        .map_err(|g| LakeFailed {
            secs: g.secs,
            source: Box::new(g.error),
        })?;
        let landed: Vec<Landed> = t
            .writes
            .iter()
            .map(|w| {
                let tp = &w.write.tp;
                let fate = if outcome.fenced.contains(tp) {
                    Fate::Fenced
                } else {
                    debug_assert!(outcome.committed.iter().any(|(c, _)| c == tp));
                    Fate::Committed
                };
                Landed {
                    tp: tp.clone(),
                    ticket: w.ticket,
                    first: w.first,
                    last: w.write.claim.last,
                    newest_source_ms: w.newest_source_ms,
                    fate,
                }
            })
            .collect();
        let report = TableCommit {
            table: t.staged.table().to_string(),
            outcome,
            took: t.started.elapsed(),
        };
        Ok::<_, LakeFailed>((landed, report))
    }))
    .await?;
    let mut done = Flushed {
        landed: Vec::new(),
        rowless: flush.rowless,
        tables: Vec::new(),
    };
    for (landed, report) in tables {
        done.landed.extend(landed);
        done.tables.push(report);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::NaiveDate;
    use url::Url;

    use super::*;
    use crate::config::{LakeConfig, OutputConfig};
    use crate::lake::changelog::DataFile;
    use crate::lake::files::{FileWriter, writer_properties};
    use crate::lake::table::LakeRoot;
    use crate::source::position::{Position, Tickets};

    /// Flushes of several new tables handed over back to back: each is
    /// staged (creating its tables) while the one before commits. They all
    /// land, in order, and every table holds each offset once. (A staging
    /// that held a table's lock while not being polled once blocked the
    /// commit before it forever.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn back_to_back_flushes_of_new_tables_all_commit_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Arc::new(Changelog::new(
            LakeRoot::at(
                Url::from_directory_path(dir.path()).unwrap(),
                HashMap::new(),
            ),
            "g",
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &LakeConfig::default(),
        ));
        let tables = ["a", "b", "c", "d"];
        let mut tickets = Tickets::default();
        let mut positions = HashMap::new();
        for t in tables {
            let mut p = Position::new(tickets.issue());
            p.learn(None);
            positions.insert(Tp::new(format!("db.{t}"), 0), p);
        }
        let mut committer = Committer::spawn(lake.clone(), Duration::from_secs(5));
        let flushes = 6;
        for offset in 0..flushes {
            let tables = tables
                .iter()
                .map(|t| {
                    let tp = Tp::new(format!("db.{t}"), 0);
                    let position = positions.get_mut(&tp).unwrap();
                    position.admit(offset);
                    let stage = position.stage(offset);
                    TableFlush {
                        table: t.to_string(),
                        writes: vec![Write {
                            ticket: stage.ticket,
                            first: offset,
                            newest_source_ms: 0,
                            write: PartitionWrite {
                                tp,
                                claim: stage.claim,
                                files: vec![DataFile {
                                    date: NaiveDate::from_ymd_opt(2026, 11, 27).unwrap(),
                                    batch: crate::lake::changelog::tests::batch(0, offset),
                                    key: None,
                                }],
                            },
                        }],
                    }
                })
                .collect();
            committer.submit(Flush {
                tables,
                rowless: Vec::new(),
                bytes: 0,
                opened: Instant::now(),
            });
        }
        committer.close();
        let mut landed = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(done) = committer.next().await {
                landed.extend(done.unwrap().landed);
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "the committer hung: {} writes landed",
            landed.len()
        );
        assert_eq!(landed.len(), tables.len() * flushes as usize);
        assert!(landed.iter().all(|l| l.fate == Fate::Committed));
        for t in tables {
            let offsets: Vec<i64> = landed
                .iter()
                .filter(|l| *l.tp.topic == format!("db.{t}"))
                .map(|l| l.last)
                .collect();
            assert_eq!(
                offsets,
                (0..flushes).collect::<Vec<_>>(),
                "{t}: out of order"
            );
            let tp = Tp::new(format!("db.{t}"), 0);
            assert_eq!(
                lake.positions(t, &[tp]).await.unwrap(),
                vec![Some(flushes - 1)]
            );
        }
    }
}
