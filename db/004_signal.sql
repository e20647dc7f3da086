-- Debezium's signal table (the connector's `signal.data.collection`): a row
-- of type `execute-snapshot` asks the running connector for an incremental
-- snapshot of some tables, read in chunks while streaming goes on. That is
-- how a newly captured table gets the rows it already had (db/capture.sh
-- inserts the signal when it publishes the table) and how one table is
-- re-snapshotted on demand (`tests/stack.sh snapshot TABLE`).
--
-- The connector itself writes here too: with the `insert_delete`
-- watermarking strategy it inserts a row when it opens a chunk's window and
-- deletes it when it closes it, so the table stays near empty. It is in the
-- publication (db/capture.sh), because signals reach the connector through
-- the change stream; the connector drops its change events before they
-- reach Kafka (the `dropSignals` transform in debezium/*.json).
CREATE TABLE IF NOT EXISTS cdc_signal (
    id   varchar(42) PRIMARY KEY,
    type varchar(32) NOT NULL,
    -- text: a signal naming many tables (the slot guard's re-snapshot of
    -- every captured table) has no length limit to hit.
    data text
);
-- A table created while it was varchar(2048).
ALTER TABLE cdc_signal ALTER COLUMN data TYPE text;

GRANT SELECT, INSERT, DELETE ON cdc_signal TO debezium;
