//! Message text, in the reader's language, and signed acknowledgement links.
//!
//! A message is short and says: which home (its label), what, since when, the time left and
//! its basis, what is asked of the reader, and how to acknowledge (a link). Times are shown in
//! the deployment's UTC offset (JST by default).
//!
//! An acknowledgement link is `{public_url}/ack/{alert_id}/{role}/{sig}` where `sig` is the
//! first 32 hex digits of HMAC-SHA256(link secret, `alert_id/role`). Opening it shows a
//! confirmation page; only its form's POST acknowledges (mail scanners open links).

use chrono::FixedOffset;
use hmac::{Hmac, Mac};
use mamori_protocol::mqtt::Role;
use sha2::Sha256;

use crate::engine::{Content, Time, TriageRow};
use crate::homes::Lang;
use crate::policy::Tier;

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

/// A role's wire name.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Family => "family",
        Role::Coordinator => "coordinator",
        Role::VisitingNurse => "visiting_nurse",
        Role::Facility => "facility",
        Role::SupportCentre => "support_centre",
        Role::Admin => "admin",
    }
}

/// Parse a role's wire name.
pub fn parse_role(s: &str) -> Option<Role> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

impl Style {
    /// The signature of an acknowledgement link.
    pub fn sign(&self, alert_id: &str, role: Role) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.link_secret) else {
            return String::new(); // HMAC takes keys of any length: cannot happen
        };
        mac.update(format!("{alert_id}/{}", role_name(role)).as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Check a link's signature (constant time).
    pub fn verify(&self, alert_id: &str, role: Role, sig: &str) -> bool {
        let Ok(given) = hex::decode(sig) else { return false };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.link_secret) else { return false };
        mac.update(format!("{alert_id}/{}", role_name(role)).as_bytes());
        given.len() == 16 && mac.verify_truncated_left(&given).is_ok()
    }

    /// The acknowledgement link for a role.
    pub fn ack_link(&self, alert_id: &str, role: Role) -> String {
        format!("{}/ack/{alert_id}/{}/{}", self.public_url, role_name(role), self.sign(alert_id, role))
    }

    fn time(&self, t: Time) -> String {
        t.with_timezone(&self.offset).format("%m/%d %H:%M").to_string()
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
pub fn kind_text(kind: &str, lang: Lang) -> &str {
    let ja = lang == Lang::Ja;
    match kind {
        "mains_lost" if ja => "停電（予備電源で運転中）",
        "mains_lost" => "mains power lost (on backup power)",
        "battery_low" if ja => "予備電源の残量低下",
        "battery_low" => "backup battery low",
        "ups_fault" if ja => "UPSの故障",
        "ups_fault" => "UPS fault",
        "device_lost" if ja => "機器の応答なし",
        "device_lost" => "a device stopped answering",
        "spo2_low" if ja => "SpO2低下",
        "spo2_low" => "SpO2 low",
        "pulse_out_of_range" if ja => "脈拍の異常",
        "pulse_out_of_range" => "pulse out of range",
        "sensor_off" if ja => "酸素飽和度センサーが外れています",
        "sensor_off" => "oximeter sensor off",
        "oximeter_alarm" if ja => "パルスオキシメータのアラーム",
        "oximeter_alarm" => "pulse oximeter alarm",
        "oximeter_alarm_silenced" if ja => "パルスオキシメータのアラームが消音されました",
        "oximeter_alarm_silenced" => "pulse oximeter alarm silenced at the bedside",
        "ventilator_alarm" if ja => "人工呼吸器のアラーム",
        "ventilator_alarm" => "ventilator alarm",
        "alarm_cable_fault" if ja => "人工呼吸器アラーム線の断線",
        "alarm_cable_fault" => "ventilator alarm cable cut: its alarms cannot be seen",
        "spool_degraded" if ja => "見守り機のディスク異常",
        "spool_degraded" => "the home unit's disk is failing",
        "home_silent" if ja => "見守り機からの通信が途絶えています",
        "home_silent" => "the home has gone silent",
        "state_unknown" if ja => "停電中に通信が途絶え、状況不明",
        "state_unknown" => "silent during an outage: state unknown",
        "delivery_failed" if ja => "通知が届いていません",
        "delivery_failed" => "a notification could not be delivered",
        "battery_degraded" if ja => "予備バッテリーが計画より持ちません",
        "battery_degraded" => "the backup battery holds less than its care plan says",
        "clock_skew" if ja => "見守り機の時計がずれています",
        "clock_skew" => "the home unit's clock is wrong",
        other => other,
    }
}

fn ask(tier: Tier, lang: Lang) -> &'static str {
    match (tier, lang) {
        (Tier::T0, Lang::Ja) => "お願い: 機器と電源を確認してください。",
        (Tier::T0, Lang::En) => "Please: check the devices and the power.",
        (Tier::T1, Lang::Ja) => "お願い: ご家族に連絡し、状況を確認してください。",
        (Tier::T1, Lang::En) => "Please: call the family and confirm the situation.",
        (Tier::T2, Lang::Ja) => "お願い: 受け入れ（電源のある避難先）の準備をしてください。",
        (Tier::T2, Lang::En) => "Please: prepare to receive the child at the powered destination.",
        (Tier::T3, Lang::Ja) => "至急: 移動または電源の確保を今すぐ手配してください。",
        (Tier::T3, Lang::En) => "Urgent: arrange a move or power now.",
    }
}

fn row(r: &TriageRow, lang: Lang) -> String {
    let left = r.time_left_s.map(|s| time_left_text(s, r.time_left_range_s, lang)).unwrap_or_else(|| "?".into());
    let silent = match (r.silent, lang) {
        (true, Lang::Ja) => " 【通信途絶】",
        (true, Lang::En) => " [SILENT]",
        _ => "",
    };
    let power = match (r.on_battery, lang) {
        (false, Lang::Ja) => " 復電",
        (false, Lang::En) => " mains back",
        _ => "",
    };
    let dest =
        r.destination.as_ref().map(|d| format!(" → {d} ({} min)", r.travel_min.unwrap_or(0))).unwrap_or_default();
    let ack = r.acknowledged_by.map(|a| format!(" ✓{}", role_name(a))).unwrap_or_default();
    format!("{:?} {}: {left}{power}{silent}{dest}{ack}", r.tier, r.label)
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
        } => {
            let what = kind_text(kind, lang);
            let again = match (*repeat > 0, ja) {
                (true, true) => "（再通知）",
                (true, false) => " (repeat)",
                _ => "",
            };
            let subject = format!("[mamori {tier:?}] {label}: {what}{again}");
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
                    format!(" 電源の残り{left}、早ければ{}に切れます（{how}）。", style.time(f.runs_out.p10))
                } else {
                    format!(" Power left: {left}; it may run out as early as {} ({how}).", style.time(f.runs_out.p10))
                };
            }
            if *silent {
                body += if ja {
                    " 見守り機と通信できません（最後の情報に基づく）。"
                } else {
                    " The home is silent (last known state)."
                };
            }
            let readings: Vec<String> = ["spo2_pct", "pulse_bpm", "runtime_s", "battery_charge_pct"]
                .iter()
                .filter_map(|k| data.get(*k).filter(|v| !v.is_null()).map(|v| format!("{k}={v}")))
                .collect();
            if !readings.is_empty() {
                body += &format!(" ({})", readings.join(", "));
            }
            if let (true, Some(skew)) = (kind == "clock_skew", data.get("skew_s").and_then(|v| v.as_i64())) {
                let off = duration(skew.abs(), lang);
                body += &match (ja, skew > 0) {
                    (true, true) => format!("（{off}進んでいます）"),
                    (true, false) => format!("（{off}遅れています）"),
                    (false, true) => format!(" ({off} ahead)"),
                    (false, false) => format!(" ({off} behind)"),
                };
            }
            if kind == "battery_degraded" {
                let n = |k: &str| data.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0).round() as i64;
                let (health, delivered, planned) = (n("health_pct"), n("delivered_wh"), n("plan_wh"));
                let times = n("discharges").max(1);
                body += &if ja {
                    format!(
                        " 最近{times}回の停電での測定では、バッテリーが使えた電力量は計画の約{health}%（約{delivered}Wh／計画{planned}Wh）でした。\
                         次の停電では、その分だけ早く切れます。"
                    )
                } else {
                    format!(
                        " Measured over the last {times} outage(s), the battery delivered about {health} % of its care plan \
                         (about {delivered} Wh of {planned} Wh). In the next outage it will run out that much sooner."
                    )
                };
            }
            if let (Some((dest, travel)), true) = (evacuation, *tier >= Tier::T2) {
                body += &if ja {
                    format!(" 避難先: {dest}（移動{travel}分）。")
                } else {
                    format!(" Destination: {dest} ({travel} min away).")
                };
            }
            let request = match (kind.as_str(), ja) {
                ("clock_skew", true) => {
                    "mamoriは受信時刻で記録しているため通知は正しく届きますが、設置業者に見守り機の時刻合わせの確認を依頼してください。"
                }
                ("battery_degraded", true) if role == Role::Family => {
                    "お願い: 停電の前に、バッテリーの交換か予備バッテリーの追加を、販売店や訪問看護ステーション、コーディネーターと相談してください。"
                }
                ("battery_degraded", false) if role == Role::Family => {
                    "Please: before the next outage, arrange to replace the battery or add a second one (ask the dealer, the visiting nurse or the coordinator)."
                }
                ("battery_degraded", true) => {
                    "お願い: ご家族と、バッテリーの交換または追加（日常生活用具の給付など）について相談してください。個別避難計画の時間も見直してください。"
                }
                ("battery_degraded", false) => {
                    "Please: talk with the family about replacing the battery or adding one (equipment subsidies), and review the evacuation plan's timings."
                }
                ("clock_skew", false) => {
                    "mamori records by the time it receives messages, so notifications are right; please have the installer check the home unit's time synchronisation."
                }
                _ => ask(*tier, lang),
            };
            body += &format!("\n{request}\n");
            body += &if ja { format!("確認（既読）: {link}") } else { format!("Acknowledge: {link}") };
            (subject, body)
        }
        Content::Cleared { label, kind, since, at } => {
            let what = kind_text(kind, lang);
            if ja {
                (
                    format!("[mamori] {label}: 解消"),
                    format!("{label}: {what}（{}から）は{}に解消しました。", style.time(*since), style.time(*at)),
                )
            } else {
                (
                    format!("[mamori] {label}: resolved"),
                    format!("{label}: {what} (since {}) resolved at {}.", style.time(*since), style.time(*at)),
                )
            }
        }
        Content::Incident { municipality, opened_at, revision, rows, closed } => {
            let on = rows.iter().filter(|r| r.on_battery).count();
            let silent = rows.iter().filter(|r| r.silent).count();
            let subject = match (closed, ja) {
                (true, true) => format!("[mamori] 地域停電 {municipality} 終了"),
                (true, false) => format!("[mamori] regional outage {municipality} over"),
                (false, true) => format!(
                    "[mamori] 地域停電 {municipality}: {on}世帯が予備電源、{silent}世帯が通信途絶（第{revision}報）"
                ),
                (false, false) => format!(
                    "[mamori] regional outage {municipality}: {on} homes on backup, {silent} silent (update {revision})"
                ),
            };
            let mut body = if ja {
                format!("{}から。残り時間の短い順:\n", style.time(*opened_at))
            } else {
                format!("Since {}. Shortest time left first:\n", style.time(*opened_at))
            };
            for r in rows {
                body += &row(r, lang);
                body.push('\n');
            }
            if !closed {
                body += if ja {
                    "お願い: 上から順に状況を確認してください。"
                } else {
                    "Please: check on the homes from the top."
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
    use crate::forecast::Band;
    use crate::forecast::{Basis, Forecast};
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
            kind: "mains_lost".into(),
            since: t(0),
            tier: Tier::T2,
            repeat: 0,
            forecast: Some(f),
            time_left_s: Some(3 * 3600 + 1200),
            silent: false,
            evacuation: Some(("熊本大学病院".into(), 40)),
            data: Default::default(),
            time_left_range_s: Some((2 * 3600 + 1800 + 59, 3 * 3600 + 1801)),
        };
        let (subject, body) = render(&c, Lang::Ja, Role::Facility, "abc", &style());
        assert!(subject.contains("K-01") && subject.contains("停電"), "{subject}");
        assert!(
            body.contains("電源の残り約3時間20分（2時間30分〜3時間40分）")
                && body.contains("UPSの報告を補正")
                && body.contains("熊本大学病院"),
            "{body}"
        );
        assert!(body.contains(&style().ack_link("abc", Role::Facility)), "{body}");
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
        let mut data = serde_json::Map::new();
        for (k, v) in [("health_pct", 55.0), ("plan_wh", 800.0), ("delivered_wh", 440.0), ("discharges", 2.0)] {
            data.insert(k.into(), v.into());
        }
        let c = Content::Alert {
            label: "K-01".into(),
            kind: "battery_degraded".into(),
            since: t(0),
            tier: Tier::T0,
            repeat: 0,
            forecast: None,
            time_left_s: None,
            time_left_range_s: None,
            silent: false,
            evacuation: None,
            data,
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
        assert_eq!(parse_role("visiting_nurse"), Some(Role::VisitingNurse));
    }
}
