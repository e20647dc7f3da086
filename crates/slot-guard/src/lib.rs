//! `cdc-slot-guard`: keeps the capture alive when PostgreSQL drops the
//! connector's replication slot.
//!
//! PostgreSQL invalidates a logical slot whose retained WAL passes
//! `max_slot_wal_keep_size` (`pg_replication_slots.wal_status = 'lost'`).
//! Debezium 3.4 then waits about 30 minutes for a slot that will never be
//! ready and fails with a message about long transactions; the changes of
//! the gap are gone for good, and only a new snapshot brings the tables
//! back. This service watches the slot and, on `lost`, does what an
//! operator would:
//!
//! 1. stop the connector (`PUT /connectors/NAME/stop`);
//! 2. record the recovery in the connector's configuration
//!    ([`recovery::PENDING`]) with `snapshot.mode=no_data`, so it streams
//!    from now on a new slot instead of a blocking full snapshot;
//! 3. delete the connector's offsets (they point into WAL that is gone);
//! 4. drop the lost slot (ending its walsender if one lingers);
//! 5. resume the connector, which creates a new slot;
//! 6. signal an incremental snapshot of every table it captures
//!    (`execute-snapshot` in its `signal.data.collection`), read in chunks
//!    while streaming goes on, and wait until it is wholly in Kafka;
//! 7. write a recovery marker into every partition of every captured
//!    topic ([`markers`]): the sink records it in the changelog, and the
//!    current-state tables remove the rows the snapshot did not deliver
//!    (deleted while the slot was lost);
//! 8. remove the mark.
//!
//! A recovery cut off anywhere is finished by the next look, which finds
//! the mark ([`recovery`] says how; docs/operations.md, "A lost
//! replication slot").
//!
//! - [`config`]: layered configuration with `validate()`.
//! - [`slot`]: the slot as PostgreSQL reports it, and the statements of
//!   the recovery.
//! - [`connect`]: the connector through Kafka Connect's REST API.
//! - [`recovery`]: the steps above.
//! - [`markers`]: the records of step 7.
//! - [`guard`]: the watch loop, its metrics and readiness.

pub mod cli;
pub mod config;
pub mod connect;
pub mod guard;
pub mod markers;
pub mod recovery;
pub mod slot;
