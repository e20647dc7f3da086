//! A batch decided before it is written: every row, every id it touches.
//!
//! Planning draws from the random source and reads only committed rows (the
//! [`Pools`]), never ids of the same batch. So a batch that must be retried
//! is retried exactly as planned, and a seeded run writes the same data
//! whatever faults happened on the way.
//!
//! Who does what is heavy-tailed: active users write, like and follow the
//! most; famous users are followed, liked, replied to and retweeted the most
//! (see [`Pools::famous_user`]).

use std::collections::HashSet;

use crate::config::WorkloadConfig;
use crate::model::{Faker, NewTweet, NewUser, ProfileEdit, TweetEdit, TweetKind};
use crate::pools::{Follow, Like, Pools};

/// Draws before giving up on finding a row not yet used.
const PICK_TRIES: usize = 20;

/// A user to insert, with the popularity the generator gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedUser {
    pub user: NewUser,
    pub fame: f64,
    pub activity: f64,
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
    pub users: Vec<PlannedUser>,
    pub tweets: Vec<NewTweet>,
    pub likes: Vec<Like>,
    pub unlikes: Vec<Like>,
    pub follows: Vec<Follow>,
    pub unfollows: Vec<Follow>,
    pub tweet_edits: Vec<TweetUpdate>,
    pub profile_edits: Vec<ProfileUpdate>,
    pub tweet_deletes: Vec<i64>,
    pub user_deletes: Vec<i64>,
}

/// `count` scaled by the time-of-day factor, rounded.
fn scaled(count: u32, factor: f64) -> usize {
    (f64::from(count) * factor).round() as usize
}

/// A new user with Pareto popularity; activity is milder than fame.
pub fn new_user(faker: &mut Faker, alpha: f64) -> PlannedUser {
    let fame = faker.pareto(alpha);
    let activity = faker.pareto(alpha + 0.5);
    PlannedUser {
        user: faker.user(fame > 100.0),
        fame,
        activity,
    }
}

/// A new tweet by an active user: a retweet, quote, thread continuation,
/// reply or original, by the configured shares.
pub fn new_tweet(
    faker: &mut Faker,
    pools: &Pools,
    mix: &WorkloadConfig,
    mentionable: &[&str],
) -> Option<NewTweet> {
    let author = pools.active_user(faker)?;
    // Cumulative shares: retweet, quote, thread, reply; the rest original.
    let x = faker.unit();
    let quote = mix.retweet_ratio + mix.quote_ratio;
    let thread = quote + mix.thread_ratio;
    let reply = thread + mix.reply_ratio;
    let kind = if x < mix.retweet_ratio {
        pools
            .popular_tweet(faker)
            .map(|t| TweetKind::Retweet(pools.parent(t)))
    } else if x < quote {
        pools
            .popular_tweet(faker)
            .map(|t| TweetKind::Quote(pools.parent(t)))
    } else if x < thread {
        author
            .last_tweet()
            .and_then(|id| pools.tweet(id))
            .map(|t| TweetKind::Thread(pools.parent(t)))
    } else if x < reply {
        pools.popular_tweet(faker).map(|t| {
            if t.author == author.id {
                TweetKind::Thread(pools.parent(t))
            } else {
                TweetKind::Reply(pools.parent(t))
            }
        })
    } else {
        None
    };
    Some(faker.tweet(
        author.id,
        author.lang,
        kind.unwrap_or(TweetKind::Original),
        mentionable,
    ))
}

/// A follow that does not exist yet, of a famous user by an active one.
/// `taken` holds those already planned and gets the new one.
pub fn new_follow(faker: &mut Faker, pools: &Pools, taken: &mut HashSet<Follow>) -> Option<Follow> {
    for i in 0..2 * PICK_TRIES {
        // Popularity first; then uniformly, so that skew cannot starve a
        // batch of its configured follows while unused pairs remain.
        let (a, b) = if i < PICK_TRIES {
            (pools.active_user(faker)?.id, pools.famous_user(faker)?.id)
        } else {
            (pools.any_user(faker)?.id, pools.any_user(faker)?.id)
        };
        let follow = Follow {
            follower_id: a,
            followee_id: b,
        };
        if a != b && !pools.has_follow(&follow) && taken.insert(follow) {
            return Some(follow);
        }
    }
    None
}

/// A like that does not exist yet, of a popular tweet by an active user.
pub fn new_like(faker: &mut Faker, pools: &Pools, taken: &mut HashSet<Like>) -> Option<Like> {
    // Popularity first, then uniformly, as for follows.
    for i in 0..2 * PICK_TRIES {
        let like = if i < PICK_TRIES {
            Like {
                user_id: pools.active_user(faker)?.id,
                tweet_id: pools.popular_tweet(faker)?.id,
            }
        } else {
            Like {
                user_id: pools.any_user(faker)?.id,
                tweet_id: pools.any_tweet(faker)?.id,
            }
        };
        if !pools.has_like(&like) && taken.insert(like) {
            return Some(like);
        }
    }
    None
}

/// Plans batch `batch_no` of the configured mix on top of `pools`, with
/// every count scaled by `rate` (the diurnal factor, 1.0 when off).
pub fn plan(
    faker: &mut Faker,
    pools: &Pools,
    mix: &WorkloadConfig,
    batch_no: i64,
    rate: f64,
) -> BatchPlan {
    faker.next_batch(mix.trend_chance, mix.trend_batches);
    let mut plan = BatchPlan {
        batch_no,
        users: (0..scaled(mix.new_users, rate))
            .map(|_| new_user(faker, mix.popularity_alpha))
            .collect(),
        ..BatchPlan::default()
    };
    if pools.user_count() == 0 {
        return plan;
    }
    // Mentions go to famous users, like attention does.
    let mentionable: Vec<&str> = (0..16)
        .filter_map(|_| pools.famous_user(faker).map(|u| u.username.as_str()))
        .collect();
    for _ in 0..scaled(mix.new_tweets, rate) {
        plan.tweets
            .extend(new_tweet(faker, pools, mix, &mentionable));
    }
    let mut taken = HashSet::new();
    for _ in 0..scaled(mix.follows, rate) {
        plan.follows.extend(new_follow(faker, pools, &mut taken));
    }
    for _ in 0..scaled(mix.unfollows, rate) {
        for _ in 0..PICK_TRIES {
            match pools.any_follow(faker) {
                Some(f) if !plan.unfollows.contains(&f) => {
                    plan.unfollows.push(f);
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    if pools.tweet_count() > 0 {
        let mut taken = HashSet::new();
        for _ in 0..scaled(mix.likes, rate) {
            plan.likes.extend(new_like(faker, pools, &mut taken));
        }
        for _ in 0..scaled(mix.unlikes, rate) {
            for _ in 0..PICK_TRIES {
                match pools.any_like(faker) {
                    Some(l) if !plan.unlikes.contains(&l) => {
                        plan.unlikes.push(l);
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        for _ in 0..scaled(mix.counter_updates, rate) {
            if let Some(t) = pools.popular_tweet(faker) {
                let (tweet_id, lang) = (t.id, t.lang);
                plan.tweet_edits.push(TweetUpdate {
                    tweet_id,
                    edit: faker.tweet_edit(lang),
                });
            }
        }
        for _ in 0..scaled(mix.tweet_deletes, rate) {
            for _ in 0..PICK_TRIES {
                let Some(t) = pools.any_tweet(faker) else {
                    break;
                };
                if !plan.tweet_deletes.contains(&t.id) {
                    plan.tweet_deletes.push(t.id);
                    break;
                }
            }
        }
    }
    for _ in 0..scaled(mix.profile_edits, rate) {
        if let Some(u) = pools.any_user(faker) {
            let (user_id, lang) = (u.id, u.lang);
            plan.profile_edits.push(ProfileUpdate {
                user_id,
                edit: faker.profile_edit(lang),
            });
        }
    }
    // Accounts are closed by anyone, famous or not; keep a core of users.
    if mix.user_delete_every > 0
        && batch_no % i64::from(mix.user_delete_every) == 0
        && pools.user_count() > 10
        && let Some(u) = pools.any_user(faker)
    {
        plan.user_deletes.push(u.id);
    }
    plan
}

/// The daily rate factor at `hour` (UTC, fractional): a sine peaking at
/// 15:00 UTC, when Europe's afternoon meets America's morning.
pub fn diurnal_factor(amplitude: f64, hour: f64) -> f64 {
    1.0 + amplitude * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diurnal_peaks_in_the_afternoon_and_is_off_at_zero() {
        assert!((diurnal_factor(0.5, 15.0) - 1.5).abs() < 1e-9);
        assert!((diurnal_factor(0.5, 3.0) - 0.5).abs() < 1e-9);
        assert_eq!(diurnal_factor(0.0, 7.3), 1.0);
        assert_eq!(scaled(10, 1.5), 15);
    }

    #[test]
    fn a_plan_refers_only_to_committed_rows() {
        let mix = WorkloadConfig::default();
        let mut faker = Faker::new(Some(1), 0.1);
        let first = plan(&mut faker, &Pools::default(), &mix, 1, 1.0);
        assert_eq!(first.users.len(), 3);
        assert!(first.tweets.is_empty() && first.likes.is_empty() && first.follows.is_empty());
    }
}
