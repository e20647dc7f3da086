//! What the integration tests under `crates/*/tests` share, so that each
//! test file says what it tests and not how to reach the stack. Used only
//! as a `[dev-dependency]` (of `cdc-sink`, `tweetgen` and `cdc-telemetry`);
//! it depends on none of them, so their modules can move freely.
//!
//! - [`stack`]: the local stack's environment (`tests/stack.sh env`),
//!   read with a panic that says to run `tests/run.sh` when it is missing;
//!   the repository's root; unique names for a test's own objects.
//! - [`wait`]: waiting on a condition with a deadline
//!   ([`wait::wait_until`], [`wait::wait_until_blocking`]), which panics
//!   with what it waited for and the last state it saw. The tests use it
//!   instead of sleeping.
//! - [`http`]: one small HTTP/1.1 client (a request over a fresh
//!   connection, as a probe or a scraper sends it).
//! - [`prom`]: a `/metrics` scrape read by the Prometheus client library's
//!   own parser (`tests/prom_parse.py`), and sample lookups.
//! - [`lake`]: the independent Delta readers (`tests/lake_read.py`, with
//!   the `deltalake` package and DuckDB) and what they return.
//! - [`compare`] (feature `postgres`): the lake's values against
//!   PostgreSQL's canonical text; a current-state table equal to its table.
//! - [`pg`] (feature `postgres`): clients of the stack's PostgreSQL, and a
//!   brand-new database with the project's schema.
//! - [`kafka`] (feature `kafka`): admin, producer and consumer clients,
//!   watermarks, reading a range of messages back (as JSON with schemas,
//!   whatever the connector's format), a group's committed
//!   offsets (setting them, waiting for them).
//! - [`avro`] (feature `kafka`): the connector's Avro values read back as
//!   the JSON payload `JsonConverter` writes, apart from the sink's reader.
//! - [`own`] (features `postgres` and `kafka`): a capture of a test's own
//!   beside the stack's: its own PostgreSQL, connector and sink.
//! - [`connect`]: Kafka Connect's REST API, and a connector's committed
//!   source offset.
//! - [`counted`] (feature `lake`): an object store that counts the
//!   requests delta-rs and the sink make of it.

#[cfg(feature = "kafka")]
pub mod avro;
#[cfg(feature = "postgres")]
pub mod compare;
pub mod connect;
#[cfg(feature = "lake")]
pub mod counted;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod lake;
#[cfg(all(feature = "postgres", feature = "kafka"))]
pub mod own;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod prom;
pub mod stack;
pub mod wait;

pub use stack::{env, repo_root, unique};
pub use wait::{wait_until, wait_until_blocking};
