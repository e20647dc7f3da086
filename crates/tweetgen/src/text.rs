//! Text in the language its tag says: short phrases written per language,
//! filled with names and places from fake's locale of that language.
//!
//! fake has no sentences outside its Latin lorem ipsum, so the phrases are
//! ours; names and cities come from fake's locales, which also decides the
//! languages offered: Spanish, for one, has no locale there and is left out.

use fake::Fake;
use fake::faker::address::raw::CityName;
use fake::faker::name::raw::Name;
use fake::locales::{AR_SA, DE_DE, EN, FR_FR, IT_IT, JA_JP, NL_NL, PT_BR, PT_PT, TR_TR, ZH_CN};
use rand::RngExt;
use rand::rngs::StdRng;

/// Languages with Twitter-like weights (English dominates).
pub const LANGS: &[(&str, u32)] = &[
    ("en", 50),
    ("ja", 14),
    ("pt", 9),
    ("ar", 6),
    ("tr", 5),
    ("fr", 5),
    ("de", 4),
    ("it", 3),
    ("nl", 2),
    ("zh", 2),
];

/// The static code for a language read back from the database.
pub fn lang_code(lang: &str) -> &'static str {
    LANGS
        .iter()
        .map(|(code, _)| *code)
        .find(|code| *code == lang)
        .unwrap_or("en")
}

/// `{name}` is a person's name, `{city}` a place, both from the locale.
fn phrases(lang: &str) -> &'static [&'static str] {
    match lang {
        "de" => &[
            "Gerade in {city} gelandet. Hat jemand Zeit für einen Kaffee?",
            "Toller Vortrag von {name} heute, danke!",
            "Endlich Wochenende. Wer kommt heute Abend mit?",
            "Der Zug nach {city} hat wieder Verspätung.",
            "Neues Projekt gestartet, ich bin gespannt.",
            "Kann mir jemand ein gutes Buch empfehlen?",
        ],
        "fr" => &[
            "Je viens d'arriver à {city}. Quelqu'un pour un café ?",
            "Super présentation de {name} aujourd'hui, merci !",
            "Enfin le week-end. Qui vient ce soir ?",
            "Encore du retard sur la ligne pour {city}.",
            "Nouveau projet lancé, j'ai hâte de vous montrer.",
            "Vous avez un bon livre à me conseiller ?",
        ],
        "it" => &[
            "Appena arrivato a {city}. Qualcuno per un caffè?",
            "Grande intervento di {name} oggi, grazie!",
            "Finalmente il fine settimana. Chi viene stasera?",
            "Il treno per {city} è di nuovo in ritardo.",
            "Nuovo progetto avviato, non vedo l'ora.",
            "Qualcuno mi consiglia un buon libro?",
        ],
        "nl" => &[
            "Net aangekomen in {city}. Iemand zin in koffie?",
            "Mooie presentatie van {name} vandaag, bedankt!",
            "Eindelijk weekend. Wie gaat er vanavond mee?",
            "De trein naar {city} heeft weer vertraging.",
            "Nieuw project gestart, ik heb er zin in.",
            "Kan iemand me een goed boek aanraden?",
        ],
        "pt" => &[
            "Acabei de chegar em {city}. Alguém para um café?",
            "Palestra incrível de {name} hoje, obrigado!",
            "Finalmente fim de semana. Quem vem hoje à noite?",
            "O trem para {city} atrasou de novo.",
            "Projeto novo começando, estou animado.",
            "Alguém me recomenda um bom livro?",
        ],
        "tr" => &[
            "{city} şehrine yeni vardım. Kahve içmek isteyen var mı?",
            "{name} bugün harika bir konuşma yaptı, teşekkürler!",
            "Sonunda hafta sonu. Bu akşam kim geliyor?",
            "{city} treni yine gecikti.",
            "Yeni bir projeye başladım, çok heyecanlıyım.",
            "Bana güzel bir kitap önerebilir misiniz?",
        ],
        "ja" => &[
            "{name}さんの発表、最高でした！",
            "今日も一日お疲れさまでした。",
            "やっと週末。今夜どこか行きませんか？",
            "電車がまた遅れています。",
            "新しいプロジェクトを始めました。楽しみです。",
            "おすすめの本があれば教えてください。",
        ],
        "zh" => &[
            "刚到{city}，有人一起喝咖啡吗？",
            "{name}今天的分享太棒了，谢谢！",
            "终于周末了，今晚谁一起出去？",
            "去{city}的火车又晚点了。",
            "新项目开始了，很期待。",
            "有人能推荐一本好书吗？",
        ],
        "ar" => &[
            "محاضرة رائعة من {name} اليوم، شكراً!",
            "وصلت للتو. من يريد أن يشرب القهوة؟",
            "أخيراً عطلة نهاية الأسبوع. من سيأتي الليلة؟",
            "القطار متأخر مرة أخرى.",
            "بدأت مشروعاً جديداً، متحمس جداً.",
            "هل يمكن أن تنصحوني بكتاب جيد؟",
        ],
        _ => &[
            "Just landed in {city}. Anyone around for coffee?",
            "Great talk by {name} today, thank you!",
            "Finally the weekend. Who's out tonight?",
            "The train to {city} is late again.",
            "Started a new project today, can't wait to share it.",
            "Can anyone recommend a good book?",
            "Hot take: the best code is the code you delete.",
        ],
    }
}

/// "About me" templates; `{city}` as above.
fn bio_phrase(lang: &str) -> &'static str {
    match lang {
        "de" => "Lebt in {city}. Meinungen sind meine eigenen.",
        "fr" => "J'habite à {city}. Les opinions n'engagent que moi.",
        "it" => "Vivo a {city}. Le opinioni sono mie.",
        "nl" => "Woont in {city}. Meningen zijn mijn eigen.",
        "pt" => "Moro em {city}. Opiniões são minhas.",
        "tr" => "{city} şehrinde yaşıyorum. Görüşler bana aittir.",
        "ja" => "東京在住。発言は個人の見解です。",
        "zh" => "住在{city}。观点仅代表个人。",
        "ar" => "الآراء تعبر عن وجهة نظري فقط.",
        _ => "Lives in {city}. Opinions my own.",
    }
}

/// A person's name from the locale of `lang`.
pub fn name(rng: &mut StdRng, lang: &str) -> String {
    match lang {
        "de" => Name(DE_DE).fake_with_rng(rng),
        "fr" => Name(FR_FR).fake_with_rng(rng),
        "it" => Name(IT_IT).fake_with_rng(rng),
        "nl" => Name(NL_NL).fake_with_rng(rng),
        "pt" => Name(PT_BR).fake_with_rng(rng),
        "tr" => Name(TR_TR).fake_with_rng(rng),
        "ja" => Name(JA_JP).fake_with_rng(rng),
        "zh" => Name(ZH_CN).fake_with_rng(rng),
        "ar" => Name(AR_SA).fake_with_rng(rng),
        _ => Name(EN).fake_with_rng(rng),
    }
}

/// A place name from the locale of `lang`. The phrases of languages whose
/// locale has no places (ja, ar) never ask for one.
pub fn city(rng: &mut StdRng, lang: &str) -> String {
    // Some of fake's templates (de, nl) leave a `{River}` unfilled: draw again.
    loop {
        let city = locale_city(rng, lang);
        if !city.contains('{') {
            return city;
        }
    }
}

fn locale_city(rng: &mut StdRng, lang: &str) -> String {
    match lang {
        "de" => CityName(DE_DE).fake_with_rng(rng),
        "fr" => CityName(FR_FR).fake_with_rng(rng),
        "it" => CityName(IT_IT).fake_with_rng(rng),
        "nl" => CityName(NL_NL).fake_with_rng(rng),
        "pt" => CityName(PT_PT).fake_with_rng(rng),
        "tr" => CityName(TR_TR).fake_with_rng(rng),
        "zh" => CityName(ZH_CN).fake_with_rng(rng),
        _ => CityName(EN).fake_with_rng(rng),
    }
}

fn fill(rng: &mut StdRng, lang: &str, template: &str) -> String {
    let mut s = template.to_string();
    if s.contains("{name}") {
        s = s.replace("{name}", &name(rng, lang));
    }
    if s.contains("{city}") {
        s = s.replace("{city}", &city(rng, lang));
    }
    s
}

/// One sentence in `lang`.
pub fn sentence(rng: &mut StdRng, lang: &str) -> String {
    let all = phrases(lang);
    let template = all[rng.random_range(0..all.len())];
    fill(rng, lang, template)
}

/// A one-line bio in `lang`.
pub fn short_bio(rng: &mut StdRng, lang: &str) -> String {
    fill(rng, lang, bio_phrase(lang))
}

/// A bio of many sentences in `lang`, well over PostgreSQL's ~2 kB TOAST
/// threshold (the column is stored EXTERNAL, uncompressed).
pub fn long_bio(rng: &mut StdRng, lang: &str) -> String {
    let mut bio = short_bio(rng, lang);
    while bio.len() < 4_000 {
        bio.push(if matches!(lang, "ja" | "zh") {
            '\n'
        } else {
            ' '
        });
        bio.push_str(&sentence(rng, lang));
    }
    bio
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A script check per language: the text is really in it.
    #[test]
    fn sentences_are_in_their_language() {
        let mut rng = StdRng::seed_from_u64(5);
        for (lang, _) in LANGS {
            for _ in 0..50 {
                let s = sentence(&mut rng, lang);
                let has =
                    |range: std::ops::RangeInclusive<char>| s.chars().any(|c| range.contains(&c));
                match *lang {
                    "ja" => assert!(has('\u{3040}'..='\u{30ff}'), "{s}"),
                    "zh" => assert!(has('\u{4e00}'..='\u{9fff}'), "{s}"),
                    "ar" => assert!(has('\u{0600}'..='\u{06ff}'), "{s}"),
                    _ => assert!(s.is_ascii() || !has('\u{3040}'..='\u{9fff}'), "{s}"),
                }
                assert!(!s.contains('{'), "unfilled placeholder: {s}");
                for latin in ["lorem", "ipsum", "dolor", "consectetur"] {
                    assert!(!s.to_lowercase().contains(latin), "{s}");
                }
            }
        }
    }

    #[test]
    fn long_bios_are_toasted_size_and_in_language() {
        let mut rng = StdRng::seed_from_u64(6);
        let bio = long_bio(&mut rng, "de");
        assert!(bio.len() > 2_000);
        assert!(bio.contains("Meinungen") || bio.contains("Vortrag") || bio.contains("Zug"));
    }
}
