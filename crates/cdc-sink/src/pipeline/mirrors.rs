//! Keeps the current-state tables in step with the changelogs: a task beside
//! the loop, told which tables' changelogs just committed, that syncs their
//! mirrors one table at a time. Notices for a table arriving while it syncs
//! coalesce into one more sync, so a slow mirror catches up in few commits
//! instead of queueing one per flush. At start it syncs every changelog
//! (a crash between a changelog commit and its mirror's, or a lake written
//! before mirrors); at shutdown each pending table gets one more sync.
//!
//! A mirror that fails is logged and counted and tried again at its table's
//! next commit: the changelog, which the mirror is rebuilt from, goes on.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::lake::mirror::{Mirror, MirrorError};
use crate::retry::{Dependency, chain, with_retry};
use crate::telemetry as t;

/// Syncs lost to a concurrent writer in a row before a table waits for its
/// next commit.
const MAX_CONFLICTS: usize = 5;

/// How soon a table whose sync waits for the other half of a primary-key
/// update is synced again without a commit of its own (the other half may
/// come through another sink of the group).
const RECHECK: Duration = Duration::from_secs(1);

/// What a table needs after a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Nothing until its next commit.
    Done,
    /// Its changelog has more to apply.
    More,
    /// Another sync shortly: it waits for the other half of a primary-key
    /// update.
    Recheck,
}

pub struct Mirrors {
    changed: Option<mpsc::UnboundedSender<String>>,
    task: JoinHandle<()>,
}

impl Mirrors {
    pub fn spawn(mirror: Arc<Mirror>, give_up: Duration) -> Mirrors {
        let (tx, rx) = mpsc::unbounded_channel();
        Mirrors {
            changed: Some(tx),
            task: tokio::spawn(run(mirror, give_up, rx)),
        }
    }

    /// `table`'s changelog committed: its mirror is behind.
    pub fn changed(&self, table: &str) {
        if let Some(tx) = &self.changed {
            let _ = tx.send(table.to_string());
        }
    }

    /// Syncs what is pending, then stops.
    pub async fn finish(mut self) {
        self.changed = None;
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Tables waiting for a sync, in turn, each once.
#[derive(Default)]
struct Pending {
    queue: VecDeque<String>,
    queued: HashSet<String>,
}

impl Pending {
    fn push(&mut self, table: String) {
        if self.queued.insert(table.clone()) {
            self.queue.push_back(table);
        }
    }

    fn pop(&mut self) -> Option<String> {
        let table = self.queue.pop_front()?;
        self.queued.remove(&table);
        Some(table)
    }
}

async fn run(mirror: Arc<Mirror>, give_up: Duration, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut pending = Pending::default();
    match mirror.root().tables().await {
        Ok(tables) => tables.into_iter().for_each(|t| pending.push(t)),
        Err(e) => {
            tracing::warn!(error = %chain(&e), "listing the changelogs failed; mirrors sync as their tables commit");
        }
    }
    let mut no_key = HashSet::new();
    // Until the loop stops: then each table still pending gets one more
    // sync (one bounded batch), and a mirror further behind catches up at
    // the next start, so that a stop never waits on a long catch-up.
    let mut stopping = false;
    let mut rechecks: HashSet<String> = HashSet::new();
    loop {
        if pending.queue.is_empty() {
            if stopping {
                break;
            }
            let received = if rechecks.is_empty() {
                Some(rx.recv().await)
            } else {
                tokio::time::timeout(RECHECK, rx.recv()).await.ok()
            };
            match received {
                Some(Some(table)) => pending.push(table),
                Some(None) => stopping = true,
                None => rechecks.drain().for_each(|t| pending.push(t)),
            }
        }
        if !stopping {
            loop {
                match rx.try_recv() {
                    Ok(table) => pending.push(table),
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
        }
        let Some(table) = pending.pop() else {
            continue;
        };
        match sync(&mirror, give_up, &table, &mut no_key).await {
            // One bounded batch of commits applied: the rest after the
            // other tables' turn.
            Next::More if !stopping => pending.push(table),
            Next::Recheck if !stopping => {
                rechecks.insert(table);
            }
            _ => {}
        }
    }
}

/// Syncs one table's mirror, again while it loses to a concurrent writer.
async fn sync(
    mirror: &Mirror,
    give_up: Duration,
    table: &str,
    no_key: &mut HashSet<String>,
) -> Next {
    for _ in 0..MAX_CONFLICTS {
        let synced = with_retry(Dependency::Lake, give_up, MirrorError::is_retryable, || {
            mirror.sync(table, false)
        })
        .await;
        let synced = match synced {
            Ok(s) => s,
            Err(gave_up) => {
                metrics::counter!(t::MIRROR_ERRORS, "table" => table.to_string()).increment(1);
                tracing::error!(table, error = %chain(&gave_up.error),
                    "syncing the current-state table failed; trying again at its next commit");
                return Next::Done;
            }
        };
        if synced.conflict {
            continue;
        }

        if synced.no_key {
            if no_key.insert(table.to_string()) {
                tracing::info!(
                    table,
                    "no primary key: no current-state table (the changelog is unaffected)"
                );
            }
            return Next::Done;
        }
        if synced.waiting {
            tracing::debug!(
                table,
                "waiting for the other half of a primary-key update to be committed"
            );
            return Next::Recheck;
        }
        if let Some(through) = synced.through {
            metrics::gauge!(t::MIRROR_CHANGELOG_VERSION, "table" => table.to_string())
                .set(through as f64);
        }
        if synced.version.is_some() {
            metrics::counter!(t::MIRROR_COMMITS, "table" => table.to_string()).increment(1);
            metrics::counter!(t::MIRROR_ROWS_WRITTEN, "table" => table.to_string())
                .increment(synced.rows_written as u64);
            metrics::counter!(t::MIRROR_BYTES_WRITTEN, "table" => table.to_string())
                .increment(synced.bytes_written as u64);
            if synced.unavailable > 0 {
                metrics::counter!(t::MIRROR_UNAVAILABLE, "table" => table.to_string())
                    .increment(synced.unavailable as u64);
                // Not silent: those columns of those rows are NULL.
                tracing::warn!(
                    table,
                    creates = synced.unavailable,
                    "primary-key updates whose unchanged TOASTed values had no previous image \
                     in this sync (the old key's delete is in another sync's commits); \
                     those columns stay NULL"
                );
            }
            if let Some(us) = synced.through_commit_us {
                metrics::gauge!(t::MIRROR_SOURCE_TIMESTAMP, "table" => table.to_string())
                    .set(us as f64 / 1e6);
            }
            if synced.full && !synced.rechosen {
                tracing::info!(table, through = ?synced.through, upserts = synced.upserts,
                    "current-state table built from the whole changelog");
            } else {
                tracing::debug!(table, through = ?synced.through, upserts = synced.upserts,
                    deletes = synced.deletes, files_removed = synced.files_removed,
                    files_added = synced.files_added, "current-state table synced");
            }
        }
        return if synced.behind {
            Next::More
        } else {
            Next::Done
        };
    }
    tracing::warn!(
        table,
        "the current-state table kept losing to concurrent writers; trying again at its next commit"
    );
    Next::Done
}
