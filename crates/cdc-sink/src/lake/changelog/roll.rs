//! When a partition's open segment is closed and flushed: kept apart from
//! the segment and the writer, which only ask it.

use std::time::Duration;

use crate::config::FlushConfig;

/// When a segment closes: whichever limit is reached first.
#[derive(Debug, Clone, Copy)]
pub struct RollPolicy {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollReason {
    Rows,
    Bytes,
    Age,
}

impl RollPolicy {
    /// The limits `flush.*` configures.
    pub fn from_config(flush: &FlushConfig) -> RollPolicy {
        RollPolicy {
            max_rows: flush.max_rows,
            max_bytes: flush.max_bytes,
            max_age: Duration::from_millis(flush.max_age_ms),
        }
    }

    pub fn check(&self, rows: usize, bytes: usize, age: Duration) -> Option<RollReason> {
        self.full(rows, bytes)
            .or((age >= self.max_age).then_some(RollReason::Age))
    }

    /// [`RollPolicy::check`] without the age: whether a segment is full,
    /// which is asked after every row, where reading the clock would be a
    /// good part of a row's cost.
    pub fn full(&self, rows: usize, bytes: usize) -> Option<RollReason> {
        if rows >= self.max_rows {
            Some(RollReason::Rows)
        } else if bytes >= self.max_bytes {
            Some(RollReason::Bytes)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rolls_on_first_limit_reached() {
        let p = RollPolicy {
            max_rows: 10,
            max_bytes: 100,
            max_age: Duration::from_secs(10),
        };
        assert_eq!(p.check(9, 99, Duration::from_secs(9)), None);
        assert_eq!(p.check(10, 0, Duration::ZERO), Some(RollReason::Rows));
        assert_eq!(p.check(0, 100, Duration::ZERO), Some(RollReason::Bytes));
        assert_eq!(
            p.check(0, 0, Duration::from_secs(10)),
            Some(RollReason::Age)
        );
        assert_eq!(p.full(0, 0), None);
        assert_eq!(p.full(10, 100), Some(RollReason::Rows));
        assert_eq!(p.full(0, 100), Some(RollReason::Bytes));
    }
}
