//! `tweetgen`: the demo workload for the CDC pipeline.
//!
//! It writes fake but realistic Twitter data into PostgreSQL: [`model`]
//! makes users, tweets and edits with [`text`] in their language; [`pools`]
//! remember committed rows and who is popular; [`plan`] decides a whole
//! batch up front; [`db`] writes it in one transaction with its ledger row;
//! [`workload`] runs the tick loop (or [`load`] mode for benchmarks) and
//! survives PostgreSQL restarts, holding its writes while a replication
//! slot is close to being lost ([`throttle`]); [`telemetry`] counts what committed and
//! serves it to Prometheus; [`config`] and [`cli`] layer defaults, TOML,
//! environment and flags.

pub mod cli;
pub mod config;
pub mod db;
pub mod load;
pub mod model;
pub mod plan;
pub mod pools;
pub mod telemetry;
pub mod text;
pub mod throttle;
pub mod workload;
