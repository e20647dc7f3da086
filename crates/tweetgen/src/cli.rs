//! Command line. Flags override the config file and the environment; the
//! password is deliberately not a flag (it would show in `ps`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use figment::Figment;
use figment::providers::Serialized;

use crate::config::{Config, LoadMethod};
use crate::workload::Limits;

#[derive(Debug, Parser)]
#[command(
    name = "tweetgen",
    version,
    about = "Writes a realistic Twitter workload into PostgreSQL"
)]
pub struct Cli {
    /// TOML config file; `TWEETGEN_*` environment variables override it.
    #[arg(long, short, env = "TWEETGEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it (without secrets) and exit.
    #[arg(long)]
    pub check_config: bool,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub dbname: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    /// File holding the password (a systemd credential, for instance).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Time between batches, e.g. `5s` or `250ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Makes the generated data deterministic for a given database state.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many batches (or load chunks).
    #[arg(long)]
    pub batches: Option<u64>,
    /// Stop after this long, e.g. `30s` or `10m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Load mode: about this many rows per second across all tables (0 = as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// How load mode writes rows.
    #[arg(long, value_enum)]
    pub load_method: Option<LoadMethod>,
}

impl Cli {
    pub fn figment(&self) -> Figment {
        let mut f = Config::figment(self.config.as_deref());
        let mut set = |key: &str, value: Option<figment::value::Value>| {
            if let Some(v) = value {
                f = std::mem::take(&mut f).merge(Serialized::default(key, v));
            }
        };
        set("database.host", self.host.clone().map(Into::into));
        set("database.port", self.port.map(Into::into));
        set("database.dbname", self.dbname.clone().map(Into::into));
        set("database.user", self.user.clone().map(Into::into));
        set(
            "database.password_file",
            self.password_file
                .as_ref()
                .map(|p| p.display().to_string().into()),
        );
        set(
            "workload.interval_ms",
            self.interval.map(|d| (d.as_millis() as u64).into()),
        );
        set("workload.seed", self.seed.map(Into::into));
        set(
            "load.method",
            self.load_method.map(|m| {
                match m {
                    LoadMethod::Copy => "copy",
                    LoadMethod::Insert => "insert",
                }
                .into()
            }),
        );
        f
    }

    pub fn limits(&self) -> Limits {
        Limits {
            batches: self.batches,
            duration: self.duration,
        }
    }
}
