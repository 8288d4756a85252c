//! A receiving facility's start page: the children who may come to it.
//!
//! A facility account sees the homes it serves. What it must prepare in an outage is a bed
//! with power: which child, when they will arrive at the latest, and what they plug in. So its
//! page lists the homes on battery first, by when the child must leave (as the coordinator's
//! board), each with its municipality's name, the time left as a band, when the family must
//! leave and when the child arrives at the latest (the pessimistic time everything runs out:
//! leaving later is too late), the devices with their watts and their sum (the outlets and
//! the power it must give), and two answers — 「受け入れられます」 (an acknowledgement) and
//! 「受け入れられません」 (recorded, but no acknowledgement: the escalation goes on) — on the
//! home's alert (see `family.rs`), which the coordinator sees at once. Homes on mains are
//! listed after, in a line each. No tiers, device chips, codes or ids.

use std::fmt::Write as _;

use axum::response::{IntoResponse, Response};
use mamori_protocol::mqtt::Role;

use super::auth::Viewer;
use super::escape;
use super::html::{clock, T};
use super::layout::layout;
use super::view::{main_alert, HomeView};
use crate::domain::engine::{Answer, Engine, Time};
use crate::domain::homes::Lang;
use crate::domain::message;

/// The facility's page: `homes` as [`super::view::homes`] sorted them.
pub(super) fn page(
    engine: &Engine,
    v: &Viewer,
    homes: &[HomeView],
    now: Time,
    offset: chrono::FixedOffset,
    answered: Option<(&str, super::Told)>,
    notice: &str,
) -> Response {
    let lang = v.lang;
    let ja = lang == Lang::Ja;
    let mut body = format!(
        "<section class=\"facility\"><h1>{}</h1>{notice}",
        if ja { "受け入れの見込み" } else { "Children who may come to you" }
    );
    if let Some((id, told)) = answered {
        let label = homes.iter().find(|h| h.id == id).map(|h| h.label.as_str()).unwrap_or_default();
        let _ = write!(
            body,
            "<p class=\"notice\" role=\"status\">{}{}</p>",
            if ja {
                format!("{}についての答え: ", escape(label))
            } else {
                format!("Your answer about {}: ", escape(label))
            },
            escape(&told.notice(lang))
        );
    }
    let (coming, calm): (Vec<&HomeView>, Vec<&HomeView>) = homes.iter().partition(|h| h.power == "battery");
    if coming.is_empty() {
        let _ = write!(
            body,
            "<p class=\"situation ok\">{}</p>",
            if ja {
                "いま停電している世帯はありません。"
            } else {
                "No home you serve is without power now."
            }
        );
    }
    for h in coming {
        let Some(plan) = mamori_protocol::mqtt::HomeId::new(&h.id).ok().and_then(|id| engine.plan(&id)) else {
            continue;
        };
        let place =
            h.municipality_name.as_deref().map(|m| format!(" <small>{}</small>", escape(m))).unwrap_or_default();
        let _ = write!(
            body,
            "<article class=\"coming\" data-home=\"{}\"><h2>{}{place}</h2>",
            escape(&h.id),
            escape(&h.label)
        );
        let state = match (h.silent, ja) {
            (true, true) => "停電中。見守り機から連絡が途絶えています。",
            (true, false) => "Without power, and its home unit has gone silent.",
            (false, true) => "停電中。予備の電源で動いています。",
            (false, false) => "Without power, on backup.",
        };
        let _ = write!(body, "<p class=\"situation bad\">{state}</p><dl class=\"state\">");
        if let Some(mid) = h.time_left_s {
            let _ = write!(
                body,
                "<div><dt>{}</dt><dd><strong>{}</strong></dd></div>",
                T(lang).t("time_left"),
                message::time_left_text(mid, h.time_left_range_s, lang)
            );
        }
        match (&h.evacuation, &h.runs_out, &h.leave_by) {
            (Some((dest, m)), Some(out), Some(leave)) => {
                let _ = write!(
                    body,
                    "<div><dt>{}</dt><dd>{}</dd></div><div><dt>{}</dt><dd>{}</dd></div>",
                    if ja { "出発の目安" } else { "Leaves by" },
                    if ja {
                        format!("{}（{}へ、移動{m}分）", clock(*leave, now, offset), escape(dest))
                    } else {
                        format!("{} (to {}, {m} min)", clock(*leave, now, offset), escape(dest))
                    },
                    if ja { "到着" } else { "Arrives" },
                    if ja {
                        format!("遅くとも{}まで", clock(out.p10, now, offset))
                    } else {
                        format!("by {} at the latest", clock(out.p10, now, offset))
                    },
                );
            }
            _ => {
                let _ = write!(
                    body,
                    "<div><dt>{}</dt><dd>{}</dd></div>",
                    if ja { "避難先" } else { "Destination" },
                    if ja { "計画に避難先がありません" } else { "none in the care plan" }
                );
            }
        }
        let total: f64 = plan.devices.iter().map(|d| d.watts).sum();
        let list: Vec<String> = plan.devices.iter().map(|d| format!("{} {:.0}W", escape(&d.name), d.watts)).collect();
        let _ = write!(
            body,
            "<div><dt>{}</dt><dd>{}{}</dd></div></dl>",
            if ja { "機器" } else { "Devices" },
            list.join(if ja { "、" } else { ", " }),
            if ja { format!("（計{total:.0}W）") } else { format!(" ({total:.0} W in all)") }
        );
        if let Some(a) = main_alert(h) {
            if let Some(said) = a
                .acks
                .iter()
                .rev()
                .filter(|k| k.role == Role::Facility && k.by == v.user.username)
                .find_map(|k| k.said(lang))
            {
                let _ = write!(
                    body,
                    "<p class=\"muted\">{} <q>{}</q></p>",
                    if ja { "あなたの答え:" } else { "Your answer:" },
                    escape(&said)
                );
            }
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/homes/{id}/answer\" class=\"answers\">{csrf}\
                 <button type=\"submit\" name=\"answer\" value=\"{ca}\">{cat}</button>\
                 <button type=\"submit\" name=\"answer\" value=\"{na}\" class=\"secondary\">{nat}</button></form>",
                id = escape(&h.id),
                csrf = v.csrf_field(),
                ca = Answer::CanAccept.as_str(),
                cat = Answer::CanAccept.text(lang),
                na = Answer::CannotAccept.as_str(),
                nat = Answer::CannotAccept.text(lang),
            );
        }
        body.push_str("</article>");
    }
    if !calm.is_empty() {
        let _ = write!(
            body,
            "<h2>{}</h2><ul class=\"calm\">",
            if ja { "電気が届いている世帯" } else { "Homes with power" }
        );
        for h in calm {
            let _ = write!(body, "<li><a href=\"/homes/{}\">{}</a></li>", escape(&h.id), escape(&h.label));
        }
        body.push_str("</ul>");
    }
    body.push_str("</section>");
    layout(v, if ja { "受け入れの見込み" } else { "Children who may come" }, &body).into_response()
}
