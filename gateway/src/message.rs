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

/// What a forecast rests on, in words.
pub fn basis(b: &str, lang: Lang) -> &'static str {
    match (b, lang) {
        ("ups_runtime", Lang::Ja) => "UPSの報告",
        ("ups_runtime", Lang::En) => "UPS reported",
        ("charge_and_load", Lang::Ja) => "残量と負荷から計算",
        ("charge_and_load", Lang::En) => "from charge and load",
        ("dead_reckoning", Lang::Ja) => "停電開始からの推定",
        ("dead_reckoning", Lang::En) => "estimated from the outage start",
        (_, Lang::Ja) => "人工呼吸器の内蔵電池のみ",
        (_, Lang::En) => "ventilator internal battery only",
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
    let left = r.time_left_s.map(|s| duration(s, lang)).unwrap_or_else(|| "?".into());
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
        Content::Alert { label, kind, since, tier, repeat, time_left_s, forecast, silent, evacuation, data } => {
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
                body += &if ja {
                    format!(
                        " 電源の残り{}（{}、{}まで）。",
                        duration(*left, lang),
                        basis(f.basis.as_str(), lang),
                        style.time(f.runs_out_at)
                    )
                } else {
                    format!(
                        " Power left: {} ({}, until {}).",
                        duration(*left, lang),
                        basis(f.basis.as_str(), lang),
                        style.time(f.runs_out_at)
                    )
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
            basis: Basis::UpsRuntime,
            as_of: t(0),
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
        };
        let (subject, body) = render(&c, Lang::Ja, Role::Facility, "abc", &style());
        assert!(subject.contains("K-01") && subject.contains("停電"), "{subject}");
        assert!(body.contains("約3時間20分") && body.contains("UPSの報告") && body.contains("熊本大学病院"), "{body}");
        assert!(body.contains(&style().ack_link("abc", Role::Facility)), "{body}");
        let (_, en) = render(&c, Lang::En, Role::Facility, "abc", &style());
        assert!(
            en.contains("about 3 h 20 min")
                && en.contains("UPS reported")
                && en.contains("Acknowledge: https://mamori.example/ack/abc/facility/"),
            "{en}"
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
        assert_eq!(parse_role("visiting_nurse"), Some(Role::VisitingNurse));
    }
}
