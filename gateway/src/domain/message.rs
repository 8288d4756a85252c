//! Message text, in the reader's language, and signed acknowledgement links.
//!
//! A message is short and says: which home (its label), what, since when, the time left and
//! its basis, what is asked of the reader, and how to acknowledge (a link). Times are shown in
//! the deployment's UTC offset (JST by default).
//!
//! An acknowledgement link is `{public_url}/ack/{alert_id}/{role}/{sig}` where `sig` is the
//! first 32 hex digits of HMAC-SHA256(link secret, `alert_id/role`). Opening it shows a
//! confirmation page; only its form's POST acknowledges (mail scanners open links).
//!
//! Over 800 lines for a reason: it is every word the gateway sends, for every reader, kind and
//! tier, in two languages, matched on typed kinds so that nothing is missing; splitting the
//! table would scatter what a reviewer must read side by side.

use chrono::FixedOffset;
use hmac::{Hmac, Mac};
use mamori_protocol::event_data::read;
use mamori_protocol::mqtt::{EventKind, Role};
use sha2::Sha256;

use crate::domain::engine::{facts, AlertKind, Content, Time, TriageRow};
use crate::domain::homes::Lang;
use crate::domain::policy::Tier;

/// How to build links and show times.
#[derive(Debug, Clone)]
pub struct Style {
    /// The dashboard's public URL (no trailing slash).
    pub public_url: String,
    /// The secret signing acknowledgement links.
    pub link_secret: Vec<u8>,
    /// Times are shown at this offset.
    pub offset: FixedOffset,
}

impl Style {
    /// The signature of an acknowledgement link.
    pub fn sign(&self, alert_id: &str, role: Role) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.link_secret) else {
            return String::new(); // HMAC takes keys of any length: cannot happen
        };
        mac.update(format!("{alert_id}/{}", role.as_str()).as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Check a link's signature (constant time).
    pub fn verify(&self, alert_id: &str, role: Role, sig: &str) -> bool {
        let Ok(given) = hex::decode(sig) else { return false };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.link_secret) else { return false };
        mac.update(format!("{alert_id}/{}", role.as_str()).as_bytes());
        given.len() == 16 && mac.verify_truncated_left(&given).is_ok()
    }

    /// The acknowledgement link for a role.
    pub fn ack_link(&self, alert_id: &str, role: Role) -> String {
        format!("{}/ack/{alert_id}/{}/{}", self.public_url, role.as_str(), self.sign(alert_id, role))
    }

    fn time(&self, t: Time) -> String {
        t.with_timezone(&self.offset).format("%m/%d %H:%M").to_string()
    }

    /// From one time to another, the date once when both fall on one day.
    fn span(&self, from: Time, to: Time, lang: Lang) -> String {
        let (a, b) = (from.with_timezone(&self.offset), to.with_timezone(&self.offset));
        let end = if a.date_naive() == b.date_naive() { b.format("%H:%M").to_string() } else { self.time(to) };
        match lang {
            Lang::Ja => format!("{}〜{end}", self.time(from)),
            Lang::En => format!("{} to {end}", self.time(from)),
        }
    }
}

/// A time left, in words (`約2時間5分`, `about 2 h 5 min`).
pub fn duration(s: i64, lang: Lang) -> String {
    let (h, m) = (s / 3600, (s % 3600) / 60);
    match lang {
        Lang::Ja if h > 0 => format!("約{h}時間{m}分"),
        Lang::Ja => format!("約{m}分"),
        Lang::En if h > 0 => format!("about {h} h {m} min"),
        Lang::En => format!("about {m} min"),
    }
}

/// A duration for a range, rounded the safe way: `Down` for the short end, `Up` for the long
/// end, `Near` for the middle (to 10 minutes above an hour, 5 below, 1 under 10 minutes).
#[derive(Clone, Copy)]
pub enum Round {
    /// Towards less.
    Down,
    /// To the nearest.
    Near,
    /// Towards more.
    Up,
}

fn rough(s: i64, round: Round, lang: Lang) -> String {
    let m = s.max(0) as f64 / 60.0;
    let step = if m >= 60.0 {
        10.0
    } else if m >= 10.0 {
        5.0
    } else {
        1.0
    };
    let q = match round {
        Round::Down => (m / step).floor(),
        Round::Near => (m / step).round(),
        Round::Up => (m / step).ceil(),
    } * step;
    let (h, m) = ((q / 60.0).floor() as i64, (q % 60.0).round() as i64);
    match (lang, h, m) {
        (Lang::Ja, 0, m) => format!("{m}分"),
        (Lang::Ja, h, 0) => format!("{h}時間"),
        (Lang::Ja, h, m) => format!("{h}時間{m}分"),
        (Lang::En, 0, m) => format!("{m} min"),
        (Lang::En, h, 0) => format!("{h} h"),
        (Lang::En, h, m) => format!("{h} h {m} min"),
    }
}

/// A time left with its range: `約2時間（1時間40分〜2時間30分）`, `about 2 h (1 h 40 min to
/// 2 h 30 min)`. Without a range (or a range under a minute wide), the middle alone.
pub fn time_left_text(mid_s: i64, range_s: Option<(i64, i64)>, lang: Lang) -> String {
    let mid = rough(mid_s, Round::Near, lang);
    match range_s.filter(|(lo, hi)| hi - lo >= 60) {
        Some((lo, hi)) => {
            let (lo, hi) = (rough(lo, Round::Down, lang), rough(hi, Round::Up, lang));
            match lang {
                Lang::Ja => format!("約{mid}（{lo}〜{hi}）"),
                Lang::En => format!("about {mid} ({lo} to {hi})"),
            }
        }
        None => match lang {
            Lang::Ja => format!("約{mid}"),
            Lang::En => format!("about {mid}"),
        },
    }
}

/// What a forecast rests on, in words.
pub fn basis(b: &str, lang: Lang) -> &'static str {
    match (b, lang) {
        ("observed_discharge", Lang::Ja) => "実際の減り方から計算",
        ("observed_discharge", Lang::En) => "from how fast it is actually draining",
        ("ups_runtime", Lang::Ja) => "UPSの報告を補正",
        ("ups_runtime", Lang::En) => "the UPS's own estimate, corrected",
        ("charge_and_load", Lang::Ja) => "残量と負荷から計算",
        ("charge_and_load", Lang::En) => "from charge and load",
        ("energy_balance", Lang::Ja) => "使った電力量から計算",
        ("energy_balance", Lang::En) => "from the energy used so far",
        ("dead_reckoning", Lang::Ja) => "停電開始からの推定",
        ("dead_reckoning", Lang::En) => "estimated from the outage start",
        (_, Lang::Ja) => "人工呼吸器の内蔵電池のみ",
        (_, Lang::En) => "ventilator internal battery only",
    }
}

/// Said when a forecast rests on an assumed battery.
pub fn unverified(lang: Lang) -> &'static str {
    match lang {
        Lang::Ja => "この電池の実際の容量はまだ測れていないため、少なめに見積もっています",
        Lang::En => "this battery's real capacity has not been measured yet, so it is estimated low",
    }
}

/// What an alert kind means, in a language.
pub fn kind_text(kind: AlertKind, lang: Lang) -> &'static str {
    use AlertKind as A;
    use EventKind as E;
    let ja = lang == Lang::Ja;
    match kind {
        A::Event(E::MainsLost) if ja => "停電（予備電源で運転中）",
        A::Event(E::MainsLost) => "mains power lost (on backup power)",
        A::Event(E::BatteryLow) if ja => "予備電源の残量低下",
        A::Event(E::BatteryLow) => "backup battery low",
        A::Event(E::UpsFault) if ja => "UPSの故障",
        A::Event(E::UpsFault) => "UPS fault",
        A::Event(E::DeviceLost) if ja => "機器の応答なし",
        A::Event(E::DeviceLost) => "a device stopped answering",
        A::Event(E::Spo2Low) if ja => "SpO2低下",
        A::Event(E::Spo2Low) => "SpO2 low",
        A::Event(E::PulseOutOfRange) if ja => "脈拍の異常",
        A::Event(E::PulseOutOfRange) => "pulse out of range",
        A::Event(E::SensorOff) if ja => "酸素飽和度センサーが外れています",
        A::Event(E::SensorOff) => "oximeter sensor off",
        A::Event(E::OximeterAlarm) if ja => "パルスオキシメータのアラーム",
        A::Event(E::OximeterAlarm) => "pulse oximeter alarm",
        A::Event(E::OximeterAlarmSilenced) if ja => "パルスオキシメータのアラームが消音されました",
        A::Event(E::OximeterAlarmSilenced) => "pulse oximeter alarm silenced at the bedside",
        A::Event(E::VentilatorAlarm) if ja => "人工呼吸器のアラーム",
        A::Event(E::VentilatorAlarm) => "ventilator alarm",
        A::Event(E::AlarmCableFault) if ja => "人工呼吸器アラーム線の断線",
        A::Event(E::AlarmCableFault) => "ventilator alarm cable cut: its alarms cannot be seen",
        A::Event(E::SpoolDegraded) if ja => "見守り機のディスク異常",
        A::Event(E::SpoolDegraded) => "the home unit's disk is failing",
        A::HomeSilent if ja => "見守り機からの通信が途絶えています",
        A::HomeSilent => "the home has gone silent",
        A::StateUnknown if ja => "停電中に通信が途絶え、状況不明",
        A::StateUnknown => "silent during an outage: state unknown",
        A::DeliveryFailed if ja => "通知が届いていません",
        A::DeliveryFailed => "a notification could not be delivered",
        A::BatteryDegraded if ja => "予備バッテリーが計画より持ちません",
        A::BatteryDegraded => "the backup battery holds less than its care plan says",
        A::BatteryTestFailed if ja => "予備電源の電池が自己診断で不合格でした",
        A::BatteryTestFailed => "the backup battery failed its self-test",
        A::ClockSkew if ja => "見守り機の時計がずれています",
        A::ClockSkew => "the home unit's clock is wrong",
        // Events that are not alerts, as the home's timeline shows them.
        A::Event(E::MainsRestored) if ja => "復電",
        A::Event(E::MainsRestored) => "mains power back",
        A::Event(E::BatteryOk) if ja => "予備電源の残量が回復",
        A::Event(E::BatteryOk) => "backup battery no longer low",
        A::Event(E::UpsFaultCleared) if ja => "UPSの故障表示が消えた",
        A::Event(E::UpsFaultCleared) => "UPS fault cleared",
        A::Event(E::DeviceRestored) if ja => "機器の応答が戻った",
        A::Event(E::DeviceRestored) => "a device answers again",
        A::Event(E::Spo2Ok) if ja => "SpO2が回復した",
        A::Event(E::Spo2Ok) => "SpO2 back up",
        A::Event(E::PulseOk) if ja => "脈拍が正常範囲に戻った",
        A::Event(E::PulseOk) => "pulse back in range",
        A::Event(E::SensorOn) if ja => "センサーが装着された",
        A::Event(E::SensorOn) => "oximeter sensor back on",
        A::Event(E::OximeterAlarmCleared) if ja => "パルスオキシメータのアラームが止まった",
        A::Event(E::OximeterAlarmCleared) => "pulse oximeter alarm ended",
        A::Event(E::VentilatorAlarmCleared) if ja => "人工呼吸器のアラームが止まった",
        A::Event(E::VentilatorAlarmCleared) => "ventilator alarm ended",
        A::Event(E::AlarmCableOk) if ja => "人工呼吸器のアラーム線がつながった",
        A::Event(E::AlarmCableOk) => "ventilator alarm cable connected again",
        A::Event(E::AgentStarted) if ja => "見守り機が起動した",
        A::Event(E::AgentStarted) => "home unit started",
        A::Event(E::AgentStopping) if ja => "見守り機が停止する",
        A::Event(E::AgentStopping) => "home unit stopping",
        A::Event(E::SpoolOk) if ja => "見守り機のディスクが正常に戻った",
        A::Event(E::SpoolOk) => "home unit's disk working again",
        A::Event(E::BatteryTest) if ja => "予備電源の電池の自己診断",
        A::Event(E::BatteryTest) => "backup battery self-test",
        A::Drill if ja => "訓練（通知のテスト）",
        A::Drill => "drill (a test of the notifications)",
        A::Event(E::Unknown) if ja => "種類の分からない出来事",
        A::Event(E::Unknown) => "an event of an unknown kind",
    }
}

/// Every alert kind the gateway pages about.
pub const KINDS: &[AlertKind] = {
    use AlertKind as A;
    use EventKind as E;
    &[
        A::Event(E::MainsLost),
        A::Event(E::BatteryLow),
        A::StateUnknown,
        A::Event(E::Spo2Low),
        A::Event(E::PulseOutOfRange),
        A::Event(E::OximeterAlarm),
        A::Event(E::OximeterAlarmSilenced),
        A::Event(E::VentilatorAlarm),
        A::Event(E::UpsFault),
        A::Event(E::DeviceLost),
        A::Event(E::SensorOff),
        A::Event(E::AlarmCableFault),
        A::Event(E::SpoolDegraded),
        A::HomeSilent,
        A::BatteryDegraded,
        A::BatteryTestFailed,
        A::ClockSkew,
        A::DeliveryFailed,
        A::Drill,
    ]
};

/// The readers messages are written for.
pub const READERS: &[Role] =
    &[Role::Family, Role::Coordinator, Role::VisitingNurse, Role::Facility, Role::SupportCentre];

/// `docs/messages.md`'s table: what each reader is asked, for every kind and tier, in
/// Japanese and English (generated; a test keeps the file current).
pub fn request_table() -> String {
    let situation = Situation {
        destination: Some(("〇〇病院", 30)),
        leave_by: Some("14:20".into()),
        devices: &[("人工呼吸器".into(), 25.0), ("加温加湿器".into(), 60.0)],
        leave_in_s: Some(3600),
    };
    let mut out = String::new();
    for lang in [Lang::Ja, Lang::En] {
        out += if lang == Lang::Ja { "\n### 日本語\n\n" } else { "\n### English\n\n" };
        out += "| kind | tier |";
        for r in READERS {
            out += &format!(" {} |", role_text(*r, lang));
        }
        out += "\n|---|---|";
        out += &"---|".repeat(READERS.len());
        out += "\n";
        for kind in KINDS {
            for tier in [Tier::T0, Tier::T1, Tier::T2, Tier::T3] {
                out += &format!("| {} (`{kind}`) | {} |", kind_text(*kind, lang), tier_text(tier, lang));
                for r in READERS {
                    out += &format!(" {} |", request(*r, *kind, tier, &situation, lang).replace('|', "/"));
                }
                out += "\n";
            }
        }
    }
    out
}

/// What kind of thing an alert is about: what its reader can do depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concern {
    /// The power: mains lost, the battery low, or the home silent during an outage.
    Power,
    /// The child: SpO2, pulse, the oximeter's or the ventilator's alarm.
    Child,
    /// The equipment that watches: a device, the UPS, the alarm cable, the home unit.
    Equipment,
    /// Calm-day upkeep: a weak battery, a wrong clock, a notification that did not arrive.
    Upkeep,
    /// A drill: nothing is wrong.
    Drill,
}

/// What an alert kind is about.
pub fn concern(kind: AlertKind) -> Concern {
    use AlertKind as A;
    use EventKind as E;
    match kind {
        A::Event(E::MainsLost) | A::Event(E::BatteryLow) | A::StateUnknown => Concern::Power,
        A::Event(E::Spo2Low)
        | A::Event(E::PulseOutOfRange)
        | A::Event(E::OximeterAlarm)
        | A::Event(E::OximeterAlarmSilenced)
        | A::Event(E::VentilatorAlarm) => Concern::Child,
        A::BatteryDegraded | A::BatteryTestFailed | A::ClockSkew | A::DeliveryFailed => Concern::Upkeep,
        A::Drill => Concern::Drill,
        _ => Concern::Equipment,
    }
}

/// A tier in words (for subjects): what it means for whoever reads it.
pub fn tier_text(tier: Tier, lang: Lang) -> &'static str {
    match (tier, lang) {
        (Tier::T0, Lang::Ja) => "お知らせ",
        (Tier::T0, Lang::En) => "notice",
        (Tier::T1, Lang::Ja) => "確認のお願い",
        (Tier::T1, Lang::En) => "please check",
        (Tier::T2, Lang::Ja) => "移動の準備",
        (Tier::T2, Lang::En) => "prepare to move",
        (Tier::T3, Lang::Ja) => "至急",
        (Tier::T3, Lang::En) => "URGENT",
    }
}

/// A role in words.
pub fn role_text(role: Role, lang: Lang) -> &'static str {
    match (role, lang) {
        (Role::Family, Lang::Ja) => "ご家族",
        (Role::Family, Lang::En) => "the family",
        (Role::Coordinator, Lang::Ja) => "コーディネーター",
        (Role::Coordinator, Lang::En) => "the coordinator",
        (Role::VisitingNurse, Lang::Ja) => "訪問看護",
        (Role::VisitingNurse, Lang::En) => "the visiting nurse",
        (Role::Facility, Lang::Ja) => "受け入れ先",
        (Role::Facility, Lang::En) => "the receiving facility",
        (Role::SupportCentre, Lang::Ja) => "支援センター",
        (Role::SupportCentre, Lang::En) => "the support centre",
        (Role::Admin, Lang::Ja) => "管理者",
        (Role::Admin, Lang::En) => "the administrator",
    }
}

/// What a reader needs to act on an alert, besides its kind and tier.
pub struct Situation<'a> {
    /// The destination and the travel time there, min.
    pub destination: Option<(&'a str, u32)>,
    /// When the family must leave at the latest (the pessimistic time left less the travel).
    pub leave_by: Option<String>,
    /// The devices on backup and their watts, for the facility.
    pub devices: &'a [(String, f64)],
    /// How long until the latest time to leave, s: a facility is asked to get ready only
    /// when it is near ([`PREPARE_WITHIN_S`]), and told to expect the child before that.
    pub leave_in_s: Option<i64>,
}

/// A facility is asked to prepare when the child must leave within this long (3 h); before
/// that it is told the child may come, and when.
pub const PREPARE_WITHIN_S: i64 = 3 * 3600;

/// Who else has been told, and who has acknowledged: `ほかに知らせた人: コーディネーター、
/// 訪問看護（コーディネーターが確認済み）。`
pub fn who_knows(reader: Role, told: &[Role], acknowledged_by: &[Role], lang: Lang) -> Option<String> {
    let others: Vec<&str> = told.iter().filter(|r| **r != reader).map(|r| role_text(*r, lang)).collect();
    if others.is_empty() {
        return None;
    }
    let acked: Vec<&str> = acknowledged_by.iter().map(|r| role_text(*r, lang)).collect();
    Some(match (lang, acked.is_empty()) {
        (Lang::Ja, true) => format!("ほかに知らせた人: {}。", others.join("、")),
        (Lang::Ja, false) => format!("ほかに知らせた人: {}（{}が確認済み）。", others.join("、"), acked.join("、")),
        (Lang::En, true) => format!("Also told: {}.", others.join(", ")),
        (Lang::En, false) => format!("Also told: {} ({} acknowledged).", others.join(", "), acked.join(", ")),
    })
}

/// What the reader is asked to do: by who they are, what the alert is about and how urgent it
/// is — never another reader's task.
pub fn request(role: Role, kind: AlertKind, tier: Tier, s: &Situation, lang: Lang) -> String {
    use AlertKind as A;
    let ja = lang == Lang::Ja;
    let dest = s.destination;
    let leave = s.leave_by.as_deref();
    let devices = if s.devices.is_empty() {
        String::new()
    } else if ja {
        let list: Vec<String> = s.devices.iter().map(|(n, w)| format!("{n} {w:.0}W")).collect();
        format!("機器: {}。", list.join("、"))
    } else {
        let list: Vec<String> = s.devices.iter().map(|(n, w)| format!("{n} {w:.0} W")).collect();
        format!(" Devices: {}.", list.join(", "))
    };
    let c = concern(kind);
    let text: String = match (role, c, tier) {
        (_, Concern::Drill, _) => {
            if ja {
                "これは訓練です。実際の停電や異常ではありません。届いたら、確認（既読）のリンクを開いて確認してください。".into()
            } else {
                "This is a drill: nothing is wrong. When it reaches you, open the acknowledgement link and acknowledge."
                    .into()
            }
        }
        // The upkeep kinds have their own requests.
        (Role::Family, Concern::Upkeep, _) if kind == A::BatteryTestFailed => {
            if ja {
                "お願い: この電池は停電のとき、人工呼吸器などを支えられないおそれがあります。早めに電池の交換を、販売店や訪問看護ステーション、コーディネーターと相談してください。交換までは、停電のときに早めに避難先へ向かう準備をしてください。".into()
            } else {
                "Please: this battery may not carry the ventilator and the other devices in an outage. Arrange to replace it soon (ask the dealer, the visiting nurse or the coordinator); until then, be ready to leave for the destination early in an outage.".into()
            }
        }
        (Role::Coordinator | Role::VisitingNurse, Concern::Upkeep, _) if kind == A::BatteryTestFailed => {
            if ja {
                "お願い: ご家族と、電池の早めの交換（日常生活用具の給付など）について相談してください。交換までは、停電のときの避難を早める計画にしてください。".into()
            } else {
                "Please: talk with the family about replacing the battery soon (equipment subsidies); until it is replaced, plan for an earlier evacuation in an outage.".into()
            }
        }
        (_, Concern::Upkeep, _) if kind == A::BatteryTestFailed => {
            if ja {
                "お知らせ: この世帯の予備電源の電池は自己診断で不合格でした。停電のときは、受け入れが早めに必要になることがあります。".into()
            } else {
                "For your information: this home's backup battery failed its self-test, so in an outage the child may need to come to you early.".into()
            }
        }
        (Role::Family, Concern::Upkeep, _) if kind == A::BatteryDegraded => {
            if ja {
                "お願い: 停電の前に、バッテリーの交換か予備バッテリーの追加を、販売店や訪問看護ステーション、コーディネーターと相談してください。".into()
            } else {
                "Please: before the next outage, arrange to replace the battery or add a second one (ask the dealer, the visiting nurse or the coordinator).".into()
            }
        }
        (Role::Coordinator | Role::VisitingNurse, Concern::Upkeep, _) if kind == A::BatteryDegraded => {
            if ja {
                "お願い: ご家族と、バッテリーの交換または追加（日常生活用具の給付など）について相談してください。個別避難計画の時間も見直してください。".into()
            } else {
                "Please: talk with the family about replacing the battery or adding one (equipment subsidies), and review the evacuation plan's timings.".into()
            }
        }
        (_, Concern::Upkeep, _) if kind == A::BatteryDegraded => {
            if ja {
                "お知らせ: この世帯の予備バッテリーは計画より早く切れます。停電のときは、受け入れが早めに必要になることがあります。".into()
            } else {
                "For your information: this home's backup battery runs out sooner than its care plan says, so in an outage the child may need to come to you earlier.".into()
            }
        }
        (Role::Family, Concern::Upkeep, _) if kind == A::DeliveryFailed => {
            if ja {
                "お願い: 登録している電話番号やメールアドレスが変わっていたら、コーディネーターに知らせてください。"
                    .into()
            } else {
                "Please: if a phone number or e-mail address you gave has changed, tell the coordinator.".into()
            }
        }
        (_, Concern::Upkeep, _) if kind == A::ClockSkew => {
            if ja {
                "mamoriは受信した時刻で記録しているため通知は正しく届きますが、設置業者に見守り機の時刻合わせの確認を依頼してください。".into()
            } else {
                "mamori records by the time it receives messages, so notifications are right; please have the installer check the home unit's time synchronisation.".into()
            }
        }
        (_, Concern::Upkeep, _) => {
            if ja {
                "お願い: この世帯の連絡先（電話番号・メールアドレスなど）が正しいか確認し、必要ならご家族に直接連絡してください。".into()
            } else {
                "Please: check this home's contact details (phone numbers, e-mail addresses) and, if needed, call the family directly.".into()
            }
        }
        // The family: what to do at home, now.
        (Role::Family, Concern::Power, Tier::T3) => {
            if ja {
                "至急: 今すぐ避難先へ移動するか、電源を確保してください。お子さんの様子がおかしいときは119番に通報してください。".into()
            } else {
                "Urgent: move to the destination or get power now. If your child is unwell, call 119.".into()
            }
        }
        (Role::Family, Concern::Power, Tier::T2) => match (dest, ja) {
            (Some((d, m)), true) => match leave {
                Some(l) => format!(
                    "お願い: 移動の準備をしてください（避難先: {d}、移動{m}分）。遅くとも{l}には出発してください。"
                ),
                None => format!("お願い: 移動の準備をしてください（避難先: {d}、移動{m}分）。"),
            },
            (Some((d, m)), false) => match leave {
                Some(l) => {
                    format!("Please: get ready to move (destination: {d}, {m} min away). Leave by {l} at the latest.")
                }
                None => format!("Please: get ready to move (destination: {d}, {m} min away)."),
            },
            (None, true) => "お願い: 移動か電源の確保の準備をしてください。".into(),
            (None, false) => "Please: get ready to move or to get power.".into(),
        },
        (Role::Family, Concern::Power, _) if kind == A::StateUnknown => {
            if ja {
                "お願い: 見守り機の電源とインターネット接続を確認してください。停電が続いているなら、移動の準備を始めてください。".into()
            } else {
                "Please: check the home unit's power and internet connection. If the outage goes on, start getting ready to move.".into()
            }
        }
        (Role::Family, Concern::Power, _) => {
            if ja {
                "お願い: 人工呼吸器などが予備電源で動いているか、予備バッテリーの残りを確認してください。停電が長引きそうなら、移動の準備を始めてください。".into()
            } else {
                "Please: check that the ventilator and the other devices run on backup power, and how much battery is left. If the outage may last, start getting ready to move.".into()
            }
        }
        (Role::Family, Concern::Child, _) => {
            if ja {
                "お願い: すぐにお子さんの様子と機器を確認してください。様子がおかしいときは119番に通報してください。"
                    .into()
            } else {
                "Please: check your child and the devices now. If your child is unwell, call 119.".into()
            }
        }
        (Role::Family, Concern::Equipment, _) if kind == A::HomeSilent => {
            if ja {
                "お願い: 見守り機の電源とインターネット接続を確認してください。".into()
            } else {
                "Please: check the home unit's power and internet connection.".into()
            }
        }
        (Role::Family, Concern::Equipment, _) => {
            if ja {
                "お願い: 機器のケーブルと電源を確認してください。".into()
            } else {
                "Please: check the devices' cables and power.".into()
            }
        }
        // The coordinator: the family, the move, the destination.
        (Role::Coordinator, Concern::Power, Tier::T3) => {
            if ja {
                "至急: ご家族の移動か電源の確保を今すぐ手配してください。".into()
            } else {
                "Urgent: arrange the family's move or power now.".into()
            }
        }
        (Role::Coordinator, Concern::Power, Tier::T2) => match (dest, leave, ja) {
            (Some((d, _)), Some(l), true) => {
                format!("お願い: ご家族と、避難先（{d}）への移動を調整してください。遅くとも{l}には出発が必要です。")
            }
            (Some((d, _)), Some(l), false) => {
                format!("Please: arrange the family's move to {d} with them. They must leave by {l} at the latest.")
            }
            (Some((d, _)), None, true) => format!("お願い: ご家族と、避難先（{d}）への移動を調整してください。"),
            (Some((d, _)), None, false) => format!("Please: arrange the family's move to {d} with them."),
            (None, _, true) => "お願い: ご家族と、移動か電源の確保を調整してください。".into(),
            (None, _, false) => "Please: arrange a move or power with the family.".into(),
        },
        (Role::Coordinator, Concern::Power, _) if kind == A::StateUnknown => {
            if ja {
                "お願い: ご家族に電話し、連絡が取れるか、電源が持っているかを確認してください。".into()
            } else {
                "Please: call the family: can they be reached, and is the power holding?".into()
            }
        }
        (Role::Coordinator, _, _) => {
            if ja {
                "お願い: ご家族に連絡し、状況を確認してください。".into()
            } else {
                "Please: call the family and confirm the situation.".into()
            }
        }
        // The visiting nurse.
        (Role::VisitingNurse, _, Tier::T3) => {
            if ja {
                "至急: ご家族に連絡し、必要なら訪問してください。".into()
            } else {
                "Urgent: call the family, and visit if needed.".into()
            }
        }
        (Role::VisitingNurse, _, _) => {
            if ja {
                "お願い: ご家族に連絡し、必要なら訪問してください。".into()
            } else {
                "Please: call the family, and visit if needed.".into()
            }
        }
        // The facility: a child may be coming.
        (Role::Facility, Concern::Power, Tier::T2 | Tier::T3)
            if s.leave_in_s.is_some_and(|l| l > PREPARE_WITHIN_S) && leave.is_some() =>
        {
            let (l, m) = (leave.unwrap_or_default(), dest.map_or(0, |d| d.1));
            if ja {
                format!("お知らせ: 停電が続けば、お子さんの受け入れが必要になります。今の見込みでは、遅くとも{l}に出発、移動{m}分です。{devices}受け入れられないときは、コーディネーターに連絡してください。")
            } else {
                format!("For your information: if the outage goes on, the child will need to come to you; as it stands they must leave by {l} at the latest, {m} min on the way.{devices} If you cannot receive them, tell the coordinator.")
            }
        }
        (Role::Facility, Concern::Power, Tier::T2 | Tier::T3) => {
            let urgent = tier == Tier::T3;
            match (leave, ja) {
                (Some(l), true) => format!(
                    "{}お子さんの受け入れの準備をしてください。遅くとも{l}に出発、移動{}分の見込みです。{devices}受け入れられないときは、コーディネーターに連絡してください。",
                    if urgent { "至急: " } else { "お願い: " },
                    dest.map_or(0, |d| d.1)
                ),
                (Some(l), false) => format!(
                    "{}prepare to receive the child: leaving by {l} at the latest, {} min on the way.{devices} If you cannot receive them, tell the coordinator.",
                    if urgent { "Urgent: " } else { "Please: " },
                    dest.map_or(0, |d| d.1)
                ),
                (None, true) => format!(
                    "{}お子さんの受け入れの準備をしてください。{devices}受け入れられないときは、コーディネーターに連絡してください。",
                    if urgent { "至急: " } else { "お願い: " }
                ),
                (None, false) => format!(
                    "{}prepare to receive the child.{devices} If you cannot receive them, tell the coordinator.",
                    if urgent { "Urgent: " } else { "Please: " }
                ),
            }
        }
        (Role::Facility, _, _) => {
            if ja {
                "お知らせ: 状況を見守ってください。受け入れが必要になれば、あらためて連絡します。".into()
            } else {
                "For your information: please stand by. You will be told if the child needs to come to you.".into()
            }
        }
        // The support centre (and an administrator, who acknowledges as it).
        (Role::SupportCentre | Role::Admin, Concern::Power, Tier::T3) => {
            if ja {
                "至急: 市町村と連携し、移動か電源の確保を支援してください。".into()
            } else {
                "Urgent: work with the municipality to get this child moved or powered.".into()
            }
        }
        (Role::SupportCentre | Role::Admin, _, Tier::T3) => {
            if ja {
                "至急: 状況を把握し、市町村と連携してください。".into()
            } else {
                "Urgent: follow the situation and work with the municipality.".into()
            }
        }
        (Role::SupportCentre | Role::Admin, _, _) => {
            if ja {
                "お願い: 状況を把握し、市町村と連携してください。".into()
            } else {
                "Please: follow the situation and work with the municipality.".into()
            }
        }
    };
    text
}

/// Readings an alert carries, in words: `SpO2 85%・脈拍 92/分`, `UPSの表示: 残量62%・残り約12分`.
pub fn readings_text(data: &serde_json::Map<String, serde_json::Value>, lang: Lang) -> Option<String> {
    let r = mamori_protocol::event_data::Readings::of(data);
    let ja = lang == Lang::Ja;
    let mut parts = Vec::new();
    if let Some(v) = r.spo2_pct {
        parts.push(format!("SpO2 {v:.0}%"));
    }
    if let Some(v) = r.pulse_bpm {
        parts.push(if ja { format!("脈拍 {v:.0}/分") } else { format!("pulse {v:.0}/min") });
    }
    let mut ups = Vec::new();
    if let Some(v) = r.battery_charge_pct {
        ups.push(if ja { format!("残量{v:.0}%") } else { format!("{v:.0} % charge") });
    }
    if let Some(v) = r.runtime_s {
        let left = rough(i64::from(v), Round::Near, lang);
        ups.push(if ja { format!("残り約{left}") } else { format!("about {left} left") });
    }
    if !ups.is_empty() {
        parts.push(if ja {
            format!("UPSの表示: {}", ups.join("・"))
        } else {
            format!("the UPS shows {}", ups.join(", "))
        });
    }
    (!parts.is_empty()).then(|| parts.join(if ja { "・" } else { "; " }))
}

/// A condition that is over, in words.
pub fn over_text(kind: AlertKind, lang: Lang) -> &'static str {
    use AlertKind as A;
    use EventKind as E;
    let ja = lang == Lang::Ja;
    match kind {
        A::Event(E::MainsLost) if ja => "電源が復旧しました",
        A::Event(E::MainsLost) => "mains power is back",
        A::Event(E::BatteryLow) if ja => "予備電源の残量が回復しました",
        A::Event(E::BatteryLow) => "the backup battery is no longer low",
        A::Event(E::UpsFault) if ja => "UPSの故障表示が消えました",
        A::Event(E::UpsFault) => "the UPS no longer reports a fault",
        A::Event(E::DeviceLost) if ja => "機器がまた応答しています",
        A::Event(E::DeviceLost) => "the device answers again",
        A::Event(E::Spo2Low) if ja => "SpO2が回復しました",
        A::Event(E::Spo2Low) => "SpO2 is back up",
        A::Event(E::PulseOutOfRange) if ja => "脈拍が戻りました",
        A::Event(E::PulseOutOfRange) => "the pulse is back in range",
        A::Event(E::SensorOff) if ja => "センサーが装着されました",
        A::Event(E::SensorOff) => "the oximeter sensor is back on",
        A::Event(E::OximeterAlarm) | A::Event(E::OximeterAlarmSilenced) if ja => {
            "パルスオキシメータのアラームが止まりました"
        }
        A::Event(E::OximeterAlarm) | A::Event(E::OximeterAlarmSilenced) => "the pulse oximeter alarm has ended",
        A::Event(E::VentilatorAlarm) if ja => "人工呼吸器のアラームが止まりました",
        A::Event(E::VentilatorAlarm) => "the ventilator alarm has ended",
        A::Event(E::AlarmCableFault) if ja => "人工呼吸器のアラーム線がつながりました",
        A::Event(E::AlarmCableFault) => "the ventilator alarm cable is connected again",
        A::Event(E::SpoolDegraded) if ja => "見守り機のディスクが正常に戻りました",
        A::Event(E::SpoolDegraded) => "the home unit's disk is working again",
        A::HomeSilent | A::StateUnknown if ja => "見守り機との通信が戻りました",
        A::HomeSilent | A::StateUnknown => "the home unit is heard again",
        A::DeliveryFailed if ja => "通知が届くようになりました",
        A::DeliveryFailed => "notifications arrive again",
        A::BatteryTestFailed if ja => "予備電源の電池は自己診断に合格しました",
        A::BatteryTestFailed => "the backup battery passed its self-test",
        A::BatteryDegraded if ja => "予備バッテリーの問題は解消しました",
        A::BatteryDegraded => "the backup battery is no longer a concern",
        A::ClockSkew if ja => "見守り機の時計が正しくなりました",
        A::ClockSkew => "the home unit's clock is right again",
        A::Drill if ja => "訓練は終わりました",
        A::Drill => "the drill is over",
        _ if ja => "解消しました",
        _ => "it is over",
    }
}

fn row(r: &TriageRow, closed: bool, lang: Lang) -> String {
    let ja = lang == Lang::Ja;
    let left = match (r.on_battery, r.time_left_s) {
        (false, _) if ja => "復電".to_string(),
        (false, _) => "mains back".to_string(),
        (true, Some(s)) if ja => format!("残り{}", time_left_text(s, r.time_left_range_s, lang)),
        (true, Some(s)) => format!("{} left", time_left_text(s, r.time_left_range_s, lang)),
        (true, None) if ja => "残り時間不明".to_string(),
        (true, None) => "time left unknown".to_string(),
    };
    let silent = match (r.silent && !closed, ja) {
        (true, true) => "【通信途絶】",
        (true, false) => " [silent]",
        _ => "",
    };
    let dest = match (&r.destination, ja) {
        (Some(d), true) => format!(" → {d}（移動{}分）", r.travel_min.unwrap_or(0)),
        (Some(d), false) => format!(" → {d} ({} min away)", r.travel_min.unwrap_or(0)),
        (None, _) => String::new(),
    };
    let ack = match (r.acknowledged_by, ja) {
        (Some(a), true) => format!(" ✓{}が確認済み", role_text(a, lang)),
        (Some(a), false) => format!(" ✓acknowledged by {}", role_text(a, lang)),
        (None, _) => String::new(),
    };
    let tier = if closed || !r.on_battery { String::new() } else { format!("［{}］", tier_text(r.tier, lang)) };
    format!("{tier}{}: {left}{silent}{dest}{ack}", r.label)
}

/// The subject and body of a message for one reader.
pub fn render(content: &Content, lang: Lang, role: Role, alert_id: &str, style: &Style) -> (String, String) {
    let link = style.ack_link(alert_id, role);
    let ja = lang == Lang::Ja;
    match content {
        Content::Alert {
            label,
            kind,
            since,
            tier,
            repeat,
            time_left_s,
            time_left_range_s,
            forecast,
            silent,
            evacuation,
            data,
            devices,
            told,
            acknowledged_by,
        } => {
            let what = kind_text(*kind, lang);
            let again = match (*repeat > 0, ja) {
                (true, true) => "（再通知）",
                (true, false) => " (repeat)",
                _ => "",
            };
            let urgency = match (*kind, ja) {
                (AlertKind::Drill, true) => "訓練",
                (AlertKind::Drill, false) => "drill",
                _ => tier_text(*tier, lang),
            };
            let subject = if ja {
                format!("【mamori・{urgency}】{label}: {what}{again}")
            } else {
                format!("[mamori, {urgency}] {label}: {what}{again}")
            };
            let mut body = if ja {
                format!("{label}: {what}。{}から。", style.time(*since))
            } else {
                format!("{label}: {what}, since {}.", style.time(*since))
            };
            if let (Some(left), Some(f)) = (time_left_s, forecast) {
                let left = time_left_text(*left, *time_left_range_s, lang);
                let how = if f.verified {
                    basis(f.basis.as_str(), lang).to_string()
                } else if ja {
                    format!("{}。{}", basis(f.basis.as_str(), lang), unverified(lang))
                } else {
                    format!("{}; {}", basis(f.basis.as_str(), lang), unverified(lang))
                };
                body += &if ja {
                    format!("電源の残り{left}、早ければ{}に切れます（{how}）。", style.time(f.runs_out.p10))
                } else {
                    format!(" Power left: {left}; it may run out as early as {} ({how}).", style.time(f.runs_out.p10))
                };
            }
            if *silent {
                body += if ja {
                    "見守り機と通信できません（最後に届いた情報にもとづきます）。"
                } else {
                    " The home unit is silent (this is the last known state)."
                };
            }
            if let Some(r) = readings_text(data, lang) {
                body += &if ja { format!("{r}。") } else { format!(" {r}.") };
            }
            let skew = (*kind == AlertKind::ClockSkew).then(|| read::<facts::ClockSkew>(data).skew_s).flatten();
            if let Some(skew) = skew {
                let off = duration(skew.abs(), lang);
                body += &match (ja, skew > 0) {
                    (true, true) => format!("（{off}進んでいます）"),
                    (true, false) => format!("（{off}遅れています）"),
                    (false, true) => format!(" ({off} ahead)"),
                    (false, false) => format!(" ({off} behind)"),
                };
            }
            if *kind == AlertKind::BatteryDegraded {
                let b = read::<facts::BatteryDegraded>(data);
                let n = |x: Option<f64>| x.unwrap_or(0.0).round() as i64;
                let (health, delivered, planned) = (n(b.health_pct), n(b.delivered_wh), n(b.plan_wh));
                let times = b.discharges.unwrap_or(1).max(1);
                body += &if ja {
                    format!(
                        "最近{times}回の停電での測定では、バッテリーが使えた電力量は計画の約{health}%（約{delivered}Wh／計画{planned}Wh）でした。\
                         次の停電では、その分だけ早く切れます。"
                    )
                } else {
                    format!(
                        " Measured over the last {times} outage(s), the battery delivered about {health} % of its care plan \
                         (about {delivered} Wh of {planned} Wh). In the next outage it will run out that much sooner."
                    )
                };
            }
            // The latest time to leave: the pessimistic time left less the travel.
            let travel = evacuation.as_ref().map(|e| e.1);
            let leave_by = match (forecast, travel) {
                (Some(f), Some(m)) => Some(style.time(f.runs_out.p10 - chrono::Duration::minutes(i64::from(m)))),
                _ => None,
            };
            let situation = Situation {
                destination: evacuation.as_ref().map(|(d, m)| (d.as_str(), *m)),
                leave_by,
                devices,
                leave_in_s: match (time_left_range_s, travel) {
                    (Some((p10, _)), Some(m)) => Some(p10 - i64::from(m) * 60),
                    _ => None,
                },
            };
            let request = request(role, *kind, *tier, &situation, lang);
            body += &format!("\n{request}\n");
            if let Some(w) = who_knows(role, told, acknowledged_by, lang) {
                body += &format!("{w}\n");
            }
            body += &if ja { format!("確認（既読）: {link}") } else { format!("Acknowledge: {link}") };
            (subject, body)
        }
        Content::Cleared { label, kind, since, at } => {
            let over = over_text(*kind, lang);
            if ja {
                (
                    format!("【mamori・解消】{label}: {over}"),
                    format!("{label}: {over}（{}）。", style.span(*since, *at, lang)),
                )
            } else {
                (
                    format!("[mamori, resolved] {label}: {over}"),
                    format!("{label}: {over} ({}).", style.span(*since, *at, lang)),
                )
            }
        }
        Content::Answer { label, answer, at, evacuation } => {
            use crate::domain::engine::Answer;
            let who = role_text(answer.role(), lang);
            let said = answer.text(lang);
            let subject = if ja {
                format!("【mamori】{label}: {who}から「{said}」")
            } else {
                format!("[mamori] {label}: {who}: \"{said}\"")
            };
            let mut body = if ja {
                format!("{label}: {who}から「{said}」と連絡がありました（{}）。\n", style.time(*at))
            } else {
                format!("{label}: {who} answered \"{said}\" ({}).\n", style.time(*at))
            };
            let dest = evacuation.as_ref();
            let next = match (answer, role, dest, ja) {
                (Answer::Evacuating, Role::Facility, Some((d, m)), true) => {
                    format!("お願い: {d}へ向かっています（移動は{m}分ほど）。受け入れの準備をお願いします。")
                }
                (Answer::Evacuating, Role::Facility, Some((d, m)), false) => {
                    format!("Please: they are on their way to {d} (about {m} min). Please get ready to take the child.")
                }
                (Answer::Evacuating, Role::Facility, None, true) => "お願い: 受け入れの準備をお願いします。".into(),
                (Answer::Evacuating, Role::Facility, None, false) => "Please: get ready to take the child.".into(),
                (Answer::Evacuating, _, Some((d, m)), true) => {
                    format!("避難先: {d}（移動{m}分）。お願い: 到着を受け入れ先と確かめてください。")
                }
                (Answer::Evacuating, _, Some((d, m)), false) => {
                    format!("Destination: {d} ({m} min away). Please: confirm the arrival with the facility.")
                }
                (Answer::Evacuating, _, None, true) => {
                    "この世帯には避難先が決まっていません。お願い: 行き先をご家族と決めてください。".into()
                }
                (Answer::Evacuating, _, None, false) => {
                    "This home has no destination in its plan. Please: agree one with the family.".into()
                }
                (Answer::PowerSecured, _, _, true) => {
                    "ご家族が電源を確保しました。状況が変わったときは、また通知します。".into()
                }
                (Answer::PowerSecured, _, _, false) => {
                    "The family has secured power. You will be told again if that changes.".into()
                }
                (Answer::CanAccept, _, _, true) => "お願い: 受け入れ先が決まったことをご家族に伝えてください。".into(),
                (Answer::CanAccept, _, _, false) => "Please: tell the family the facility can take the child.".into(),
                (Answer::CannotAccept, _, _, true) => "お願い: 別の受け入れ先を探して、ご家族に伝えてください。".into(),
                (Answer::CannotAccept, _, _, false) => "Please: find another facility and tell the family.".into(),
                (Answer::Handling, _, _, _) => String::new(),
            };
            body += &next;
            body += &if ja { format!("\n確認（既読）: {link}") } else { format!("\nAcknowledge: {link}") };
            (subject, body)
        }
        Content::Incident { municipality, opened_at, revision, rows, closed } => {
            // A code where no care plan names the municipality.
            let municipality = match (municipality.chars().all(|c| c.is_ascii_digit()), ja) {
                (true, true) => format!("市町村コード{municipality}"),
                (true, false) => format!("municipality {municipality}"),
                (false, _) => municipality.clone(),
            };
            let on = rows.iter().filter(|r| r.on_battery).count();
            let silent = rows.iter().filter(|r| r.silent).count();
            let subject = match (closed, ja) {
                (true, true) => format!("【mamori】広域停電（{municipality}）が終わりました"),
                (true, false) => format!("[mamori] regional outage {municipality} over"),
                (false, true) => format!(
                    "【mamori】広域停電（{municipality}）: {on}世帯が予備電源、{silent}世帯が通信途絶（第{revision}報）"
                ),
                (false, false) => format!(
                    "[mamori] regional outage {municipality}: {on} homes on backup, {silent} silent (update {revision})"
                ),
            };
            let mut body = match (closed, ja) {
                (false, true) => format!("{}から。残り時間の短い順:\n", style.time(*opened_at)),
                (false, false) => format!("Since {}. Shortest time left first:\n", style.time(*opened_at)),
                (true, true) => format!("{}からの広域停電は終わりました。各世帯の状況:\n", style.time(*opened_at)),
                (true, false) => format!("The regional outage since {} is over. Each home:\n", style.time(*opened_at)),
            };
            for r in rows {
                body += &row(r, *closed, lang);
                body.push('\n');
            }
            if !closed {
                body += &match (role, ja) {
                    (Role::Family, true) => "お願い: ご自宅の機器と予備電源を確認してください。".to_string(),
                    (Role::Family, false) => "Please: check your devices and backup power.".to_string(),
                    (_, true) => "お願い: 上から順に状況を確認してください。".to_string(),
                    (_, false) => "Please: check on the homes from the top.".to_string(),
                };
                body += &if ja { format!("\n確認（既読）: {link}") } else { format!("\nAcknowledge: {link}") };
            }
            (subject, body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::forecast::Band;
    use crate::domain::forecast::{Basis, Forecast};
    use chrono::DateTime;

    fn style() -> Style {
        Style {
            public_url: "https://mamori.example".into(),
            link_secret: b"k".to_vec(),
            offset: FixedOffset::east_opt(9 * 3600).unwrap(),
        }
    }

    fn t(s: i64) -> Time {
        DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    #[test]
    fn an_alert_says_home_what_since_time_left_basis_ask_and_link() {
        let f = Forecast {
            external_until: t(3600),
            runs_out_at: t(3 * 3600 + 1200),
            external: Band { p10: t(3000), p50: t(3600), p90: t(4200) },
            runs_out: Band { p10: t(2 * 3600 + 1800), p50: t(3 * 3600 + 1200), p90: t(3 * 3600 + 1800) },
            basis: Basis::UpsRuntime,
            as_of: t(0),
            verified: true,
        };
        let c = Content::Alert {
            label: "K-01".into(),
            kind: AlertKind::Event(mamori_protocol::mqtt::EventKind::MainsLost),
            since: t(0),
            tier: Tier::T2,
            repeat: 0,
            forecast: Some(f),
            time_left_s: Some(3 * 3600 + 1200),
            silent: false,
            evacuation: Some(("熊本大学病院".into(), 40)),
            data: Default::default(),
            time_left_range_s: Some((2 * 3600 + 1800 + 59, 3 * 3600 + 1801)),
            devices: vec![("人工呼吸器".into(), 25.0)],
            told: vec![Role::Family, Role::Coordinator, Role::Facility],
            acknowledged_by: vec![Role::Family],
        };
        let (subject, body) = render(&c, Lang::Ja, Role::Facility, "abc", &style());
        assert!(subject.contains("K-01") && subject.contains("停電") && subject.contains("移動の準備"), "{subject}");
        // 09:00 JST + 2 h 30 min (the pessimistic end) − 40 min of travel = 10:50.
        assert!(
            body.contains("電源の残り約3時間20分（2時間30分〜3時間40分）")
                && body.contains("UPSの報告を補正")
                && body.contains("お子さんの受け入れの準備")
                && body.contains("遅くとも09/22 01:03に出発、移動40分")
                && body.contains("人工呼吸器 25W")
                && body.contains("ほかに知らせた人: ご家族、コーディネーター（ご家族が確認済み）"),
            "{body}"
        );
        let (_, family) = render(&c, Lang::Ja, Role::Family, "abc", &style());
        assert!(
            family.contains("移動の準備をしてください（避難先: 熊本大学病院、移動40分）")
                && family.contains("ほかに知らせた人: コーディネーター、受け入れ先")
                && !family.contains("受け入れの準備"),
            "{family}"
        );
        assert!(body.contains(&style().ack_link("abc", Role::Facility)), "{body}");
        // Far from the time to leave, the facility is told when to expect the child, not yet
        // asked to get ready.
        let mut far = c.clone();
        if let Content::Alert { time_left_range_s, .. } = &mut far {
            *time_left_range_s = Some((10 * 3600, 14 * 3600));
        }
        let (_, later) = render(&far, Lang::Ja, Role::Facility, "abc", &style());
        assert!(
            later.contains("お知らせ: 停電が続けば、お子さんの受け入れが必要になります")
                && !later.contains("受け入れの準備"),
            "{later}"
        );
        let (_, en) = render(&c, Lang::En, Role::Facility, "abc", &style());
        assert!(
            en.contains("about 3 h 20 min (2 h 30 min to 3 h 40 min)")
                && en.contains("the UPS's own estimate, corrected")
                && en.contains("Acknowledge: https://mamori.example/ack/abc/facility/"),
            "{en}"
        );
        // Resting on an assumed battery: the reader is told.
        let mut c = c;
        if let Content::Alert { forecast: Some(f), .. } = &mut c {
            f.verified = false;
        }
        let (_, body) = render(&c, Lang::Ja, Role::Family, "abc", &style());
        assert!(body.contains("まだ測れていない"), "{body}");
    }

    #[test]
    fn ranges_round_the_safe_way() {
        assert_eq!(time_left_text(7260, Some((6000, 8500)), Lang::Ja), "約2時間（1時間40分〜2時間30分）");
        assert_eq!(time_left_text(1500, Some((1260, 1790)), Lang::En), "about 25 min (20 min to 30 min)");
        assert_eq!(
            time_left_text(400, Some((400, 430)), Lang::Ja),
            "約7分",
            "a range under a minute is not worth saying"
        );
    }

    #[test]
    fn a_degraded_battery_is_explained_with_what_each_reader_can_do() {
        // As the engine writes it.
        let data = mamori_protocol::event_data::to_data(&facts::BatteryDegraded {
            health_pct: Some(55.0),
            plan_wh: Some(800.0),
            delivered_wh: Some(440.0),
            source: None,
            discharges: Some(2),
        });
        let c = Content::Alert {
            label: "K-01".into(),
            kind: AlertKind::BatteryDegraded,
            since: t(0),
            tier: Tier::T0,
            repeat: 0,
            forecast: None,
            time_left_s: None,
            time_left_range_s: None,
            silent: false,
            evacuation: None,
            data,
            devices: vec![],
            told: vec![Role::Family, Role::Coordinator],
            acknowledged_by: vec![],
        };
        let (subject, family) = render(&c, Lang::Ja, Role::Family, "abc", &style());
        assert!(subject.contains("予備バッテリーが計画より持ちません"), "{subject}");
        assert!(
            family.contains("計画の約55%（約440Wh／計画800Wh）") && family.contains("交換か予備バッテリーの追加"),
            "{family}"
        );
        let (_, coordinator) = render(&c, Lang::Ja, Role::Coordinator, "abc", &style());
        assert!(coordinator.contains("ご家族と") && !coordinator.contains("ご家族に連絡"), "{coordinator}");
        let (_, en) = render(&c, Lang::En, Role::Family, "abc", &style());
        assert!(en.contains("about 55 % of its care plan") && en.contains("replace the battery"), "{en}");
        for text in [&family, &coordinator] {
            assert!(!text.contains("health_pct") && !text.contains("plan_wh"), "no field names: {text}");
        }
    }

    /// A reader's own task, and the phrases of everyone else's: whichever reader gets a
    /// message, it never carries another reader's task.
    fn tasks(role: Role) -> &'static [&'static str] {
        match role {
            Role::Family => {
                &["119番", "避難先へ移動するか", "移動の準備をしてください", "見守り機の電源とインターネット"]
            }
            Role::Coordinator => &["を調整してください", "手配してください", "ご家族に電話", "ご家族に連絡し、状況"],
            Role::VisitingNurse => &["訪問してください"],
            Role::Facility => &["受け入れの準備", "受け入れが必要になれば"],
            Role::SupportCentre | Role::Admin => &["市町村と連携"],
        }
    }

    fn every_alert() -> Vec<Content> {
        let f = Forecast {
            external_until: t(3600),
            runs_out_at: t(7200),
            external: Band { p10: t(3000), p50: t(3600), p90: t(4200) },
            runs_out: Band { p10: t(6000), p50: t(7200), p90: t(8400) },
            basis: Basis::ObservedDischarge,
            as_of: t(0),
            verified: false,
        };
        let mut data = serde_json::Map::new();
        for (k, v) in [("spo2_pct", 85.0), ("pulse_bpm", 92.0), ("battery_charge_pct", 62.0), ("runtime_s", 720.0)] {
            data.insert(k.into(), v.into());
        }
        // The engine's own facts, as it writes them.
        data.extend(mamori_protocol::event_data::to_data(&facts::ClockSkew { skew_s: Some(-3600) }));
        data.extend(mamori_protocol::event_data::to_data(&facts::BatteryDegraded {
            health_pct: Some(55.0),
            plan_wh: Some(800.0),
            delivered_wh: Some(440.0),
            source: None,
            discharges: Some(2),
        }));
        data.insert("runtime_s".into(), 720.into()); // whole seconds, as the agent writes it
        let mut out = Vec::new();
        for kind in KINDS {
            for tier in [Tier::T0, Tier::T1, Tier::T2, Tier::T3] {
                for (evacuation, forecast) in [(Some(("熊本大学病院".to_string(), 40)), Some(f)), (None, None)] {
                    out.push(Content::Alert {
                        label: "K-01".into(),
                        kind: *kind,
                        since: t(0),
                        tier,
                        repeat: 1,
                        time_left_s: forecast.as_ref().map(|_| 7200),
                        time_left_range_s: forecast.as_ref().map(|_| (6000, 8400)),
                        forecast,
                        silent: true,
                        evacuation,
                        data: data.clone(),
                        devices: vec![("人工呼吸器".into(), 25.0), ("加温加湿器".into(), 60.0)],
                        told: READERS.to_vec(),
                        acknowledged_by: vec![Role::Coordinator],
                    });
                }
            }
            out.push(Content::Cleared { label: "K-01".into(), kind: *kind, since: t(0), at: t(600) });
        }
        let row = |label: &str, on_battery: bool, left: Option<i64>| TriageRow {
            home: mamori_protocol::mqtt::HomeId::new("h-01").unwrap(),
            label: label.into(),
            tier: Tier::T2,
            time_left_s: left,
            time_left_range_s: left.map(|l| (l - 900, l + 900)),
            basis: None,
            on_battery,
            silent: label == "K-02",
            acknowledged_by: (label == "K-03").then_some(Role::Coordinator),
            destination: Some("熊本大学病院".into()),
            travel_min: Some(40),
            leave_in_s: left.map(|l| l - 900 - 40 * 60),
        };
        for answer in [
            crate::domain::engine::Answer::Evacuating,
            crate::domain::engine::Answer::PowerSecured,
            crate::domain::engine::Answer::CanAccept,
            crate::domain::engine::Answer::CannotAccept,
        ] {
            for evacuation in [Some(("熊本大学病院".to_string(), 40)), None] {
                out.push(Content::Answer { label: "K-01".into(), answer, at: t(60), evacuation });
            }
        }
        let rows = vec![row("K-01", true, Some(5400)), row("K-02", true, None), row("K-03", false, None)];
        for closed in [false, true] {
            out.push(Content::Incident {
                municipality: "熊本市".into(),
                opened_at: t(0),
                revision: 3,
                rows: rows.clone(),
                closed,
            });
        }
        out
    }

    #[test]
    fn no_reader_is_ever_asked_another_readers_task() {
        let mut checked = 0;
        for content in every_alert() {
            for reader in READERS {
                for lang in [Lang::Ja] {
                    let (_, body) = render(&content, lang, *reader, "abc", &style());
                    // The request is the line after the facts; who else knows follows it.
                    let request = body.lines().nth(1).unwrap_or("");
                    for other in READERS.iter().filter(|r| *r != reader) {
                        for phrase in tasks(*other) {
                            assert!(
                                !request.contains(phrase),
                                "{reader:?} was asked {other:?}'s task ({phrase}):\n{body}"
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 600, "{checked}");
    }

    #[test]
    fn japanese_text_has_no_field_names_codes_or_english_words() {
        const ALLOWED: &[&str] = &["mamori", "SpO2", "UPS", "W", "Wh"];
        for content in every_alert() {
            for reader in READERS {
                let (subject, body) = render(&content, Lang::Ja, *reader, "abc", &style());
                let text = format!("{subject}\n{}", body.split("確認（既読）: ").next().unwrap_or(""));
                for word in text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                    let word = word.trim_start_matches(|c: char| c.is_ascii_digit());
                    assert!(
                        word.is_empty() || ALLOWED.contains(&word) || word == "K",
                        "an English word or a code in Japanese ({word}) for {reader:?}:\n{text}"
                    );
                }
                for bad in ["。 ", "  ", "?", "_", "（）"] {
                    assert!(!text.contains(bad), "{bad:?} in the Japanese text for {reader:?}:\n{text}");
                }
            }
        }
        // Every event kind a home can send has words, as the dashboard's timeline shows it.
        // And a kind this version does not know (stored by a newer one) is named in words too,
        // never by its code.
        let unknown = [mamori_protocol::mqtt::EventKind::Unknown];
        for kind in mamori_protocol::mqtt::EventKind::ALL.iter().chain(&unknown) {
            let words = kind_text(AlertKind::Event(*kind), Lang::Ja);
            let english =
                words.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| !w.is_empty() && !ALLOWED.contains(&w));
            assert!(!english, "{kind:?}: {words}");
        }
    }

    #[test]
    fn the_table_in_docs_messages_is_what_the_gateway_sends() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/messages.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let (start, end) = ("<!-- table: generated by the gateway's tests -->\n", "<!-- end of table -->");
        let (head, rest) = doc.split_once(start).expect("the table's start marker");
        let (_, tail) = rest.split_once(end).expect("the table's end marker");
        let fresh = format!("{head}{start}{}{end}{tail}", request_table());
        if std::env::var_os("MAMORI_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        } else {
            assert!(
                fresh == doc,
                "docs/messages.md is out of date: MAMORI_UPDATE_DOCS=1 cargo test -p mamori-gateway --lib message"
            );
        }
    }

    #[test]
    fn an_answer_tells_its_reader_who_said_what_and_what_to_do_next() {
        use crate::domain::engine::Answer;
        let said = |answer: Answer, role: Role, lang: Lang| {
            let c = Content::Answer {
                label: "K-01".into(),
                answer,
                at: t(60),
                evacuation: Some(("熊本大学病院".into(), 40)),
            };
            render(&c, lang, role, "abc", &style())
        };
        let (subject, body) = said(Answer::CannotAccept, Role::Coordinator, Lang::Ja);
        assert_eq!(subject, "【mamori】K-01: 受け入れ先から「受け入れられません」");
        assert!(
            body.contains("別の受け入れ先を探して、ご家族に伝えてください") && body.contains("/ack/abc/coordinator/"),
            "{body}"
        );
        let (_, body) = said(Answer::Evacuating, Role::Facility, Lang::Ja);
        assert!(
            body.contains("ご家族から「避難します」")
                && body.contains("熊本大学病院へ向かっています（移動は40分ほど）"),
            "{body}"
        );
        let (_, body) = said(Answer::Evacuating, Role::Coordinator, Lang::En);
        assert!(
            body.contains("the family answered \"We are leaving for the destination\"") && body.contains("40 min away"),
            "{body}"
        );
    }

    #[test]
    fn links_verify_only_with_the_right_alert_role_and_secret() {
        let s = style();
        let sig = s.sign("abc", Role::Family);
        assert!(s.verify("abc", Role::Family, &sig));
        assert!(!s.verify("abd", Role::Family, &sig));
        assert!(!s.verify("abc", Role::Coordinator, &sig));
        assert!(!s.verify("abc", Role::Family, "zz"));
        let other = Style { link_secret: b"other".to_vec(), ..style() };
        assert!(!other.verify("abc", Role::Family, &sig));
    }
}
