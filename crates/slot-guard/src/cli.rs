//! Command line. Flags override the config file and the environment; the
//! password is deliberately not a flag (it would show in `ps`).

use std::path::PathBuf;

use clap::Parser;
use figment::Figment;
use figment::providers::Serialized;

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "cdc-slot-guard",
    version,
    about = "Recovers the Debezium connector when PostgreSQL loses its replication slot"
)]
pub struct Cli {
    /// TOML config file; `CDC_SLOT_GUARD_*` environment variables override it.
    #[arg(long, short, env = "CDC_SLOT_GUARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it (without secrets) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// File holding the PostgreSQL password (a systemd credential).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
}

impl Cli {
    pub fn figment(&self) -> Figment {
        let f = Config::figment(self.config.as_deref());
        match &self.password_file {
            Some(p) => f.merge(Serialized::default("database.password_file", p)),
            None => f,
        }
    }
}
