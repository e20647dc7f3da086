//! The fake Twitter: what a user, a tweet and an edit look like.
//!
//! [`Faker`] owns the random source, so a seeded run is deterministic for a
//! given database state. Text comes from [`crate::text`], in the language of
//! its tag. Nothing here touches the database.

use fake::Fake;
use fake::faker::internet::en::FreeEmail;
use fake::faker::name::en::{FirstName, LastName};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rust_decimal::Decimal;

use crate::text::{self, LANGS};

/// Hashtags, most popular first: everyday use picks them Zipf-like by rank.
pub const TOPICS: &[&str] = &[
    "music",
    "football",
    "ai",
    "travel",
    "coffee",
    "gaming",
    "photography",
    "books",
    "climate",
    "startup",
    "opensource",
    "rustlang",
    "remote",
    "devops",
    "postgres",
    "kafka",
    "dataengineering",
    "nixos",
    "parquet",
    "cdc",
];

/// Tags that can trend: events, not evergreen topics.
const EVENTS: &[&str] = &[
    "worldcup",
    "eurovision",
    "election",
    "solareclipse",
    "launchday",
    "earthquake",
    "oscars",
    "blackfriday",
];

#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    pub username: String,
    pub display_name: String,
    pub email: Option<String>,
    pub bio: Option<String>,
    pub location: Option<String>,
    pub lang: &'static str,
    pub verified: bool,
    pub reputation: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewTweet {
    pub user_id: i64,
    pub reply_to_id: Option<i64>,
    pub retweet_of_id: Option<i64>,
    pub quote_of_id: Option<i64>,
    pub body: String,
    pub lang: &'static str,
    pub hashtags: Vec<String>,
    pub mentions: Vec<String>,
    pub sensitive: bool,
    pub latitude: Option<Decimal>,
    pub longitude: Option<Decimal>,
}

/// An existing tweet a new one refers to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parent<'a> {
    pub id: i64,
    pub author: &'a str,
    pub body: &'a str,
    pub lang: &'static str,
}

/// How a new tweet relates to an existing one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TweetKind<'a> {
    Original,
    /// A reply to someone else's tweet; mentions its author.
    Reply(Parent<'a>),
    /// The author's next tweet in a thread: a reply to their own last one.
    Thread(Parent<'a>),
    /// A tweet of its own that embeds another.
    Quote(Parent<'a>),
    /// A pure retweet: "RT @author: text", in the original's language.
    Retweet(Parent<'a>),
}

/// One change to an existing profile.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileEdit {
    /// Touches only small columns, so a TOASTed bio is left unchanged and
    /// Debezium sends its placeholder for it.
    Reputation(Decimal),
    /// Rewrites the bio (sometimes to NULL) and the location.
    Profile {
        bio: Option<String>,
        location: Option<String>,
    },
}

/// An update to an existing tweet.
#[derive(Debug, Clone, PartialEq)]
pub enum TweetEdit {
    Counters { likes: i32, retweets: i32 },
    Body(String),
}

/// A hashtag bursting for a while, as trends do.
#[derive(Debug, Clone, PartialEq)]
struct Trend {
    tag: &'static str,
    batches_left: u32,
}

pub struct Faker {
    rng: StdRng,
    long_bio_ratio: f64,
    trend: Option<Trend>,
}

impl Faker {
    pub fn new(seed: Option<u64>, long_bio_ratio: f64) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Faker {
            rng,
            long_bio_ratio,
            trend: None,
        }
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p.clamp(0.0, 1.0))
    }

    /// A uniform draw in `0..n`; `n` must be positive.
    pub fn index(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// A uniform draw in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Picks one element; `None` for an empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.index(items.len())])
        }
    }

    /// A Pareto draw (minimum 1, tail index `alpha`): most users get little
    /// attention and a few get most of it. Capped so one user cannot hold
    /// all the weight of a small run.
    pub fn pareto(&mut self, alpha: f64) -> f64 {
        let u = 1.0 - self.unit(); // (0, 1]
        u.powf(-1.0 / alpha).min(1e6)
    }

    /// Advances the trending hashtag by one batch: a burst starts with
    /// probability `start_chance` and lasts `length` batches.
    pub fn next_batch(&mut self, start_chance: f64, length: u32) {
        if let Some(trend) = &mut self.trend {
            trend.batches_left = trend.batches_left.saturating_sub(1);
            if trend.batches_left == 0 {
                self.trend = None;
            }
        }
        if self.trend.is_none() && length > 0 && self.chance(start_chance) {
            let tag = EVENTS[self.index(EVENTS.len())];
            self.trend = Some(Trend {
                tag,
                batches_left: length,
            });
        }
    }

    pub fn trending(&self) -> Option<&'static str> {
        self.trend.as_ref().map(|t| t.tag)
    }

    fn lang(&mut self) -> &'static str {
        let total: u32 = LANGS.iter().map(|(_, w)| w).sum();
        let mut n = self.rng.random_range(0..total);
        for (lang, w) in LANGS {
            if n < *w {
                return lang;
            }
            n -= w;
        }
        "en"
    }

    /// A new user; `famous` ones are more often verified.
    pub fn user(&mut self, famous: bool) -> NewUser {
        let lang = self.lang();
        // fake's Username mixes in lorem words; a handle from a name does not.
        let first: String = FirstName().fake_with_rng(&mut self.rng);
        let last: String = LastName().fake_with_rng(&mut self.rng);
        let base: String = format!("{first}_{last}")
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let username = format!("{base}_{}", self.rng.random_range(0..1_000_000u32));
        let bio = if self.chance(self.long_bio_ratio) {
            Some(text::long_bio(&mut self.rng, lang))
        } else if self.chance(0.8) {
            Some(text::short_bio(&mut self.rng, lang))
        } else {
            None
        };
        NewUser {
            username,
            display_name: text::name(&mut self.rng, lang),
            email: self
                .chance(0.7)
                .then(|| FreeEmail().fake_with_rng(&mut self.rng)),
            bio,
            location: self.location(lang),
            lang,
            verified: self.chance(if famous { 0.5 } else { 0.01 }),
            reputation: self.reputation(),
        }
    }

    fn location(&mut self, lang: &str) -> Option<String> {
        // ja and ar have no places in fake's locales.
        (!matches!(lang, "ja" | "ar") && self.chance(0.6)).then(|| text::city(&mut self.rng, lang))
    }

    fn reputation(&mut self) -> Decimal {
        // Two decimals in [0, 100]: numeric(5,2).
        Decimal::new(self.rng.random_range(0..=10_000), 2)
    }

    fn coordinate(&mut self, max_degrees: i64) -> Decimal {
        // Six decimals: numeric(9,6).
        let micro = max_degrees * 1_000_000;
        Decimal::new(self.rng.random_range(-micro..=micro), 6)
    }

    /// Hashtags for a new tweet: the trend in a large share of tweets while
    /// it lasts, otherwise topics by Zipf rank (weight 1/rank).
    fn hashtags(&mut self) -> Vec<String> {
        let mut tags: Vec<String> = Vec::new();
        if let Some(tag) = self.trending()
            && self.chance(0.4)
        {
            tags.push(tag.to_string());
        }
        let n = [0, 0, 1, 1, 1, 2, 3][self.index(7)];
        let harmonic: f64 = (1..=TOPICS.len()).map(|r| 1.0 / r as f64).sum();
        for _ in 0..n {
            let mut x = self.unit() * harmonic;
            let mut pick = TOPICS[TOPICS.len() - 1];
            for (r, topic) in TOPICS.iter().enumerate() {
                x -= 1.0 / (r + 1) as f64;
                if x < 0.0 {
                    pick = topic;
                    break;
                }
            }
            if !tags.iter().any(|t| t == pick) {
                tags.push(pick.to_string());
            }
        }
        tags
    }

    /// A tweet by `user_id`, who writes mostly in `author_lang`;
    /// `mentionable` are usernames that can be @-mentioned.
    pub fn tweet(
        &mut self,
        user_id: i64,
        author_lang: &'static str,
        kind: TweetKind<'_>,
        mentionable: &[&str],
    ) -> NewTweet {
        if let TweetKind::Retweet(of) = kind {
            let mut body = format!("RT @{}: {}", of.author, of.body);
            truncate_chars(&mut body, 280);
            return NewTweet {
                user_id,
                reply_to_id: None,
                retweet_of_id: Some(of.id),
                quote_of_id: None,
                body,
                lang: of.lang,
                hashtags: Vec::new(),
                mentions: vec![of.author.to_string()],
                sensitive: false,
                latitude: None,
                longitude: None,
            };
        }
        // Replies follow the conversation's language; others mostly the
        // author's own, sometimes English.
        let lang = match kind {
            TweetKind::Reply(p) | TweetKind::Thread(p) => p.lang,
            _ if self.chance(0.85) => author_lang,
            _ => "en",
        };
        let hashtags = self.hashtags();
        let mut mentions: Vec<String> = Vec::new();
        match kind {
            TweetKind::Reply(p) => mentions.push(p.author.to_string()),
            _ => {
                if self.chance(0.15)
                    && let Some(name) = self.pick(mentionable)
                {
                    mentions.push(name.to_string());
                }
            }
        }
        let mut body = String::new();
        for m in &mentions {
            body.push('@');
            body.push_str(m);
            body.push(' ');
        }
        body.push_str(&text::sentence(&mut self.rng, lang));
        for tag in &hashtags {
            body.push_str(" #");
            body.push_str(tag);
        }
        truncate_chars(&mut body, 280);
        let geo = self.chance(0.15);
        let (reply_to_id, quote_of_id) = match kind {
            TweetKind::Reply(p) | TweetKind::Thread(p) => (Some(p.id), None),
            TweetKind::Quote(p) => (None, Some(p.id)),
            _ => (None, None),
        };
        NewTweet {
            user_id,
            reply_to_id,
            retweet_of_id: None,
            quote_of_id,
            body,
            lang,
            hashtags,
            mentions,
            sensitive: self.chance(0.03),
            latitude: geo.then(|| self.coordinate(90)),
            longitude: geo.then(|| self.coordinate(180)),
        }
    }

    pub fn profile_edit(&mut self, lang: &str) -> ProfileEdit {
        if self.chance(0.7) {
            ProfileEdit::Reputation(self.reputation())
        } else {
            let bio = if self.chance(0.1) {
                None
            } else if self.chance(self.long_bio_ratio) {
                Some(text::long_bio(&mut self.rng, lang))
            } else {
                Some(text::short_bio(&mut self.rng, lang))
            };
            ProfileEdit::Profile {
                bio,
                location: self.location(lang),
            }
        }
    }

    pub fn tweet_edit(&mut self, lang: &str) -> TweetEdit {
        if self.chance(0.9) {
            TweetEdit::Counters {
                likes: self.rng.random_range(0..40),
                retweets: self.rng.random_range(0..8),
            }
        } else {
            let mut body = text::sentence(&mut self.rng, lang);
            truncate_chars(&mut body, 280);
            TweetEdit::Body(body)
        }
    }
}

/// Cuts `s` to at most `max` characters (not bytes: varchar(280) counts
/// characters, and a byte cut could split one).
pub fn truncate_chars(s: &mut String, max: usize) {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: Parent<'static> = Parent {
        id: 9,
        author: "alice",
        body: "初めまして",
        lang: "ja",
    };

    #[test]
    fn seeded_runs_are_deterministic() {
        let mut a = Faker::new(Some(42), 0.1);
        let mut b = Faker::new(Some(42), 0.1);
        for _ in 0..50 {
            assert_eq!(a.user(false), b.user(false));
            let kind = TweetKind::Reply(PARENT);
            assert_eq!(
                a.tweet(1, "de", kind, &["x"]),
                b.tweet(1, "de", kind, &["x"])
            );
        }
    }

    #[test]
    fn users_fit_the_schema() {
        let mut f = Faker::new(Some(1), 0.5);
        let mut long = 0;
        for _ in 0..500 {
            let u = f.user(false);
            assert!(u.username.chars().count() <= 32, "{}", u.username);
            assert!(u.reputation >= Decimal::ZERO && u.reputation <= Decimal::new(100, 0));
            assert_eq!(u.reputation.scale(), 2);
            if u.bio.as_ref().is_some_and(|b| b.len() > 2_000) {
                long += 1;
            }
        }
        assert!(long > 150, "long bios: {long}");
    }

    #[test]
    fn tweets_fit_the_schema_and_follow_their_parent() {
        let mut f = Faker::new(Some(2), 0.1);
        let mut geo = 0;
        for i in 0..1_000 {
            let kind = match i % 4 {
                0 => TweetKind::Reply(PARENT),
                1 => TweetKind::Retweet(PARENT),
                2 => TweetKind::Quote(PARENT),
                _ => TweetKind::Original,
            };
            let t = f.tweet(7, "fr", kind, &["alice", "bob"]);
            assert!(t.body.chars().count() <= 280);
            assert!(!t.body.is_empty());
            for tag in &t.hashtags {
                assert!(t.body.contains(&format!("#{tag}")) || t.body.chars().count() == 280);
            }
            if let (Some(lat), Some(lon)) = (t.latitude, t.longitude) {
                geo += 1;
                assert!(lat.abs() <= Decimal::new(90, 0) && lon.abs() <= Decimal::new(180, 0));
                assert_eq!(lat.scale(), 6);
            } else {
                assert_eq!(t.latitude, t.longitude);
            }
            match kind {
                TweetKind::Reply(_) => {
                    assert_eq!((t.reply_to_id, t.lang), (Some(9), "ja"));
                    assert_eq!(t.mentions, vec!["alice".to_string()]);
                }
                TweetKind::Retweet(_) => {
                    assert_eq!(t.retweet_of_id, Some(9));
                    assert_eq!(t.body, "RT @alice: 初めまして");
                }
                TweetKind::Quote(_) => assert_eq!(t.quote_of_id, Some(9)),
                _ => assert!(t.reply_to_id.is_none() && t.quote_of_id.is_none()),
            }
        }
        assert!((20..200).contains(&geo), "geo-tagged: {geo}");
    }

    #[test]
    fn a_trend_bursts_then_ends() {
        let mut f = Faker::new(Some(4), 0.0);
        f.next_batch(1.0, 3);
        let tag = f.trending().expect("a trend started");
        let tagged = (0..200)
            .filter(|_| {
                f.tweet(1, "en", TweetKind::Original, &[])
                    .hashtags
                    .contains(&tag.to_string())
            })
            .count();
        assert!((50..110).contains(&tagged), "{tagged} of 200 carry #{tag}");
        f.next_batch(0.0, 3);
        f.next_batch(0.0, 3);
        assert_eq!(f.trending(), Some(tag));
        f.next_batch(0.0, 3);
        assert_eq!(f.trending(), None);
    }

    #[test]
    fn pareto_is_heavy_tailed() {
        let mut f = Faker::new(Some(8), 0.0);
        let mut w: Vec<f64> = (0..10_000).map(|_| f.pareto(1.1)).collect();
        w.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = w[..100].iter().sum();
        let all: f64 = w.iter().sum();
        assert!(top / all > 0.2, "top 1 % hold {:.2}", top / all);
        assert!(w[9_999] >= 1.0);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut s = "🚀".repeat(300);
        truncate_chars(&mut s, 280);
        assert_eq!(s.chars().count(), 280);
    }

    #[test]
    fn pick_from_empty_is_none() {
        let mut f = Faker::new(Some(3), 0.0);
        assert_eq!(f.pick::<i64>(&[]), None);
    }
}
