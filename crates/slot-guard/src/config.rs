//! Configuration: defaults, then a TOML file, then `CDC_SLOT_GUARD_*`
//! environment variables (`__` separates nesting, e.g.
//! `CDC_SLOT_GUARD_DATABASE__HOST`). Unknown keys are errors, and every
//! error names its key.
//!
//! The slot, the signal table and the captured tables are not configured
//! here: they are read from the connector's own configuration (`slot.name`,
//! `signal.data.collection`, `table.include.list`), so the guard can never
//! watch one slot and recover another.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read `database.password_file` {path}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub connect: ConnectConfig,
    pub kafka: KafkaConfig,
    pub guard: GuardConfig,
    pub metrics: MetricsConfig,
}

/// PostgreSQL, as the connector's own role: it reads
/// `pg_replication_slots`, drops the slot (its `REPLICATION` attribute
/// allows that) and inserts the snapshot signal (it has `INSERT` on the
/// signal table, db/004_signal.sql).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// Prefer `password_file` (a systemd credential); this is for the
    /// environment (`CDC_SLOT_GUARD_DATABASE__PASSWORD`). Never a flag.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    /// Kafka Connect's REST API.
    pub url: String,
    /// The Debezium PostgreSQL connector to guard.
    pub connector: String,
}

/// Where the recovery markers go: every partition of every captured
/// table's topic, after the re-snapshot is in Kafka (see `markers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// The captured tables' topics, as the sink's `kafka.topics`: names,
    /// or regular expressions when they start with `^`.
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Time between two looks at the slot.
    pub interval_ms: u64,
    /// How long one step of a recovery may take (the connector stopping,
    /// the slot becoming inactive, the new slot appearing).
    pub step_timeout_secs: u64,
    /// Recoveries tried in a row before the service gives up and exits
    /// non-zero (systemd restarts it, and it starts over).
    pub attempts: u32,
    /// How long PostgreSQL or Connect may be unreachable before the
    /// service exits non-zero.
    pub give_up_after_secs: u64,
    /// How long the re-snapshot of every table may take before the
    /// recovery counts as failed (and is tried again).
    pub snapshot_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// IP address and port of `/metrics`, `/healthz` and `/readyz`.
    /// Empty: no endpoint, and no metrics are recorded.
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: DatabaseConfig {
                host: "127.0.0.1".into(),
                port: 5432,
                dbname: "twitter".into(),
                user: "debezium".into(),
                password: None,
                password_file: None,
            },
            connect: ConnectConfig {
                url: "http://127.0.0.1:8083".into(),
                connector: "twitter-postgres".into(),
            },
            kafka: KafkaConfig {
                bootstrap_servers: "127.0.0.1:9092".into(),
                topics: vec![r"^twitter\..*".into()],
            },
            guard: GuardConfig {
                interval_ms: 10_000,
                step_timeout_secs: 120,
                attempts: 3,
                give_up_after_secs: 120,
                snapshot_timeout_secs: 6 * 3600,
            },
            metrics: MetricsConfig {
                // Loopback: no authentication. 9464 is the sink's, 9465 tweetgen's.
                listen: "127.0.0.1:9466".into(),
            },
        }
    }
}

macro_rules! default_from_root {
    ($($ty:ident => $field:ident),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                Config::default().$field
            }
        }
    )*};
}
default_from_root!(DatabaseConfig => database, ConnectConfig => connect, KafkaConfig => kafka, GuardConfig => guard, MetricsConfig => metrics);

impl Config {
    /// Layers defaults, the optional TOML file and the environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("CDC_SLOT_GUARD_").split("__"))
    }

    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.database.host.is_empty() {
            return invalid("database.host", "must not be empty");
        }
        if self.database.password.is_some() && self.database.password_file.is_some() {
            return invalid(
                "database.password_file",
                "is set together with database.password: set only one",
            );
        }
        if !(self.connect.url.starts_with("http://") || self.connect.url.starts_with("https://")) {
            return invalid("connect.url", "must be an http:// or https:// URL");
        }
        if self.connect.connector.is_empty() || self.connect.connector.contains('/') {
            return invalid("connect.connector", "must be a connector name");
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return invalid("kafka.bootstrap_servers", "must name at least one broker");
        }
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics", "must name at least one topic or pattern");
        }
        if let Some(bad) = self.kafka.topics.iter().find_map(|t| {
            t.starts_with('^')
                .then(|| regex::Regex::new(t).err())
                .flatten()
        }) {
            return invalid("kafka.topics", &format!("holds an invalid pattern: {bad}"));
        }
        if self.guard.snapshot_timeout_secs == 0 {
            return invalid("guard.snapshot_timeout_secs", "must be greater than 0");
        }
        if self.guard.interval_ms == 0 {
            return invalid("guard.interval_ms", "must be greater than 0");
        }
        if self.guard.attempts == 0 {
            return invalid("guard.attempts", "must be at least 1");
        }
        if self.guard.step_timeout_secs == 0 {
            return invalid("guard.step_timeout_secs", "must be greater than 0");
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return invalid(
                "metrics.listen",
                "must be an IP address and port such as 127.0.0.1:9466, or empty to disable the endpoint",
            );
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.guard.interval_ms)
    }

    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.guard.step_timeout_secs)
    }

    pub fn give_up_after(&self) -> Duration {
        Duration::from_secs(self.guard.give_up_after_secs)
    }

    pub fn snapshot_timeout(&self) -> Duration {
        Duration::from_secs(self.guard.snapshot_timeout_secs)
    }
}

impl MetricsConfig {
    /// Where to serve the endpoint; `None` when `listen` is empty.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

impl DatabaseConfig {
    /// The password, read from `password_file` when set (a trailing newline
    /// is not part of it).
    pub fn resolve_password(&self) -> Result<Option<SecretString>, ConfigError> {
        match (&self.password, &self.password_file) {
            (_, Some(path)) => {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Some(SecretString::from(raw.trim_end_matches(['\n', '\r']))))
            }
            (Some(p), None) => Ok(Some(SecretString::from(p.expose_secret()))),
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn environment_overrides_the_file_and_errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("guard.toml", "[guard]\ninterval_ms = 500\nattempts = 2\n")?;
            jail.set_env("CDC_SLOT_GUARD_GUARD__ATTEMPTS", "5");
            let c = Config::from_figment(Config::figment(Some(Path::new("guard.toml")))).unwrap();
            assert_eq!((c.guard.interval_ms, c.guard.attempts), (500, 5));

            jail.set_env("CDC_SLOT_GUARD_CONNECT__URL", "127.0.0.1:8083");
            let err = Config::from_figment(Config::figment(None)).unwrap_err();
            assert!(err.to_string().contains("`connect.url`"), "{err}");

            jail.set_env("CDC_SLOT_GUARD_CONNECT__URL", "http://127.0.0.1:8083");
            jail.set_env("CDC_SLOT_GUARD_KAFKA__TOPICS", "[\"^twitter\\\\.(\"]");
            let err = Config::from_figment(Config::figment(None)).unwrap_err();
            assert!(err.to_string().contains("`kafka.topics`"), "{err}");

            jail.set_env("CDC_SLOT_GUARD_KAFKA__TOPICS", "[\"^twitter\\\\..*\"]");
            jail.set_env("CDC_SLOT_GUARD_GUARD__INTERVL_MS", "5");
            let err = Config::from_figment(Config::figment(None)).unwrap_err();
            assert!(err.to_string().contains("intervl_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_password_is_never_printed() {
        let mut c = Config::default();
        c.database.password = Some(SecretString::from("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
