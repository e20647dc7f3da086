-- The publication Debezium reads through pgoutput, limited to our tables.
-- Created here rather than by Debezium (publication.autocreate.mode=disabled)
-- so that the debezium role needs no ownership of the tables. Its tables are
-- those of db/captured-tables, added by db/capture.sh. Never `SET TABLE` here:
-- on every `up` that dropped any table added since.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'twitter_cdc') THEN
        CREATE PUBLICATION twitter_cdc;
    END IF;
END
$$;
