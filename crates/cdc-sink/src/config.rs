//! Configuration: defaults, then a TOML file, then `CDC_SINK_*` environment
//! variables (`__` separates nesting, e.g. `CDC_SINK_S3__BUCKET`). Unknown
//! keys are errors and every error names its key.

use std::collections::BTreeMap;
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
    #[error("cannot read `s3.secret_access_key_file` {path}")]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub output: OutputConfig,
    pub flush: FlushConfig,
    pub lake: LakeConfig,
    pub mirror: MirrorConfig,
    pub metrics: MetricsConfig,
    /// After this long without Kafka brokers or a successful S3 write, the
    /// sink exits non-zero so that systemd restarts it.
    pub give_up_after_secs: u64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    /// Topic names, or patterns starting with `^` (librdkafka regex
    /// subscription): a new table's topic is picked up on its own.
    pub topics: Vec<String>,
    /// How often topic metadata is refreshed, so that a topic created after
    /// the sink subscribed starts landing within one flush interval.
    pub metadata_refresh_ms: u64,
    /// Static group membership (`group.instance.id`). Off by default, on
    /// purpose: Kafka hands a restarted static member its cached assignment
    /// without a rebalance, so a topic created while the sink was down (a
    /// newly captured table) would not be assigned until some other member
    /// joins. Without it a crashed sink's partitions wait for the session
    /// timeout (10 s), which the lake's positions make harmless.
    pub instance_id: Option<String>,
    /// The compacted topic on which the schema-id message format
    /// (debezium/converter's SchemaIdConverter) publishes each value schema
    /// once. Read only when a message names a schema (in its Avro value's
    /// frame or its `cdclake.schema` header); JSON-with-schemas messages
    /// never need it.
    pub schema_topic: String,
    /// Extra librdkafka properties (TLS, SASL, tuning). Cannot override the
    /// offset handling the exactly-once design depends on.
    pub properties: BTreeMap<String, String>,
}

/// librdkafka properties may carry SASL or TLS key passwords: their values
/// are redacted, so `--check-config` and logs can print the config.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "key"].iter().any(|w| k.contains(w))
                    && !k.ends_with(".location");
                (k.as_str(), if secret { "[REDACTED]" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("metadata_refresh_ms", &self.metadata_refresh_ms)
            .field("instance_id", &self.instance_id)
            .field("schema_topic", &self.schema_topic)
            .field("properties", &properties)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Empty for AWS; the MinIO URL otherwise.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    #[serde(skip_serializing)]
    pub secret_access_key: Option<SecretString>,
    pub secret_access_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CompressionCodec {
    Zstd,
    Snappy,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Key prefix inside the bucket; empty puts tables at the top.
    pub prefix: String,
    pub compression: CompressionCodec,
    pub zstd_level: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    pub max_rows: usize,
    /// Decoded size of a segment's rows (not the messages', which carry
    /// their schema).
    pub max_bytes: usize,
    pub max_age_ms: u64,
    /// Open segments and flushes not yet committed, together: past it the
    /// largest segment is flushed early and consumption pauses.
    pub max_buffered_bytes: usize,
}

/// The operators' endpoint: `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// IP address and port, e.g. `127.0.0.1:9464`. Empty: no endpoint, and
    /// no metrics are recorded.
    pub listen: String,
    /// `/readyz` fails when input has waited this long without a commit.
    pub ready_window_secs: u64,
}

impl MetricsConfig {
    /// Where to serve the endpoint; `None` when `listen` is empty. Only
    /// meaningful on a validated configuration.
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

/// Delta table upkeep: set as table properties when the sink creates a
/// table, and used by `cdc-sink upkeep`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// A checkpoint every this many commits (`delta.checkpointInterval`).
    pub checkpoint_interval: u64,
    /// Log entries older than this are removed after a checkpoint
    /// (`delta.logRetentionDuration`); time travel reaches this far back.
    pub log_retention_hours: u64,
    /// Files no longer referenced (compacted away, or written by an attempt
    /// that never committed) are deleted by vacuum once this old.
    pub vacuum_retention_hours: u64,
    /// Compaction rewrites a date partition once it has this many files.
    pub compact_min_files: usize,
    /// Compacted files are about this large.
    pub compact_target_bytes: usize,
}

/// The current-state tables (`<prefix>/_current/<table>`), kept in step
/// with the changelogs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    /// Keep a current-state table of every captured table with a primary
    /// key.
    pub enabled: bool,
    /// Files of a current-state table are cut at about this size; the last
    /// one takes new keys until it is a quarter of it.
    pub target_file_bytes: usize,
    /// The order a current-state table's files are sorted and cut in.
    pub clustering: Clustering,
    /// The memory a current-state table built from the whole changelog (a
    /// rebuild) aims to stay under, beyond the process's own: a changelog
    /// that would take more is built range by range of the table's order.
    pub build_memory_bytes: usize,
    /// Changelog Parquet bytes one sync applies at most (at least one
    /// commit's); unset, a quarter of `target_file_bytes`. A mirror that
    /// is behind catches up in syncs of this size: each costs about a
    /// rewrite of the files its updates touch, so bigger syncs catch up
    /// with less CPU and more memory (docs/benchmarks.md).
    pub sync_max_bytes: Option<usize>,
}

/// How a current-state table orders its rows across files.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Clustering {
    /// A composite key's column that grows with time goes first (`likes`:
    /// `tweet_id`, not `user_id`), chosen from the rows when the table is
    /// created or rebuilt: new rows then go to the last files, and a batch
    /// of changes rewrites about as many files at 100M rows as at 10M.
    #[default]
    Time,
    /// The primary key's own column order.
    Key,
}

impl LakeConfig {
    pub fn table_properties(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "delta.checkpointInterval".into(),
                self.checkpoint_interval.to_string(),
            ),
            (
                "delta.logRetentionDuration".into(),
                format!("interval {} hours", self.log_retention_hours),
            ),
            ("delta.enableExpiredLogCleanup".into(), "true".into()),
            (
                "delta.deletedFileRetentionDuration".into(),
                format!("interval {} hours", self.vacuum_retention_hours),
            ),
        ])
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            kafka: KafkaConfig {
                brokers: "127.0.0.1:9092".into(),
                group_id: "cdc-sink".into(),
                topics: vec![r"^twitter\..*".into()],
                metadata_refresh_ms: 5_000,
                instance_id: None,
                schema_topic: "_cdclake.schemas".into(),
                properties: BTreeMap::new(),
            },
            s3: S3Config {
                endpoint: "http://127.0.0.1:9000".into(),
                bucket: "lake".into(),
                region: "us-east-1".into(),
                access_key_id: String::new(),
                secret_access_key: None,
                secret_access_key_file: None,
            },
            output: OutputConfig {
                prefix: String::new(),
                compression: CompressionCodec::Zstd,
                zstd_level: 3,
            },
            flush: FlushConfig {
                max_rows: 200_000,
                // Decoded row bytes (see `Segment::push`). Arrow builders and
                // the Parquet encoder take about twice that at a flush. With
                // commits pipelined, 4 MiB segments and 16 MiB in all drain
                // as fast as 8 and 32 MiB, at some 40 MiB less peak RSS
                // (docs/benchmarks.md).
                max_bytes: 4 * 1024 * 1024,
                max_age_ms: 10_000,
                max_buffered_bytes: 16 * 1024 * 1024,
            },
            metrics: MetricsConfig {
                listen: "127.0.0.1:9464".into(),
                ready_window_secs: 60,
            },
            lake: LakeConfig {
                checkpoint_interval: 100,
                log_retention_hours: 168,
                vacuum_retention_hours: 168,
                compact_min_files: 20,
                compact_target_bytes: 128 * 1024 * 1024,
            },
            mirror: MirrorConfig {
                enabled: true,
                // Files are cut by their rows' Arrow size, so Parquet files
                // come out smaller still. 16 MiB: at 32 the sink's peak RSS
                // in a drain was 550 MiB rather than 435 (docs/benchmarks.md).
                target_file_bytes: 16 * 1024 * 1024,
                clustering: Clustering::Time,
                build_memory_bytes: 1 << 30,
                sync_max_bytes: None,
            },
            give_up_after_secs: 120,
        }
    }
}

macro_rules! default_from_root {
    ($($ty:ident => $field:ident),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                SinkConfig::default().$field
            }
        }
    )*};
}
default_from_root!(KafkaConfig => kafka, S3Config => s3, OutputConfig => output, FlushConfig => flush, LakeConfig => lake, MirrorConfig => mirror, MetricsConfig => metrics);

/// librdkafka properties the sink sets itself; overriding them would break
/// exactly-once delivery.
const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "group.instance.id",
    "bootstrap.servers",
    "isolation.level",
];

impl SinkConfig {
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(SinkConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("CDC_SINK_").split("__"))
    }

    pub fn from_figment(figment: Figment) -> Result<SinkConfig, ConfigError> {
        let config: SinkConfig = figment.extract().map_err(Box::new)?;
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
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "must not be empty");
        }
        if self.kafka.group_id.trim().is_empty() {
            return invalid("kafka.group_id", "must not be empty");
        }
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics", "must name at least one topic or pattern");
        }
        if self.kafka.schema_topic.trim().is_empty() {
            return invalid("kafka.schema_topic", "must name a topic");
        }
        if self.kafka.metadata_refresh_ms == 0 {
            return invalid("kafka.metadata_refresh_ms", "must be greater than 0");
        }
        if self.lake.checkpoint_interval == 0 {
            return invalid("lake.checkpoint_interval", "must be greater than 0");
        }
        if self.lake.vacuum_retention_hours < 1 {
            // Vacuum deletes unreferenced files older than this, and a flush
            // in flight has put its files but not yet committed them.
            return invalid(
                "lake.vacuum_retention_hours",
                "must be at least 1: a shorter retention can delete the files of a flush in flight",
            );
        }
        if self.lake.compact_min_files < 2 {
            return invalid("lake.compact_min_files", "must be at least 2");
        }
        if self.mirror.target_file_bytes < 1024 * 1024 {
            return invalid("mirror.target_file_bytes", "must be at least 1 MiB");
        }
        if self.mirror.build_memory_bytes < 64 * 1024 {
            return invalid("mirror.build_memory_bytes", "must be at least 64 KiB");
        }
        if self.mirror.sync_max_bytes.is_some_and(|b| b < 64 * 1024) {
            return invalid("mirror.sync_max_bytes", "must be at least 64 KiB");
        }
        if let Some(k) = self
            .kafka
            .properties
            .keys()
            .find(|k| RESERVED_KAFKA_PROPERTIES.contains(&k.as_str()))
        {
            return Err(ConfigError::Invalid {
                key: "kafka.properties",
                reason: format!("must not set `{k}`: the sink manages it"),
            });
        }
        if self.s3.bucket.is_empty() {
            return invalid("s3.bucket", "must not be empty");
        }
        if self.s3.secret_access_key.is_some() && self.s3.secret_access_key_file.is_some() {
            return invalid(
                "s3.secret_access_key_file",
                "is set together with s3.secret_access_key: set only one",
            );
        }
        if !(1..=22).contains(&self.output.zstd_level) {
            return invalid("output.zstd_level", "must be between 1 and 22");
        }
        if self.flush.max_rows == 0 {
            return invalid("flush.max_rows", "must be greater than 0");
        }
        if self.flush.max_bytes == 0 {
            return invalid("flush.max_bytes", "must be greater than 0");
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(
                "metrics.listen",
                "must be an IP address and port such as 127.0.0.1:9464, or empty to disable the endpoint",
            );
        }
        if self.metrics.ready_window_secs == 0 {
            return invalid("metrics.ready_window_secs", "must be greater than 0");
        }
        if self.flush.max_age_ms == 0 {
            return invalid("flush.max_age_ms", "must be greater than 0");
        }
        if self.flush.max_buffered_bytes < self.flush.max_bytes {
            return invalid(
                "flush.max_buffered_bytes",
                "must be at least flush.max_bytes",
            );
        }
        if self.give_up_after_secs == 0 {
            return invalid("give_up_after_secs", "must be greater than 0");
        }
        Ok(())
    }

    pub fn give_up_after(&self) -> Duration {
        Duration::from_secs(self.give_up_after_secs)
    }
}

impl S3Config {
    pub fn resolve_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        match (&self.secret_access_key, &self.secret_access_key_file) {
            (_, Some(path)) => {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Some(SecretString::from(raw.trim_end_matches(['\n', '\r']))))
            }
            (Some(s), None) => Ok(Some(SecretString::from(s.expose_secret()))),
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
        SinkConfig::default().validate().unwrap();
    }

    #[test]
    fn a_mirror_sync_too_small_is_named() {
        let mut cfg = SinkConfig::default();
        cfg.mirror.sync_max_bytes = Some(1024);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("mirror.sync_max_bytes"), "{e}");
        cfg.mirror.sync_max_bytes = Some(8 << 20);
        cfg.validate().unwrap();
    }

    #[test]
    fn layers_and_bad_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "sink.toml",
                "[flush]\nmax_age_ms = 2000\n[kafka]\ntopics = [\"a.b\"]\n",
            )?;
            jail.set_env("CDC_SINK_FLUSH__MAX_ROWS", "5");
            let c = SinkConfig::from_figment(SinkConfig::figment(Some(Path::new("sink.toml"))))
                .unwrap();
            assert_eq!((c.flush.max_age_ms, c.flush.max_rows), (2000, 5));
            assert_eq!(c.kafka.topics, vec!["a.b".to_string()]);

            jail.set_env("CDC_SINK_FLUSH__MAX_ROWS", "lots");
            let err = SinkConfig::from_figment(SinkConfig::figment(Some(Path::new("sink.toml"))))
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("flush.max_rows"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_and_reserved_property_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sink.toml", "[s3]\nbuckett = \"x\"\n")?;
            let err = SinkConfig::from_figment(SinkConfig::figment(Some(Path::new("sink.toml"))))
                .unwrap_err()
                .to_string();
            assert!(err.contains("buckett"), "{err}");
            Ok(())
        });
        let mut c = SinkConfig::default();
        c.kafka
            .properties
            .insert("enable.auto.commit".into(), "true".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("kafka.properties") && err.contains("enable.auto.commit"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_in_debug() {
        let mut c = SinkConfig::default();
        c.s3.secret_access_key = Some(SecretString::from("minio-very-secret"));
        c.kafka
            .properties
            .insert("sasl.password".into(), "kafka-very-secret".into());
        c.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("SASL_SSL"));
    }
}
