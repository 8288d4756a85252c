//! The overview (`GET /`: every home the user may see, worst first) and the cells a home's row
//! shows on it and on the other pages (time left, power, connection, devices, readings).
//!
//! The dashboard as a whole: server-rendered pages in Japanese (default) or English, usable on
//! a phone and without JavaScript.
//!
//! With JavaScript, `/static/app.js` listens to `/events` (server-sent events) and, when one
//! of the user's homes changes, fetches the same page again and swaps its `<main>` (unless
//! the user is typing in a form there). It also refreshes once a minute, because time left
//! changes with time alone. Without JavaScript the pages are complete; they are only not
//! live. The stream is scoped like the pages: it says nothing about homes the user cannot see.
//!
//! Nothing is loaded from anywhere but the gateway (CSS, JS and charts are served or inline
//! SVG; the CSP header forbids anything else), so the dashboard works on a network cut off
//! from the internet, as in a disaster.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::FixedOffset;
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::Viewer;
use super::html::*;
use super::layout::layout;
use super::view::{self, HomeView};
use super::{App, Client};
use crate::admin::accounts::AccountRole;
use crate::domain::engine::{Engine, Time};
use crate::domain::homes::Lang;
use crate::domain::message::{basis, kind_text};

pub(super) fn time_left_text(h: &HomeView, t: T) -> Markup {
    html! {
        @if let Some(s) = h.time_left_s {
            strong { (crate::domain::message::time_left_text(s, h.time_left_range_s, t.0)) }
            @if h.on_last_battery { " " span.bad { "(" (t.t("last_battery")) ")" } }
            br;
            small { (basis(h.basis.unwrap_or(""), t.0)) }
            @if h.forecast_verified == Some(false) {
                br;
                small.muted { (crate::domain::message::unverified(t.0)) }
            }
        } @else {
            "—"
        }
    }
}

/// When the child must leave, in words, and its row's urgency class: past it, within 30
/// minutes, within 3 hours, later. Without a destination (`leave`: false) there is no time to
/// leave by, only the time the power runs out.
pub(super) fn leave_text(
    leave_in_s: Option<i64>,
    leave: bool,
    now: Time,
    offset: FixedOffset,
    lang: Lang,
) -> (String, &'static str) {
    let Some(s) = leave_in_s else { return (String::new(), "") };
    let at = clock(now + chrono::Duration::seconds(s), now, offset);
    let ja = lang == Lang::Ja;
    if s <= 0 {
        let text = match (leave, ja) {
            (true, true) => format!("出発の目安を過ぎています（{at}）"),
            (true, false) => format!("Past the time to leave ({at})"),
            (false, true) => format!("電源が尽きる目安を過ぎています（{at}）"),
            (false, false) => format!("Past the time the power runs out ({at})"),
        };
        return (text, "leave-overdue");
    }
    let left = crate::domain::message::duration(s, lang);
    let text = match (leave, ja) {
        (true, true) => format!("出発の目安 {at}（あと{left}）"),
        (true, false) => format!("Leave by {at} (in {left})"),
        (false, true) => format!("避難先なし・電源が尽きる目安 {at}（あと{left}）"),
        (false, false) => format!("No destination; the power runs out by {at} (in {left})"),
    };
    let cls = if s < 30 * 60 {
        "leave-soon"
    } else if s < 3 * 3600 {
        "leave-hours"
    } else {
        ""
    };
    (text, cls)
}

pub(super) fn power_cell(h: &HomeView, t: T) -> Markup {
    let cls = match h.power {
        "battery" => "bad",
        "mains" => "ok",
        _ => "muted",
    };
    html! { span class={ "pill " (cls) } { (t.t(h.power)) } }
}

pub(super) fn conn_cell(h: &HomeView, t: T, offset: FixedOffset) -> Markup {
    let cls = match h.connectivity {
        "silent" => "bad",
        "online" => "ok",
        _ => "muted",
    };
    let heard = h.last_heard.map(|l| local_s(l, offset)).unwrap_or_else(|| "—".into());
    html! { span class={ "pill " (cls) } { (t.t(h.connectivity)) } br; small { (heard) } }
}

/// A device for people: its kind in words (its id, the installer's name for it, on hover).
fn device_text(h: &HomeView, id: &str, lang: Lang) -> Markup {
    use mamori_protocol::mqtt::DeviceKind as K;
    let words = match (h.device_kinds.get(id), lang) {
        (Some(K::Ups), _) => "UPS",
        (Some(K::Oximeter), Lang::Ja) => "パルスオキシメータ",
        (Some(K::Oximeter), Lang::En) => "pulse oximeter",
        (Some(K::Bridge), Lang::Ja) => "センサー基板",
        (Some(K::Bridge), Lang::En) => "sensor bridge",
        (Some(K::PowerMonitor), Lang::Ja) => "電源モニター",
        (Some(K::PowerMonitor), Lang::En) => "power monitor",
        (Some(K::Contacts), Lang::Ja) => "接点入力",
        (Some(K::Contacts), Lang::En) => "contacts",
        (None, _) => return html! { code { (id) } },
    };
    html! { span title=(id) { (words) } }
}

pub(super) fn devices_cell(h: &HomeView, t: T) -> Markup {
    html! {
        @for d in &h.devices {
            @if h.devices_lost.contains(d) {
                span."pill"."bad" { (device_text(h, d, t.0)) " " (t.t("lost")) } " "
            } @else {
                span.pill { (device_text(h, d, t.0)) } " "
            }
        }
        @if h.devices.is_empty() { "—" }
    }
}

/// Readings of a silent home are its last known ones, not the present: said so, with their age.
fn stale_note(h: &HomeView, now: Time, lang: Lang) -> Markup {
    let Some(heard) = h.last_heard.filter(|_| h.silent) else { return html! {} };
    let min = (now - heard).num_minutes().max(0);
    let text = match lang {
        Lang::Ja => format!("最後に届いた値（{min}分前）"),
        Lang::En => format!("last known ({min} min ago)"),
    };
    html! { br; small.stale { (text) } }
}

pub(super) fn oxi_cell(h: &HomeView, now: Time, lang: Lang) -> Markup {
    match (h.spo2_pct, h.pulse_bpm) {
        (None, None) => html! { "—" },
        (s, p) => {
            let (s, p) =
                (s.map_or_else(|| "—".into(), |v| format!("{v}%")), p.map_or_else(|| "—".into(), |v| v.to_string()));
            let text = match lang {
                Lang::Ja => format!("SpO2 {s}・脈拍 {p}/分"),
                Lang::En => format!("SpO2 {s} · pulse {p}/min"),
            };
            html! { (text) (stale_note(h, now, lang)) }
        }
    }
}

/// A home's opaque id, shown to administrators (installers match it to the home unit); the
/// others know a home by its label.
pub(super) fn id_for_installer(v: &Viewer, id: &str) -> Markup {
    html! {
        @if v.user.role == AccountRole::Admin { " " small { code { (id) } } }
    }
}

/// Minutes, in words.
pub(super) fn minutes(m: u32, lang: Lang) -> String {
    match lang {
        Lang::Ja => format!("移動{m}分"),
        Lang::En => format!("{m} min"),
    }
}

/// An account's role, in words.
pub(super) fn account_role_text(role: AccountRole, lang: Lang) -> &'static str {
    match (role, lang) {
        (AccountRole::Admin, Lang::Ja) => "管理者",
        (AccountRole::Admin, Lang::En) => "administrator",
        (AccountRole::Coordinator, Lang::Ja) => "コーディネーター",
        (AccountRole::Coordinator, Lang::En) => "coordinator",
        (AccountRole::Facility, Lang::Ja) => "受け入れ先",
        (AccountRole::Facility, Lang::En) => "facility",
        (AccountRole::Family, Lang::Ja) => "ご家族",
        (AccountRole::Family, Lang::En) => "family",
    }
}

/// A channel in a delivery history: its kind in words, its address as a code to copy.
pub(super) fn channel_cell(ch: &crate::domain::homes::ChannelRef, lang: Lang) -> Markup {
    use crate::domain::homes::ChannelRef as C;
    let kind = channel_text(crate::domain::stats::channel_of(&ch.destination()), lang);
    let target = match ch {
        C::Webhook(x) | C::Email(x) | C::Sms(x) | C::Line(x) | C::Voice(x) | C::Console(x) => x,
    };
    html! { (kind) " " code { (target) } }
}

pub(super) fn vent_cell(h: &HomeView, now: Time, t: T) -> Markup {
    // A silent home's "normal" is not known to be normal now: no reassuring green.
    let ok = if h.silent { "pill stale" } else { "pill ok" };
    html! {
        @match h.ventilator {
            Some("normal") => { span class=(ok) { (t.t("normal")) } (stale_note(h, now, t.0)) },
            Some(k @ ("alarm" | "cable_fault")) => {
                span."pill"."bad" { (t.t(if k == "alarm" { "alarm" } else { "cable_fault" })) }
                (stale_note(h, now, t.0))
            },
            _ => "—",
        }
    }
}

fn incidents_html(engine: &Engine, v: &Viewer, now: Time, offset: FixedOffset) -> Markup {
    let t = T(v.lang);
    html! {
        @for i in view::incidents(engine, &v.user, now) {
            @let battery = i.rows.iter().filter(|r| r.on_battery).count();
            @let silent = i.rows.iter().filter(|r| r.silent).count();
            section.incident {
                h2 {
                    a href={ "/incidents/" (i.id) } {
                        (t.t("incident")) " " (i.municipality_name.as_deref().unwrap_or(&i.municipality))
                    }
                }
                p {
                    (t.t("since")) " " (local(i.opened_at, offset)) " · " (battery) "/" (i.rows.len()) " " (t.t("battery"))
                    " · " (silent) " " (t.t("silent"))
                }
            }
        }
    }
}

/// The overview's query: `answered` (a home id) and `told` after a facility's answer.
#[derive(Deserialize, Default)]
pub struct OverviewQuery {
    answered: Option<String>,
    told: Option<String>,
}

/// `GET /`: every home the user may see, grouped by municipality, worst first (a family goes
/// to its home's page, a facility sees the children who may come to it).
pub async fn overview(State(app): State<App>, v: Viewer, client: Client, Query(q): Query<OverviewQuery>) -> Response {
    // A family has one home: its page is the family's start (see `family.rs`).
    if v.user.role == AccountRole::Family {
        if let [home] = v.user.homes.as_slice() {
            return Redirect::to(&format!("/homes/{}", super::auth::urlencode(home))).into_response();
        }
    }
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let offset = app.style.offset;
    let homes = view::homes(&snap.engine, &v.user, now);
    app.audit_view(&v, &client.text(), "view_overview", "homes", &format!("{} homes", homes.len())).await;
    let withheld = view::withheld(&snap.engine, &v.user);
    let withheld = html! {
        @if withheld > 0 { p.notice { (t.t("withheld").replace("{n}", &withheld.to_string())) } }
    };
    if v.user.role == AccountRole::Facility {
        let told = q.told.as_deref().and_then(super::Told::from_query);
        let answered = q.answered.as_deref().zip(told);
        return super::facility::page(&snap.engine, &v, &homes, now, offset, answered, &withheld);
    }
    let mut groups: BTreeMap<String, Vec<&HomeView>> = BTreeMap::new();
    let mut order = Vec::new();
    for h in &homes {
        let m = h.municipality_name.clone().unwrap_or_else(|| h.municipality.clone());
        if !groups.contains_key(&m) {
            order.push(m.clone());
        }
        groups.entry(m).or_default().push(h);
    }
    let body = html! {
        (incidents_html(&snap.engine, &v, now, offset))
        @if homes.is_empty() { p { (t.t("no_homes")) } }
        (withheld)
        @if matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator) {
            p.noprint { a href="/plans/new" { (t.t("add_home")) } }
        }
        @for m in &order {
            section {
                h2 { (m) }
                table.homes {
                    thead {
                        tr {
                            th { (t.t("home")) } th { (t.t("power")) } th { (t.t("time_left")) }
                            th { (t.t("last_heard")) } th { (t.t("devices")) } th { (t.t("oximeter")) }
                            th { (t.t("ventilator")) } th { (t.t("alerts")) }
                        }
                    }
                    tbody {
                        @for h in &groups[m] { (home_row(&v, h, now, offset)) }
                    }
                }
            }
        }
    };
    layout(&v, t.t("overview"), body).into_response()
}

/// A home's row on the overview.
fn home_row(v: &Viewer, h: &HomeView, now: Time, offset: FixedOffset) -> Markup {
    let t = T(v.lang);
    let (leave, leave_cls) = if h.power == "battery" {
        leave_text(h.leave_by.map(|l| (l - now).num_seconds()), true, now, offset, v.lang)
    } else {
        (String::new(), "")
    };
    let urgent = h.power == "battery" || h.silent;
    html! {
        tr class=[urgent.then(|| format!("urgent {leave_cls}"))] data-home=(h.id) {
            td data-label=(t.t("home")) {
                a href={ "/homes/" (h.id) } { (h.label) }
                (id_for_installer(v, &h.id))
                @if let Some(k) = view::handler(h) {
                    br;
                    small.handler { (t.t("handling")) ": " (k.by) }
                }
            }
            td data-label=(t.t("power")) { (power_cell(h, t)) }
            td data-label=(t.t("time_left")) {
                (time_left_text(h, t))
                @if !leave.is_empty() { br; small.leave { (leave) } }
            }
            td data-label=(t.t("last_heard")) { (conn_cell(h, t, offset)) }
            td data-label=(t.t("devices")) { (devices_cell(h, t)) }
            td data-label=(t.t("oximeter")) { (oxi_cell(h, now, v.lang)) }
            td data-label=(t.t("ventilator")) { (vent_cell(h, now, t)) }
            td data-label=(t.t("alerts")) {
                @for (k, a) in h.alerts.iter().enumerate() {
                    @if k > 0 { " " }
                    span class={ "pill sev-" (format!("{:?}", a.severity)) } {
                        (kind_text(a.kind, v.lang)) @if a.acknowledged.is_some() { " ✓" }
                    }
                }
            }
        }
    }
}

/// A channel's name for people.
pub(super) fn channel_text(channel: &str, lang: Lang) -> &'static str {
    match (channel, lang) {
        ("webhook", _) => "Webhook",
        ("sms", Lang::Ja) => "ショートメッセージ",
        ("sms", Lang::En) => "SMS",
        ("email", Lang::Ja) => "メール",
        ("email", Lang::En) => "E-mail",
        ("line", _) => "LINE",
        ("voice", Lang::Ja) => "電話",
        ("voice", Lang::En) => "Phone call",
        ("console", Lang::Ja) => "コンソール",
        ("console", Lang::En) => "Console",
        (_, Lang::Ja) => "その他",
        (_, Lang::En) => "Other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::contacts::contacts_html;
    use crate::web::home::chart;

    #[test]
    fn contacts_are_listed_with_their_numbers_to_tap_and_call() {
        let plan: crate::domain::homes::Home = serde_json::from_value(serde_json::json!({
            "id": "h1", "municipality": "431001", "label": "K-01", "devices": [], "backup": [],
            "contacts": [
                { "role": "family", "name": "母", "channels": [{ "sms": "090-1234-5678" }],
                  "then": [{ "after_min": 5, "channels": [{ "voice": "+819012345678" }] }] },
                { "role": "coordinator", "name": "佐藤", "channels": [{ "email": "sato@example.lg.jp" }] }
            ]
        }))
        .unwrap();
        let engine =
            Engine::new(crate::domain::engine::Settings::default(), crate::domain::policy::Policies::default());
        let html = contacts_html(&plan, T(Lang::Ja), &engine).into_string();
        assert!(html.contains("母（ご家族）"), "{html}");
        assert!(html.contains("<a href=\"tel:09012345678\">090-1234-5678</a>"), "{html}");
        assert!(html.contains("<a href=\"tel:+819012345678\">"), "the later channel's number too: {html}");
        assert!(html.contains("佐藤") && html.contains("電話番号の登録なし"), "{html}");
        let en = contacts_html(&plan, T(Lang::En), &engine).into_string();
        assert!(
            en.contains("(coordinator)") || en.contains("(the coordinator)") || en.contains("(Coordinator)"),
            "{en}"
        );
    }

    #[test]
    fn a_chart_scales_into_its_box_and_says_when_there_is_no_data() {
        let from = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let to = from + chrono::Duration::hours(24);
        let s = vec![(from, 50.0), (from + chrono::Duration::hours(12), 100.0), (to, 0.0)];
        let jst = FixedOffset::east_opt(9 * 3600).unwrap();
        let svg = chart("c", &[("c", s)], from, to, jst, "none").into_string();
        assert!(svg.contains(">23:13</text>") && svg.contains(">05:13</text>"), "{svg}");
        assert!(svg.contains("points=\"36.0,61.0 316.0,4.0 596.0,118.0\""), "{svg}");
        let late = vec![(to - chrono::Duration::minutes(10), 1.0), (to, 2.0)];
        let svg = chart("c", &[("c", late)], from, to, jst, "none").into_string();
        assert!(svg.contains("points=\"36.0,118.0 596.0,4.0\""), "a short history fills the width: {svg}");
        assert!(chart("c", &[("c", vec![])], from, to, jst, "none").into_string().contains("none"));
    }
}
