//! Readiness: whether the service is doing its job right now, as `/readyz`
//! reports it.
//!
//! The service owns the truth and sets it from its own loop (connected,
//! committed, failed); the HTTP server only reads it. A plain mutex is
//! enough: both sides hold it for a clone or an assignment, never across an
//! `.await`.

use std::sync::{Arc, Mutex, PoisonError};

/// A cloneable handle on the service's readiness. Starts not ready, with the
/// reason given to [`Readiness::new`].
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<Mutex<Result<(), String>>>,
    /// A gauge (1 ready, 0 not) kept equal to the state, for services whose
    /// metrics contract has one.
    gauge: Option<&'static str>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new("starting")
    }
}

impl Readiness {
    /// Not ready, because of `reason` (say, "connecting to PostgreSQL").
    pub fn new(reason: impl Into<String>) -> Self {
        Readiness {
            state: Arc::new(Mutex::new(Err(one_line(reason.into())))),
            gauge: None,
        }
    }

    /// Also keeps gauge `name` at 1 while ready and 0 otherwise.
    pub fn with_gauge(mut self, name: &'static str) -> Self {
        self.gauge = Some(name);
        self.publish(self.is_ready());
        self
    }

    /// `Ok(())` when ready, else `Err(reason)`. The reason is shown on one
    /// line: line breaks in it become spaces.
    pub fn set(&self, state: Result<(), String>) {
        let ready = state.is_ok();
        *self.lock() = state.map_err(one_line);
        self.publish(ready);
    }

    pub fn set_ready(&self) {
        self.set(Ok(()));
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set(Err(reason.into()));
    }

    /// The current state: `Err` holds why the service is not ready.
    pub fn get(&self) -> Result<(), String> {
        self.lock().clone()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<(), String>> {
        // A panic elsewhere while holding the lock left a whole value behind
        // (assignments cannot tear), so the state is still meaningful.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, ready: bool) {
        if let Some(name) = self.gauge {
            metrics::gauge!(name).set(if ready { 1.0 } else { 0.0 });
        }
    }
}

fn one_line(reason: String) -> String {
    if reason.contains(['\n', '\r']) {
        reason.replace(['\n', '\r'], " ")
    } else {
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_not_ready_and_follows_set() {
        let r = Readiness::new("connecting");
        assert_eq!(r.get(), Err("connecting".to_string()));
        let shared = r.clone();
        shared.set_ready();
        assert!(r.is_ready());
        shared.set_not_ready("lost\nthe connection");
        assert_eq!(r.get(), Err("lost the connection".to_string()));
    }
}
