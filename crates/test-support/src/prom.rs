//! A scrape of `/metrics`, read by the Prometheus client library's own
//! parser (`tests/prom_parse.py`, the `prometheus-client` package of the
//! readers' venv) rather than by the services' code: a test of a metric
//! also proves a real scraper can read it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::{http, lake};

/// One sample as the parser read it.
#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    /// The family's name (`tweetgen_rows` for `tweetgen_rows_total`).
    pub family: String,
    /// The type the exposition declares for the family.
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "number_or_special")]
    pub value: f64,
}

/// prom_parse.py writes NaN and ±Inf as strings (JSON has no such numbers).
fn number_or_special<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            other => Err(serde::de::Error::custom(format!("not a value: {other}"))),
        },
        other => Err(serde::de::Error::custom(format!("not a value: {other}"))),
    }
}

/// One parsed exposition, with its text for failure messages.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// Parses `text`; panics (with the parser's error) if it is not a valid
    /// exposition.
    pub fn parse(text: &str) -> Scrape {
        let mut child = Command::new(lake::readers_python())
            .arg(lake::repo_script("prom_parse.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tests/prom_parse.py");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the exposition does not parse: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        Scrape {
            samples: serde_json::from_slice(&out.stdout).unwrap(),
            text: text.to_string(),
        }
    }

    /// The value of the first sample `name` whose labels include `labels`
    /// (others may be there too); `None` when there is none.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// The value of the one sample `name` with exactly `labels`; panics
    /// (with the scrape) unless there is exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?} in\n{}", self.text);
        found[0].value
    }

    /// The values of every sample `name`, whatever their labels.
    pub fn values(&self, name: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .collect()
    }

    /// The type the exposition declares for the family of sample `name`.
    pub fn kind(&self, name: &str) -> &str {
        &self
            .samples
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in\n{}", self.text))
            .kind
    }
}

/// `GET /metrics` from `addr` (which must answer 200), parsed.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let reply = http::get(addr, "/metrics").await;
    assert_eq!(
        reply.status, 200,
        "/metrics answered {}: {}",
        reply.status, reply.body
    );
    Scrape::parse(&reply.body)
}
