//! The care-plan editor's fields in both directions: a plan to the form's named values
//! ([`Fields::from_home`]), and the values posted back to a plan with every problem placed on
//! its row ([`Fields::to_home`]), with the channels and numbers a reader types. No HTML here:
//! the form itself is `form.rs`.

use std::collections::BTreeMap;

use mamori_protocol::mqtt::{HomeId, Role};

use super::super::auth::Viewer;
use super::super::App;
use super::MAX_ROWS;
use crate::domain::homes::{
    Backup, BackupKind, ChannelRef, ChannelStep, Chemistry, Contact, Device, Evacuation, Field, Home, Lang, Problem,
    Want,
};

/// The form's fields by name (the same shape whether filled from a plan or posted back).
#[derive(Default, Debug, Clone)]
pub(super) struct Fields(BTreeMap<String, String>);

fn num_text(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn kind_name(k: BackupKind) -> &'static str {
    match k {
        BackupKind::Ups => "ups",
        BackupKind::PowerStation => "power_station",
        BackupKind::VentilatorInternal => "ventilator_internal",
    }
}

/// A channel as the form shows it: `SMS:+8190…`, `電話:+8190…` (English: `voice:`).
fn channel_text(c: &ChannelRef, lang: Lang) -> String {
    let ja = lang == Lang::Ja;
    match c {
        ChannelRef::Sms(p) => format!("SMS:{p}"),
        ChannelRef::Voice(p) => format!("{}:{p}", if ja { "電話" } else { "voice" }),
        ChannelRef::Line(id) => format!("LINE:{id}"),
        ChannelRef::Email(a) => format!("{}:{a}", if ja { "メール" } else { "email" }),
        ChannelRef::Webhook(n) => format!("{}:{n}", if ja { "連携" } else { "webhook" }),
        ChannelRef::Console(n) => format!("{}:{n}", if ja { "画面" } else { "console" }),
    }
}

/// One channel typed into the form, in either language's words.
fn parse_channel(s: &str) -> Option<ChannelRef> {
    let s = s.trim().replace('：', ":");
    let (kind, to) = s.split_once(':')?;
    let to = to.trim().to_string();
    if to.is_empty() {
        return None;
    }
    Some(match kind.trim().to_lowercase().as_str() {
        "sms" | "ｓｍｓ" => ChannelRef::Sms(to),
        "voice" | "call" | "phone" | "電話" => ChannelRef::Voice(to),
        "line" | "ｌｉｎｅ" => ChannelRef::Line(to),
        "email" | "mail" | "e-mail" | "メール" => ChannelRef::Email(to),
        "webhook" | "連携" => ChannelRef::Webhook(to),
        "console" | "画面" => ChannelRef::Console(to),
        _ => return None,
    })
}

/// Channels separated by commas or lines.
fn parse_channels(s: &str) -> Result<Vec<ChannelRef>, usize> {
    s.split(['\n', ',', '、'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .enumerate()
        .map(|(k, x)| parse_channel(x).ok_or(k))
        .collect()
}

/// A number typed in half- or full-width digits.
fn parse_number(s: &str) -> Option<f64> {
    let t: String = s
        .trim()
        .chars()
        .map(|c| match c {
            '０'..='９' => char::from_u32(c as u32 - '０' as u32 + '0' as u32).unwrap_or(c),
            '．' => '.',
            c => c,
        })
        .collect();
    t.parse::<f64>().ok().filter(|x| x.is_finite())
}

impl Fields {
    pub(super) fn from_pairs(pairs: Vec<(String, String)>) -> Fields {
        // The last of a repeated name wins; nothing beyond a sane size is kept.
        Fields(pairs.into_iter().take(2000).map(|(k, v)| (k, v.chars().take(2000).collect())).collect())
    }

    pub(super) fn get(&self, k: &str) -> &str {
        self.0.get(k).map_or("", String::as_str)
    }

    pub(super) fn set(&mut self, k: &str, v: &str) {
        self.0.insert(k.to_string(), v.to_string());
    }

    pub(super) fn from_home(h: &Home, lang: Lang) -> Fields {
        let mut f = Fields::default();
        f.set("label", &h.label);
        f.set("municipality", &h.municipality);
        f.set("municipality_name", h.municipality_name.as_deref().unwrap_or(""));
        for (j, d) in h.devices.iter().enumerate() {
            f.set(&format!("d{j}_name"), &d.name);
            f.set(&format!("d{j}_watts"), &num_text(d.watts));
        }
        for (j, b) in h.backup.iter().enumerate() {
            f.set(&format!("b{j}_kind"), kind_name(b.kind));
            let o = |x: Option<f64>| x.map(num_text).unwrap_or_default();
            f.set(&format!("b{j}_usable_wh"), &o(b.usable_wh));
            f.set(&format!("b{j}_nameplate_wh"), &o(b.nameplate_wh));
            f.set(&format!("b{j}_runtime_min"), &o(b.runtime_min));
            let chem = match b.chemistry {
                Some(Chemistry::LeadAcid) => "lead_acid",
                Some(Chemistry::Lithium) => "lithium",
                None => "",
            };
            f.set(&format!("b{j}_chemistry"), chem);
        }
        if let Some(e) = &h.evacuation {
            f.set("evac_destination", &e.destination);
            f.set("evac_travel_min", &e.travel_min.to_string());
        }
        for (j, c) in h.contacts.iter().enumerate() {
            f.set(&format!("c{j}_role"), c.role.as_str());
            f.set(&format!("c{j}_name"), &c.name);
            f.set(&format!("c{j}_language"), if c.language == Lang::En { "en" } else { "ja" });
            let chans: Vec<String> = c.channels.iter().map(|x| channel_text(x, lang)).collect();
            f.set(&format!("c{j}_channels"), &chans.join("\n"));
            let then: Vec<String> = c
                .then
                .iter()
                .map(|s| {
                    let chans: Vec<String> = s.channels.iter().map(|x| channel_text(x, lang)).collect();
                    format!("{}: {}", s.after_min, chans.join(", "))
                })
                .collect();
            f.set(&format!("c{j}_then"), &then.join("\n"));
            f.set(&format!("c{j}_quiet"), c.quiet_hours.as_deref().unwrap_or(""));
            f.set(&format!("c{j}_phone"), c.phone.as_deref().unwrap_or(""));
            if let Some(k) = &c.consent {
                f.set(&format!("c{j}_consent_by"), &k.given_by);
                f.set(&format!("c{j}_consent_on"), &k.on);
                f.set(&format!("c{j}_consent_purpose"), &k.purpose);
                f.set(&format!("c{j}_consent_withdrawn"), k.withdrawn_on.as_deref().unwrap_or(""));
            }
        }
        f
    }

    /// Rows of a kind the form holds something in (the highest such index + 1, at most
    /// [`MAX_ROWS`]): blank rows posted back are not counted, so a refused form does not grow.
    pub(super) fn rows(&self, prefix: char) -> usize {
        self.0
            .iter()
            // A select always posts something: a role or a language alone is no content.
            .filter(|(k, v)| !v.trim().is_empty() && !k.ends_with("_role") && !k.ends_with("_language"))
            .filter_map(|(k, _)| k.strip_prefix(prefix))
            .filter_map(|k| k.split_once('_').and_then(|(n, _)| n.parse::<usize>().ok()))
            .filter(|n| *n < MAX_ROWS)
            .map(|n| n + 1)
            .max()
            .unwrap_or(0)
            .min(MAX_ROWS)
    }

    /// The plan the form describes, and every problem with it (rows numbered as on the page).
    pub(super) fn to_home(&self, id: HomeId, stored: &Home, v: &Viewer, app: &App) -> (Home, Vec<Problem>) {
        let mut problems = Vec::new();
        // Index in the plan → row on the page, per kind, for the problems the plan's own
        // check finds.
        let (mut dmap, mut bmap, mut cmap) = (Vec::new(), Vec::new(), Vec::new());
        let mut devices = Vec::new();
        for j in 0..self.rows('d') {
            let name = self.get(&format!("d{j}_name")).trim().to_string();
            let watts = self.get(&format!("d{j}_watts")).trim();
            if name.is_empty() && watts.is_empty() {
                continue;
            }
            if name.is_empty() || name.chars().count() > 40 {
                problems.push(Problem { field: Field::DeviceName(j), want: Want::Name });
            }
            let w = parse_number(watts);
            if w.is_none() {
                problems.push(Problem { field: Field::DeviceWatts(j), want: Want::Watts });
            }
            dmap.push(j);
            devices.push(Device { name, watts: w.unwrap_or(1.0) });
        }
        let mut backup = Vec::new();
        for j in 0..self.rows('b') {
            let kind = match self.get(&format!("b{j}_kind")) {
                "" => continue,
                "ups" => BackupKind::Ups,
                "power_station" => BackupKind::PowerStation,
                "ventilator_internal" => BackupKind::VentilatorInternal,
                _ => {
                    problems.push(Problem { field: Field::Backup(j), want: Want::Positive });
                    continue;
                }
            };
            let mut bad = false;
            let mut n = |k: &str| {
                let t = self.get(&format!("b{j}_{k}")).trim();
                if t.is_empty() {
                    return None;
                }
                let x = parse_number(t);
                bad |= x.is_none();
                x
            };
            let (usable_wh, nameplate_wh, runtime_min) = (n("usable_wh"), n("nameplate_wh"), n("runtime_min"));
            if bad {
                problems.push(Problem { field: Field::Backup(j), want: Want::Positive });
            }
            let chemistry = match self.get(&format!("b{j}_chemistry")) {
                "lead_acid" => Some(Chemistry::LeadAcid),
                "lithium" => Some(Chemistry::Lithium),
                _ => None,
            };
            bmap.push(j);
            backup.push(Backup { kind, usable_wh, nameplate_wh, runtime_min, chemistry });
        }
        let dest = self.get("evac_destination").trim().to_string();
        let travel = self.get("evac_travel_min").trim();
        let evacuation = match (dest.is_empty(), travel.is_empty()) {
            (true, true) => None,
            _ => match parse_number(travel).filter(|m| m.fract() == 0.0 && (1.0..=1440.0).contains(m)) {
                Some(m) if !dest.is_empty() => Some(Evacuation { destination: dest, travel_min: m as u32 }),
                _ => {
                    problems.push(Problem { field: Field::Evacuation, want: Want::Evacuation });
                    None
                }
            },
        };
        let mut contacts = Vec::new();
        for j in 0..self.rows('c') {
            let name = self.get(&format!("c{j}_name")).trim().to_string();
            let chans_text = self.get(&format!("c{j}_channels"));
            let then_text = self.get(&format!("c{j}_then"));
            let quiet = self.get(&format!("c{j}_quiet")).trim().to_string();
            let phone: String =
                self.get(&format!("c{j}_phone")).chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
            if name.is_empty() && chans_text.trim().is_empty() && then_text.trim().is_empty() {
                continue;
            }
            let c = contacts.len();
            if name.is_empty() || name.chars().count() > 40 {
                problems.push(Problem { field: Field::ContactName(j), want: Want::Name });
            }
            let role = self.get(&format!("c{j}_role")).parse::<Role>().ok();
            if role.is_none() {
                problems.push(Problem { field: Field::ContactRole(j), want: Want::Role });
            }
            let channels = match parse_channels(chans_text) {
                Ok(ch) => ch,
                Err(k) => {
                    problems.push(Problem { field: Field::ContactChannel(j, k), want: Want::ChannelForm });
                    Vec::new()
                }
            };
            let mut then = Vec::new();
            for (s, line) in then_text.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
                let line = line.replace('：', ":");
                let Some((mins, rest)) = line.split_once(':') else {
                    problems.push(Problem { field: Field::StepAfter(j, s), want: Want::AfterMin });
                    continue;
                };
                let mins = mins.trim().trim_end_matches("分後").trim_end_matches('分').trim_end_matches("min").trim();
                let Some(after_min) = parse_number(mins).filter(|m| m.fract() == 0.0 && *m >= 0.0 && *m <= 1e6) else {
                    problems.push(Problem { field: Field::StepAfter(j, s), want: Want::AfterMin });
                    continue;
                };
                match parse_channels(rest) {
                    Ok(channels) => then.push(ChannelStep { after_min: after_min as u32, channels }),
                    Err(k) => problems.push(Problem { field: Field::StepChannel(j, s, k), want: Want::ChannelForm }),
                }
            }
            cmap.push(j);
            let _ = c;
            let field = |k: &str| self.get(&format!("c{j}_consent_{k}")).trim().to_string();
            let (by, on, purpose, withdrawn) = (field("by"), field("on"), field("purpose"), field("withdrawn"));
            let consent =
                (!(by.is_empty() && on.is_empty() && purpose.is_empty() && withdrawn.is_empty())).then(|| {
                    crate::domain::homes::Consent {
                        given_by: by,
                        on,
                        purpose,
                        withdrawn_on: (!withdrawn.is_empty()).then_some(withdrawn),
                    }
                });
            contacts.push(Contact {
                role: role.unwrap_or(Role::Family),
                name,
                language: if self.get(&format!("c{j}_language")) == "en" { Lang::En } else { Lang::Ja },
                channels,
                then,
                quiet_hours: (!quiet.is_empty()).then_some(quiet),
                phone: (!phone.is_empty()).then_some(phone),
                consent,
            });
        }
        let name = self.get("municipality_name").trim();
        let home = Home {
            id,
            municipality: self.get("municipality").trim().to_string(),
            municipality_name: (!name.is_empty()).then(|| name.to_string()),
            label: self.get("label").trim().to_string(),
            devices,
            backup,
            evacuation,
            contacts,
            escalation: stored.escalation.clone(),
        };
        let at = |map: &Vec<usize>, i: usize| map.get(i).copied().unwrap_or(i);
        for p in home.problems(&app.known) {
            let field = match p.field {
                Field::DeviceWatts(i) => Field::DeviceWatts(at(&dmap, i)),
                Field::DeviceName(i) => Field::DeviceName(at(&dmap, i)),
                Field::Backup(i) => Field::Backup(at(&bmap, i)),
                Field::BackupRuntime(i) => Field::BackupRuntime(at(&bmap, i)),
                Field::ContactName(i) => Field::ContactName(at(&cmap, i)),
                Field::ContactChannels(i) => Field::ContactChannels(at(&cmap, i)),
                Field::ContactChannel(i, k) => Field::ContactChannel(at(&cmap, i), k),
                Field::StepAfter(i, s) => Field::StepAfter(at(&cmap, i), s),
                Field::StepChannels(i, s) => Field::StepChannels(at(&cmap, i), s),
                Field::StepChannel(i, s, k) => Field::StepChannel(at(&cmap, i), s, k),
                Field::QuietHours(i) => Field::QuietHours(at(&cmap, i)),
                Field::Consent(i) => Field::Consent(at(&cmap, i)),
                Field::Phone(i) => Field::Phone(at(&cmap, i)),
                Field::ContactRole(i) => Field::ContactRole(at(&cmap, i)),
                other => other,
            };
            // A parse problem already names this place; the plan's check would repeat it.
            if !problems.iter().any(|q: &Problem| q.field == field) {
                problems.push(Problem { field, want: p.want });
            }
        }
        if !home.municipality.is_empty()
            && crate::domain::homes::valid_municipality(&home.municipality)
            && !v.user.may_edit_plan(&home.municipality)
        {
            problems.push(Problem { field: Field::Municipality, want: Want::InScope });
        }
        (home, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_read_in_either_languages_words_and_shown_in_the_readers() {
        assert_eq!(
            parse_channels("SMS:+819012345678\n電話：+819012345678, line:Uabc、メール:a@b.jp\n連携:coord").unwrap(),
            [
                ChannelRef::Sms("+819012345678".into()),
                ChannelRef::Voice("+819012345678".into()),
                ChannelRef::Line("Uabc".into()),
                ChannelRef::Email("a@b.jp".into()),
                ChannelRef::Webhook("coord".into()),
            ]
        );
        assert_eq!(parse_channels("sms:+81, fax:123"), Err(1));
        assert_eq!(parse_channels("+819012345678"), Err(0));
        for c in [ChannelRef::Voice("+81".into()), ChannelRef::Webhook("w".into()), ChannelRef::Email("a@b".into())] {
            for lang in [Lang::Ja, Lang::En] {
                assert_eq!(parse_channel(&channel_text(&c, lang)), Some(c.clone()));
            }
        }
        assert_eq!(parse_number("２５．５"), Some(25.5));
        assert_eq!(parse_number("NaN"), None);
    }
}
