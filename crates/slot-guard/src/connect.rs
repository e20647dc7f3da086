//! The guarded connector, through Kafka Connect's REST API.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::ConnectConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Kafka Connect: {what} failed")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Kafka Connect: {what} answered {status}: {body}")]
    Status {
        what: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("Kafka Connect: connector configuration has no `{0}`")]
    MissingKey(&'static str),
    #[error("Kafka Connect: the connector FAILED while it was to become RUNNING: {trace}")]
    Failed { trace: String },
    #[error("Kafka Connect: the connector is not {want} after {waited:?} (last: {last})")]
    Timeout {
        want: &'static str,
        waited: Duration,
        last: String,
    },
}

/// The connector's state, folded like `tests/stack.sh` folds it: RUNNING
/// only when the connector and every task run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectorState {
    Running,
    Stopped,
    Failed,
    /// Anything else: paused, restarting, no task yet; what was seen.
    Other(String),
}

impl ConnectorState {
    fn from_status(status: &Value) -> ConnectorState {
        let connector = status["connector"]["state"].as_str().unwrap_or("");
        let tasks: Vec<&str> = status["tasks"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["state"].as_str()).collect())
            .unwrap_or_default();
        if connector == "FAILED" || tasks.contains(&"FAILED") {
            ConnectorState::Failed
        } else if connector == "STOPPED" && tasks.is_empty() {
            ConnectorState::Stopped
        } else if connector == "RUNNING"
            && !tasks.is_empty()
            && tasks.iter().all(|t| *t == "RUNNING")
        {
            ConnectorState::Running
        } else {
            ConnectorState::Other(format!("connector {connector}, tasks {tasks:?}"))
        }
    }
}

/// What the guard needs of the connector's configuration.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub raw: Map<String, Value>,
    pub slot: String,
    /// Schema-qualified, as Debezium names it (`public.cdc_signal`).
    pub signal_table: String,
    /// Schema-qualified tables (`public.users`).
    pub tables: Vec<String>,
}

impl ConnectorConfig {
    fn parse(raw: Map<String, Value>) -> Result<ConnectorConfig, ConnectError> {
        let get = |k: &'static str| {
            raw.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(ConnectError::MissingKey(k))
        };
        let slot = get("slot.name")?;
        let signal_table = get("signal.data.collection")?;
        let tables = get("table.include.list")?
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        Ok(ConnectorConfig {
            raw,
            slot,
            signal_table,
            tables,
        })
    }
}

pub struct Connect {
    http: reqwest::Client,
    /// `<url>/connectors/<name>`.
    base: String,
}

impl Connect {
    pub fn new(config: &ConnectConfig) -> Connect {
        Connect {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client without TLS builds"),
            base: format!(
                "{}/connectors/{}",
                config.url.trim_end_matches('/'),
                config.connector
            ),
        }
    }

    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ConnectError> {
        let response = request.send().await.map_err(|source| ConnectError::Http {
            what: what.to_string(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(ConnectError::Status {
            what: what.to_string(),
            status,
            body,
        })
    }

    async fn json(&self, what: &str, path: &str) -> Result<Value, ConnectError> {
        let url = format!("{}{path}", self.base);
        self.send(what, self.http.get(url))
            .await?
            .json()
            .await
            .map_err(|source| ConnectError::Http {
                what: what.to_string(),
                source,
            })
    }

    pub async fn config(&self) -> Result<ConnectorConfig, ConnectError> {
        let value = self
            .json("reading the connector's config", "/config")
            .await?;
        ConnectorConfig::parse(value.as_object().cloned().unwrap_or_default())
    }

    pub async fn state(&self) -> Result<ConnectorState, ConnectError> {
        let status = self
            .json("reading the connector's status", "/status")
            .await?;
        Ok(ConnectorState::from_status(&status))
    }

    pub async fn stop(&self) -> Result<(), ConnectError> {
        let url = format!("{}/stop", self.base);
        self.send("stopping the connector", self.http.put(url))
            .await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), ConnectError> {
        let url = format!("{}/resume", self.base);
        self.send("resuming the connector", self.http.put(url))
            .await?;
        Ok(())
    }

    /// Deletes the connector's source offsets (Connect 3.6+; the
    /// connector must be stopped).
    pub async fn delete_offsets(&self) -> Result<(), ConnectError> {
        let url = format!("{}/offsets", self.base);
        self.send("deleting the connector's offsets", self.http.delete(url))
            .await?;
        Ok(())
    }

    /// The connector's committed source offsets (Connect 3.6+): Connect
    /// commits an offset only once every record before it is written to
    /// Kafka. One map per source partition (Debezium has one).
    pub async fn offsets(&self) -> Result<Vec<Map<String, Value>>, ConnectError> {
        let value = self
            .json("reading the connector's offsets", "/offsets")
            .await?;
        Ok(value
            .get("offsets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("offset")?.as_object().cloned())
            .collect())
    }

    /// Replaces the connector's configuration. A stopped connector stays
    /// stopped.
    pub async fn put_config(&self, config: &Map<String, Value>) -> Result<(), ConnectError> {
        let url = format!("{}/config", self.base);
        self.send(
            "updating the connector's config",
            self.http.put(url).json(config),
        )
        .await?;
        Ok(())
    }

    /// Polls until the connector is in `want`, for at most `timeout`.
    pub async fn wait_for(
        &self,
        want: ConnectorState,
        timeout: Duration,
    ) -> Result<(), ConnectError> {
        let label = match want {
            ConnectorState::Running => "RUNNING",
            ConnectorState::Stopped => "STOPPED",
            _ => "in the state asked for",
        };
        let started = Instant::now();
        loop {
            let last = match self.state().await {
                Ok(s) if s == want => return Ok(()),
                // Waiting longer will not make a failed task run.
                Ok(ConnectorState::Failed) if want == ConnectorState::Running => {
                    let trace = self
                        .json("reading the connector's status", "/status")
                        .await
                        .ok()
                        .and_then(|s| {
                            s["tasks"]
                                .as_array()
                                .and_then(|t| t.iter().find_map(|t| t["trace"].as_str()))
                                .map(|t| t.lines().next().unwrap_or("").to_string())
                        })
                        .unwrap_or_default();
                    return Err(ConnectError::Failed { trace });
                }
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= timeout {
                return Err(ConnectError::Timeout {
                    want: label,
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn running_needs_every_task_running() {
        let s = |c: &str, t: &[&str]| {
            ConnectorState::from_status(&json!({
                "connector": {"state": c},
                "tasks": t.iter().map(|s| json!({"state": s})).collect::<Vec<_>>()
            }))
        };
        assert_eq!(s("RUNNING", &["RUNNING"]), ConnectorState::Running);
        assert_eq!(s("RUNNING", &["FAILED"]), ConnectorState::Failed);
        assert_eq!(s("STOPPED", &[]), ConnectorState::Stopped);
        assert!(matches!(s("RUNNING", &[]), ConnectorState::Other(_)));
        assert!(matches!(
            s("RUNNING", &["RUNNING", "UNASSIGNED"]),
            ConnectorState::Other(_)
        ));
    }

    #[test]
    fn the_config_names_slot_signal_and_tables() {
        let raw = json!({"slot.name": "s", "signal.data.collection": "public.sig",
                         "table.include.list": "public.a, public.b"});
        let c = ConnectorConfig::parse(raw.as_object().unwrap().clone()).unwrap();
        assert_eq!(c.slot, "s");
        assert_eq!(c.signal_table, "public.sig");
        assert_eq!(c.tables, ["public.a", "public.b"]);
        let raw = json!({"slot.name": "s", "table.include.list": "public.a"});
        let err = ConnectorConfig::parse(raw.as_object().unwrap().clone()).unwrap_err();
        assert!(err.to_string().contains("signal.data.collection"), "{err}");
    }
}
