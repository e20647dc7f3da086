-- Twitter demo schema. Applied idempotently: every statement may run twice.
--
-- Column types are chosen so the lake carries every type a CDC pipeline must
-- get right: identity bigints, text and varchar, boolean, timestamptz,
-- numeric with a scale, text[], nullable columns, and a column (users.bio)
-- whose long values PostgreSQL TOASTs out of line.

CREATE TABLE IF NOT EXISTS users (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username        varchar(32)  NOT NULL UNIQUE,
    display_name    text         NOT NULL,
    email           text,
    bio             text,
    location        text,
    lang            varchar(8)   NOT NULL DEFAULT 'en',
    verified        boolean      NOT NULL DEFAULT false,
    followers_count integer      NOT NULL DEFAULT 0,
    -- A reputation score in [0, 100] with two decimals.
    reputation      numeric(5,2) NOT NULL DEFAULT 50.00,
    created_at      timestamptz  NOT NULL DEFAULT now(),
    updated_at      timestamptz  NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tweets (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint       NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- A reply whose parent is deleted stays, as on Twitter, but loses its link.
    reply_to_id   bigint       REFERENCES tweets (id) ON DELETE SET NULL,
    body          varchar(280) NOT NULL,
    lang          varchar(8)   NOT NULL,
    hashtags      text[]       NOT NULL DEFAULT '{}',
    mentions      text[]       NOT NULL DEFAULT '{}',
    like_count    integer      NOT NULL DEFAULT 0,
    retweet_count integer      NOT NULL DEFAULT 0,
    sensitive     boolean      NOT NULL DEFAULT false,
    -- Geo tag, present on a minority of tweets.
    latitude      numeric(9,6),
    longitude     numeric(9,6),
    created_at    timestamptz  NOT NULL DEFAULT now(),
    edited_at     timestamptz
);

CREATE INDEX IF NOT EXISTS tweets_user_id_idx ON tweets (user_id);
CREATE INDEX IF NOT EXISTS tweets_reply_to_id_idx ON tweets (reply_to_id);

CREATE TABLE IF NOT EXISTS likes (
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tweet_id   bigint      NOT NULL REFERENCES tweets (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, tweet_id)
);

CREATE INDEX IF NOT EXISTS likes_tweet_id_idx ON likes (tweet_id);

-- The generator's ledger: one row per committed batch, written inside the
-- batch's own transaction. After a connection is lost during COMMIT, the
-- generator looks its row up to learn whether the batch committed, instead
-- of guessing. Not published: it is bookkeeping, not workload.
CREATE TABLE IF NOT EXISTS tweetgen_batches (
    run_id       bigint      NOT NULL,
    batch_no     bigint      NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, batch_no)
);

-- Long bios go out of line uncompressed, so that even repetitive text is
-- TOASTed and the pipeline sees unchanged-TOAST placeholders on updates.
ALTER TABLE users ALTER COLUMN bio SET STORAGE EXTERNAL;

-- REPLICA IDENTITY decides what Debezium can put in an event's `before`.
--
-- users: DEFAULT (the primary key). Deletes carry only `id` in `before`, and
--   an update that leaves a TOASTed bio untouched sends Debezium's
--   `__debezium_unavailable_value` placeholder for it; the sink records the
--   column as unchanged rather than writing the placeholder as data.
-- tweets: FULL. Deletes and updates carry the whole old row, so the lake
--   keeps the content of a deleted tweet. Costs extra WAL per change, which
--   is acceptable for a table whose rows are small.
-- likes: DEFAULT. The key is the whole identity of a like.
ALTER TABLE users  REPLICA IDENTITY DEFAULT;
ALTER TABLE tweets REPLICA IDENTITY FULL;
ALTER TABLE likes  REPLICA IDENTITY DEFAULT;
