//! A home's contacts as the coordinator's home page and the family's page show them: each
//! with their role, the numbers to dial as `tel:` links, and their consent.

use std::fmt::Write as _;

use super::escape;
use super::html::T;
use crate::domain::engine::Engine;
use crate::domain::homes::Lang;
use crate::domain::message::role_text;

/// A home's contacts, with the numbers of their SMS and call channels as `tel:` links.
/// The home's contacts with their roles, phone numbers to dial, and their consent: when the
/// config requires consent, a contact without a current one is marked as told nothing.
pub fn contacts_html(plan: &crate::domain::homes::Home, t: T, engine: &Engine) -> String {
    use crate::domain::homes::ChannelRef;
    let (require_consent, today) = (engine.require_consent(), engine.today(crate::edge::clock::now()));
    let mut out = format!("<h2>{}</h2><ul class=\"contacts\">", t.t("contacts"));
    for c in &plan.contacts {
        let mut numbers: Vec<&str> = c
            .phone
            .as_deref()
            .into_iter()
            .chain(c.channels.iter().chain(c.then.iter().flat_map(|s| s.channels.iter())).filter_map(|ch| match ch {
                ChannelRef::Sms(n) | ChannelRef::Voice(n) => Some(n.as_str()),
                _ => None,
            }))
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        let phones = if numbers.is_empty() {
            format!("<small class=\"muted\">{}</small>", t.t("no_phone"))
        } else {
            numbers
                .iter()
                .map(|n| {
                    let dial: String = n.chars().filter(|c| c.is_ascii_digit() || *c == '+').collect();
                    format!("<a href=\"tel:{}\">{}</a>", escape(&dial), escape(n))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let role = role_text(c.role, t.0);
        let who = match t.0 {
            Lang::Ja => format!("{}（{role}）", escape(&c.name)),
            Lang::En => format!("{} ({role})", escape(&c.name)),
        };
        let consent = match (&c.consent, c.role) {
            (_, mamori_protocol::mqtt::Role::Family) => String::new(),
            (Some(k), _) if k.current(today) => {
                format!(" <small class=\"muted\">{}</small>", t.t("consent_given").replace("{on}", &escape(&k.on)))
            }
            _ if require_consent => format!(" <small class=\"bad\">{}</small>", t.t("consent_missing")),
            (Some(k), _) if k.withdrawn_on.is_some() && !k.not_yet(today) => {
                format!(" <small class=\"muted\">{}</small>", t.t("consent_withdrawn"))
            }
            (Some(_), _) => format!(" <small class=\"muted\">{}</small>", t.t("consent_not_yet")),
            _ => format!(" <small class=\"muted\">{}</small>", t.t("consent_unrecorded")),
        };
        let _ = write!(out, "<li>{who} {phones}{consent}</li>");
    }
    out.push_str("</ul>");
    out
}
