//! A home's page for coordinators, facilities and administrators: live state, who is
//! handling it, the care plan's contacts with tap-to-call links and their consent, 24-hour
//! charts (inline SVG), alerts with acknowledge and clear, every notification's delivery, the
//! event timeline, and drills. (A family's own page is `family.rs`.) Split from `pages.rs`
//! (issue 20: pages by resource).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use mamori_protocol::mqtt::Telemetry;
use maud::{html, Markup};
use serde::Deserialize;

use super::alerts::alert_row;
use super::auth::Viewer;
use super::contacts::contacts_html;
use super::html::*;
use super::layout::layout;
use super::pages::*;
use super::view;
use super::{App, Client};
use crate::admin::accounts::AccountRole;
use crate::domain::engine::Time;
use crate::domain::homes::Lang;
use crate::domain::message::{kind_text, role_text};
use crate::edge::store::OutboxRow;

/// An inline SVG line chart of one or two series up to `to`, over at most `[from, to]`:
/// it starts at the first point when the history is shorter, so a young history is not a
/// sliver at the right edge. Time ticks are local clock times.
pub fn chart(
    title: &str,
    series: &[(&str, Vec<(Time, f64)>)],
    from: Time,
    to: Time,
    offset: FixedOffset,
    empty: &str,
) -> Markup {
    let first = series.iter().filter_map(|(_, s)| s.first().map(|(t, _)| *t)).min();
    let from = first.map_or(from, |f| f.max(from).min(to - chrono::Duration::minutes(1)));
    let (w, h, pad_l, pad_b) = (600.0, 140.0, 36.0, 18.0);
    let values: Vec<f64> = series.iter().flat_map(|(_, s)| s.iter().map(|(_, v)| *v)).collect();
    if values.is_empty() {
        return html! { figure.chart { figcaption { (title) } p.muted { (empty) } } };
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if (hi - lo).abs() < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo, hi) };
    let span = (to - from).num_seconds().max(1) as f64;
    let x = |t: Time| pad_l + (w - pad_l - 4.0) * ((t - from).num_seconds() as f64 / span).clamp(0.0, 1.0);
    let y = |v: f64| 4.0 + (h - pad_b - 8.0) * (1.0 - (v - lo) / (hi - lo));
    let b = h - pad_b;
    let ticks = (0..=4).map(|k| {
        let tx = pad_l + (w - pad_l - 4.0) * f64::from(k) / 4.0;
        let at = from + chrono::Duration::seconds((span * f64::from(k) / 4.0) as i64);
        let label = at.with_timezone(&offset).format("%H:%M").to_string();
        let anchor = match k {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        (format!("{tx:.0}"), anchor, label)
    });
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox={ "0 0 " (w) " " (h) } role="img" aria-label=(title) preserveAspectRatio="none" {
                line x1=(pad_l) y1=(b) x2=(w) y2=(b) class="axis" {}
                text x="2" y="12" class="tick" { (tick(hi, hi - lo)) }
                text x="2" y=(b) class="tick" { (tick(lo, hi - lo)) }
                @for (tx, anchor, label) in ticks {
                    text x=(tx) y=(h - 4.0) class="tick" text-anchor=(anchor) { (label) }
                }
                @for (i, (_, s)) in series.iter().enumerate() {
                    @let pts: Vec<String> = s.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
                    polyline class={ "s" (i) } points=(pts.join(" ")) {}
                }
            }
            @if series.len() > 1 {
                p.legend {
                    @for (i, (name, _)) in series.iter().enumerate() {
                        span class={ "k" (i) } { "■ " (name) } " "
                    }
                }
            }
        }
    }
}

/// An axis value: whole numbers unless the range is narrow.
fn tick(v: f64, range: f64) -> String {
    if range < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

struct HomeHistory {
    telemetry: Vec<Telemetry>,
    events: Vec<mamori_protocol::mqtt::Event>,
    alerts: Vec<crate::domain::engine::Alert>,
    outbox: BTreeMap<String, Vec<OutboxRow>>,
}

/// `GET /homes/{id}`.
pub async fn home(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Query(q): Query<HomeQuery>,
) -> Response {
    let t = T(v.lang);
    let snap = app.snap();
    let now = crate::edge::clock::now();
    let offset = app.style.offset;
    let Some(plan) = view::home(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    app.audit_view(&v, &client.text(), "view_home", &id, "").await;
    let h = view::home_view(plan, snap.engine.home_state(&plan.id), now);
    if v.user.role == AccountRole::Family {
        let told = q.told.as_deref().and_then(super::Told::from_query);
        return super::family::page(&app, &v, plan, h, now, told).await;
    }
    let home_id = plan.id.clone();
    let since = now - chrono::Duration::hours(24);
    let history = app
        .db(move |s| {
            let alerts = s.alerts_for(&home_id, 50)?;
            let mut outbox = BTreeMap::new();
            for a in &alerts {
                outbox.insert(a.id.clone(), crate::edge::store::Store::outbox_for(s, &a.id)?);
            }
            Ok(HomeHistory {
                telemetry: s.telemetry_since(&home_id, since, 400)?,
                events: s.events_for(&home_id, 100)?,
                alerts,
                outbox,
            })
        })
        .await;
    let history = match history {
        Ok(h) => h,
        Err(e) => return failed(e),
    };
    let back = format!("/homes/{}", h.id);
    // Only a number: the query is anyone's to write.
    let saved = q.saved.and_then(|n| n.parse::<u32>().ok());
    // What earlier outages showed of the battery.
    let battery = h.batteries.first().map(|b| {
        let cls = if b.health_pct < 70.0 { "bad" } else { "ok" };
        let (used, plan_wh) = (format!("{:.0}", b.health_pct / 100.0 * b.plan_wh), format!("{:.0}", b.plan_wh));
        let (pct, at) = (format!("{:.0}", b.health_pct), local(b.measured_at, offset));
        match t.0 {
            Lang::En => html! {
                span class=(cls) { (pct) " % of the care plan" }
                " (" (used) " Wh of " (plan_wh) " Wh; measured in " (b.discharges) " outage(s), last " (at) ")"
            },
            Lang::Ja => html! {
                span class=(cls) { "計画の" (pct) "%" }
                "（約" (used) "Wh／計画" (plan_wh) "Wh、" (b.discharges) "回の停電で測定、最終" (at) "）"
            },
        }
    });
    let charts = charts(&history.telemetry, &snap.engine, plan, &h, since, now, offset, t);
    let body = html! {
        @if let Some(n) = saved {
            p.notice role="status" { (t.t("plan_saved").replace("{n}", &n.to_string())) }
        }
        h1 { (h.label) (id_for_installer(&v, &h.id)) }
        dl.state {
            div { dt { (t.t("power")) } dd { (power_cell(&h, t)) } }
            div { dt { (t.t("time_left")) } dd { (time_left_text(&h, t)) } }
            div { dt { (t.t("last_heard")) } dd { (conn_cell(&h, t, offset)) } }
            div { dt { (t.t("devices")) } dd { (devices_cell(&h, t)) } }
            div { dt { (t.t("oximeter")) } dd { (oxi_cell(&h, now, v.lang)) } }
            div { dt { (t.t("ventilator")) } dd { (vent_cell(&h, now, t)) } }
            @if let Some((d, m)) = &h.evacuation {
                div { dt { (t.t("destination")) } dd { (d) "（" (minutes(*m, v.lang)) "）" } }
            }
        }
        @if v.user.may_edit_plan(&plan.municipality) {
            p.noprint { a href={ "/homes/" (plan.id) "/plan" } { (t.t("edit_plan")) } }
        }
        @if let Some(text) = battery {
            dl.state { div { dt { (t.t("battery_measured")) } dd { (text) } } }
        }
        // Who is handling it, and taking it on (a coordinator; the latest holds: handing over
        // is the other coordinator taking it).
        @if let Some(k) = view::handler(&h) {
            p.handler { (t.t("handling")) ": " (k.by) " " small { (local(k.at, offset)) } }
        }
        @if v.user.role == AccountRole::Coordinator && super::view::main_alert(&h).is_some() {
            form method="post" action={ "/homes/" (plan.id) "/answer" } class="inline" {
                (v.csrf_field())
                button type="submit" name="answer" value="handling" class="secondary" {
                    (crate::domain::engine::Answer::Handling.text(v.lang))
                }
            }
        }
        // Who to call: each contact with their phone numbers as links a phone dials (tap to call).
        (contacts_html(plan, t, &snap.engine))
        // Active alerts.
        h2 { (t.t("alerts")) }
        @if h.alerts.is_empty() {
            p { (t.t("no_alerts")) }
        } @else {
            table.alerts { tbody { @for a in &h.alerts { (alert_row(&v, None, None, a, &back, offset)) } } }
        }
        h2 { (t.t("charts")) }
        div.charts { (charts) }
        // Alert history with deliveries.
        h2 { (t.t("all_alerts")) }
        @for a in &history.alerts {
            (alert_history(a, history.outbox.get(&a.id).map(Vec::as_slice).unwrap_or(&[]), v.lang, offset))
        }
        h2 { (t.t("events")) }
        ol.timeline {
            @for e in &history.events {
                li {
                    time { (local_s(e.ts.with_timezone(&chrono::Utc), offset)) }
                    " "
                    span class={ "pill sev-" (format!("{:?}", e.severity)) } { (kind_text(e.kind.into(), v.lang)) }
                    @if let Some(s) = &e.source { " " small { (s) } }
                }
            }
        }
        @if v.user.may_drill() {
            h2 { (t.t("drill")) }
            p { (t.t("drill_intro")) }
            form method="post" action={ "/homes/" (plan.id) "/drill" } {
                (v.csrf_field())
                button type="submit" { (t.t("drill_start")) }
            }
        }
    };
    layout(&v, &h.label, body).into_response()
}

/// The charts of the last 24 hours: the battery, the time left through this outage, SpO2 and
/// pulse.
#[allow(clippy::too_many_arguments)]
fn charts(
    telemetry: &[Telemetry],
    engine: &crate::domain::engine::Engine,
    plan: &crate::domain::homes::Home,
    h: &view::HomeView,
    since: Time,
    now: Time,
    offset: FixedOffset,
    t: T,
) -> Markup {
    let series = |f: &dyn Fn(&Telemetry) -> Option<f64>| -> Vec<(Time, f64)> {
        telemetry.iter().filter_map(|x| f(x).map(|v| (x.ts.with_timezone(&chrono::Utc), v))).collect()
    };
    // The battery: its charge when the UPS reports one, else its voltage.
    let charge = series(&|x| x.ups.as_ref().and_then(|u| u.battery_charge_pct));
    let (title, battery) = if charge.is_empty() {
        let volts = series(&|x| {
            x.ups
                .as_ref()
                .and_then(|u| u.battery_voltage_v)
                .or_else(|| x.power_meter.as_ref().and_then(|m| m.battery_voltage_v))
        });
        (t.t("battery_v"), volts)
    } else {
        (t.t("charge"), charge)
    };
    // Time left through this outage: the forecast's band recomputed at each snapshot from
    // the history (which keeps the charted readings), with what is known of the battery now.
    let learned = engine.home_state(&plan.id).and_then(|s| s.battery.clone());
    let mut band: [Vec<(Time, f64)>; 3] = Default::default();
    if let Some(outage) = h.on_battery_since {
        let mut d = crate::domain::forecast::Discharge::start(outage);
        for x in telemetry {
            let at = x.ts.with_timezone(&chrono::Utc);
            if at < outage {
                continue;
            }
            d.push(
                crate::domain::forecast::Sample::of(at, x.ups.as_ref(), x.power_meter.as_ref()),
                chrono::Duration::days(7),
            );
            let f = crate::domain::forecast::forecast(plan, outage, &d, learned.as_ref(), &Default::default());
            let min = |l: chrono::Duration| l.num_seconds() as f64 / 60.0;
            band[0].push((at, min(f.time_left_p10(at))));
            band[1].push((at, min(f.time_left(at))));
            band[2].push((at, min(f.time_left_p90(at))));
        }
    }
    let [p10, p50, p90] = band;
    let oxi = [
        (t.t("spo2"), series(&|x| x.oximeter.as_ref().and_then(|o| o.spo2_pct).map(f64::from))),
        (t.t("pulse"), series(&|x| x.oximeter.as_ref().and_then(|o| o.pulse_bpm).map(f64::from))),
    ];
    html! {
        (chart(title, &[(title, battery)], since, now, offset, t.t("no_data")))
        (chart(
            t.t("time_left_min"),
            &[(t.t("band_p50"), p50), (t.t("band_p10"), p10), (t.t("band_p90"), p90)],
            since,
            now,
            offset,
            t.t("no_outage"),
        ))
        (chart(t.t("spo2_pulse"), &oxi, since, now, offset, t.t("no_data")))
    }
}

/// One alert of the history: when, who answered, and every delivery of it.
fn alert_history(a: &crate::domain::engine::Alert, rows: &[OutboxRow], lang: Lang, offset: FixedOffset) -> Markup {
    let t = T(lang);
    html! {
        details.alert-history data-alert=(a.id) open[a.cleared_at.is_none()] {
            summary {
                span class={ "pill sev-" (format!("{:?}", a.severity)) } { (kind_text(a.kind, lang)) }
                " " (local(a.since, offset))
                @if let Some(c) = a.cleared_at {
                    " · " (t.t("cleared")) " " (local(c, offset))
                    @if let Some(b) = &a.cleared_by {
                        @match lang {
                            Lang::Ja => { "（" (t.t("cleared_by")) ": " (by_text(b, lang)) "）" },
                            Lang::En => { " (" (t.t("cleared_by")) " " (by_text(b, lang)) ")" },
                        }
                    }
                }
            }
            p {
                @for (i, k) in a.acks.iter().enumerate() {
                    @if i > 0 { br; }
                    // A refusal is an answer, not an acknowledgement.
                    (if k.acknowledges() { t.t("acknowledged") } else { t.t("answered") })
                    " " (by_text(&k.by, lang)) "（" (role_text(k.role, lang)) "） " (local(k.at, offset))
                    @if let Some(n) = k.said(lang) { " " q { (n) } }
                }
            }
            @if !rows.is_empty() {
                table.deliveries {
                    caption { (t.t("history")) }
                    thead {
                        tr {
                            th { (t.t("recipient")) } th { (t.t("channel")) } th { (t.t("status")) }
                            th { (t.t("attempts")) } th { (t.t("last_error")) }
                        }
                    }
                    tbody { @for r in rows { (delivery_row(r, lang, offset)) } }
                }
            }
        }
    }
}

fn delivery_row(r: &OutboxRow, lang: Lang, offset: FixedOffset) -> Markup {
    use crate::edge::store::OutboxStatus as S;
    let t = T(lang);
    html! {
        tr.delivery {
            td { (r.recipient) " " small { (role_text(r.role, lang)) } }
            td { (channel_cell(&r.channel, lang)) }
            td {
                @match r.status {
                    S::Delivered => {
                        span."pill"."ok" { (t.t("delivered")) }
                        " " (r.delivered_at.map(|d| local_s(d, offset)).unwrap_or_default())
                    },
                    S::Pending => span."pill"."warn" { (t.t("pending")) },
                    S::Abandoned => span."pill"."bad" { (t.t("abandoned")) },
                    S::NotNeeded => span.pill { (t.t("not_needed")) },
                }
                @if r.fallback_done { " " span."pill"."warn" { (t.t("fallback")) } }
            }
            td { (r.attempts) }
            td { (r.last_error.as_deref().unwrap_or("")) }
        }
    }
}

/// A home page's query: `told` after a family's answer (who was sent it), `saved` (the
/// version) after the care plan was stored.
#[derive(Deserialize, Default)]
pub struct HomeQuery {
    told: Option<String>,
    saved: Option<String>,
}

/// The drill form.
#[derive(Deserialize)]
pub struct DrillForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /homes/{id}/drill`: send every contact of the home a labelled test message (the
/// home's page then shows who received it and who acknowledged).
pub async fn drill_home(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(f): Form<DrillForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let snap = app.snap();
    let Some(plan) = view::home(&snap.engine, &v.user, &id) else { return not_found(v.lang) };
    if !v.user.may_drill() {
        return (StatusCode::FORBIDDEN, layout(&v, "403", html! { p.error { (T(v.lang).t("drill_forbidden")) } }))
            .into_response();
    }
    let home = plan.id.clone();
    match app.drill(home, v.user.username.clone()).await {
        Ok(drill) => {
            app.audit(&v.user.username, &client.text(), "drill", &drill, &id).await;
            Redirect::to(&format!("/homes/{id}")).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, layout(&v, "409", html! { p.error { (e) } })).into_response(),
    }
}
