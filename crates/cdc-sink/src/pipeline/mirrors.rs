//! Keeps the current-state tables in step with the changelogs: a task beside
//! the loop, told which tables' changelogs just committed, that syncs their
//! mirrors, a few tables side by side and each table one sync at a time.
//! Notices for a table arriving while it syncs coalesce into one more sync,
//! so a slow mirror catches up in few commits instead of queueing one per
//! flush. At start it syncs every changelog
//! (a crash between a changelog commit and its mirror's, or a lake written
//! before mirrors); at shutdown each pending table gets one more sync.
//!
//! A mirror that fails is logged and counted and tried again at its table's
//! next commit: the changelog, which the mirror is rebuilt from, goes on.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::lake::mirror::{Mirror, MirrorError};
use crate::retry::{Dependency, chain, with_retry};
use crate::telemetry as t;

/// Tables synced side by side at most: one table's build from its whole
/// changelog (minutes on a big one) does not hold the others' syncs.
/// Builds themselves take turns ([`Mirror`]), so memory stays bounded.
const CONCURRENT: usize = 4;

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
    /// None: the table has no primary key (logged once).
    NoKey,
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

    /// The first table in turn that is not `busy`.
    fn pop_unless(&mut self, busy: &HashSet<String>) -> Option<String> {
        let at = self.queue.iter().position(|t| !busy.contains(t))?;
        let table = self.queue.remove(at).expect("found there");
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
    let mut recheck_at = None;
    let mut running: JoinSet<(String, Next)> = JoinSet::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    loop {
        // A table in flight stays pending: one more sync once it is done.
        while running.len() < CONCURRENT {
            let Some(table) = pending.pop_unless(&in_flight) else {
                break;
            };
            in_flight.insert(table.clone());
            let mirror = mirror.clone();
            running.spawn(async move {
                let next = sync(&mirror, give_up, &table).await;
                (table, next)
            });
        }
        if stopping && running.is_empty() {
            break;
        }
        tokio::select! {
            received = rx.recv(), if !stopping => match received {
                Some(table) => pending.push(table),
                None => stopping = true,
            },
            Some(done) = running.join_next() => {
                let (table, next) =
                    done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                in_flight.remove(&table);
                match next {
                    // One bounded batch of commits applied: the rest after
                    // the other tables' turn.
                    Next::More if !stopping => pending.push(table),
                    Next::Recheck if !stopping => {
                        recheck_at.get_or_insert_with(|| Instant::now() + RECHECK);
                        rechecks.insert(table);
                    }
                    Next::NoKey if no_key.insert(table.clone()) => tracing::info!(
                        table,
                        "no primary key: no current-state table (the changelog is unaffected)"
                    ),
                    _ => {}
                }
            },
            () = tokio::time::sleep_until(recheck_at.unwrap_or_else(Instant::now)),
                if recheck_at.is_some() && !stopping => {
                recheck_at = None;
                rechecks.drain().for_each(|t| pending.push(t));
            },
        }
    }
}

/// Syncs one table's mirror, again while it loses to a concurrent writer.
async fn sync(mirror: &Mirror, give_up: Duration, table: &str) -> Next {
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
            return Next::NoKey;
        }
        if synced.awaits_build {
            tracing::debug!(table, "waiting for another table's build to end");
            return Next::Recheck;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LakeConfig;
    use crate::lake::mirror::tests::{Lake, TABLE, expect};

    /// A table whose mirror must be built from its whole changelog (the
    /// log entries it would apply are gone, as after
    /// `delta.logRetentionDuration`) holds only its own turn: the other
    /// table's mirror is synced while the build waits before its commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_holds_no_other_tables_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        let config = LakeConfig {
            checkpoint_interval: 5,
            ..LakeConfig::default()
        };
        let mut lake = Lake::at(dir, url, config);
        let other = lake.with_another_table().await;
        let log = lake
            .root
            .table_url(TABLE)
            .to_file_path()
            .unwrap()
            .join("_delta_log");
        for v in 0..5 {
            std::fs::remove_file(log.join(format!("{v:020}.json"))).unwrap();
        }
        let (mirror, gate) = lake.gated_mirror();
        // At start the task syncs every changelog: `items` first.
        let mirrors = Mirrors::spawn(Arc::new(mirror), Duration::from_secs(5));
        gate.reached.notified().await;
        let want = expect(&[(1, "one"), (2, "two")]);
        let synced = async {
            // Polled: the task says nothing of a sync it made.
            while other.rows_if_any().await != want {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), synced)
            .await
            .expect("the other table's mirror waited for the build");
        gate.proceed.notify_one();
        mirrors.finish().await;
        assert_eq!(lake.rows().await.len(), 20_000);
    }
}
