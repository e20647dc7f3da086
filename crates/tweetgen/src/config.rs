//! Configuration: defaults, then a TOML file, then `TWEETGEN_*` environment
//! variables (`__` separates nesting, e.g. `TWEETGEN_DATABASE__HOST`), then
//! command-line overrides. Unknown keys are errors so that a typo is caught,
//! and every error names the offending key.

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
    pub workload: WorkloadConfig,
    pub load: LoadConfig,
    pub throttle: ThrottleConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// Prefer `password_file` (a systemd credential); this is for the
    /// environment (`TWEETGEN_DATABASE__PASSWORD`). Never a CLI flag.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    /// How long to keep retrying an unreachable server before giving up.
    pub connect_timeout_secs: u64,
}

/// The mix of one batch. Each tick writes one batch in one transaction.
/// Counts are rows per batch; a batch only refers to rows committed before
/// it, so the first batches write fewer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    pub interval_ms: u64,
    pub new_users: u32,
    /// New tweets, retweets and quotes included.
    pub new_tweets: u32,
    /// Share of new tweets that reply to someone else's tweet, 0..=1.
    pub reply_ratio: f64,
    /// Share of new tweets that continue the author's own last tweet.
    pub thread_ratio: f64,
    /// Share of new tweets that are retweets.
    pub retweet_ratio: f64,
    /// Share of new tweets that quote another tweet.
    pub quote_ratio: f64,
    pub likes: u32,
    pub unlikes: u32,
    pub follows: u32,
    pub unfollows: u32,
    /// Like and retweet counter bumps and body edits of existing tweets.
    pub counter_updates: u32,
    pub profile_edits: u32,
    pub tweet_deletes: u32,
    /// Delete one user every this many batches (0: never).
    pub user_delete_every: u32,
    /// Tail index of the Pareto popularity of users: smaller is more
    /// unequal. 1.1 gives the top 1 % of users about half the attention.
    pub popularity_alpha: f64,
    /// Chance per batch that a hashtag starts trending, 0..=1.
    pub trend_chance: f64,
    /// How many batches a trend lasts.
    pub trend_batches: u32,
    /// Daily swing of the batch sizes, 0..1: 0.5 makes batches 1.5x the
    /// configured size at 15:00 UTC and 0.5x at 03:00 UTC. 0 is off; on,
    /// a seeded run depends on the time of day.
    pub diurnal_amplitude: f64,
    /// Share of new users whose bio is long enough to be TOASTed, 0..=1.
    pub long_bio_ratio: f64,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadMethod {
    Copy,
    Insert,
}

/// Load mode, for benchmarks: bulk rows into every table at a target rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    pub method: LoadMethod,
    /// Rows per statement (multi-row INSERT) or per COPY.
    pub chunk_rows: u32,
}

/// Holding writes while a replication slot is close to being lost
/// (`throttle.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Hold writes while the smallest `safe_wal_size` of the logical slots
    /// is below this many bytes. 0: never hold.
    pub min_safe_wal_bytes: u64,
    /// How often to read the slots (at most once per batch or chunk).
    pub check_interval_ms: u64,
}

/// The operators' endpoint: `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// IP address and port, e.g. `127.0.0.1:9465`. Empty: no endpoint, and
    /// no metrics are recorded.
    pub listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: DatabaseConfig {
                host: "127.0.0.1".into(),
                port: 5432,
                dbname: "twitter".into(),
                user: "tweetgen".into(),
                password: None,
                password_file: None,
                connect_timeout_secs: 120,
            },
            workload: WorkloadConfig {
                interval_ms: 5000,
                new_users: 3,
                new_tweets: 10,
                reply_ratio: 0.25,
                thread_ratio: 0.1,
                retweet_ratio: 0.15,
                quote_ratio: 0.05,
                likes: 15,
                unlikes: 1,
                follows: 8,
                unfollows: 1,
                counter_updates: 5,
                profile_edits: 2,
                tweet_deletes: 1,
                user_delete_every: 5,
                popularity_alpha: 1.1,
                trend_chance: 0.05,
                trend_batches: 20,
                diurnal_amplitude: 0.0,
                long_bio_ratio: 0.1,
                seed: None,
            },
            load: LoadConfig {
                method: LoadMethod::Copy,
                chunk_rows: 5000,
            },
            throttle: ThrottleConfig {
                // A quarter of the stack's max_slot_wal_keep_size (2GB):
                // the retained-WAL alert fires at 1 GiB, this at 1.5 GiB.
                min_safe_wal_bytes: 512 * 1024 * 1024,
                check_interval_ms: 1000,
            },
            metrics: MetricsConfig {
                // Loopback: the endpoint has no authentication. 9464 is the sink's.
                listen: "127.0.0.1:9465".into(),
            },
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Config::default().database
    }
}
impl Default for WorkloadConfig {
    fn default() -> Self {
        Config::default().workload
    }
}
impl Default for LoadConfig {
    fn default() -> Self {
        Config::default().load
    }
}
impl Default for ThrottleConfig {
    fn default() -> Self {
        Config::default().throttle
    }
}
impl Default for MetricsConfig {
    fn default() -> Self {
        Config::default().metrics
    }
}

impl Config {
    /// Layers defaults, the optional TOML file and the environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("TWEETGEN_").split("__"))
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
        let w = &self.workload;
        if w.interval_ms == 0 {
            return invalid("workload.interval_ms", "must be greater than 0");
        }
        for (key, value) in [
            ("workload.reply_ratio", w.reply_ratio),
            ("workload.thread_ratio", w.thread_ratio),
            ("workload.retweet_ratio", w.retweet_ratio),
            ("workload.quote_ratio", w.quote_ratio),
            ("workload.trend_chance", w.trend_chance),
            ("workload.long_bio_ratio", w.long_bio_ratio),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return invalid(key, "must be between 0 and 1");
            }
        }
        if w.reply_ratio + w.thread_ratio + w.retweet_ratio + w.quote_ratio > 1.0 {
            return invalid(
                "workload.reply_ratio",
                "plus thread_ratio, retweet_ratio and quote_ratio must not exceed 1",
            );
        }
        if !(0.0..1.0).contains(&w.diurnal_amplitude) {
            return invalid(
                "workload.diurnal_amplitude",
                "must be at least 0 and below 1",
            );
        }
        if !(w.popularity_alpha > 0.0 && w.popularity_alpha.is_finite()) {
            return invalid("workload.popularity_alpha", "must be greater than 0");
        }
        if w.new_users
            + w.new_tweets
            + w.likes
            + w.unlikes
            + w.follows
            + w.unfollows
            + w.counter_updates
            + w.profile_edits
            + w.tweet_deletes
            + w.user_delete_every
            == 0
        {
            return invalid("workload", "every batch size is 0: nothing to write");
        }
        if self.throttle.check_interval_ms == 0 {
            return invalid("throttle.check_interval_ms", "must be greater than 0");
        }
        if self.load.chunk_rows == 0 {
            return invalid("load.chunk_rows", "must be greater than 0");
        }
        if self.database.host.is_empty() {
            return invalid("database.host", "must not be empty");
        }
        if self.database.password.is_some() && self.database.password_file.is_some() {
            return invalid(
                "database.password_file",
                "is set together with database.password: set only one",
            );
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return invalid(
                "metrics.listen",
                "must be an IP address and port such as 127.0.0.1:9465, or empty to disable the endpoint",
            );
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.workload.interval_ms)
    }
}

impl MetricsConfig {
    /// Where to serve the endpoint; `None` when `listen` is empty. Only
    /// meaningful on a validated configuration.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

impl DatabaseConfig {
    /// The password, read from `password_file` when set. A trailing newline
    /// in the file (as `echo` writes) is not part of the password.
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
    fn env_overrides_toml_and_names_bad_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gen.toml", "[workload]\nnew_users = 7\nnew_tweets = 2\n")?;
            jail.set_env("TWEETGEN_WORKLOAD__NEW_TWEETS", "9");
            let c = Config::from_figment(Config::figment(Some(Path::new("gen.toml")))).unwrap();
            assert_eq!((c.workload.new_users, c.workload.new_tweets), (7, 9));

            jail.set_env("TWEETGEN_WORKLOAD__NEW_TWEETS", "many");
            let err = Config::from_figment(Config::figment(Some(Path::new("gen.toml"))))
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("workload.new_tweets"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gen.toml", "[workload]\nnew_tweeets = 3\n")?;
            let err = Config::from_figment(Config::figment(Some(Path::new("gen.toml"))))
                .unwrap_err()
                .to_string();
            assert!(err.contains("new_tweeets"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn out_of_range_value_is_named() {
        let mut c = Config::default();
        c.workload.reply_ratio = 1.5;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("workload.reply_ratio"), "{err}");
    }

    #[test]
    fn ratios_that_add_up_past_one_are_named() {
        let mut c = Config::default();
        c.workload.retweet_ratio = 0.9;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("workload.reply_ratio") && err.contains("retweet_ratio"),
            "{err}"
        );
    }

    #[test]
    fn metrics_listen_is_checked_and_empty_disables() {
        let mut c = Config::default();
        assert_eq!(
            c.metrics.listen_addr(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9465)))
        );
        c.metrics.listen = "localhost:9465".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        c.metrics.listen = "[::1]:0".into();
        c.validate().unwrap();
        c.metrics.listen = String::new();
        c.validate().unwrap();
        assert_eq!(c.metrics.listen_addr(), None);
    }

    #[test]
    fn metrics_listen_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TWEETGEN_METRICS__LISTEN", "");
            let c = Config::from_figment(Config::figment(None)).unwrap();
            assert_eq!(c.metrics.listen_addr(), None);
            jail.set_env("TWEETGEN_METRICS__LISTEN", "0.0.0.0:9999");
            let c = Config::from_figment(Config::figment(None)).unwrap();
            assert_eq!(c.metrics.listen, "0.0.0.0:9999");
            Ok(())
        });
    }

    #[test]
    fn password_never_in_debug() {
        let mut c = Config::default();
        c.database.password = Some(SecretString::from("hunter2-secret"));
        assert!(!format!("{c:?}").contains("hunter2-secret"));
    }

    #[test]
    fn password_file_trailing_newline_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let db = DatabaseConfig {
            password_file: Some(path),
            ..DatabaseConfig::default()
        };
        let pw = db.resolve_password().unwrap().unwrap();
        assert_eq!(pw.expose_secret(), "s3cret");
    }
}
