//! A home's contacts as the coordinator's home page and the family's page show them: each
//! with their role, the numbers to dial as `tel:` links, and their consent.

use maud::{html, Markup};

use super::html::T;
use crate::domain::engine::Engine;
use crate::domain::homes::Lang;
use crate::domain::message::role_text;

/// A home's contacts, with the numbers of their SMS and call channels as `tel:` links.
/// The home's contacts with their roles, phone numbers to dial, and their consent: when the
/// config requires consent, a contact without a current one is marked as told nothing.
pub fn contacts_html(plan: &crate::domain::homes::Home, t: T, engine: &Engine) -> Markup {
    use crate::domain::homes::ChannelRef;
    let (require_consent, today) = (engine.require_consent(), engine.today(crate::edge::clock::now()));
    let contact = |c: &crate::domain::homes::Contact| {
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
        let role = role_text(c.role, t.0);
        let who = match t.0 {
            Lang::Ja => format!("{}（{role}）", c.name),
            Lang::En => format!("{} ({role})", c.name),
        };
        let (cls, consent) = match (&c.consent, c.role) {
            (_, mamori_protocol::mqtt::Role::Family) => ("", String::new()),
            (Some(k), _) if k.current(today) => ("muted", t.t("consent_given").replace("{on}", &k.on)),
            _ if require_consent => ("bad", t.t("consent_missing").to_string()),
            (Some(k), _) if k.withdrawn_on.is_some() && !k.not_yet(today) => {
                ("muted", t.t("consent_withdrawn").to_string())
            }
            (Some(_), _) => ("muted", t.t("consent_not_yet").to_string()),
            _ => ("muted", t.t("consent_unrecorded").to_string()),
        };
        html! {
            li {
                (who) " "
                @if numbers.is_empty() {
                    small.muted { (t.t("no_phone")) }
                }
                @for (k, n) in numbers.iter().enumerate() {
                    @if k > 0 { " " }
                    @let dial: String = n.chars().filter(|c| c.is_ascii_digit() || *c == '+').collect();
                    a href={ "tel:" (dial) } { (n) }
                }
                @if !consent.is_empty() { " " small class=(cls) { (consent) } }
            }
        }
    };
    html! {
        h2 { (t.t("contacts")) }
        ul.contacts { @for c in &plan.contacts { (contact(c)) } }
    }
}
