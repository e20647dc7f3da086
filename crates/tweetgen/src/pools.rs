//! What the generator knows of the committed database: users with their
//! popularity, recent tweets, likes and follows. A batch is planned from
//! here without querying first.
//!
//! [`Pools`] changes only from [`Committed`] rows, so a rolled back batch
//! leaves no ids behind that PostgreSQL never stored. Choices are weighted:
//! each user has a heavy-tailed `fame` (who gets followed, liked, replied
//! to) and `activity` (who writes, likes, follows), sampled in O(log n)
//! through Fenwick trees. Only `Vec`/`VecDeque` order feeds a choice, never
//! a hash map's, so a seeded run is deterministic.

use std::collections::{HashMap, HashSet, VecDeque};

use tokio_postgres::Client;

use crate::model::{Faker, Parent};
use crate::text::lang_code;

/// Bounds memory on long runs; older rows simply stop getting activity,
/// much like old tweets do.
const MAX_USERS: usize = 20_000;
const MAX_TWEETS: usize = 50_000;
const MAX_EDGES: usize = 100_000;
/// Tweets remembered per user for likes and replies to their recent posts.
const RECENT_PER_USER: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Like {
    pub user_id: i64,
    pub tweet_id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Follow {
    pub follower_id: i64,
    pub followee_id: i64,
}

/// A row of `likes` or `follows`: a table keyed by two user/tweet ids.
pub trait Edge: Copy + Send + Sync {
    const TABLE: &'static str;
    const COLUMNS: [&'static str; 2];
    fn key(&self) -> [i64; 2];
    fn from_key(key: [i64; 2]) -> Self;
}

impl Edge for Like {
    const TABLE: &'static str = "likes";
    const COLUMNS: [&'static str; 2] = ["user_id", "tweet_id"];
    fn key(&self) -> [i64; 2] {
        [self.user_id, self.tweet_id]
    }
    fn from_key([user_id, tweet_id]: [i64; 2]) -> Self {
        Like { user_id, tweet_id }
    }
}

impl Edge for Follow {
    const TABLE: &'static str = "follows";
    const COLUMNS: [&'static str; 2] = ["follower_id", "followee_id"];
    fn key(&self) -> [i64; 2] {
        [self.follower_id, self.followee_id]
    }
    fn from_key([follower_id, followee_id]: [i64; 2]) -> Self {
        Follow {
            follower_id,
            followee_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserEntry {
    pub id: i64,
    pub username: String,
    pub lang: &'static str,
    pub fame: f64,
    pub activity: f64,
    /// Newest last.
    recent: VecDeque<i64>,
}

impl UserEntry {
    pub fn new(id: i64, username: String, lang: &'static str, fame: f64, activity: f64) -> Self {
        UserEntry {
            id,
            username,
            lang,
            fame,
            activity,
            recent: VecDeque::new(),
        }
    }

    pub fn last_tweet(&self) -> Option<i64> {
        self.recent.back().copied()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TweetEntry {
    pub id: i64,
    pub author: i64,
    pub body: String,
    pub lang: &'static str,
}

/// Rows one transaction committed, as the pools need them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    pub users: Vec<UserEntry>,
    /// Tweets others can reply to, like or quote (retweets are left out).
    pub tweets: Vec<TweetEntry>,
    pub likes: Vec<Like>,
    pub unlikes: Vec<Like>,
    pub follows: Vec<Follow>,
    pub unfollows: Vec<Follow>,
    pub tweets_deleted: Vec<i64>,
    pub users_deleted: Vec<i64>,
}

/// Prefix sums over weights for sampling proportionally to weight.
#[derive(Debug, Default)]
struct Fenwick {
    tree: Vec<f64>,
    weights: Vec<f64>,
}

impl Fenwick {
    fn push(&mut self, w: f64) {
        self.weights.push(0.0);
        self.tree.push(0.0);
        // Rebuild the new node from its children's range.
        let i = self.tree.len(); // 1-based index of the new node
        let low = i - (i & i.wrapping_neg());
        let mut sum = 0.0;
        let mut j = i - 1;
        while j > low {
            sum += self.tree[j - 1];
            j -= j & j.wrapping_neg();
        }
        self.tree[i - 1] = sum;
        self.set(i - 1, w);
    }

    fn set(&mut self, idx: usize, w: f64) {
        let delta = w - self.weights[idx];
        self.weights[idx] = w;
        let mut i = idx + 1;
        while i <= self.tree.len() {
            self.tree[i - 1] += delta;
            i += i & i.wrapping_neg();
        }
    }

    fn total(&self) -> f64 {
        let mut i = self.tree.len();
        let mut sum = 0.0;
        while i > 0 {
            sum += self.tree[i - 1];
            i -= i & i.wrapping_neg();
        }
        sum
    }

    /// The slot whose cumulative range contains `x` in `[0, total)`.
    fn find(&self, mut x: f64) -> usize {
        let mut pos = 0;
        let mut step = self.tree.len().next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= self.tree.len() && self.tree[next - 1] <= x {
                pos = next;
                x -= self.tree[next - 1];
            }
            step /= 2;
        }
        pos.min(self.tree.len().saturating_sub(1))
    }
}

/// A bounded set of pairs with a stable order for uniform choice.
#[derive(Debug)]
struct Edges<E> {
    order: VecDeque<E>,
    set: HashSet<E>,
}

impl<E> Default for Edges<E> {
    fn default() -> Self {
        Edges {
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }
}

impl<E: Copy + Eq + std::hash::Hash> Edges<E> {
    fn insert(&mut self, e: E) {
        if self.set.insert(e) {
            self.order.push_back(e);
        }
        while self.order.len() > MAX_EDGES {
            let old = self.order.pop_front().expect("not empty");
            self.set.remove(&old);
        }
    }

    fn remove(&mut self, e: &E) {
        if self.set.remove(e)
            && let Some(i) = self.order.iter().position(|x| x == e)
        {
            self.order.remove(i);
        }
    }

    fn retain(&mut self, keep: impl Fn(&E) -> bool) {
        self.order.retain(&keep);
        self.set.retain(keep);
    }

    fn pick(&self, faker: &mut Faker) -> Option<E> {
        (!self.order.is_empty()).then(|| self.order[faker.index(self.order.len())])
    }
}

#[derive(Debug, Default)]
pub struct Pools {
    slots: Vec<Option<UserEntry>>,
    slot_of: HashMap<i64, usize>,
    /// Free slots, reused lowest first.
    free: Vec<usize>,
    /// Live users, oldest first, for eviction and uniform choice.
    user_order: VecDeque<i64>,
    fame: Fenwick,
    activity: Fenwick,
    tweets: HashMap<i64, TweetEntry>,
    /// Tweet ids, oldest first.
    tweet_order: VecDeque<i64>,
    likes: Edges<Like>,
    follows: Edges<Follow>,
}

impl Pools {
    /// Loads the newest rows, so a restarted generator keeps building on
    /// what is there. Popularity is read back from the follower count.
    pub async fn load(client: &Client) -> Result<Pools, tokio_postgres::Error> {
        let mut pools = Pools::default();
        let users = client
            .query(
                "SELECT id, username, lang, followers_count FROM users ORDER BY id DESC LIMIT $1",
                &[&(MAX_USERS as i64)],
            )
            .await?;
        for r in users.iter().rev() {
            let followers: i32 = r.get(3);
            let weight = 1.0 + f64::from(followers.max(0));
            let lang: String = r.get(2);
            pools.add_user(UserEntry::new(
                r.get(0),
                r.get(1),
                lang_code(&lang),
                weight,
                weight.sqrt(),
            ));
        }
        let tweets = client
            .query(
                "SELECT id, user_id, body, lang FROM tweets WHERE retweet_of_id IS NULL \
                 ORDER BY id DESC LIMIT $1",
                &[&(MAX_TWEETS as i64)],
            )
            .await?;
        for r in tweets.iter().rev() {
            let lang: String = r.get(3);
            pools.add_tweet(TweetEntry {
                id: r.get(0),
                author: r.get(1),
                body: r.get(2),
                lang: lang_code(&lang),
            });
        }
        let likes = client
            .query(
                "SELECT user_id, tweet_id FROM likes ORDER BY created_at DESC, user_id, tweet_id LIMIT $1",
                &[&(MAX_EDGES as i64)],
            )
            .await?;
        for r in likes.iter().rev() {
            pools.likes.insert(Like {
                user_id: r.get(0),
                tweet_id: r.get(1),
            });
        }
        let follows = client
            .query(
                "SELECT follower_id, followee_id FROM follows \
                 ORDER BY created_at DESC, follower_id, followee_id LIMIT $1",
                &[&(MAX_EDGES as i64)],
            )
            .await?;
        for r in follows.iter().rev() {
            pools.follows.insert(Follow {
                follower_id: r.get(0),
                followee_id: r.get(1),
            });
        }
        Ok(pools)
    }

    pub fn user_count(&self) -> usize {
        self.user_order.len()
    }

    pub fn tweet_count(&self) -> usize {
        self.tweet_order.len()
    }

    pub fn user(&self, id: i64) -> Option<&UserEntry> {
        self.slot_of.get(&id).and_then(|&s| self.slots[s].as_ref())
    }

    pub fn tweet(&self, id: i64) -> Option<&TweetEntry> {
        self.tweets.get(&id)
    }

    /// `tweet` as the parent of a new one.
    pub fn parent<'a>(&'a self, tweet: &'a TweetEntry) -> Parent<'a> {
        Parent {
            id: tweet.id,
            author: self.user(tweet.author).map_or("", |u| u.username.as_str()),
            body: &tweet.body,
            lang: tweet.lang,
        }
    }

    pub fn has_like(&self, like: &Like) -> bool {
        self.likes.set.contains(like)
    }

    pub fn has_follow(&self, follow: &Follow) -> bool {
        self.follows.set.contains(follow)
    }

    fn weighted(&self, tree: &Fenwick, faker: &mut Faker) -> Option<&UserEntry> {
        let total = tree.total();
        if self.user_order.is_empty() || total <= 0.0 {
            return None;
        }
        match self.slots[tree.find(faker.unit() * total)].as_ref() {
            Some(u) => Some(u),
            // Float drift after many updates can land on a freed slot.
            None => self.any_user(faker),
        }
    }

    /// A user chosen in proportion to fame: who gets followed and read.
    pub fn famous_user(&self, faker: &mut Faker) -> Option<&UserEntry> {
        self.weighted(&self.fame, faker)
    }

    /// A user chosen in proportion to activity: who writes, likes, follows.
    pub fn active_user(&self, faker: &mut Faker) -> Option<&UserEntry> {
        self.weighted(&self.activity, faker)
    }

    /// Any user, uniformly.
    pub fn any_user(&self, faker: &mut Faker) -> Option<&UserEntry> {
        let n = self.user_order.len();
        (n > 0)
            .then(|| self.user(self.user_order[faker.index(n)]))
            .flatten()
    }

    /// A tweet chosen the way attention goes: a famous author, then one of
    /// their recent tweets, the newest most likely. Falls back to any recent
    /// tweet when the famous ones have not posted.
    pub fn popular_tweet(&self, faker: &mut Faker) -> Option<&TweetEntry> {
        for _ in 0..4 {
            let Some(author) = self.famous_user(faker) else {
                break;
            };
            if author.recent.is_empty() {
                continue;
            }
            // Geometric from the newest: half the picks hit the latest.
            let mut back = 0;
            while back + 1 < author.recent.len() && faker.chance(0.5) {
                back += 1;
            }
            let id = author.recent[author.recent.len() - 1 - back];
            if let Some(t) = self.tweets.get(&id) {
                return Some(t);
            }
        }
        self.any_tweet(faker)
    }

    /// Any remembered tweet, uniformly.
    pub fn any_tweet(&self, faker: &mut Faker) -> Option<&TweetEntry> {
        let n = self.tweet_order.len();
        (n > 0)
            .then(|| self.tweets.get(&self.tweet_order[faker.index(n)]))
            .flatten()
    }

    pub fn any_like(&self, faker: &mut Faker) -> Option<Like> {
        self.likes.pick(faker)
    }

    pub fn any_follow(&self, faker: &mut Faker) -> Option<Follow> {
        self.follows.pick(faker)
    }

    fn add_user(&mut self, user: UserEntry) {
        let (fame, activity, id) = (user.fame, user.activity, user.id);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(user);
                self.fame.set(s, fame);
                self.activity.set(s, activity);
                s
            }
            None => {
                self.slots.push(Some(user));
                self.fame.push(fame);
                self.activity.push(activity);
                self.slots.len() - 1
            }
        };
        self.slot_of.insert(id, slot);
        self.user_order.push_back(id);
        while self.user_order.len() > MAX_USERS {
            let oldest = self.user_order[0];
            self.forget_user(oldest);
        }
    }

    /// Drops a user from the pools (deleted, or too old to keep).
    fn forget_user(&mut self, id: i64) {
        let Some(slot) = self.slot_of.remove(&id) else {
            return;
        };
        self.slots[slot] = None;
        self.fame.set(slot, 0.0);
        self.activity.set(slot, 0.0);
        self.free.push(slot);
        // Lowest slot first keeps reuse independent of deletion order.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(i) = self.user_order.iter().position(|&u| u == id) {
            self.user_order.remove(i);
        }
    }

    fn add_tweet(&mut self, tweet: TweetEntry) {
        if let Some(&slot) = self.slot_of.get(&tweet.author)
            && let Some(user) = self.slots[slot].as_mut()
        {
            user.recent.push_back(tweet.id);
            if user.recent.len() > RECENT_PER_USER {
                user.recent.pop_front();
            }
        }
        self.tweet_order.push_back(tweet.id);
        self.tweets.insert(tweet.id, tweet);
        while self.tweet_order.len() > MAX_TWEETS {
            let old = self.tweet_order.pop_front().expect("not empty");
            self.tweets.remove(&old);
        }
    }

    /// Records what a transaction committed, cascades included.
    pub fn apply(&mut self, c: &Committed) {
        for u in &c.users {
            self.add_user(u.clone());
        }
        for t in &c.tweets {
            self.add_tweet(t.clone());
        }
        for l in &c.likes {
            self.likes.insert(*l);
        }
        for f in &c.follows {
            self.follows.insert(*f);
        }
        for l in &c.unlikes {
            self.likes.remove(l);
        }
        for f in &c.unfollows {
            self.follows.remove(f);
        }
        let mut gone_tweets: HashSet<i64> = c.tweets_deleted.iter().copied().collect();
        let gone_users: HashSet<i64> = c.users_deleted.iter().copied().collect();
        if !gone_users.is_empty() {
            // ON DELETE CASCADE: their tweets, likes and follows went too.
            gone_tweets.extend(
                self.tweet_order
                    .iter()
                    .filter(|id| gone_users.contains(&self.tweets[id].author)),
            );
            for id in &c.users_deleted {
                self.forget_user(*id);
            }
            self.likes.retain(|l| !gone_users.contains(&l.user_id));
            self.follows.retain(|f| {
                !gone_users.contains(&f.follower_id) && !gone_users.contains(&f.followee_id)
            });
        }
        if !gone_tweets.is_empty() {
            self.tweet_order.retain(|id| !gone_tweets.contains(id));
            self.tweets.retain(|id, _| !gone_tweets.contains(id));
            for user in self.slots.iter_mut().flatten() {
                user.recent.retain(|id| !gone_tweets.contains(id));
            }
            self.likes.retain(|l| !gone_tweets.contains(&l.tweet_id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64, fame: f64) -> UserEntry {
        UserEntry::new(id, format!("u{id}"), "en", fame, 1.0)
    }

    fn tweet(id: i64, author: i64) -> TweetEntry {
        TweetEntry {
            id,
            author,
            body: format!("t{id}"),
            lang: "en",
        }
    }

    #[test]
    fn fenwick_samples_in_proportion_to_weight() {
        let mut p = Pools::default();
        p.apply(&Committed {
            users: vec![user(1, 1.0), user(2, 9.0)],
            ..Default::default()
        });
        let mut f = Faker::new(Some(1), 0.0);
        let twos = (0..10_000)
            .filter(|_| p.famous_user(&mut f).unwrap().id == 2)
            .count();
        assert!((8_700..9_300).contains(&twos), "{twos}");
    }

    #[test]
    fn deleting_a_user_cascades_like_postgres() {
        let mut p = Pools::default();
        p.apply(&Committed {
            users: vec![user(1, 1.0), user(2, 1.0), user(3, 1.0)],
            ..Default::default()
        });
        p.apply(&Committed {
            tweets: vec![tweet(10, 1), tweet(11, 2)],
            likes: vec![
                Like {
                    user_id: 2,
                    tweet_id: 10,
                },
                Like {
                    user_id: 3,
                    tweet_id: 11,
                },
                Like {
                    user_id: 1,
                    tweet_id: 11,
                },
            ],
            follows: vec![
                Follow {
                    follower_id: 2,
                    followee_id: 1,
                },
                Follow {
                    follower_id: 3,
                    followee_id: 2,
                },
            ],
            ..Default::default()
        });
        p.apply(&Committed {
            users_deleted: vec![1],
            ..Default::default()
        });
        assert_eq!(p.user_count(), 2);
        assert!(p.user(1).is_none() && p.tweet(10).is_none());
        assert_eq!(p.tweet_count(), 1);
        assert_eq!(
            p.likes.order.iter().copied().collect::<Vec<_>>(),
            vec![Like {
                user_id: 3,
                tweet_id: 11
            }]
        );
        assert_eq!(p.follows.order.len(), 1);
        // The freed slot weighs nothing.
        let mut f = Faker::new(Some(2), 0.0);
        assert!((0..1000).all(|_| p.famous_user(&mut f).unwrap().id != 1));
    }

    #[test]
    fn pools_are_bounded() {
        let mut p = Pools::default();
        p.apply(&Committed {
            users: vec![user(1, 1.0)],
            ..Default::default()
        });
        p.apply(&Committed {
            tweets: (0..(MAX_TWEETS as i64 + 10)).map(|i| tweet(i, 1)).collect(),
            ..Default::default()
        });
        assert_eq!(p.tweet_count(), MAX_TWEETS);
        assert_eq!(p.tweet_order[0], 10);
        assert_eq!(p.user(1).unwrap().recent.len(), RECENT_PER_USER);
    }
}
