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

use axum::response::{IntoResponse, Response};
use mamori_protocol::mqtt::Role;
use maud::{html, Markup};

use super::auth::Viewer;
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
    notice: &Markup,
) -> Response {
    let lang = v.lang;
    let ja = lang == Lang::Ja;
    let (coming, calm): (Vec<&HomeView>, Vec<&HomeView>) = homes.iter().partition(|h| h.power == "battery");
    let body = html! {
        section.facility {
            h1 { (if ja { "受け入れの見込み" } else { "Children who may come to you" }) }
            (notice)
            @if let Some((id, told)) = &answered {
                @let label = homes.iter().find(|h| h.id == *id).map(|h| h.label.as_str()).unwrap_or_default();
                p.notice role="status" {
                    @if ja { (label) "についての答え: " } @else { "Your answer about " (label) ": " }
                    (told.notice(lang))
                }
            }
            @if coming.is_empty() {
                p."situation"."ok" {
                    (if ja { "いま停電している世帯はありません。" } else { "No home you serve is without power now." })
                }
            }
            @for h in coming {
                @if let Some(plan) = mamori_protocol::mqtt::HomeId::new(&h.id).ok().and_then(|id| engine.plan(&id)) {
                    (coming_home(v, h, plan, now, offset))
                }
            }
            @if !calm.is_empty() {
                h2 { (if ja { "電気が届いている世帯" } else { "Homes with power" }) }
                ul.calm { @for h in calm { li { a href={ "/homes/" (h.id) } { (h.label) } } } }
            }
        }
    };
    layout(v, if ja { "受け入れの見込み" } else { "Children who may come" }, body).into_response()
}

/// A home on battery: when the child leaves and arrives, what they plug in, and the answers.
fn coming_home(
    v: &Viewer,
    h: &HomeView,
    plan: &crate::domain::homes::Home,
    now: Time,
    offset: chrono::FixedOffset,
) -> Markup {
    let lang = v.lang;
    let ja = lang == Lang::Ja;
    let state = match (h.silent, ja) {
        (true, true) => "停電中。見守り機から連絡が途絶えています。",
        (true, false) => "Without power, and its home unit has gone silent.",
        (false, true) => "停電中。予備の電源で動いています。",
        (false, false) => "Without power, on backup.",
    };
    let total: f64 = plan.devices.iter().map(|d| d.watts).sum();
    let list: Vec<String> = plan.devices.iter().map(|d| format!("{} {:.0}W", d.name, d.watts)).collect();
    let said = main_alert(h).and_then(|a| {
        a.acks.iter().rev().filter(|k| k.role == Role::Facility && k.by == v.user.username).find_map(|k| k.said(lang))
    });
    html! {
        article.coming data-home=(h.id) {
            h2 {
                (h.label)
                @if let Some(m) = &h.municipality_name { " " small { (m) } }
            }
            p."situation"."bad" { (state) }
            dl.state {
                @if let Some(mid) = h.time_left_s {
                    div {
                        dt { (T(lang).t("time_left")) }
                        dd { strong { (message::time_left_text(mid, h.time_left_range_s, lang)) } }
                    }
                }
                @match (&h.evacuation, &h.runs_out, &h.leave_by) {
                    (Some((dest, m)), Some(out), Some(leave)) => {
                        div {
                            dt { (if ja { "出発の目安" } else { "Leaves by" }) }
                            dd {
                                @if ja {
                                    (clock(*leave, now, offset)) "（" (dest) "へ、移動" (m) "分）"
                                } @else {
                                    (clock(*leave, now, offset)) " (to " (dest) ", " (m) " min)"
                                }
                            }
                        }
                        div {
                            dt { (if ja { "到着" } else { "Arrives" }) }
                            dd {
                                @if ja {
                                    "遅くとも" (clock(out.p10, now, offset)) "まで"
                                } @else {
                                    "by " (clock(out.p10, now, offset)) " at the latest"
                                }
                            }
                        }
                    },
                    _ => {
                        div {
                            dt { (if ja { "避難先" } else { "Destination" }) }
                            dd { (if ja { "計画に避難先がありません" } else { "none in the care plan" }) }
                        }
                    },
                }
                div {
                    dt { (if ja { "機器" } else { "Devices" }) }
                    dd {
                        (list.join(if ja { "、" } else { ", " }))
                        (if ja { format!("（計{total:.0}W）") } else { format!(" ({total:.0} W in all)") })
                    }
                }
            }
            @if main_alert(h).is_some() {
                @if let Some(said) = said {
                    p.muted { (if ja { "あなたの答え:" } else { "Your answer:" }) " " q { (said) } }
                }
                form method="post" action={ "/homes/" (h.id) "/answer" } class="answers" {
                    (v.csrf_field())
                    button type="submit" name="answer" value=(Answer::CanAccept.as_str()) { (Answer::CanAccept.text(lang)) }
                    button type="submit" name="answer" value=(Answer::CannotAccept.as_str()) class="secondary" {
                        (Answer::CannotAccept.text(lang))
                    }
                }
            }
        }
    }
}
