//! A batch decided before it is written: every row, every id it touches.
//!
//! Planning draws from the random source and reads only committed ids (the
//! [`Pools`]), never ids of the same batch. So a batch that must be retried
//! is retried exactly as planned, and a seeded run writes the same data
//! whatever faults happened on the way.

use crate::config::WorkloadConfig;
use crate::model::{Faker, NewTweet, NewUser, ProfileEdit, TweetEdit};
use crate::pools::Pools;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Like {
    pub user_id: i64,
    pub tweet_id: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TweetUpdate {
    pub tweet_id: i64,
    pub edit: TweetEdit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProfileUpdate {
    pub user_id: i64,
    pub edit: ProfileEdit,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchPlan {
    /// 1-based within a run; the ledger key with the run id.
    pub batch_no: i64,
    pub users: Vec<NewUser>,
    pub tweets: Vec<NewTweet>,
    pub likes: Vec<Like>,
    pub tweet_edits: Vec<TweetUpdate>,
    pub profile_edits: Vec<ProfileUpdate>,
    pub tweet_deletes: Vec<i64>,
}

/// Draws before giving up on finding a row not yet used.
const PICK_TRIES: usize = 20;

/// Plans batch `batch_no` of the configured mix on top of `pools`.
pub fn plan(faker: &mut Faker, pools: &Pools, mix: &WorkloadConfig, batch_no: i64) -> BatchPlan {
    let mut plan = BatchPlan {
        batch_no,
        users: (0..mix.new_users).map(|_| faker.user()).collect(),
        ..BatchPlan::default()
    };
    let authors = pools.user_ids();
    let names = pools.usernames();
    let tweets = pools.tweet_ids();
    if authors.is_empty() {
        return plan;
    }
    for _ in 0..mix.new_tweets {
        let author = faker.pick(&authors).expect("authors not empty");
        let reply_to = if faker.chance(mix.reply_ratio) {
            faker.pick(&tweets)
        } else {
            None
        };
        plan.tweets.push(faker.tweet(author, reply_to, &names));
    }
    if !tweets.is_empty() {
        for _ in 0..mix.likes {
            // A few draws find a pair not liked yet unless nearly all are.
            for _ in 0..PICK_TRIES {
                let like = Like {
                    user_id: faker.pick(&authors).expect("not empty"),
                    tweet_id: faker.pick(&tweets).expect("not empty"),
                };
                if !pools.has_like(&like) && !plan.likes.contains(&like) {
                    plan.likes.push(like);
                    break;
                }
            }
        }
        for _ in 0..mix.counter_updates {
            plan.tweet_edits.push(TweetUpdate {
                tweet_id: faker.pick(&tweets).expect("not empty"),
                edit: faker.tweet_edit(),
            });
        }
        for _ in 0..mix.tweet_deletes {
            for _ in 0..PICK_TRIES {
                let id = faker.pick(&tweets).expect("not empty");
                if !plan.tweet_deletes.contains(&id) {
                    plan.tweet_deletes.push(id);
                    break;
                }
            }
        }
    }
    for _ in 0..mix.profile_edits {
        plan.profile_edits.push(ProfileUpdate {
            user_id: faker.pick(&authors).expect("not empty"),
            edit: faker.profile_edit(),
        });
    }
    plan
}
