//! Readiness, for the regional council (協議の場) and the support centre: what calm days are
//! for (地域の状況把握, 資源の把握・開発).
//!
//! Per municipality the coordinator or administrator may see: how many homes are watched; how
//! long each home's backup lasts at its care plan's load (the learned battery health when
//! earlier outages measured it, the care plan's energy otherwise, and the ventilator's own
//! battery on top); the homes whose backup cannot cover the journey there and back plus a
//! margin ([`MARGIN_MIN`]), those with a degraded battery, those without a destination; and
//! the drills each home has done (the last one, and whether everyone told acknowledged it).
//! A page, a CSV (`/readiness.csv`) and the print stylesheet for the meeting.
//!
//! And the contacts without a current consent from the guardian, by role (whatever the
//! config's `[privacy] require_consent`: on a calm day it says which consent forms to get).
//! The rows are pure: made from the engine's plans and states and the homes' alert history.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

use super::auth::Viewer;
use super::html::{failed, local, not_found, T};
use super::layout::layout;
use super::{App, Client};
use crate::admin::accounts::AccountRole;
use crate::domain::engine::{Alert, AlertKind, Engine, Time};
use crate::domain::homes::{BackupKind, Home, Lang};

/// The margin on top of the journey there and back, min.
pub const MARGIN_MIN: u32 = 60;

/// One home's readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Municipality code (what the rows are grouped by).
    pub municipality_code: String,
    /// Municipality (its name when the care plan gives it).
    pub municipality: String,
    /// The home's label.
    pub label: String,
    /// The external backup at the care plan's load, h (None: no energy or no load in the plan).
    pub backup_h: Option<f64>,
    /// Whether `backup_h` rests on a measured battery.
    pub measured: bool,
    /// The ventilator's own battery, min.
    pub internal_min: Option<f64>,
    /// The journey there and back plus the margin, h (None: no destination).
    pub needed_h: Option<f64>,
    /// The battery holds less than the degraded threshold of its care plan's energy.
    pub degraded: bool,
    /// The last drill and whether everyone told acknowledged it.
    pub last_drill: Option<(Time, bool)>,
    /// The roles (not the family) with a contact whose consent is missing, withdrawn or not
    /// yet in force.
    pub without_consent: Vec<mamori_protocol::mqtt::Role>,
}

impl Row {
    /// The backup does not cover the journey there and back plus the margin (or it is unknown).
    pub fn short(&self) -> bool {
        match (self.backup_h, self.needed_h) {
            (Some(b), Some(n)) => b + self.internal_min.unwrap_or(0.0) / 60.0 < n,
            (None, _) => true,
            (Some(_), None) => false,
        }
    }
}

/// A home's row from its plan, what was learned of its battery and its drills.
pub fn row(
    plan: &Home,
    learned: Option<&crate::domain::forecast::Learned>,
    degraded_below_pct: f64,
    drills: &[Alert],
    today: chrono::NaiveDate,
) -> Row {
    let mut without_consent: Vec<mamori_protocol::mqtt::Role> = plan
        .contacts
        .iter()
        .filter(|c| c.role != mamori_protocol::mqtt::Role::Family)
        .filter(|c| !c.consent.as_ref().is_some_and(|k| k.current(today)))
        .map(|c| c.role)
        .collect();
    without_consent.sort_by_key(|r| r.as_str());
    without_consent.dedup();
    let watts: f64 = plan.devices.iter().map(|d| d.watts).sum();
    let plan_wh = plan.external_wh();
    let health =
        learned.filter(|l| l.usable() && plan_wh.is_some_and(|w| (w - l.plan_wh).abs() < 0.5)).map(|l| l.health);
    let backup_h = plan_wh.filter(|_| watts > 0.0).map(|wh| wh * health.unwrap_or(1.0) / watts);
    let last_drill = drills.iter().filter(|a| a.kind == AlertKind::Drill).max_by_key(|a| a.raised_at).map(|a| {
        (a.raised_at, !a.notified.is_empty() && a.notified.iter().all(|r| a.acks.iter().any(|k| k.role == *r)))
    });
    Row {
        municipality_code: plan.municipality.clone(),
        municipality: plan.municipality_name.clone().unwrap_or_else(|| plan.municipality.clone()),
        label: plan.label.clone(),
        backup_h,
        measured: health.is_some(),
        internal_min: plan.backup.iter().find(|b| b.kind == BackupKind::VentilatorInternal).and_then(|b| b.runtime_min),
        needed_h: plan.evacuation.as_ref().map(|e| (2.0 * f64::from(e.travel_min) + f64::from(MARGIN_MIN)) / 60.0),
        // As the engine's `battery_degraded`: a time measured only by a silence does not say so.
        degraded: learned.is_some_and(|l| !l.by_silence) && health.is_some_and(|h| h * 100.0 < degraded_below_pct),
        last_drill,
        without_consent,
    }
}

/// The counts a meeting reads first, for a municipality or a prefecture.
fn counts(rs: &[&Row], lang: Lang) -> Markup {
    let ja = lang == Lang::Ja;
    let hs: Vec<f64> = rs.iter().filter_map(|r| r.backup_h).collect();
    let worst = hs.iter().copied().fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.min(x))));
    let items = [
        (if ja { "見守っている世帯" } else { "Homes watched" }, rs.len().to_string()),
        (
            if ja { "予備電源（中央値）" } else { "Backup (median)" },
            median(hs.clone()).map(|h| hours(h, lang)).unwrap_or_else(|| "—".into()),
        ),
        (
            if ja { "予備電源（最短）" } else { "Backup (shortest)" },
            worst.map(|h| hours(h, lang)).unwrap_or_else(|| "—".into()),
        ),
        (
            if ja { "移動に足りない世帯" } else { "Short for the journey" },
            rs.iter().filter(|r| r.short()).count().to_string(),
        ),
        (
            if ja { "電池が劣化している世帯" } else { "Degraded batteries" },
            rs.iter().filter(|r| r.degraded).count().to_string(),
        ),
        (
            if ja { "避難先のない世帯" } else { "Without a destination" },
            rs.iter().filter(|r| r.needed_h.is_none()).count().to_string(),
        ),
        (
            if ja { "訓練をした世帯" } else { "Homes with a drill" },
            rs.iter().filter(|r| r.last_drill.is_some()).count().to_string(),
        ),
        (
            if ja { "同意のない連絡先がある世帯" } else { "Homes with a contact without consent" },
            rs.iter().filter(|r| !r.without_consent.is_empty()).count().to_string(),
        ),
    ];
    html! { dl.state { @for (dt, dd) in items { div { dt { (dt) } dd { (dd) } } } } }
}

/// A prefecture's name from its code (JIS X 0401, the first two digits of a municipality code).
pub fn prefecture(code: &str, lang: Lang) -> Option<&'static str> {
    const NAMES: [(&str, &str); 47] = [
        ("北海道", "Hokkaido"),
        ("青森県", "Aomori"),
        ("岩手県", "Iwate"),
        ("宮城県", "Miyagi"),
        ("秋田県", "Akita"),
        ("山形県", "Yamagata"),
        ("福島県", "Fukushima"),
        ("茨城県", "Ibaraki"),
        ("栃木県", "Tochigi"),
        ("群馬県", "Gunma"),
        ("埼玉県", "Saitama"),
        ("千葉県", "Chiba"),
        ("東京都", "Tokyo"),
        ("神奈川県", "Kanagawa"),
        ("新潟県", "Niigata"),
        ("富山県", "Toyama"),
        ("石川県", "Ishikawa"),
        ("福井県", "Fukui"),
        ("山梨県", "Yamanashi"),
        ("長野県", "Nagano"),
        ("岐阜県", "Gifu"),
        ("静岡県", "Shizuoka"),
        ("愛知県", "Aichi"),
        ("三重県", "Mie"),
        ("滋賀県", "Shiga"),
        ("京都府", "Kyoto"),
        ("大阪府", "Osaka"),
        ("兵庫県", "Hyogo"),
        ("奈良県", "Nara"),
        ("和歌山県", "Wakayama"),
        ("鳥取県", "Tottori"),
        ("島根県", "Shimane"),
        ("岡山県", "Okayama"),
        ("広島県", "Hiroshima"),
        ("山口県", "Yamaguchi"),
        ("徳島県", "Tokushima"),
        ("香川県", "Kagawa"),
        ("愛媛県", "Ehime"),
        ("高知県", "Kochi"),
        ("福岡県", "Fukuoka"),
        ("佐賀県", "Saga"),
        ("長崎県", "Nagasaki"),
        ("熊本県", "Kumamoto"),
        ("大分県", "Oita"),
        ("宮崎県", "Miyazaki"),
        ("鹿児島県", "Kagoshima"),
        ("沖縄県", "Okinawa"),
    ];
    let n: usize = code.parse().ok()?;
    let (ja, en) = NAMES.get(n.checked_sub(1)?)?;
    Some(if lang == Lang::Ja { ja } else { en })
}

fn roles_text(roles: &[mamori_protocol::mqtt::Role], lang: Lang) -> String {
    roles.iter().map(|r| crate::domain::message::role_text(*r, lang)).collect::<Vec<_>>().join(if lang == Lang::Ja {
        "、"
    } else {
        ", "
    })
}

fn hours(h: f64, lang: Lang) -> String {
    crate::domain::message::duration((h * 3600.0) as i64, lang)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

async fn rows(app: &App, v: &Viewer) -> Result<Vec<Row>, anyhow::Error> {
    let snap = app.snap();
    let engine: &Engine = &snap.engine;
    let plans: Vec<(Home, Option<crate::domain::forecast::Learned>)> = engine
        .states_and_plans()
        .filter(|(p, _)| super::view::sees(&snap.engine, &v.user, p))
        .map(|(p, st)| (p.clone(), st.and_then(|s| s.battery.clone())))
        .collect();
    let below = engine.settings().battery_degraded_below_pct;
    let ids: Vec<_> = plans.iter().map(|(p, _)| p.id.clone()).collect();
    let history: BTreeMap<String, Vec<Alert>> = app
        .db(move |s| {
            let mut out = BTreeMap::new();
            for id in ids {
                let drills: Vec<Alert> =
                    s.alerts_for(&id, 200)?.into_iter().filter(|a| a.kind == AlertKind::Drill).collect();
                out.insert(id.as_str().to_string(), drills);
            }
            Ok(out)
        })
        .await?;
    let mut out: Vec<Row> = plans
        .iter()
        .map(|(p, l)| {
            let drills = history.get(p.id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            row(p, l.as_ref(), below, drills, engine.today(crate::edge::clock::now()))
        })
        .collect();
    out.sort_by(|a, b| a.municipality_code.cmp(&b.municipality_code).then(a.label.cmp(&b.label)));
    Ok(out)
}

fn may(v: &Viewer) -> bool {
    matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator)
}

/// `GET /readiness`.
pub async fn page(State(app): State<App>, v: Viewer, client: Client) -> Response {
    if !may(&v) {
        return not_found(v.lang);
    }
    let rows = match rows(&app, &v).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    app.audit_view(&v, &client.text(), "view_readiness", "readiness", &format!("{} homes", rows.len())).await;
    let (lang, offset) = (v.lang, app.style.offset);
    let ja = lang == Lang::Ja;
    let t = T(lang);
    let title = if ja { "備えの状況" } else { "Readiness" };
    let intro = if ja {
        format!("移動時間の往復に{MARGIN_MIN}分を加えた時間を、予備電源で支えられるかを見ています。電池の時間は、これまでの停電で測れた世帯はその実測から、ほかはケア計画から計算しています。")
    } else {
        format!("Whether each home's backup covers the journey there and back plus {MARGIN_MIN} minutes. Battery time is from what earlier outages measured where they did, otherwise from the care plan.")
    };
    // By code (two towns may share a name); headed by the name a care plan gives.
    let mut by_muni: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        by_muni.entry(r.municipality_code.as_str()).or_default().push(r);
    }
    // Each prefecture in scope first (the first two digits of a municipality code).
    let mut by_pref: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        by_pref.entry(r.municipality_code.get(..2).unwrap_or("")).or_default().push(r);
    }
    let body = html! {
        h1 { (title) }
        p { (intro) " " a href="/readiness.csv" { "CSV" } }
        @for (code, rs) in &by_pref {
            section.prefecture {
                h2 { (prefecture(code, lang).map_or_else(|| code.to_string(), str::to_string)) }
                (counts(rs, lang))
            }
        }
        @for (code, rs) in &by_muni {
            section {
                h2 { (rs.iter().map(|r| r.municipality.as_str()).find(|n| n != code).unwrap_or(*code)) }
                (counts(rs, lang))
                table.readiness {
                    thead {
                        tr {
                            th { (t.t("home")) }
                            th { (if ja { "予備電源" } else { "Backup" }) }
                            th { (if ja { "必要な時間" } else { "Needed" }) }
                            th { (if ja { "電池" } else { "Battery" }) }
                            th { (if ja { "最後の訓練" } else { "Last drill" }) }
                            th { (if ja { "同意のない連絡先" } else { "Without consent" }) }
                        }
                    }
                    tbody { @for r in rs { (readiness_row(r, lang, offset)) } }
                }
            }
        }
    };
    layout(&v, title, body).into_response()
}

/// A home's row of the readiness table.
fn readiness_row(r: &Row, lang: Lang, offset: chrono::FixedOffset) -> Markup {
    let ja = lang == Lang::Ja;
    let backup = match (r.backup_h, r.measured) {
        (Some(h), true) => format!("{}{}", hours(h, lang), if ja { "（実測）" } else { " (measured)" }),
        (Some(h), false) => format!("{}{}", hours(h, lang), if ja { "（計画）" } else { " (care plan)" }),
        (None, _) => (if ja { "ケア計画に電池の量がありません" } else { "no energy in the care plan" }).to_string(),
    };
    let needed = r
        .needed_h
        .map(|h| hours(h, lang))
        .unwrap_or_else(|| (if ja { "避難先がありません" } else { "no destination" }).to_string());
    let drill = match (r.last_drill, ja) {
        (Some((at, true)), true) => format!("{}（全員が確認）", local(at, offset)),
        (Some((at, true)), false) => format!("{} (all acknowledged)", local(at, offset)),
        (Some((at, false)), true) => format!("{}（未確認の人あり）", local(at, offset)),
        (Some((at, false)), false) => format!("{} (not all acknowledged)", local(at, offset)),
        (None, true) => "まだ".into(),
        (None, false) => "none yet".into(),
    };
    html! {
        tr class=(if r.short() { "leave-overdue" } else { "" }) {
            td { (r.label) }
            td {
                (backup)
                @if let Some(m) = r.internal_min {
                    br;
                    small { (if ja { "＋呼吸器の内蔵電池 " } else { "+ the ventilator's own " }) (hours(m / 60.0, lang)) }
                }
            }
            td { (needed) }
            td { @if r.degraded { span."pill"."bad" { (if ja { "劣化" } else { "degraded" }) } } }
            td { (drill) }
            td { (roles_text(&r.without_consent, lang)) }
        }
    }
}

/// `GET /readiness.csv`: the same rows, in the reader's language.
pub async fn csv(State(app): State<App>, v: Viewer, client: Client) -> Response {
    if !may(&v) {
        return not_found(v.lang);
    }
    let rows = match rows(&app, &v).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    app.audit(&v.user.username, &client.text(), "export_readiness", "readiness", &format!("{} homes", rows.len()))
        .await;
    let ja = v.lang == Lang::Ja;
    let header: [&str; 10] = if ja {
        [
            "市町村",
            "世帯",
            "予備電源（時間）",
            "実測",
            "呼吸器の内蔵電池（分）",
            "必要な時間（時間）",
            "移動に足りない",
            "電池の劣化",
            "最後の訓練",
            "同意のない連絡先",
        ]
    } else {
        [
            "Municipality",
            "Home",
            "Backup (h)",
            "Measured",
            "Ventilator's own battery (min)",
            "Needed (h)",
            "Short",
            "Degraded",
            "Last drill",
            "Without consent",
        ]
    };
    let yes_no = |b: bool| {
        if b {
            if ja {
                "はい"
            } else {
                "yes"
            }
        } else if ja {
            "いいえ"
        } else {
            "no"
        }
    };
    let mut out = String::from("\u{feff}");
    out.push_str(&crate::admin::audit::csv_row(header));
    for r in &rows {
        let cells = [
            r.municipality.clone(),
            r.label.clone(),
            r.backup_h.map(|h| format!("{h:.1}")).unwrap_or_default(),
            yes_no(r.measured).to_string(),
            r.internal_min.map(|m| format!("{m:.0}")).unwrap_or_default(),
            r.needed_h.map(|h| format!("{h:.1}")).unwrap_or_default(),
            yes_no(r.short()).to_string(),
            yes_no(r.degraded).to_string(),
            r.last_drill.map(|(at, _)| local(at, app.style.offset)).unwrap_or_default(),
            roles_text(&r.without_consent, v.lang),
        ];
        out.push_str(&crate::admin::audit::csv_row(cells.iter().map(String::as_str)));
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"mamori-readiness.csv\""),
        ],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefecture_is_named_from_the_first_two_digits() {
        assert_eq!(prefecture("43", Lang::Ja), Some("熊本県"));
        assert_eq!(prefecture("13", Lang::En), Some("Tokyo"));
        assert_eq!(prefecture("01", Lang::Ja), Some("北海道"));
        assert_eq!(prefecture("47", Lang::Ja), Some("沖縄県"));
        for bad in ["00", "48", "", "x1"] {
            assert_eq!(prefecture(bad, Lang::Ja), None, "{bad}");
        }
    }

    fn plan(text: &str) -> Home {
        let toml = format!(
            "[[home]]\nid = \"h-1\"\nmunicipality = \"431001\"\nmunicipality_name = \"熊本市\"\nlabel = \"H-1\"\n{text}\n\
             contacts = [{{ role = \"family\", name = \"母\", channels = [{{ console = \"f\" }}] }}]\n"
        );
        crate::domain::homes::HomesFile::parse(&toml, std::path::Path::new("h.toml"), &Default::default())
            .unwrap()
            .homes
            .remove(0)
    }

    #[test]
    fn a_backup_that_cannot_cover_the_journey_is_short_and_a_measured_battery_counts() {
        // 100 W, 300 Wh: 3 h; 60 min away: 2 h there and back + 1 h margin = 3 h. Covered, just.
        let p = plan(
            "devices = [{ name = \"ventilator\", watts = 100 }]\nbackup = [{ kind = \"ups\", usable_wh = 300 }]\n\
             evacuation = { destination = \"病院\", travel_min = 60 }",
        );
        let r = row(&p, None, 70.0, &[], chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap());
        assert_eq!((r.backup_h, r.needed_h, r.short(), r.measured), (Some(3.0), Some(3.0), false, false));
        // Earlier outages measured the battery at half its plan: 1.5 h, short and degraded.
        let learned = crate::domain::forecast::Learned {
            source: BackupKind::Ups,
            plan_wh: 300.0,
            health: 0.5,
            optimism: None,
            evidence_pct: 100.0,
            discharges: 2,
            updated_at: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
            by_silence: false,
        };
        let r = row(&p, Some(&learned), 70.0, &[], chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap());
        assert_eq!((r.backup_h, r.short(), r.degraded, r.measured), (Some(1.5), true, true, true));
        // The ventilator's own battery counts toward the journey.
        let p = plan(
            "devices = [{ name = \"ventilator\", watts = 100 }]\nbackup = [{ kind = \"ups\", usable_wh = 150 }, { kind = \"ventilator_internal\", runtime_min = 120 }]\n\
             evacuation = { destination = \"病院\", travel_min = 30 }",
        );
        let r = row(&p, None, 70.0, &[], chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap());
        assert!(!r.short(), "1.5 h + 2 h against 2 h: {r:?}");
        // No destination: not short for a journey, but counted as without one.
        let p =
            plan("devices = [{ name = \"ventilator\", watts = 100 }]\nbackup = [{ kind = \"ups\", usable_wh = 150 }]");
        let r = row(&p, None, 70.0, &[], chrono::NaiveDate::from_ymd_opt(2026, 11, 30).unwrap());
        assert_eq!((r.needed_h, r.short()), (None, false));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }
}
