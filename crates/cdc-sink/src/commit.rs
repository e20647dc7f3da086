//! Offset bookkeeping: the one place that does offset arithmetic.
//!
//! The rules, which together give exactly-once output:
//! - a partition's offsets are committed to Kafka only after every file of
//!   the segment that covers them is written, and the committed offset is
//!   the segment's last offset plus one ([`commit_offset`]);
//! - when a partition (re)starts at offset `x`, the intent recorded at `x`
//!   (if any) says where the segment that was being written there ended, and
//!   the new segment must end at exactly that offset ([`Boundary`]), so the
//!   replay rewrites the same objects instead of overlapping them.
//!
//! [`Offsets`] keeps that state per partition.

use std::collections::HashMap;

/// A topic and partition.
pub type Tp = (String, i32);

/// The offset to commit after a segment ending at `last` is durable: Kafka
/// commits name the next message to read.
pub fn commit_offset(last: i64) -> i64 {
    last + 1
}

/// What to do with the segment when a message at `offset` arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Append to the open segment (opening one if needed).
    Append,
    /// Append, then close the segment: it now ends where the intent said.
    AppendThenRoll,
    /// The intent's last offset was skipped over (compaction, say): close
    /// the open segment first, then start a new one with this message.
    RollThenAppend,
}

/// Where `offset` falls relative to a pending intent ending at `intent_last`.
pub fn boundary(intent_last: Option<i64>, offset: i64) -> Boundary {
    match intent_last {
        None => Boundary::Append,
        Some(last) if offset < last => Boundary::Append,
        Some(last) if offset == last => Boundary::AppendThenRoll,
        Some(_) => Boundary::RollThenAppend,
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PartitionState {
    /// Look for an intent at the next segment's first offset.
    check_intent: bool,
    /// The segment being replayed must end here.
    intent_last: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<Tp, PartitionState>,
}

impl Offsets {
    /// A partition was assigned: its position comes from Kafka's committed
    /// offset, where an intent may be waiting.
    pub fn assign(&mut self, tp: Tp) {
        self.parts.insert(
            tp,
            PartitionState {
                check_intent: true,
                ..Default::default()
            },
        );
    }

    pub fn revoke(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    pub fn is_assigned(&self, tp: &Tp) -> bool {
        self.parts.contains_key(tp)
    }

    /// True when a segment starting now must first look for an intent.
    pub fn needs_intent_check(&self, tp: &Tp) -> bool {
        self.parts.get(tp).is_some_and(|p| p.check_intent)
    }

    /// Records the result of the intent lookup for the segment starting at
    /// `first`. An intent that ends before `first` is stale and ignored.
    pub fn set_intent(&mut self, tp: &Tp, first: i64, intent_last: Option<i64>) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.check_intent = false;
            p.intent_last = intent_last.filter(|&last| last >= first);
        }
    }

    /// Drops a pending intent none of whose offsets arrived (they were
    /// compacted away); the next segment looks for a chained one.
    pub fn expire_intent(&mut self, tp: &Tp) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.intent_last = None;
            p.check_intent = true;
        }
    }

    pub fn boundary(&self, tp: &Tp, offset: i64) -> Boundary {
        boundary(self.parts.get(tp).and_then(|p| p.intent_last), offset)
    }

    /// True while the open segment replays an intent; it must not be cut
    /// early by the roll policy or it would no longer match the intent.
    pub fn replaying(&self, tp: &Tp) -> bool {
        self.parts.get(tp).is_some_and(|p| p.intent_last.is_some())
    }

    /// A segment ending at `last` is durable. Returns the offset to commit.
    /// A replayed intent may be followed by another one written before the
    /// same crash, so the next segment looks again.
    pub fn flushed(&mut self, tp: &Tp, last: i64) -> i64 {
        let next = commit_offset(last);
        if let Some(p) = self.parts.get_mut(tp)
            && p.intent_last.take().is_some()
        {
            p.check_intent = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        ("twitter.tweets".into(), 0)
    }

    #[test]
    fn commit_is_last_plus_one() {
        assert_eq!(commit_offset(0), 1);
        assert_eq!(commit_offset(41), 42);
    }

    #[test]
    fn boundary_follows_intent() {
        assert_eq!(boundary(None, 7), Boundary::Append);
        assert_eq!(boundary(Some(10), 7), Boundary::Append);
        assert_eq!(boundary(Some(10), 10), Boundary::AppendThenRoll);
        assert_eq!(boundary(Some(10), 12), Boundary::RollThenAppend);
    }

    #[test]
    fn replay_then_chain_then_normal() {
        let mut o = Offsets::default();
        o.assign(tp());
        assert!(o.needs_intent_check(&tp()));
        // Restart at 100 finds an intent 100..=180.
        o.set_intent(&tp(), 100, Some(180));
        assert!(!o.needs_intent_check(&tp()));
        assert!(o.replaying(&tp()));
        assert_eq!(o.boundary(&tp(), 150), Boundary::Append);
        assert_eq!(o.boundary(&tp(), 180), Boundary::AppendThenRoll);
        assert_eq!(o.flushed(&tp(), 180), 181);
        // The next segment looks for a chained intent at 181; none there.
        assert!(o.needs_intent_check(&tp()));
        o.set_intent(&tp(), 181, None);
        assert!(!o.replaying(&tp()));
        assert_eq!(o.boundary(&tp(), 10_000), Boundary::Append);
        assert_eq!(o.flushed(&tp(), 300), 301);
        // Normal flushes do not trigger lookups.
        assert!(!o.needs_intent_check(&tp()));
    }

    #[test]
    fn an_intent_whose_offsets_are_gone_expires() {
        let mut o = Offsets::default();
        o.assign(tp());
        o.set_intent(&tp(), 10, Some(20));
        assert_eq!(o.boundary(&tp(), 25), Boundary::RollThenAppend);
        o.expire_intent(&tp());
        assert_eq!(o.boundary(&tp(), 25), Boundary::Append);
        assert!(o.needs_intent_check(&tp()));
    }

    #[test]
    fn stale_intent_is_ignored() {
        let mut o = Offsets::default();
        o.assign(tp());
        o.set_intent(&tp(), 200, Some(150));
        assert!(!o.replaying(&tp()));
    }

    #[test]
    fn revoked_partitions_forget_everything() {
        let mut o = Offsets::default();
        o.assign(tp());
        o.set_intent(&tp(), 1, Some(5));
        o.revoke(&tp());
        assert!(!o.is_assigned(&tp()));
        assert_eq!(o.boundary(&tp(), 5), Boundary::Append);
        // Re-assignment starts from Kafka's committed offset again.
        o.assign(tp());
        assert!(o.needs_intent_check(&tp()));
    }
}
