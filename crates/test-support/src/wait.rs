//! Waiting on a condition with a deadline: the tests' only way to wait for
//! something to happen. A test names what it waits for and how to observe
//! it; it never sleeps for a time it hopes is long enough.
//!
//! The probe returns `Ok(value)` once the condition holds, or `Err(state)`
//! with what it saw instead; past the deadline the wait panics (or, with
//! the `try_` forms, returns [`TimedOut`]) naming what it waited for and
//! the last state seen, so a failure says how far things got.

use std::fmt;
use std::time::{Duration, Instant};

/// How long a wait pauses between two probes. Short against the deadlines
/// the tests use; a probe that is itself slow (a lake read) sets its own
/// pace.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A wait that ran out of time.
#[derive(Debug)]
pub struct TimedOut {
    /// What the test waited for.
    pub what: String,
    /// How long it waited.
    pub waited: Duration,
    /// The state the last probe reported.
    pub last: String,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:.1?} waiting for {}; last seen: {}",
            self.waited, self.what, self.last
        )
    }
}

impl std::error::Error for TimedOut {}

/// Probes until `probe` returns `Ok`, at most for `deadline`; panics with
/// `what` and the last state otherwise.
///
/// ```ignore
/// let n = wait_until("10 rows in the lake", Duration::from_secs(60), async || {
///     let n = count_rows().await;
///     if n >= 10 { Ok(n) } else { Err(format!("{n} rows")) }
/// })
/// .await;
/// ```
pub async fn wait_until<T, S: fmt::Display>(
    what: &str,
    deadline: Duration,
    probe: impl AsyncFnMut() -> Result<T, S>,
) -> T {
    try_wait_until(what, deadline, probe)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_until`], returning the timeout instead of panicking: for a test
/// that adds context (a process's log) to the failure, or cleans up.
pub async fn try_wait_until<T, S: fmt::Display>(
    what: &str,
    deadline: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, S>,
) -> Result<T, TimedOut> {
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(state) if started.elapsed() >= deadline => {
                return Err(TimedOut {
                    what: what.to_string(),
                    waited: started.elapsed(),
                    last: state.to_string(),
                });
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`wait_until`] for code outside an async runtime (a plain `#[test]`, a
/// `Drop`).
pub fn wait_until_blocking<T, S: fmt::Display>(
    what: &str,
    deadline: Duration,
    probe: impl FnMut() -> Result<T, S>,
) -> T {
    try_wait_until_blocking(what, deadline, probe).unwrap_or_else(|e| panic!("{e}"))
}

/// [`try_wait_until`] for code outside an async runtime.
pub fn try_wait_until_blocking<T, S: fmt::Display>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> Result<T, S>,
) -> Result<T, TimedOut> {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(v) => return Ok(v),
            Err(state) if started.elapsed() >= deadline => {
                return Err(TimedOut {
                    what: what.to_string(),
                    waited: started.elapsed(),
                    last: state.to_string(),
                });
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let got = wait_until("three probes", Duration::from_secs(5), async || {
            n += 1;
            if n == 3 { Ok(n) } else { Err(n) }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn a_timeout_names_the_wait_and_the_last_state() {
        let err = try_wait_until("never", Duration::from_millis(250), async || {
            Err::<(), _>("still nothing")
        })
        .await
        .unwrap_err();
        assert_eq!(err.what, "never");
        assert_eq!(err.last, "still nothing");
        assert!(err.waited >= Duration::from_millis(250));
        assert!(err.to_string().contains("waiting for never"), "{err}");
    }

    #[test]
    fn blocking_form_times_out_too() {
        let mut probes = 0;
        let err = try_wait_until_blocking("never", Duration::from_millis(250), || {
            probes += 1;
            Err::<(), _>(probes)
        })
        .unwrap_err();
        assert!(probes >= 2, "{probes}");
        assert_eq!(err.last, probes.to_string());
    }
}
