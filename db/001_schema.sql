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
    -- Kept equal to the rows of `follows` by the trigger below.
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

-- Added after the first release: a database created before keeps its data.
-- `following_count` arrives with `follows`, when no follow exists yet, so the
-- counters of existing users are reset to agree with the (empty) table.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'public' AND table_name = 'users'
                     AND column_name = 'following_count') THEN
        ALTER TABLE users ADD COLUMN following_count integer NOT NULL DEFAULT 0;
        UPDATE users SET followers_count = 0 WHERE followers_count <> 0;
    END IF;
END
$$;

-- A retweet is only a pointer: it goes when the original goes, as on
-- Twitter. A quote is a tweet of its own and keeps its text.
ALTER TABLE tweets ADD COLUMN IF NOT EXISTS retweet_of_id bigint REFERENCES tweets (id) ON DELETE CASCADE;
ALTER TABLE tweets ADD COLUMN IF NOT EXISTS quote_of_id bigint REFERENCES tweets (id) ON DELETE SET NULL;
CREATE INDEX IF NOT EXISTS tweets_retweet_of_id_idx ON tweets (retweet_of_id);
CREATE INDEX IF NOT EXISTS tweets_quote_of_id_idx ON tweets (quote_of_id);

-- Who follows whom. Deleting a user deletes their follows both ways (CASCADE):
-- a follow of nobody means nothing. PostgreSQL runs the cascade as ordinary
-- row deletes in the same transaction, so pgoutput carries each one and
-- Debezium emits a `d` event (plus a tombstone) per follow, tweet and like
-- removed, in the transaction of the user's own delete.
CREATE TABLE IF NOT EXISTS follows (
    follower_id bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    followee_id bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower_id, followee_id),
    CHECK (follower_id <> followee_id)
);

CREATE INDEX IF NOT EXISTS follows_followee_id_idx ON follows (followee_id);

-- The counters on users follow `follows` in the same transaction, whoever
-- writes it, so the lake never sees a count that disagrees with the edges.
-- On a cascaded user delete the deleted side's UPDATE finds no row: harmless.
CREATE OR REPLACE FUNCTION follows_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE users SET followers_count = followers_count + 1 WHERE id = NEW.followee_id;
        UPDATE users SET following_count = following_count + 1 WHERE id = NEW.follower_id;
    ELSE
        UPDATE users SET followers_count = followers_count - 1 WHERE id = OLD.followee_id;
        UPDATE users SET following_count = following_count - 1 WHERE id = OLD.follower_id;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS follows_count ON follows;
CREATE TRIGGER follows_count AFTER INSERT OR DELETE ON follows
    FOR EACH ROW EXECUTE FUNCTION follows_count();

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
-- likes, follows: DEFAULT. The key is the whole identity of a like or follow.
ALTER TABLE users   REPLICA IDENTITY DEFAULT;
ALTER TABLE tweets  REPLICA IDENTITY FULL;
ALTER TABLE likes   REPLICA IDENTITY DEFAULT;
ALTER TABLE follows REPLICA IDENTITY DEFAULT;
