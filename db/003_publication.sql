-- The publication Debezium reads through pgoutput, limited to our tables.
-- Created here rather than by Debezium (publication.autocreate.mode=disabled)
-- so that the debezium role needs no ownership of the tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'twitter_cdc') THEN
        CREATE PUBLICATION twitter_cdc FOR TABLE users, tweets, likes, follows;
    ELSE
        ALTER PUBLICATION twitter_cdc SET TABLE users, tweets, likes, follows;
    END IF;
END
$$;
