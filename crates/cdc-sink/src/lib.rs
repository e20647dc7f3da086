//! `cdc-sink`: Debezium change events from Kafka to Parquet on S3, exactly
//! once.
//!
//! The flow, one module per job: [`source`] consumes Kafka with manual
//! offsets; [`decode`] turns Debezium JSON into typed rows using the
//! [`schema`] carried in each message; [`batch`] buffers rows per partition
//! and rolls segments by rows, bytes or age; [`write`] encodes Parquet and
//! puts it under deterministic keys; [`commit`] does the offset arithmetic
//! that makes replays idempotent; [`pipeline`] is the loop that ties them
//! together; [`config`] and [`cli`] configure it.

pub mod batch;
pub mod cli;
pub mod commit;
pub mod config;
pub mod decode;
pub mod pipeline;
pub mod schema;
pub mod source;
pub mod write;
