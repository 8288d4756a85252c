//! A home's page for coordinators, facilities and administrators: live state, who is
//! handling it, the care plan's contacts with tap-to-call links and their consent, 24-hour
//! charts (inline SVG), alerts with acknowledge and clear, every notification's delivery, the
//! event timeline, and drills. (A family's own page is `family.rs`.) Split from `pages.rs`
//! (issue 20: pages by resource).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use mamori_protocol::mqtt::Telemetry;
use serde::Deserialize;

use super::alerts::alert_row;
use super::auth::Viewer;
use super::contacts::contacts_html;
use super::html::*;
use super::layout::layout;
use super::pages::*;
use super::view;
use super::{escape, App, Client};
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
) -> String {
    let first = series.iter().filter_map(|(_, s)| s.first().map(|(t, _)| *t)).min();
    let from = first.map_or(from, |f| f.max(from).min(to - chrono::Duration::minutes(1)));
    let (w, h, pad_l, pad_b) = (600.0, 140.0, 36.0, 18.0);
    let values: Vec<f64> = series.iter().flat_map(|(_, s)| s.iter().map(|(_, v)| *v)).collect();
    let mut out = format!("<figure class=\"chart\"><figcaption>{}</figcaption>", escape(title));
    if values.is_empty() {
        let _ = write!(out, "<p class=\"muted\">{}</p></figure>", escape(empty));
        return out;
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if (hi - lo).abs() < 1e-9 { (lo - 1.0, hi + 1.0) } else { (lo, hi) };
    let span = (to - from).num_seconds().max(1) as f64;
    let x = |t: Time| pad_l + (w - pad_l - 4.0) * ((t - from).num_seconds() as f64 / span).clamp(0.0, 1.0);
    let y = |v: f64| 4.0 + (h - pad_b - 8.0) * (1.0 - (v - lo) / (hi - lo));
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{t}\" preserveAspectRatio=\"none\">\
         <line x1=\"{pad_l}\" y1=\"{b}\" x2=\"{w}\" y2=\"{b}\" class=\"axis\"/>\
         <text x=\"2\" y=\"12\" class=\"tick\">{hi}</text><text x=\"2\" y=\"{b}\" class=\"tick\">{lo}</text>",
        t = escape(title),
        b = h - pad_b,
        hi = tick(hi, hi - lo),
        lo = tick(lo, hi - lo),
    );
    for k in 0..=4 {
        let tx = pad_l + (w - pad_l - 4.0) * f64::from(k) / 4.0;
        let at = from + chrono::Duration::seconds((span * f64::from(k) / 4.0) as i64);
        let label = at.with_timezone(&offset).format("%H:%M");
        let anchor = match k {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ =
            write!(out, "<text x=\"{tx:.0}\" y=\"{}\" class=\"tick\" text-anchor=\"{anchor}\">{label}</text>", h - 4.0);
    }
    for (i, (_, s)) in series.iter().enumerate() {
        let pts: Vec<String> = s.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        let _ = write!(out, "<polyline class=\"s{i}\" points=\"{}\"/>", pts.join(" "));
    }
    out.push_str("</svg>");
    if series.len() > 1 {
        out.push_str("<p class=\"legend\">");
        for (i, (name, _)) in series.iter().enumerate() {
            let _ = write!(out, "<span class=\"k{i}\">■ {}</span> ", escape(name));
        }
        out.push_str("</p>");
    }
    out.push_str("</figure>");
    out
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
    // Only a number: the query is anyone's to write, and the notice is HTML.
    let saved = q
        .saved
        .and_then(|n| n.parse::<u32>().ok())
        .map(|n| {
            format!("<p class=\"notice\" role=\"status\">{}</p>", t.t("plan_saved").replace("{n}", &n.to_string()))
        })
        .unwrap_or_default();
    let edit = if v.user.may_edit_plan(&plan.municipality) {
        format!(
            "<p class=\"noprint\"><a href=\"/homes/{}/plan\">{}</a></p>",
            escape(plan.id.as_str()),
            t.t("edit_plan")
        )
    } else {
        String::new()
    };
    let mut body = saved
        + &format!(
            "<h1>{label}{id}</h1><dl class=\"state\">\
         <div><dt>{pl}</dt><dd>{power}</dd></div><div><dt>{tl}</dt><dd>{left}</dd></div>\
         <div><dt>{cl}</dt><dd>{conn}</dd></div><div><dt>{dl}</dt><dd>{dev}</dd></div>\
         <div><dt>{ol}</dt><dd>{oxi}</dd></div><div><dt>{vl}</dt><dd>{vent}</dd></div>{evac}</dl>",
            label = escape(&h.label),
            id = id_for_installer(&v, &h.id),
            pl = t.t("power"),
            power = power_cell(&h, t),
            tl = t.t("time_left"),
            left = time_left_text(&h, t),
            cl = t.t("last_heard"),
            conn = conn_cell(&h, t, offset),
            dl = t.t("devices"),
            dev = devices_cell(&h, t),
            ol = t.t("oximeter"),
            oxi = oxi_cell(&h, now, v.lang),
            vl = t.t("ventilator"),
            vent = vent_cell(&h, now, t),
            evac = h
                .evacuation
                .as_ref()
                .map(|(d, m)| {
                    format!(
                        "<div><dt>{}</dt><dd>{}（{}）</dd></div>",
                        t.t("destination"),
                        escape(d),
                        minutes(*m, v.lang)
                    )
                })
                .unwrap_or_default(),
        );
    body.push_str(&edit);
    // What earlier outages showed of the battery.
    if let Some(b) = h.batteries.first() {
        let cls = if b.health_pct < 70.0 { "bad" } else { "ok" };
        let text = match t.0 {
            Lang::En => format!(
                "<span class=\"{cls}\">{:.0} % of the care plan</span> ({:.0} Wh of {:.0} Wh; measured in {} outage(s), last {})",
                b.health_pct,
                b.health_pct / 100.0 * b.plan_wh,
                b.plan_wh,
                b.discharges,
                local(b.measured_at, offset)
            ),
            Lang::Ja => format!(
                "<span class=\"{cls}\">計画の{:.0}%</span>（約{:.0}Wh／計画{:.0}Wh、{}回の停電で測定、最終{}）",
                b.health_pct,
                b.health_pct / 100.0 * b.plan_wh,
                b.plan_wh,
                b.discharges,
                local(b.measured_at, offset)
            ),
        };
        let _ = write!(body, "<dl class=\"state\"><div><dt>{}</dt><dd>{text}</dd></div></dl>", t.t("battery_measured"));
    }
    // Who is handling it, and taking it on (a coordinator; the latest holds: handing over is
    // the other coordinator taking it).
    if let Some(k) = view::handler(&h) {
        let _ = write!(
            body,
            "<p class=\"handler\">{}: {} <small>{}</small></p>",
            t.t("handling"),
            escape(&k.by),
            local(k.at, offset)
        );
    }
    if v.user.role == AccountRole::Coordinator && super::view::main_alert(&h).is_some() {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/homes/{}/answer\" class=\"inline\">{}<button type=\"submit\" name=\"answer\" value=\"handling\" class=\"secondary\">{}</button></form>",
            escape(plan.id.as_str()),
            v.csrf_field(),
            crate::domain::engine::Answer::Handling.text(v.lang)
        );
    }
    // Who to call: each contact with their phone numbers as links a phone dials (tap to call).
    body.push_str(&contacts_html(plan, t, &snap.engine));
    // Active alerts.
    let _ = write!(body, "<h2>{}</h2>", t.t("alerts"));
    if h.alerts.is_empty() {
        let _ = write!(body, "<p>{}</p>", t.t("no_alerts"));
    } else {
        body.push_str("<table class=\"alerts\"><tbody>");
        for a in &h.alerts {
            body.push_str(&alert_row(&v, None, None, a, &back, offset));
        }
        body.push_str("</tbody></table>");
    }
    // Charts.
    let series = |f: &dyn Fn(&Telemetry) -> Option<f64>| -> Vec<(Time, f64)> {
        history.telemetry.iter().filter_map(|x| f(x).map(|v| (x.ts.with_timezone(&chrono::Utc), v))).collect()
    };
    let _ = write!(body, "<h2>{}</h2><div class=\"charts\">", t.t("charts"));
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
    body.push_str(&chart(title, &[(title, battery)], since, now, offset, t.t("no_data")));
    // Time left through this outage: the forecast's band recomputed at each snapshot from
    // the history (which keeps the charted readings), with what is known of the battery now.
    let learned = snap.engine.home_state(&plan.id).and_then(|s| s.battery.clone());
    let mut band: [Vec<(Time, f64)>; 3] = Default::default();
    if let Some(outage) = h.on_battery_since {
        let mut d = crate::domain::forecast::Discharge::start(outage);
        for x in &history.telemetry {
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
    body.push_str(&chart(
        t.t("time_left_min"),
        &[(t.t("band_p50"), p50), (t.t("band_p10"), p10), (t.t("band_p90"), p90)],
        since,
        now,
        offset,
        t.t("no_outage"),
    ));
    body.push_str(&chart(
        t.t("spo2_pulse"),
        &[
            (t.t("spo2"), series(&|x| x.oximeter.as_ref().and_then(|o| o.spo2_pct).map(f64::from))),
            (t.t("pulse"), series(&|x| x.oximeter.as_ref().and_then(|o| o.pulse_bpm).map(f64::from))),
        ],
        since,
        now,
        offset,
        t.t("no_data"),
    ));
    body.push_str("</div>");
    // Alert history with deliveries.
    let _ = write!(body, "<h2>{}</h2>", t.t("all_alerts"));
    for a in &history.alerts {
        let cleared = a
            .cleared_at
            .map(|c| {
                format!(
                    " · {} {}{}",
                    t.t("cleared"),
                    local(c, offset),
                    a.cleared_by
                        .as_ref()
                        .map(|b| match v.lang {
                            Lang::Ja => format!("（{}: {}）", t.t("cleared_by"), by_text(b, v.lang)),
                            Lang::En => format!(" ({} {})", t.t("cleared_by"), by_text(b, v.lang)),
                        })
                        .unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let acks: Vec<String> = a
            .acks
            .iter()
            .map(|k| {
                format!(
                    "{} {}（{}） {}{}",
                    // A refusal is an answer, not an acknowledgement.
                    if k.acknowledges() { t.t("acknowledged") } else { t.t("answered") },
                    by_text(&k.by, v.lang),
                    role_text(k.role, v.lang),
                    local(k.at, offset),
                    k.said(v.lang).map(|n| format!(" <q>{}</q>", escape(&n))).unwrap_or_default()
                )
            })
            .collect();
        let _ = write!(
            body,
            "<details class=\"alert-history\" data-alert=\"{id}\"{open}><summary><span class=\"pill sev-{sev:?}\">{kind}</span> {since}{cleared}</summary>\
             <p>{acks}</p>",
            id = escape(&a.id),
            open = if a.cleared_at.is_none() { " open" } else { "" },
            sev = a.severity,
            kind = escape(kind_text(a.kind, v.lang)),
            since = local(a.since, offset),
            acks = acks.join("<br>"),
        );
        let rows = history.outbox.get(&a.id).map(Vec::as_slice).unwrap_or(&[]);
        if !rows.is_empty() {
            let _ = write!(
                body,
                "<table class=\"deliveries\"><caption>{}</caption><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
                t.t("history"),
                t.t("recipient"),
                t.t("channel"),
                t.t("status"),
                t.t("attempts"),
                t.t("last_error"),
            );
            for r in rows {
                let status = match r.status {
                    crate::edge::store::OutboxStatus::Delivered => format!(
                        "<span class=\"pill ok\">{}</span> {}",
                        t.t("delivered"),
                        r.delivered_at.map(|d| local_s(d, offset)).unwrap_or_default()
                    ),
                    crate::edge::store::OutboxStatus::Pending => {
                        format!("<span class=\"pill warn\">{}</span>", t.t("pending"))
                    }
                    crate::edge::store::OutboxStatus::Abandoned => {
                        format!("<span class=\"pill bad\">{}</span>", t.t("abandoned"))
                    }
                    crate::edge::store::OutboxStatus::NotNeeded => {
                        format!("<span class=\"pill\">{}</span>", t.t("not_needed"))
                    }
                };
                let fallback = if r.fallback_done {
                    format!(" <span class=\"pill warn\">{}</span>", t.t("fallback"))
                } else {
                    String::new()
                };
                let _ = write!(
                    body,
                    "<tr class=\"delivery\"><td>{} <small>{}</small></td><td>{}</td><td>{status}{fallback}</td><td>{}</td><td>{}</td></tr>",
                    escape(&r.recipient),
                    role_text(r.role, v.lang),
                    channel_cell(&r.channel, v.lang),
                    r.attempts,
                    escape(r.last_error.as_deref().unwrap_or("")),
                );
            }
            body.push_str("</tbody></table>");
        }
        body.push_str("</details>");
    }
    // Events.
    let _ = write!(body, "<h2>{}</h2><ol class=\"timeline\">", t.t("events"));
    for e in &history.events {
        let _ = write!(
            body,
            "<li><time>{}</time> <span class=\"pill sev-{:?}\">{}</span>{}</li>",
            local_s(e.ts.with_timezone(&chrono::Utc), offset),
            e.severity,
            escape(kind_text(e.kind.into(), v.lang)),
            e.source.as_ref().map(|s| format!(" <small>{}</small>", escape(s))).unwrap_or_default()
        );
    }
    body.push_str("</ol>");
    if v.user.may_drill() {
        let _ = write!(
            body,
            "<h2>{}</h2><p>{}</p><form method=\"post\" action=\"/homes/{}/drill\">{}<button type=\"submit\">{}</button></form>",
            t.t("drill"),
            t.t("drill_intro"),
            escape(plan.id.as_str()),
            v.csrf_field(),
            t.t("drill_start")
        );
    }
    layout(&v, &h.label, &body).into_response()
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
        return (
            StatusCode::FORBIDDEN,
            layout(&v, "403", &format!("<p class=\"error\">{}</p>", T(v.lang).t("drill_forbidden"))),
        )
            .into_response();
    }
    let home = plan.id.clone();
    match app.drill(home, v.user.username.clone()).await {
        Ok(drill) => {
            app.audit(&v.user.username, &client.text(), "drill", &drill, &id).await;
            Redirect::to(&format!("/homes/{id}")).into_response()
        }
        Err(e) => {
            (StatusCode::CONFLICT, layout(&v, "409", &format!("<p class=\"error\">{}</p>", escape(&e)))).into_response()
        }
    }
}
