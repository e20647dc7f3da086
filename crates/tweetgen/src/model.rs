//! The fake Twitter: what a user, a tweet and a profile edit look like.
//!
//! [`Faker`] owns the random source, so a seeded run is deterministic for a
//! given database state. Nothing here touches the database.

use fake::Fake;
use fake::faker::address::en::{CityName, CountryName};
use fake::faker::company::en::{Buzzword, CatchPhrase, CompanyName};
use fake::faker::internet::en::{FreeEmail, Username};
use fake::faker::job::en::Title as JobTitle;
use fake::faker::lorem::en::{Paragraph, Sentence, Word};
use fake::faker::name::en::Name;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rust_decimal::Decimal;

/// Languages with Twitter-like weights (English dominates).
const LANGS: &[(&str, u32)] = &[
    ("en", 55),
    ("es", 12),
    ("ja", 10),
    ("pt", 8),
    ("fr", 5),
    ("de", 4),
    ("tr", 3),
    ("ar", 3),
];

const TOPICS: &[&str] = &[
    "rustlang",
    "postgres",
    "dataengineering",
    "kafka",
    "nixos",
    "opensource",
    "coffee",
    "football",
    "music",
    "travel",
    "photography",
    "ai",
    "climate",
    "books",
    "gaming",
    "startup",
    "remote",
    "devops",
    "parquet",
    "cdc",
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
    pub followers_count: i32,
    pub reputation: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewTweet {
    pub user_id: i64,
    pub reply_to_id: Option<i64>,
    pub body: String,
    pub lang: &'static str,
    pub hashtags: Vec<String>,
    pub mentions: Vec<String>,
    pub sensitive: bool,
    pub latitude: Option<Decimal>,
    pub longitude: Option<Decimal>,
}

/// One change to an existing profile.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileEdit {
    /// Touches only small columns, so a TOASTed bio is left unchanged and
    /// Debezium sends its placeholder for it.
    Counters {
        followers_delta: i32,
        reputation: Decimal,
    },
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

pub struct Faker {
    rng: StdRng,
    long_bio_ratio: f64,
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
        }
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    /// Picks one element; `None` for an empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.rng.random_range(0..items.len())])
        }
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

    pub fn user(&mut self) -> NewUser {
        let base: String = Username().fake_with_rng(&mut self.rng);
        let base: String = base
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let username = format!("{base}_{}", self.rng.random_range(0..100_000u32));
        let bio = if self.chance(self.long_bio_ratio) {
            Some(self.long_bio())
        } else if self.chance(0.8) {
            Some(self.short_bio())
        } else {
            None
        };
        let followers_count = if self.chance(0.02) {
            self.rng.random_range(10_000..5_000_000)
        } else {
            self.rng.random_range(0..2_000)
        };
        NewUser {
            username,
            display_name: Name().fake_with_rng(&mut self.rng),
            email: self
                .chance(0.7)
                .then(|| FreeEmail().fake_with_rng(&mut self.rng)),
            bio,
            location: self.location(),
            lang: self.lang(),
            verified: followers_count > 100_000 || self.chance(0.01),
            followers_count,
            reputation: self.reputation(),
        }
    }

    fn short_bio(&mut self) -> String {
        let title: String = JobTitle().fake_with_rng(&mut self.rng);
        let company: String = CompanyName().fake_with_rng(&mut self.rng);
        let topic = self.pick(TOPICS).unwrap_or("rustlang");
        format!("{title} at {company}. Opinions my own. #{topic}")
    }

    /// A bio of several paragraphs, well over PostgreSQL's ~2 kB TOAST
    /// threshold (the column is stored EXTERNAL, uncompressed).
    fn long_bio(&mut self) -> String {
        let mut bio = self.short_bio();
        while bio.len() < 4_000 {
            let p: String = Paragraph(4..8).fake_with_rng(&mut self.rng);
            bio.push_str("\n\n");
            bio.push_str(&p);
        }
        bio
    }

    fn location(&mut self) -> Option<String> {
        self.chance(0.6).then(|| {
            let city: String = CityName().fake_with_rng(&mut self.rng);
            let country: String = CountryName().fake_with_rng(&mut self.rng);
            format!("{city}, {country}")
        })
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

    /// A tweet by `user_id`, replying to `reply_to` when given; `mentionable`
    /// are usernames that can be @-mentioned.
    pub fn tweet(&mut self, user_id: i64, reply_to: Option<i64>, mentionable: &[&str]) -> NewTweet {
        let n_tags = [0, 0, 1, 1, 1, 2, 3][self.rng.random_range(0..7)];
        let mut hashtags: Vec<String> = Vec::with_capacity(n_tags);
        for _ in 0..n_tags {
            let tag = self.pick(TOPICS).unwrap_or("rustlang").to_string();
            if !hashtags.contains(&tag) {
                hashtags.push(tag);
            }
        }
        let mut mentions: Vec<String> = Vec::new();
        if (reply_to.is_some() || self.chance(0.2))
            && let Some(name) = self.pick(mentionable)
        {
            mentions.push(name.to_string());
        }
        let mut body = String::new();
        for m in &mentions {
            body.push('@');
            body.push_str(m);
            body.push(' ');
        }
        body.push_str(&self.sentence());
        for tag in &hashtags {
            body.push_str(" #");
            body.push_str(tag);
        }
        truncate_chars(&mut body, 280);
        let geo = self.chance(0.15);
        NewTweet {
            user_id,
            reply_to_id: reply_to,
            body,
            lang: self.lang(),
            hashtags,
            mentions,
            sensitive: self.chance(0.03),
            latitude: geo.then(|| self.coordinate(90)),
            longitude: geo.then(|| self.coordinate(180)),
        }
    }

    fn sentence(&mut self) -> String {
        match self.rng.random_range(0..5) {
            0 => {
                let phrase: String = CatchPhrase().fake_with_rng(&mut self.rng);
                format!("Hot take: {}.", phrase.to_lowercase())
            }
            1 => {
                let word: String = Buzzword().fake_with_rng(&mut self.rng);
                let company: String = CompanyName().fake_with_rng(&mut self.rng);
                format!("Just shipped {word} support at {company} 🚀")
            }
            2 => {
                let city: String = CityName().fake_with_rng(&mut self.rng);
                let word: String = Word().fake_with_rng(&mut self.rng);
                format!("Landed in {city}. Anyone up for {word} tonight?")
            }
            _ => Sentence(6..18).fake_with_rng(&mut self.rng),
        }
    }

    pub fn profile_edit(&mut self) -> ProfileEdit {
        if self.chance(0.7) {
            ProfileEdit::Counters {
                followers_delta: self.rng.random_range(-5..50),
                reputation: self.reputation(),
            }
        } else {
            let bio = if self.chance(0.1) {
                None
            } else if self.chance(self.long_bio_ratio) {
                Some(self.long_bio())
            } else {
                Some(self.short_bio())
            };
            ProfileEdit::Profile {
                bio,
                location: self.location(),
            }
        }
    }

    pub fn tweet_edit(&mut self) -> TweetEdit {
        if self.chance(0.9) {
            TweetEdit::Counters {
                likes: self.rng.random_range(0..40),
                retweets: self.rng.random_range(0..8),
            }
        } else {
            let mut body = format!("{} (edited)", self.sentence());
            truncate_chars(&mut body, 280);
            TweetEdit::Body(body)
        }
    }
}

/// Cuts `s` to at most `max` characters (not bytes: varchar(280) counts
/// characters, and a byte cut could split one).
fn truncate_chars(s: &mut String, max: usize) {
    if let Some((idx, _)) = s.char_indices().nth(max) {
        s.truncate(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_runs_are_deterministic() {
        let mut a = Faker::new(Some(42), 0.1);
        let mut b = Faker::new(Some(42), 0.1);
        for _ in 0..50 {
            assert_eq!(a.user(), b.user());
            assert_eq!(a.tweet(1, Some(2), &["x"]), b.tweet(1, Some(2), &["x"]));
        }
    }

    #[test]
    fn users_fit_the_schema() {
        let mut f = Faker::new(Some(1), 0.5);
        let mut long = 0;
        for _ in 0..500 {
            let u = f.user();
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
    fn tweets_fit_the_schema() {
        let mut f = Faker::new(Some(2), 0.1);
        let mut geo = 0;
        for i in 0..1_000 {
            let t = f.tweet(7, (i % 3 == 0).then_some(9), &["alice", "bob"]);
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
            if t.reply_to_id.is_some() {
                assert_eq!(t.mentions.len(), 1);
            }
        }
        assert!((50..300).contains(&geo), "geo-tagged: {geo}");
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
