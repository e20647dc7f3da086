//! Recently seen row ids, so a batch can reply to, like, update and delete
//! rows that exist without querying for them first.
//!
//! [`Pools`] is only changed from a committed [`BatchOutcome`], so a rolled
//! back batch leaves no ids behind that PostgreSQL never stored.

use std::collections::{HashSet, VecDeque};

use tokio_postgres::Client;

use crate::db::BatchOutcome;
use crate::plan::Like;

/// Bounds memory on long runs; older rows simply stop getting activity,
/// much like old tweets do.
const MAX_USERS: usize = 20_000;
const MAX_TWEETS: usize = 50_000;
const MAX_LIKES: usize = 100_000;

#[derive(Debug, Default)]
pub struct Pools {
    users: VecDeque<(i64, String)>,
    tweets: VecDeque<i64>,
    /// Known likes, so a batch plans only new ones (and exactly as many as
    /// configured) and unlikes only existing ones.
    likes: VecDeque<Like>,
    like_set: HashSet<Like>,
}

impl Pools {
    /// Loads the newest users and tweets, so a restarted generator keeps
    /// building on what is there.
    pub async fn load(client: &Client) -> Result<Pools, tokio_postgres::Error> {
        let users = client
            .query(
                "SELECT id, username FROM users ORDER BY id DESC LIMIT $1",
                &[&(MAX_USERS as i64)],
            )
            .await?;
        let tweets = client
            .query(
                "SELECT id FROM tweets ORDER BY id DESC LIMIT $1",
                &[&(MAX_TWEETS as i64)],
            )
            .await?;
        let likes = client
            .query(
                "SELECT user_id, tweet_id FROM likes ORDER BY created_at DESC, user_id, tweet_id LIMIT $1",
                &[&(MAX_LIKES as i64)],
            )
            .await?;
        let mut pools = Pools {
            users: users.iter().rev().map(|r| (r.get(0), r.get(1))).collect(),
            tweets: tweets.iter().rev().map(|r| r.get(0)).collect(),
            ..Pools::default()
        };
        pools.add_likes(likes.iter().rev().map(|r| Like {
            user_id: r.get(0),
            tweet_id: r.get(1),
        }));
        Ok(pools)
    }

    pub fn has_like(&self, like: &Like) -> bool {
        self.like_set.contains(like)
    }

    fn add_likes(&mut self, likes: impl IntoIterator<Item = Like>) {
        for like in likes {
            if self.like_set.insert(like) {
                self.likes.push_back(like);
            }
        }
        while self.likes.len() > MAX_LIKES {
            let old = self.likes.pop_front().expect("not empty");
            self.like_set.remove(&old);
        }
    }

    pub fn user_ids(&self) -> Vec<i64> {
        self.users.iter().map(|(id, _)| *id).collect()
    }

    pub fn usernames(&self) -> Vec<&str> {
        self.users.iter().map(|(_, n)| n.as_str()).collect()
    }

    pub fn tweet_ids(&self) -> Vec<i64> {
        self.tweets.iter().copied().collect()
    }

    pub fn apply(&mut self, outcome: &BatchOutcome) {
        self.add_users(
            outcome
                .users_inserted
                .iter()
                .map(|u| (u.id, u.username.clone())),
        );
        self.tweets.extend(&outcome.tweets_inserted);
        self.add_likes(outcome.likes_inserted.iter().copied());
        if !outcome.tweets_deleted.is_empty() {
            let gone: HashSet<i64> = outcome.tweets_deleted.iter().copied().collect();
            self.tweets.retain(|id| !gone.contains(id));
            // The likes went with their tweets (ON DELETE CASCADE).
            self.likes.retain(|l| !gone.contains(&l.tweet_id));
            self.like_set.retain(|l| !gone.contains(&l.tweet_id));
        }
        while self.tweets.len() > MAX_TWEETS {
            self.tweets.pop_front();
        }
    }

    pub fn add_users(&mut self, users: impl IntoIterator<Item = (i64, String)>) {
        self.users.extend(users);
        while self.users.len() > MAX_USERS {
            self.users.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::InsertedUser;

    #[test]
    fn apply_adds_and_removes() {
        let mut p = Pools::default();
        p.apply(&BatchOutcome {
            users_inserted: vec![InsertedUser {
                id: 1,
                username: "a".into(),
            }],
            tweets_inserted: vec![10, 11, 12],
            ..Default::default()
        });
        p.apply(&BatchOutcome {
            tweets_deleted: vec![11],
            ..Default::default()
        });
        assert_eq!(p.user_ids(), vec![1]);
        assert_eq!(p.tweet_ids(), vec![10, 12]);
    }

    #[test]
    fn pools_are_bounded() {
        let mut p = Pools::default();
        p.apply(&BatchOutcome {
            tweets_inserted: (0..(MAX_TWEETS as i64 + 10)).collect(),
            ..Default::default()
        });
        assert_eq!(p.tweet_ids().len(), MAX_TWEETS);
        assert_eq!(p.tweet_ids()[0], 10);
    }
}
