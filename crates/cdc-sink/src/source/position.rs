//! Where each assigned partition stands: the one type that decides which
//! Kafka messages may enter the lake.
//!
//! The lake is the source of truth. Every Delta commit carries, per Kafka
//! partition it covers, a `txn` action whose version is the last offset it
//! holds. A [`Position`] starts [`Unknown`](State::Unknown) on assignment,
//! learns that version from the table before it admits anything, and from
//! then on admits each offset at most once:
//! - an offset at or below the lake's version is already there: skipped;
//! - the first message after assignment must be exactly version + 1, or the
//!   consumer is sent there (Kafka's committed offsets are only a lag
//!   report and may be behind or ahead);
//! - a commit must find the version it was built on, or another writer got
//!   there first: [`Claim::judge`] says which, and a fenced partition
//!   starts over ([`Position::fence`]).
//!
//! Commits are pipelined: a partition's next write is handed over
//! ([`Position::stage`]) while its previous one is still in flight, so it
//! expects the version that one will leave, not the lake's. Every write
//! carries the [`Ticket`] of the position that staged it; a fence or a new
//! assignment issues new tickets, so the outcome of a write staged before
//! it (committed or fenced) no longer moves the position.
//!
//! Call sites never compare offsets themselves. The pipeline keeps one
//! [`Position`] per assigned partition, together with what that partition
//! has buffered (`pipeline::partition`).

use std::sync::Arc;

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tp {
    /// Shared: a `Tp` is made for every message, and cloned into every
    /// map and commit that names its partition.
    pub topic: Arc<str>,
    pub partition: i32,
}

impl Tp {
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Tp {
        Tp {
            topic: topic.into(),
            partition,
        }
    }
}

/// The [`Tp`]s of the partitions messages came from, so that naming a
/// message's partition is a comparison, not an allocation. Messages come
/// in runs from one partition (a fetch's batch), so the last one is tried
/// first. It holds one entry per partition the process has consumed,
/// revoked ones included: a few hundred at most, a few bytes each.
#[derive(Debug, Default)]
pub struct TpNames {
    seen: Vec<Tp>,
    last: usize,
}

impl TpNames {
    pub fn get(&mut self, topic: &str, partition: i32) -> Tp {
        let is = |t: &Tp| t.partition == partition && *t.topic == *topic;
        if let Some(tp) = self.seen.get(self.last).filter(|t| is(t)) {
            return tp.clone();
        }
        self.last = match self.seen.iter().position(is) {
            Some(i) => i,
            None => {
                let shared = self.seen.iter().find(|t| *t.topic == *topic);
                let topic = shared.map_or_else(|| Arc::from(topic), |t| t.topic.clone());
                self.seen.push(Tp { topic, partition });
                self.seen.len() - 1
            }
        };
        self.seen[self.last].clone()
    }
}

impl std::fmt::Display for Tp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Buffer it: it is the next offset this partition needs.
    Accept,
    /// Drop it: the lake already has it, or it precedes a pending seek.
    Skip,
    /// Drop it and move the consumer to this offset.
    SeekTo(i64),
    /// The lake's version must be read before anything is admitted.
    NeedsLakeVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Assigned; the lake has not been asked yet.
    Unknown,
    /// The lake's version is known; nothing admitted since.
    Known,
    /// The consumer was sent to `target`; older offsets still in flight are
    /// dropped.
    Seeking { target: i64 },
    /// Offsets below `next` have been admitted (or are in the lake).
    Streaming { next: i64 },
}

/// Matches a write's outcome to the position that staged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// Issues tickets, never the same twice (across reassignments too).
#[derive(Debug, Default)]
pub struct Tickets {
    issued: u64,
}

impl Tickets {
    pub fn issue(&mut self) -> Ticket {
        self.issued += 1;
        Ticket(self.issued)
    }
}

/// A write handed over for committing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub claim: Claim,
    pub ticket: Ticket,
}

/// What one partition's write claims of its table: the `txn` version it
/// builds on and the one it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The `txn` version the table must hold when this write commits:
    /// anything else means another writer has committed since.
    pub expected: Option<i64>,
    /// The write's last offset: the `txn` version it records.
    pub last: i64,
}

/// Whether a write may commit, given the `txn` version the table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The table is where the write expects: commit it.
    Commit,
    /// The table already holds exactly this write: an earlier attempt of
    /// it landed (its answer was lost and the commit retried).
    Landed,
    /// Another writer moved the partition: nothing of this write may land.
    Fenced,
}

impl Claim {
    pub fn judge(&self, found: Option<i64>) -> Verdict {
        if found == self.expected {
            Verdict::Commit
        } else if found == Some(self.last) {
            Verdict::Landed
        } else {
            Verdict::Fenced
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    state: State,
    /// The last offset the lake holds for this partition (its `txn`
    /// version), as of the last read or our last commit.
    lake: Option<i64>,
    /// The last offset handed over for committing and not yet confirmed.
    staged: Option<i64>,
    ticket: Ticket,
    /// After a fence: the first offset whose rows were dropped. If the lake
    /// then still holds nothing of this partition, reading resumes there,
    /// not wherever the consumer happens to be.
    dropped_from: Option<i64>,
}

impl Position {
    /// A newly assigned partition: nothing is admitted before the lake's
    /// version is learnt.
    pub fn new(ticket: Ticket) -> Position {
        Position {
            state: State::Unknown,
            lake: None,
            staged: None,
            ticket,
            dropped_from: None,
        }
    }

    /// Where reading must resume once the lake's version is known: after
    /// the lake's last offset (whoever wrote it, everything up to it is
    /// there); with nothing in the lake, at the first dropped offset; with
    /// neither, `None`: whatever Kafka starts with.
    fn resume_at(&self) -> Option<i64> {
        match self.lake {
            Some(v) => Some(v + 1),
            None => self.dropped_from,
        }
    }

    /// Records the version read from the table.
    pub fn learn(&mut self, lake: Option<i64>) {
        self.lake = lake;
        self.state = State::Known;
    }

    pub fn admit(&mut self, offset: i64) -> Admit {
        match self.state {
            State::Unknown => Admit::NeedsLakeVersion,
            State::Known => match self.resume_at() {
                // Nothing of this partition in the lake: whatever Kafka
                // starts with (committed offset or reset) is the start.
                None => self.accept(offset),
                Some(r) if offset == r => self.accept(offset),
                Some(r) if offset < r => {
                    // Kafka's committed offset lags the lake: read on
                    // through what is already there.
                    self.state = State::Streaming { next: r };
                    Admit::Skip
                }
                Some(r) => {
                    self.state = State::Seeking { target: r };
                    Admit::SeekTo(r)
                }
            },
            State::Seeking { target } if offset < target => Admit::Skip,
            // After a seek, the first offset at or past the target starts
            // the stream; past it means the log start moved (retention or
            // DeleteRecords) and those offsets are gone from Kafka.
            State::Seeking { .. } => self.accept(offset),
            State::Streaming { next } if offset < next => Admit::Skip,
            State::Streaming { .. } => self.accept(offset),
        }
    }

    /// Right after [`Position::learn`]: where to send the consumer now,
    /// without waiting for a message (a fenced partition may be quiet).
    /// `None` leaves the decision to the next message.
    pub fn seek_now(&mut self) -> Option<i64> {
        if self.state != State::Known {
            return None;
        }
        let target = self.resume_at()?;
        self.state = State::Seeking { target };
        Some(target)
    }

    fn accept(&mut self, offset: i64) -> Admit {
        self.state = State::Streaming { next: offset + 1 };
        Admit::Accept
    }

    /// Hands the admitted offsets up to `last` over for committing. The
    /// write must find the version the previous one leaves.
    pub fn stage(&mut self, last: i64) -> Stage {
        let expected = self.staged.or(self.lake);
        debug_assert!(expected.is_none_or(|v| last > v));
        self.staged = Some(last);
        Stage {
            claim: Claim { expected, last },
            ticket: self.ticket,
        }
    }

    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// Another writer advanced this partition (or a seek failed):
    /// everything buffered or in flight from `dropped_from` on is dropped,
    /// and the position is read again from the lake. With `staged_by`, only
    /// if this is still the position that staged the fenced write; returns
    /// whether it started over.
    pub fn fence(
        &mut self,
        tickets: &mut Tickets,
        staged_by: Option<Ticket>,
        dropped_from: Option<i64>,
    ) -> bool {
        if staged_by.is_some_and(|t| t != self.ticket) {
            return false;
        }
        *self = Position {
            dropped_from,
            ..Position::new(tickets.issue())
        };
        true
    }

    /// A write holding offsets up to `last` landed. Ignored when the write
    /// was staged before a fence: the position has been read again since.
    pub fn committed(&mut self, ticket: Ticket, last: i64) {
        if ticket != self.ticket {
            return;
        }
        self.lake = Some(self.lake.map_or(last, |v| v.max(last)));
        if self.staged == Some(last) {
            self.staged = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp_names_hand_out_one_shared_topic_per_topic() {
        let mut names = TpNames::default();
        let a0 = names.get("db.a", 0);
        let a1 = names.get("db.a", 1);
        let b0 = names.get("db.b", 0);
        assert_eq!(a0, Tp::new("db.a", 0));
        assert_eq!(a1, Tp::new("db.a", 1));
        assert_eq!(b0, Tp::new("db.b", 0));
        assert!(Arc::ptr_eq(&a0.topic, &a1.topic));
        // Found again, last one or not, without a new allocation.
        assert!(Arc::ptr_eq(&names.get("db.b", 0).topic, &b0.topic));
        assert!(Arc::ptr_eq(&names.get("db.a", 1).topic, &a0.topic));
        assert_eq!(names.get("db.a", 0), a0);
        assert_eq!(names.seen.len(), 3);
    }

    fn known(lake: Option<i64>) -> Position {
        let mut p = Position::new(Ticket(0));
        p.learn(lake);
        p
    }

    /// A newly assigned partition whose lake version is `lake`, and the
    /// tickets it was issued from.
    fn assigned(lake: Option<i64>) -> (Position, Tickets) {
        let mut tickets = Tickets::default();
        let mut p = Position::new(tickets.issue());
        p.learn(lake);
        (p, tickets)
    }

    #[test]
    fn a_claim_commits_only_on_the_version_it_builds_on() {
        let claim = Claim {
            expected: Some(10),
            last: 14,
        };
        assert_eq!(claim.judge(Some(10)), Verdict::Commit);
        assert_eq!(claim.judge(Some(14)), Verdict::Landed);
        assert_eq!(claim.judge(Some(12)), Verdict::Fenced);
        assert_eq!(claim.judge(None), Verdict::Fenced);
        let first = Claim {
            expected: None,
            last: 3,
        };
        assert_eq!(first.judge(None), Verdict::Commit);
        assert_eq!(first.judge(Some(3)), Verdict::Landed);
    }

    #[test]
    fn nothing_is_admitted_before_the_lake_is_read() {
        let mut p = Position::new(Ticket(0));
        assert_eq!(p.admit(0), Admit::NeedsLakeVersion);
        p.learn(None);
        assert_eq!(
            p.admit(7),
            Admit::Accept,
            "an empty lake takes Kafka's start"
        );
        assert_eq!(p.admit(7), Admit::Skip, "never the same offset twice");
        assert_eq!(p.admit(8), Admit::Accept);
    }

    #[test]
    fn kafka_behind_the_lake_reads_through() {
        let mut p = known(Some(10));
        assert_eq!(p.admit(5), Admit::Skip);
        assert_eq!(p.admit(10), Admit::Skip);
        assert_eq!(p.admit(11), Admit::Accept);
    }

    #[test]
    fn kafka_ahead_of_the_lake_seeks_back() {
        let mut p = known(Some(10));
        assert_eq!(p.admit(20), Admit::SeekTo(11));
        assert_eq!(p.admit(10), Admit::Skip);
        assert_eq!(p.admit(11), Admit::Accept);
        assert_eq!(p.admit(12), Admit::Accept);
    }

    #[test]
    fn a_log_start_past_the_target_is_accepted_once() {
        let mut p = known(Some(10));
        assert_eq!(p.admit(30), Admit::SeekTo(11));
        // Offsets 11..25 were deleted: the seek lands on 25.
        assert_eq!(p.admit(25), Admit::Accept);
        assert_eq!(p.admit(25), Admit::Skip);
    }

    #[test]
    fn writes_in_flight_chain_their_expected_versions() {
        let mut p = known(Some(10));
        assert_eq!(p.admit(11), Admit::Accept);
        let first = p.stage(11);
        assert_eq!(first.claim.expected, Some(10));
        assert_eq!(p.admit(12), Admit::Accept);
        assert_eq!(p.admit(13), Admit::Accept);
        // Staged while the first is still in flight: it builds on it.
        let second = p.stage(13);
        assert_eq!(second.claim.expected, Some(11));
        p.committed(first.ticket, 11);
        p.committed(second.ticket, 13);
        assert_eq!(p.admit(14), Admit::Accept);
        assert_eq!(p.stage(14).claim.expected, Some(13));
    }

    #[test]
    fn fencing_starts_over_from_the_lake() {
        let (mut p, mut tickets) = assigned(Some(10));
        assert_eq!(p.admit(11), Admit::Accept);
        let stage = p.stage(11);
        assert!(p.fence(&mut tickets, Some(stage.ticket), Some(11)));
        assert_eq!(p.admit(12), Admit::NeedsLakeVersion);
        p.learn(Some(40));
        assert_eq!(p.admit(12), Admit::Skip);
        assert_eq!(p.admit(41), Admit::Accept);
        assert_eq!(
            p.stage(41).claim.expected,
            Some(40),
            "nothing staged before survives"
        );
    }

    /// Outcomes of writes staged before a fence no longer move the
    /// position: it has been read again from the lake.
    #[test]
    fn outcomes_of_writes_staged_before_a_fence_are_ignored() {
        let (mut p, mut tickets) = assigned(Some(10));
        p.admit(11);
        let first = p.stage(11);
        p.admit(12);
        let second = p.stage(12);
        assert!(p.fence(&mut tickets, Some(first.ticket), Some(11)));
        // The second write was fenced too, after the position started over.
        assert!(!p.fence(&mut tickets, Some(second.ticket), Some(12)));
        p.learn(Some(30));
        p.committed(second.ticket, 12);
        assert_eq!(p.admit(31), Admit::Accept);
        assert_eq!(p.stage(31).claim.expected, Some(30));
        // A reassignment issues a new ticket as well.
        let old = p.ticket();
        let mut p = Position::new(tickets.issue());
        assert!(!p.fence(&mut tickets, Some(old), None));
    }

    #[test]
    fn a_fenced_partition_seeks_without_waiting_for_a_message() {
        let (mut p, mut tickets) = assigned(Some(10));
        assert_eq!(p.admit(11), Admit::Accept);
        assert!(p.fence(&mut tickets, None, Some(11)));
        p.learn(Some(20));
        assert_eq!(p.seek_now(), Some(21));
        assert_eq!(p.admit(15), Admit::Skip, "fetched before the seek");
        assert_eq!(p.admit(21), Admit::Accept);
        let mut q = known(None);
        assert_eq!(q.seek_now(), None, "nothing to go back to");
    }

    /// A fence on a partition the lake holds nothing of must not skip the
    /// rows it dropped: reading resumes at the first of them.
    #[test]
    fn a_fence_before_any_commit_resumes_at_the_dropped_rows() {
        let (mut p, mut tickets) = assigned(None);
        assert_eq!(p.admit(0), Admit::Accept);
        assert!(p.fence(&mut tickets, None, Some(0)));
        assert_eq!(p.admit(50), Admit::NeedsLakeVersion);
        p.learn(None);
        assert_eq!(p.admit(50), Admit::SeekTo(0));
        assert_eq!(p.admit(0), Admit::Accept);
    }
}
