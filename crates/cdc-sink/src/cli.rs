//! Command line. Flags override the config file and the environment; the
//! S3 secret is deliberately not a flag (it would show in `ps`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;

use crate::config::SinkConfig;

#[derive(Debug, Parser)]
#[command(
    name = "cdc-sink",
    version,
    about = "Streams Debezium change events from Kafka into Delta Lake tables on S3, exactly once"
)]
pub struct Cli {
    /// TOML config file; `CDC_SINK_*` environment variables override it.
    #[arg(long, short, env = "CDC_SINK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it (without secrets) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Kafka consumer group.
    #[arg(long)]
    pub group_id: Option<String>,
    /// S3 endpoint URL (MinIO).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    #[arg(long)]
    pub bucket: Option<String>,
    /// Without a subcommand, the sink runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compact small files, vacuum unreferenced ones, checkpoint and trim
    /// the log of every Delta table in the lake, then exit.
    Upkeep {
        /// Change nothing; print what would be compacted and deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Bring the current-state tables up to their changelogs (all, or
    /// one), then exit. Also how a lake written before them gets them.
    Mirror {
        /// Only this table (its changelog's directory name).
        #[arg(long)]
        table: Option<String>,
        /// Rebuild from the whole changelog, replacing every file. Run it
        /// with the sinks stopped, or they rebuild alongside.
        #[arg(long)]
        rebuild: bool,
    },
}

impl Cli {
    pub fn figment(&self) -> Figment {
        let mut f = SinkConfig::figment(self.config.as_deref());
        for (key, value) in [
            ("kafka.brokers", &self.brokers),
            ("kafka.group_id", &self.group_id),
            ("s3.endpoint", &self.s3_endpoint),
            ("s3.bucket", &self.bucket),
        ] {
            if let Some(v) = value {
                f = f.merge(Serialized::default(key, v));
            }
        }
        f
    }
}
