//! Notices about the gateway itself, for the people who run it (the `[[operators]]` of the
//! config: the prefectural support centre's desk and the administrators).
//!
//! They are not alerts about a home: the gateway's database refusing writes, the database
//! taking writes again, many homes falling silent at once across municipalities (a network or
//! centre problem, not one emergency per family). They never go through the outbox, since the
//! outbox is in the store and the store may be what failed: [`crate::service::run`] sends them straight
//! through the senders, retrying in memory, on every channel of every operator.
//!
//! The text is written for the operator who receives it: what happened, what it means for the
//! homes, and what to do.

use serde::{Deserialize, Serialize};

use crate::domain::homes::Lang;

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
    /// Several gateways: the active one has seen no standby for a while, so its own failure
    /// would not be taken over.
    NoStandby {
        /// The active gateway's name.
        gateway: String,
        /// For how long, s.
        for_s: i64,
    },
    /// A standby is back.
    StandbyBack {
        /// The active gateway's name.
        gateway: String,
        /// The standby's.
        standby: String,
    },
}

impl Notice {
    /// A short stable name (the idempotency key's middle part).
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::StoreDegraded { .. } => "gateway_degraded",
            Notice::StoreRecovered { .. } => "gateway_recovered",
            Notice::MassSilence { .. } => "mass_silence",
            Notice::NoStandby { .. } => "no_standby",
            Notice::StandbyBack { .. } => "standby_back",
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
            Notice::NoStandby { gateway, for_s } => {
                let min = (for_s + 59) / 60;
                if ja {
                    (
                        "【mamori】待機中のゲートウェイがありません".into(),
                        format!(
                            "稼働中のmamoriゲートウェイ（{gateway}）から、待機中のゲートウェイが約{min}分間見えていません。                             通知は続いていますが、このゲートウェイが止まると、代わりに通知を引き継ぐものがありません。
                             待機側のサーバーとサービスを確認し、起動してください。"
                        ),
                    )
                } else {
                    (
                        "[mamori] no standby gateway".into(),
                        format!(
                            "The active mamori gateway ({gateway}) has seen no standby gateway for about {min} min.                              Notifications go on, but if this gateway stops, nothing takes over.
                             Check the standby's server and service and start it."
                        ),
                    )
                }
            }
            Notice::StandbyBack { gateway, standby } => {
                if ja {
                    (
                        "【mamori】待機中のゲートウェイが戻りました".into(),
                        format!(
                            "待機中のゲートウェイ（{standby}）が再び見えるようになりました。                             稼働中のゲートウェイ（{gateway}）が止まっても、通知は引き継がれます。"
                        ),
                    )
                } else {
                    (
                        "[mamori] a standby gateway is back".into(),
                        format!(
                            "The standby gateway {standby} is seen again: if the active gateway ({gateway}) stops,                              it takes over the notifications."
                        ),
                    )
                }
            }
        }
    }
}

/// Whether the operators should hear that the active gateway has no standby, or has one again:
/// pure, the time passed in. A standby must be missing for `grace` (it may be restarting)
/// before anyone is told, and each change is told once.
#[derive(Debug, Clone, Default)]
pub struct StandbyWatch {
    missing_since: Option<crate::domain::engine::Time>,
    told: bool,
}

impl StandbyWatch {
    /// The standbys seen now; a notice to send, if any.
    pub fn update(
        &mut self,
        gateway: &str,
        standbys: &[String],
        grace: chrono::Duration,
        now: crate::domain::engine::Time,
    ) -> Option<Notice> {
        if let Some(first) = standbys.first() {
            self.missing_since = None;
            return std::mem::take(&mut self.told)
                .then(|| Notice::StandbyBack { gateway: gateway.into(), standby: first.clone() });
        }
        let since = *self.missing_since.get_or_insert(now);
        if !self.told && now - since >= grace {
            self.told = true;
            return Some(Notice::NoStandby { gateway: gateway.into(), for_s: (now - since).num_seconds() });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_standby_is_told_once_after_its_grace_and_its_return_once() {
        let t = |s: i64| chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap();
        let grace = chrono::Duration::seconds(18);
        let mut w = StandbyWatch::default();
        let b = vec!["gw-b".to_string()];
        assert_eq!(w.update("gw-a", &b, grace, t(0)), None, "a standby from the start: nothing to say");
        assert_eq!(w.update("gw-a", &[], grace, t(1)), None);
        assert_eq!(w.update("gw-a", &[], grace, t(18)), None, "it may be restarting");
        assert_eq!(w.update("gw-a", &[], grace, t(19)), Some(Notice::NoStandby { gateway: "gw-a".into(), for_s: 18 }));
        assert_eq!(w.update("gw-a", &[], grace, t(60)), None, "told once");
        assert!(matches!(w.update("gw-a", &b, grace, t(61)), Some(Notice::StandbyBack { .. })));
        assert_eq!(w.update("gw-a", &b, grace, t(62)), None);
        // A standby that blinks within the grace is never told.
        assert_eq!(w.update("gw-a", &[], grace, t(70)), None);
        assert_eq!(w.update("gw-a", &b, grace, t(75)), None);
    }

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
            Notice::NoStandby { gateway: "gw-a".into(), for_s: 30 },
            Notice::StandbyBack { gateway: "gw-a".into(), standby: "gw-b".into() },
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
