//! Notices about the gateway itself, for the people who run it (the `[[operators]]` of the
//! config: the prefectural support centre's desk and the administrators).
//!
//! They are not alerts about a home: the gateway's database refusing writes, the database
//! taking writes again, many homes falling silent at once across municipalities (a network or
//! centre problem, not one emergency per family). They never go through the outbox, since the
//! outbox is in the store and the store may be what failed: [`crate::run`] sends them straight
//! through the senders, retrying in memory, on every channel of every operator.
//!
//! The text is written for the operator who receives it: what happened, what it means for the
//! homes, and what to do.

use serde::{Deserialize, Serialize};

use crate::homes::Lang;

/// Why the store refuses writes, in terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreProblem {
    /// The disk (or the database's quota) is full.
    DiskFull,
    /// The file system or the file is read-only.
    ReadOnly,
    /// The disk failed a read or a write.
    Io,
    /// Anything else the database said.
    Other,
}

impl StoreProblem {
    /// Classify a store error from its text (SQLite's messages are stable: "database or disk
    /// is full", "attempt to write a readonly database", "disk I/O error").
    pub fn of(error: &str) -> StoreProblem {
        let e = error.to_ascii_lowercase();
        if e.contains("disk is full") || e.contains("no space") || e.contains("quota") {
            StoreProblem::DiskFull
        } else if e.contains("readonly") || e.contains("read-only") || e.contains("read only") {
            StoreProblem::ReadOnly
        } else if e.contains("i/o error") || e.contains("input/output") {
            StoreProblem::Io
        } else {
            StoreProblem::Other
        }
    }

    /// In words.
    pub fn text(self, lang: Lang) -> &'static str {
        match (self, lang) {
            (StoreProblem::DiskFull, Lang::Ja) => "ディスクの空きがありません",
            (StoreProblem::DiskFull, Lang::En) => "the disk is full",
            (StoreProblem::ReadOnly, Lang::Ja) => "ディスクが書き込み禁止になっています",
            (StoreProblem::ReadOnly, Lang::En) => "the disk is read-only",
            (StoreProblem::Io, Lang::Ja) => "ディスクの読み書きに失敗しています",
            (StoreProblem::Io, Lang::En) => "the disk fails to read or write",
            (StoreProblem::Other, Lang::Ja) => "データベースが書き込みを受け付けません",
            (StoreProblem::Other, Lang::En) => "the database refuses writes",
        }
    }
}

/// A notice about the gateway itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// The store refuses writes: the gateway keeps sending what it had already decided, and
    /// holds new messages at the broker.
    StoreDegraded {
        /// Why, classified.
        problem: StoreProblem,
        /// The database's own words (English; for the operator's logs).
        detail: String,
    },
    /// The store takes writes again.
    StoreRecovered {
        /// How long it refused, s.
        after_s: i64,
    },
    /// Many homes fell silent together across municipalities: most likely the network or the
    /// centre, not the homes. Their silence alerts wait `grace_min` before anyone is paged.
    MassSilence {
        /// Homes that fell silent together.
        homes: usize,
        /// In how many municipalities.
        municipalities: usize,
        /// How long their alerts wait, min.
        grace_min: i64,
    },
}

impl Notice {
    /// A short stable name (the idempotency key's middle part).
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::StoreDegraded { .. } => "gateway_degraded",
            Notice::StoreRecovered { .. } => "gateway_recovered",
            Notice::MassSilence { .. } => "mass_silence",
        }
    }

    /// Subject and body in a language.
    pub fn render(&self, lang: Lang) -> (String, String) {
        let ja = lang == Lang::Ja;
        match self {
            Notice::StoreDegraded { problem, detail } => {
                if ja {
                    (
                        "【mamori】ゲートウェイが記録できません".into(),
                        format!(
                            "mamoriゲートウェイがデータベースに書き込めなくなりました（{}）。\n\
                             すでに決まった通知は送り続けています。各家庭からの新しい知らせはブローカーに保留され、\
                             書き込めるようになれば順に処理されますが、それまで新しい停電や警報の通知は出ません。\n\
                             至急、サーバーのディスクを確認してください。",
                            problem.text(lang)
                        ),
                    )
                } else {
                    (
                        "[mamori] the gateway cannot record".into(),
                        format!(
                            "The mamori gateway can no longer write to its database ({}: {detail}).\n\
                             It keeps sending the notifications it had already decided. New messages from homes \
                             are held at the broker and will be processed once it can write again; until then no \
                             new outage or alarm is notified.\nCheck the server's disk now.",
                            problem.text(lang)
                        ),
                    )
                }
            }
            Notice::StoreRecovered { after_s } => {
                let min = (after_s + 59) / 60;
                if ja {
                    (
                        "【mamori】ゲートウェイの記録が再開しました".into(),
                        format!(
                            "mamoriゲートウェイがデータベースに再び書き込めるようになりました（約{min}分間止まっていました）。\
                             保留されていた各家庭からの知らせを処理しています。"
                        ),
                    )
                } else {
                    (
                        "[mamori] the gateway records again".into(),
                        format!(
                            "The mamori gateway can write to its database again (it could not for about {min} min). \
                             It is processing the messages from homes that were held."
                        ),
                    )
                }
            }
            Notice::MassSilence { homes, municipalities, grace_min } => {
                if ja {
                    (
                        format!("【mamori】{homes}件の家庭からの通信が同時に途絶えました"),
                        format!(
                            "{municipalities}つの市町村にまたがる{homes}件の家庭からの通信が、ほぼ同時に途絶えました。\
                             各家庭ではなく、ネットワークかセンター側の障害の可能性が高いため、家庭ごとの通知は{grace_min}分間見合わせています。\
                             それまでに通信が戻らない家庭は、個別に通知します。\nネットワークとブローカーの状態を確認してください。"
                        ),
                    )
                } else {
                    (
                        format!("[mamori] {homes} homes went silent at once"),
                        format!(
                            "{homes} homes in {municipalities} municipalities stopped reporting at almost the same time. \
                             This is most likely the network or the centre, not the homes, so their individual alerts \
                             wait {grace_min} min; any home still silent then is notified on its own.\n\
                             Check the network and the broker."
                        ),
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_errors_are_classified_for_the_operator() {
        assert_eq!(StoreProblem::of("database /x/mamori.db: database or disk is full"), StoreProblem::DiskFull);
        assert_eq!(StoreProblem::of("attempt to write a readonly database"), StoreProblem::ReadOnly);
        assert_eq!(StoreProblem::of("disk I/O error"), StoreProblem::Io);
        assert_eq!(StoreProblem::of("database is locked"), StoreProblem::Other);
    }

    #[test]
    fn every_notice_reads_in_both_languages_without_raw_detail_in_japanese() {
        let notices = [
            Notice::StoreDegraded { problem: StoreProblem::DiskFull, detail: "database or disk is full".into() },
            Notice::StoreRecovered { after_s: 125 },
            Notice::MassSilence { homes: 40, municipalities: 3, grace_min: 10 },
        ];
        for n in &notices {
            let (s, b) = n.render(Lang::Ja);
            assert!(!s.is_empty() && !b.is_empty());
            assert!(!b.contains("database") && !b.contains("disk is full"), "{b}");
            let (s, b) = n.render(Lang::En);
            assert!(s.starts_with("[mamori]") && !b.is_empty());
        }
        assert!(notices[1].render(Lang::Ja).1.contains("約3分"));
        assert!(notices[2].render(Lang::Ja).1.contains("3つの市町村にまたがる40件"));
    }
}
