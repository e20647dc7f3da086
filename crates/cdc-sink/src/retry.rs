//! How the sink waits out a dependency that fails: capped exponential
//! backoff with jitter, for at most the configured give-up time, after
//! which the error ends the process (and systemd restarts it).

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};

/// A dependency the sink retries, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Kafka,
    S3,
    Lake,
}

impl Dependency {
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Kafka => "kafka",
            Dependency::S3 => "s3",
            Dependency::Lake => "lake",
        }
    }
}

/// What a retried call ended with, after giving up.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub secs: u64,
    pub error: E,
}

/// Retries `f` while its error may pass, for at most `give_up` in total.
pub async fn with_retry<T, E, Fut>(
    dependency: Dependency,
    give_up: Duration,
    retryable: impl Fn(&E) -> bool,
    f: impl FnMut() -> Fut,
) -> Result<T, GaveUp<E>>
where
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error,
{
    let started = Instant::now();
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_total_delay(Some(give_up))
        .without_max_times();
    f.retry(backoff)
        .when(|e| retryable(e))
        .notify(|e, after| {
            metrics::counter!(crate::telemetry::RETRIES, "dependency" => dependency.name())
                .increment(1);
            // Waiting out a dependency is not a hung loop.
            cdc_telemetry::systemd::Watchdog::from_env().ping();
            tracing::warn!(dependency = dependency.name(), error = %chain(e), retry_in = ?after,
                "request failed, retrying");
        })
        .await
        .map_err(|error| {
            metrics::counter!(crate::telemetry::GIVE_UPS, "dependency" => dependency.name())
                .increment(1);
            GaveUp {
                secs: started.elapsed().as_secs(),
                error,
            }
        })
}

/// An error and its causes on one line, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Failure {
        #[error("transient")]
        Transient,
        #[error("permanent")]
        Permanent,
        #[error("outer")]
        Outer(#[source] std::io::Error),
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_the_call_succeeds() {
        let calls = AtomicUsize::new(0);
        let got = with_retry(
            Dependency::S3,
            Duration::from_secs(30),
            |e| matches!(e, Failure::Transient),
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(Failure::Transient),
                    n => Ok(n),
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(got, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_error_that_may_not_pass_is_returned_at_once() {
        let calls = AtomicUsize::new(0);
        let started = Instant::now();
        let got = with_retry(
            Dependency::Lake,
            Duration::from_secs(30),
            |e| matches!(e, Failure::Transient),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Failure::Permanent)
            },
        )
        .await;
        assert!(matches!(
            got,
            Err(GaveUp {
                error: Failure::Permanent,
                ..
            })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn it_gives_up_once_the_time_is_spent() {
        let calls = AtomicUsize::new(0);
        let started = Instant::now();
        let got = with_retry(
            Dependency::Kafka,
            Duration::from_millis(600),
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Failure::Transient)
            },
        )
        .await;
        let gave_up = got.unwrap_err();
        assert!(matches!(gave_up.error, Failure::Transient));
        assert!(
            calls.load(Ordering::SeqCst) >= 2,
            "retried before giving up"
        );
        // The delays add up to at most the give-up time; it does not retry
        // for ever.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Failure::Outer(std::io::Error::other("disk on fire"));
        assert_eq!(chain(&e), "outer: disk on fire");
        assert_eq!(chain(&Failure::Permanent), "permanent");
    }
}
