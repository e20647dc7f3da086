//! `cdc-sink`: Debezium change events from Kafka to Delta Lake tables on S3,
//! exactly once.
//!
//! The folders follow the flow:
//! - [`source`]: the Kafka consumer, and [`source::position`], the one type
//!   that decides which offsets may enter the lake;
//! - [`decode`]: Debezium JSON to typed rows, by the Connect schema each
//!   message carries ([`decode::schema`]);
//! - [`lake`]: everything written to S3: the tables ([`lake::table`]), the
//!   Parquet files ([`lake::files`]), the changelog writer and its buffers
//!   ([`lake::changelog`]), the [`lake::committer`] that runs it behind the
//!   loop, [`lake::upkeep`] and the [`lake::quarantine`];
//! - [`pipeline`]: the loop that ties them together, and the assigned
//!   partitions it keeps ([`pipeline::partition`]).
//!
//! Beside the flow: [`retry`] waits out failing dependencies; [`telemetry`]
//! reports to operators; [`config`] and [`cli`] configure it; [`memory`]
//! sets the allocator up.

pub mod cli;
pub mod config;
pub mod decode;
pub mod lake;
pub mod memory;
pub mod pipeline;
pub mod retry;
pub mod source;
pub mod telemetry;

/// A hash map for lookups made once or more per Kafka message (partition
/// state, schemas by fingerprint, per-table meters): foldhash instead of
/// std's SipHash, which showed in the drain's profile. Its keys are topic
/// names and schema fingerprints, not attacker-chosen input.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
