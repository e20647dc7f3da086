//! systemd notifications (`Type=notify`): `READY=1` once the service is up,
//! and `WATCHDOG=1` from its main loop, so that a loop stuck on something
//! that never returns gets the unit restarted (`WatchdogSec=`).
//!
//! Outside systemd (`NOTIFY_SOCKET` and `WATCHDOG_USEC` unset) every call is
//! a no-op. A failed notification is logged, never fatal: the service works
//! the same, and systemd's own timeouts report what went wrong.

use std::time::Duration;

/// Tells systemd the service is up (`READY=1`).
pub fn ready() {
    notify(sd_notify::NotifyState::Ready);
}

/// The watchdog the service manager set for this process, if any.
///
/// Ping it from the main loop's tick: not from a timer task of its own,
/// which would keep pinging while the loop is stuck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watchdog {
    interval: Option<Duration>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this
    /// process if set), as systemd passes them for `WatchdogSec=`.
    pub fn from_env() -> Self {
        Watchdog {
            interval: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// No watchdog: [`ping`](Self::ping) does nothing and
    /// [`bound`](Self::bound) bounds nothing.
    pub fn disabled() -> Self {
        Watchdog::default()
    }

    /// The interval systemd expects pings within, if a watchdog is set.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Sends `WATCHDOG=1` when a watchdog is set.
    pub fn ping(&self) {
        if self.interval.is_some() {
            notify(sd_notify::NotifyState::Watchdog);
        }
    }

    /// `wait`, cut to half the watchdog interval: the longest a loop may
    /// sleep between pings and still leave systemd a margin, as
    /// `sd_watchdog_enabled(3)` recommends.
    pub fn bound(&self, wait: Duration) -> Duration {
        match self.interval {
            Some(interval) => wait.min(interval / 2),
            None => wait,
        }
    }
}

fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(std::slice::from_ref(&state)) {
        tracing::warn!(error = %err, notification = %state, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_half_the_interval() {
        let dog = Watchdog {
            interval: Some(Duration::from_secs(30)),
        };
        assert_eq!(dog.bound(Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(dog.bound(Duration::from_secs(5)), Duration::from_secs(5));
        let off = Watchdog::disabled();
        assert_eq!(off.bound(Duration::from_secs(60)), Duration::from_secs(60));
    }
}
