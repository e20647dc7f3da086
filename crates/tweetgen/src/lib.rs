//! `tweetgen`: the demo workload for the CDC pipeline.
//!
//! It writes fake but realistic Twitter data into PostgreSQL: [`model`]
//! makes users, tweets and edits; [`db`] writes one batch per transaction;
//! [`workload`] runs the tick loop (or [`load`] mode for benchmarks) and
//! survives PostgreSQL restarts; [`config`] and [`cli`] layer defaults, TOML,
//! environment and flags.

pub mod cli;
pub mod config;
pub mod db;
pub mod load;
pub mod model;
pub mod pools;
pub mod workload;
