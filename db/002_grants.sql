-- Privileges for the two service roles. The roles themselves (and their
-- passwords) are created by whoever deploys: tests/stack.sh locally,
-- services.postgresql.ensureUsers on NixOS. Secrets never live in these files.
--
-- tweetgen: the workload; reads and writes the demo tables.
-- debezium: least privilege for pgoutput: REPLICATION (granted on the role)
--           plus SELECT for the initial snapshot. It owns nothing and cannot
--           create the publication, which 003 creates instead.
GRANT CONNECT ON DATABASE twitter TO tweetgen, debezium;
GRANT USAGE ON SCHEMA public TO tweetgen, debezium;
GRANT SELECT, INSERT, UPDATE, DELETE ON users, tweets, likes, follows, tweetgen_batches TO tweetgen;
GRANT SELECT ON users, tweets, likes, follows TO debezium;
