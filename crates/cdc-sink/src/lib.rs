//! `cdc-sink`: Debezium change events from Kafka to Delta Lake tables on S3,
//! exactly once.
//!
//! The flow, one module per job: [`source`] consumes Kafka; [`position`]
//! decides which offsets may enter the lake; [`decode`] turns Debezium JSON
//! into typed rows using the [`schema`] carried in each message; [`batch`]
//! buffers rows per partition and rolls segments by rows, bytes or age;
//! [`lake`] writes Parquet ([`encode`]) and commits it to Delta with the
//! partitions' offsets in the same transaction; [`committer`] runs those
//! writes behind the loop, staged ahead and committed in order;
//! [`quarantine`] keeps what cannot be read; [`retry`] waits out failing
//! dependencies; [`pipeline`] is the loop that ties them together;
//! [`telemetry`] reports to operators; [`config`] and [`cli`] configure it.

pub mod batch;
pub mod cli;
pub mod committer;
pub mod config;
pub mod decode;
pub mod encode;
pub mod lake;
pub mod pipeline;
pub mod position;
pub mod quarantine;
pub mod retry;
pub mod schema;
pub mod source;
pub mod storage;
pub mod telemetry;
pub mod upkeep;
