//! The partitions this sink is assigned, each as one [`Partition`]: where
//! it stands ([`Position`], which owns the exactly-once rules) and what it
//! has buffered (its open [`Segment`]). Keeping the two in one type means a
//! revoke or a fence drops both at once; nothing outside aligns them.

use std::collections::hash_map::Entry;
use std::time::Instant;

use crate::lake::changelog::roll::{RollPolicy, RollReason};
use crate::lake::changelog::segment::Segment;
use crate::source::position::{Admit, Position, Stage, Ticket, Tickets, Tp};

pub struct Partition {
    pub position: Position,
    /// Rows and rowless offsets admitted since the last flush.
    pub segment: Option<Segment>,
}

/// A segment taken for flushing, with the position's hand-over.
pub struct Taken {
    pub segment: Segment,
    /// `None` for a segment without rows: nothing goes to the lake.
    pub stage: Option<Stage>,
}

#[derive(Default)]
pub struct Partitions {
    parts: crate::FastMap<Tp, Partition>,
    tickets: Tickets,
}

impl Partitions {
    /// A new assignment starts from nothing: its position is read from the
    /// lake before anything is admitted.
    pub fn assign(&mut self, tp: Tp) {
        let position = Position::new(self.tickets.issue());
        self.parts.insert(
            tp,
            Partition {
                position,
                segment: None,
            },
        );
    }

    /// Forgets `tp`; returns whether a buffered segment went with it.
    pub fn revoke(&mut self, tp: &Tp) -> bool {
        self.parts.remove(tp).is_some_and(|p| p.segment.is_some())
    }

    pub fn is_assigned(&self, tp: &Tp) -> bool {
        self.parts.contains_key(tp)
    }

    /// What to do with `offset` of `tp`; `None` if `tp` is not assigned
    /// (a message fetched before a revoke: its new owner reads it again).
    pub fn admit(&mut self, tp: &Tp, offset: i64) -> Option<Admit> {
        self.parts.get_mut(tp).map(|p| p.position.admit(offset))
    }

    /// The lake's version of `tp`, read after [`Admit::NeedsLakeVersion`]
    /// or a fence.
    pub fn learn(&mut self, tp: &Tp, version: Option<i64>) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.position.learn(version);
        }
    }

    /// Right after [`Partitions::learn`]: where to send the consumer now.
    pub fn seek_now(&mut self, tp: &Tp) -> Option<i64> {
        self.parts.get_mut(tp).and_then(|p| p.position.seek_now())
    }

    /// The open segment of `tp`, opened at `offset` if there is none.
    /// Only for an admitted offset of an assigned partition.
    pub fn segment(&mut self, tp: &Tp, offset: i64) -> &mut Segment {
        self.parts
            .get_mut(tp)
            .expect("an admitted offset's partition is assigned")
            .segment
            .get_or_insert_with(|| Segment::new(offset))
    }

    /// Takes `tp`'s open segment for flushing and, if it holds rows, hands
    /// its offsets over for committing.
    pub fn take(&mut self, tp: &Tp) -> Option<Taken> {
        let p = self.parts.get_mut(tp)?;
        let segment = p.segment.take()?;
        let stage = (segment.rows() > 0).then(|| p.position.stage(segment.last));
        Some(Taken { segment, stage })
    }

    /// A write staged with `ticket` landed.
    pub fn committed(&mut self, tp: &Tp, ticket: Ticket, last: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            p.position.committed(ticket, last);
        }
    }

    /// Another writer advanced `tp` (or a seek failed): its buffer and its
    /// position go, and the position is read again from the lake. With
    /// `staged_by`, only if the position is still the one that staged the
    /// fenced write. Returns whether it started over.
    pub fn fence(&mut self, tp: &Tp, staged_by: Option<Ticket>, dropped_from: Option<i64>) -> bool {
        let Entry::Occupied(mut e) = self.parts.entry(tp.clone()) else {
            return false;
        };
        let p = e.get_mut();
        if !p.position.fence(&mut self.tickets, staged_by, dropped_from) {
            return false;
        }
        p.segment = None;
        true
    }

    /// Bytes buffered in open segments.
    pub fn buffered_bytes(&self) -> usize {
        self.segments().map(|(_, s)| s.bytes).sum()
    }

    pub fn open_segments(&self) -> usize {
        self.segments().count()
    }

    /// When the oldest open segment opened.
    pub fn oldest(&self) -> Option<Instant> {
        self.segments().map(|(_, s)| s.opened).min()
    }

    /// The partition with the largest open segment.
    pub fn largest(&self) -> Option<Tp> {
        self.segments()
            .max_by_key(|(_, s)| s.bytes)
            .map(|(tp, _)| tp.clone())
    }

    /// Partitions whose segment is due by `policy`.
    pub fn due(&self, policy: &RollPolicy) -> Vec<(Tp, RollReason)> {
        self.segments()
            .filter_map(|(tp, s)| s.roll_reason(policy).map(|r| (tp.clone(), r)))
            .collect()
    }

    /// Partitions with an open segment.
    pub fn buffered(&self) -> Vec<Tp> {
        self.segments().map(|(tp, _)| tp.clone()).collect()
    }

    /// Whether `tp`'s segment is full (rows or bytes): age is the tick's
    /// to check.
    pub fn full(&self, tp: &Tp, policy: &RollPolicy) -> Option<RollReason> {
        self.parts.get(tp)?.segment.as_ref()?.full(policy)
    }

    fn segments(&self) -> impl Iterator<Item = (&Tp, &Segment)> {
        self.parts
            .iter()
            .filter_map(|(tp, p)| p.segment.as_ref().map(|s| (tp, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        Tp::new("db.t", 0)
    }

    #[test]
    fn a_fence_drops_the_buffer_with_the_position() {
        let mut ps = Partitions::default();
        ps.assign(tp());
        assert_eq!(ps.admit(&tp(), 5), Some(Admit::NeedsLakeVersion));
        ps.learn(&tp(), Some(4));
        assert_eq!(ps.admit(&tp(), 5), Some(Admit::Accept));
        ps.segment(&tp(), 5).cover(5);
        assert_eq!(ps.open_segments(), 1);
        assert!(ps.fence(&tp(), None, Some(5)));
        assert_eq!(ps.open_segments(), 0, "the buffer went with the position");
        assert_eq!(ps.admit(&tp(), 6), Some(Admit::NeedsLakeVersion));
    }

    #[test]
    fn a_stale_fence_changes_nothing() {
        let mut ps = Partitions::default();
        ps.assign(tp());
        ps.learn(&tp(), None);
        ps.admit(&tp(), 0);
        ps.segment(&tp(), 0).cover(0);
        let before = ps.parts[&tp()].position.ticket();
        // A reassignment since: the old ticket no longer applies.
        ps.assign(tp());
        ps.learn(&tp(), None);
        ps.admit(&tp(), 0);
        ps.segment(&tp(), 0).cover(0);
        assert!(!ps.fence(&tp(), Some(before), Some(0)));
        assert_eq!(ps.open_segments(), 1);
    }

    #[test]
    fn a_segment_without_rows_is_not_staged() {
        let mut ps = Partitions::default();
        ps.assign(tp());
        ps.learn(&tp(), None);
        ps.admit(&tp(), 0);
        ps.segment(&tp(), 0).cover(0);
        let taken = ps.take(&tp()).unwrap();
        assert!(taken.stage.is_none());
        assert!(ps.take(&tp()).is_none(), "taken once");
        assert!(!ps.revoke(&tp()), "nothing buffered left");
        assert!(!ps.is_assigned(&tp()));
    }
}
