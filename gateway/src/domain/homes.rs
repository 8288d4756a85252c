//! Homes and their care plans: the only place where a home's opaque id meets people.
//!
//! A homes file is TOML with one `[[home]]` table per home (see `deploy/gateway/homes.toml`),
//! or the same in YAML (a `.yaml`/`.yml` file with a `home:` list; channels as one-key maps,
//! `- webhook: coord-431001`; see `deploy/gateway/homes.yaml`):
//! the municipality (全国地方公共団体コード, six digits with its check digit), a label the
//! readers of a message recognise, the devices on backup power with their watts, each backup
//! source, the evacuation destination with its travel time, contacts by role with their
//! channels and language, and optional per-home escalation overrides.
//!
//! Loading validates everything and reports every problem at once, each with the file, the
//! key and what was expected. Nothing from this file is ever sent over MQTT.
//!
//! Over 800 lines for a reason: the care plan's every field with its check and its words,
//! shared by the homes file, `homes import` and the dashboard's editor, which must refuse
//! exactly the same things.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use mamori_protocol::mqtt::{HomeId, Role};
use serde::{Deserialize, Serialize};

use crate::domain::policy::Policy;

/// A homes file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HomesFile {
    /// Every home.
    #[serde(default, rename = "home")]
    pub homes: Vec<Home>,
}

/// One home and its care plan.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Home {
    /// The opaque id the agent publishes under (`mamori/v1/{id}/...`).
    pub id: HomeId,
    /// The municipality code (six digits, e.g. `431001` for Kumamoto city).
    pub municipality: String,
    /// The municipality's name as its people say it (`熊本市`), for messages and the
    /// dashboard; without it they show the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub municipality_name: Option<String>,
    /// What readers call this home (`K-01 (Higashi-ku)`): shown in messages and the dashboard.
    pub label: String,
    /// Devices on backup power.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Backup sources.
    #[serde(default)]
    pub backup: Vec<Backup>,
    /// Where the child goes when the power will not last.
    #[serde(default)]
    pub evacuation: Option<Evacuation>,
    /// Who hears about this home.
    #[serde(default)]
    pub contacts: Vec<Contact>,
    /// Escalation overrides for this home, by alert kind (`mains_lost`, `default`...).
    #[serde(default)]
    pub escalation: BTreeMap<String, Policy>,
}

/// A device on backup power.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// What it is (`ventilator`, `humidifier`, `suction`...).
    pub name: String,
    /// Average draw, W (measured, not the nameplate: ventilators draw 15–35 W).
    pub watts: f64,
}

/// What kind of backup source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// A UPS (reports its own runtime when it can).
    Ups,
    /// A portable power station through its AC inverter.
    PowerStation,
    /// The ventilator's internal battery: the last one.
    VentilatorInternal,
}

/// One backup source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Its kind.
    pub kind: BackupKind,
    /// Usable energy, Wh (what reaches the devices).
    #[serde(default)]
    pub usable_wh: Option<f64>,
    /// Nameplate energy, Wh: a power station's usable energy is taken as 85 % of it (the AC
    /// inverter's loss), a UPS's as 80 %.
    #[serde(default)]
    pub nameplate_wh: Option<f64>,
    /// Runtime on this source alone, min (a ventilator's internal battery: Astral ~480).
    #[serde(default)]
    pub runtime_min: Option<f64>,
    /// The battery's chemistry, when not the usual for its kind (a UPS: lead-acid; a power
    /// station: lithium).
    #[serde(default)]
    pub chemistry: Option<Chemistry>,
}

/// A battery's chemistry: how far its reported level and its load can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Chemistry {
    /// Sealed lead-acid: delivers less at a high load (Peukert), ages to 50–70 % in 3 years,
    /// its voltage follows its charge.
    LeadAcid,
    /// Lithium (LiFePO4, NMC): a flat voltage and a charge reading good to about ±15 %.
    Lithium,
}

impl Backup {
    /// Its chemistry: as stated, else the usual for its kind.
    pub fn chemistry(&self) -> Chemistry {
        self.chemistry.unwrap_or(match self.kind {
            BackupKind::PowerStation => Chemistry::Lithium,
            _ => Chemistry::LeadAcid,
        })
    }

    /// Usable energy, Wh, when known.
    pub fn energy_wh(&self) -> Option<f64> {
        self.usable_wh.or_else(|| {
            let factor = match self.kind {
                BackupKind::PowerStation => 0.85,
                BackupKind::Ups => 0.80,
                BackupKind::VentilatorInternal => 1.0,
            };
            self.nameplate_wh.map(|wh| wh * factor)
        })
    }
}

/// The evacuation plan (個別避難計画) in short.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Evacuation {
    /// The powered destination.
    pub destination: String,
    /// Travel time there, min.
    pub travel_min: u32,
}

/// Message language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lang {
    /// 日本語 (the default).
    #[default]
    Ja,
    /// English.
    En,
}

/// One person or desk to notify.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    /// Their role for this home.
    pub role: Role,
    /// Their name (stays in the gateway).
    pub name: String,
    /// Message language.
    #[serde(default)]
    pub language: Lang,
    /// Channels, all of which are used for every message.
    pub channels: Vec<ChannelRef>,
    /// Channels tried next, each after its delay, while this person's role has not
    /// acknowledged (LINE at once, then a call five minutes later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<ChannelStep>,
    /// Hours when only critical messages reach this person (`"22:00-07:00"`, local time);
    /// others wait until the end. A critical alert is never held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<String>,
    /// A phone number to call by hand (international form): a `tel:` link on the dashboard,
    /// never messaged (a family on LINE can still be called).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The guardian's consent to share this child's data with this recipient (needed when
    /// the gateway config's `[privacy] require_consent` is on; a family contact needs none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
}

/// A guardian's consent to share the child's data (要配慮個人情報) with one recipient, as
/// recorded on the consent form: who agreed, when, for what, and whether it was withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// Who agreed (the guardian, as on the form).
    pub given_by: String,
    /// When, `YYYY-MM-DD`.
    pub on: String,
    /// For what, as on the form (`停電時の通知と避難の調整`).
    pub purpose: String,
    /// Withdrawn on, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawn_on: Option<String>,
}

fn date(s: &str) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()
}

impl Consent {
    /// Whether its day has not come yet on `today` (or its day cannot be read).
    pub fn not_yet(&self, today: chrono::NaiveDate) -> bool {
        date(&self.on).is_none_or(|on| on > today)
    }

    /// Whether it holds on `today`: given by then and not withdrawn by then.
    pub fn current(&self, today: chrono::NaiveDate) -> bool {
        date(&self.on).is_some_and(|on| on <= today)
            && self.withdrawn_on.as_deref().and_then(date).is_none_or(|w| w > today)
    }
}

impl Contact {
    /// Whether this contact may be sent the child's data on `today`: a family contact always
    /// (the guardian is who consents); anyone else, when consent is required, only with a
    /// current consent naming them.
    pub fn may_receive(&self, require_consent: bool, today: chrono::NaiveDate) -> bool {
        !require_consent || self.role == Role::Family || self.consent.as_ref().is_some_and(|c| c.current(today))
    }
}

/// A later channel of a contact: used `after_min` minutes after the message, unless the
/// contact's role has acknowledged by then or the alert is over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelStep {
    /// Minutes after the message.
    pub after_min: u32,
    /// The channels then.
    pub channels: Vec<ChannelRef>,
}

/// Parse `"HH:MM-HH:MM"` into minutes after midnight (the end may be earlier: over midnight).
pub fn parse_quiet_hours(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    let m = |t: &str| -> Option<u32> {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    };
    let (from, to) = (m(a)?, m(b)?);
    (from != to).then_some((from, to))
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ChannelRef {
    /// A webhook endpoint named in the gateway config's `[endpoints]`.
    Webhook(String),
    /// An e-mail address (sent through the gateway config's `[smtp]`).
    Email(String),
    /// A phone number, through the SMS gateway endpoint named `sms` in `[endpoints]`.
    Sms(String),
    /// A LINE user, group or room id (`U…`, `C…`, `R…` and 32 hex digits), through the
    /// gateway config's `[line]` (the Messaging API's push).
    Line(String),
    /// A phone number to call (international form, `+8190…`), through the gateway config's
    /// `[voice]` (a Twilio-compatible voice API): the message is spoken, and pressing 1
    /// acknowledges.
    Voice(String),
    /// The gateway's own console (the demo).
    Console(String),
}

/// Whether a LINE id is well formed: `U` (a user), `C` (a group) or `R` (a room) and 32
/// lowercase hex digits.
pub fn valid_line_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some('U' | 'C' | 'R'))
        && id.len() == 33
        && chars.all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

impl ChannelRef {
    /// The destination a channel's messages go through: the unit of fairness and of the breaker.
    pub fn destination(&self) -> String {
        match self {
            ChannelRef::Webhook(name) => format!("webhook:{name}"),
            // Every SMS goes through the one SMS gateway, every e-mail through the one relay.
            ChannelRef::Sms(_) => "sms".to_string(),
            ChannelRef::Email(_) => "smtp".to_string(),
            ChannelRef::Line(_) => "line".to_string(),
            ChannelRef::Voice(_) => "voice".to_string(),
            ChannelRef::Console(name) => format!("console:{name}"),
        }
    }

    /// A short, stable text form (`webhook:coord-431001`), used in idempotency keys.
    pub fn key(&self) -> String {
        match self {
            ChannelRef::Webhook(n) => format!("webhook:{n}"),
            ChannelRef::Email(a) => format!("email:{a}"),
            ChannelRef::Sms(p) => format!("sms:{p}"),
            ChannelRef::Line(id) => format!("line:{id}"),
            ChannelRef::Voice(p) => format!("voice:{p}"),
            ChannelRef::Console(n) => format!("console:{n}"),
        }
    }
}

impl Home {
    /// Total draw of the devices on backup, W.
    pub fn load_w(&self) -> f64 {
        self.devices.iter().map(|d| d.watts).sum()
    }

    /// Usable energy of the external sources (UPS and power stations), Wh.
    pub fn external_wh(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .backup
            .iter()
            .filter(|b| b.kind != BackupKind::VentilatorInternal)
            .filter_map(Backup::energy_wh)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// The first external source (UPS or power station): the one whose readings the home
    /// reports and whose health is learned.
    pub fn external(&self) -> Option<&Backup> {
        self.backup.iter().find(|b| b.kind != BackupKind::VentilatorInternal)
    }

    /// The ventilator's internal battery runtime, min.
    pub fn internal_min(&self) -> f64 {
        self.backup.iter().filter(|b| b.kind == BackupKind::VentilatorInternal).filter_map(|b| b.runtime_min).sum()
    }

    /// Contacts with a role.
    pub fn contacts_for(&self, role: Role) -> impl Iterator<Item = &Contact> {
        self.contacts.iter().filter(move |c| c.role == role)
    }
}

impl Home {
    /// Everything wrong with this plan, in the homes file's order (the homes file and the
    /// dashboard's plan editor check the same).
    pub fn problems(&self, known: &Known) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut err = |field: Field, want: Want| out.push(Problem { field, want });
        if !valid_municipality(&self.municipality) {
            err(Field::Municipality, Want::Municipality);
        }
        if self.municipality_name.as_ref().is_some_and(|n| n.trim().is_empty() || n.chars().count() > 40) {
            err(Field::MunicipalityName, Want::MunicipalityName);
        }
        if self.label.trim().is_empty() || self.label.chars().count() > 80 {
            err(Field::Label, Want::Label);
        }
        for (j, d) in self.devices.iter().enumerate() {
            if !(d.watts.is_finite() && d.watts > 0.0 && d.watts < 5000.0) {
                err(Field::DeviceWatts(j), Want::Watts);
            }
        }
        for (j, b) in self.backup.iter().enumerate() {
            let ok_num = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v > 0.0);
            if !(ok_num(b.usable_wh) && ok_num(b.nameplate_wh) && ok_num(b.runtime_min)) {
                err(Field::Backup(j), Want::Positive);
            }
            match b.kind {
                BackupKind::VentilatorInternal if b.runtime_min.is_none() => {
                    err(Field::BackupRuntime(j), Want::InternalRuntime)
                }
                BackupKind::Ups | BackupKind::PowerStation if b.energy_wh().is_none() => {
                    err(Field::Backup(j), Want::Energy)
                }
                _ => {}
            }
        }
        if !self.backup.is_empty() && self.devices.is_empty() {
            err(Field::Devices, Want::DevicesForBackup);
        }
        if self.evacuation.as_ref().is_some_and(|e| {
            e.destination.trim().is_empty() || e.destination.chars().count() > 80 || !(1..=1440).contains(&e.travel_min)
        }) {
            err(Field::Evacuation, Want::Evacuation);
        }
        if self.contacts.iter().all(|c| c.role != Role::Family) {
            err(Field::Contacts, Want::FamilyContact);
        }
        for (j, c) in self.contacts.iter().enumerate() {
            if c.channels.is_empty() {
                err(Field::ContactChannels(j), Want::Channel);
            }
            for (k, ch) in c.channels.iter().enumerate() {
                if let Some(w) = known.check(ch) {
                    err(Field::ContactChannel(j, k), Want::Usable(w));
                }
            }
            let mut seen: BTreeSet<&ChannelRef> = c.channels.iter().collect();
            let mut last = 0;
            for (s, step) in c.then.iter().enumerate() {
                if step.after_min <= last || step.after_min > 24 * 60 {
                    err(Field::StepAfter(j, s), Want::AfterMin);
                }
                last = step.after_min;
                if step.channels.is_empty() {
                    err(Field::StepChannels(j, s), Want::Channel);
                }
                for (k, ch) in step.channels.iter().enumerate() {
                    if let Some(w) = known.check(ch) {
                        err(Field::StepChannel(j, s, k), Want::Usable(w));
                    } else if !seen.insert(ch) {
                        err(Field::StepChannel(j, s, k), Want::ChannelUnused);
                    }
                }
            }
            if c.quiet_hours.as_deref().is_some_and(|q| parse_quiet_hours(q).is_none()) {
                err(Field::QuietHours(j), Want::QuietHours);
            }
            if c.phone.as_deref().is_some_and(|p| !valid_phone(p)) {
                err(Field::Phone(j), Want::Usable(ChannelWant::Phone));
            }
            if let Some(k) = &c.consent {
                let on = date(&k.on);
                let withdrawn = k.withdrawn_on.as_deref().map(date);
                let ok = !k.given_by.trim().is_empty()
                    && k.given_by.chars().count() <= 40
                    && !k.purpose.trim().is_empty()
                    && k.purpose.chars().count() <= 200
                    && on.is_some()
                    && withdrawn.is_none_or(|w| w.is_some_and(|w| Some(w) >= on));
                if !ok {
                    err(Field::Consent(j), Want::Consent);
                }
            }
        }
        for (kind, p) in &self.escalation {
            if kind != "default" && kind.parse::<crate::domain::engine::AlertKind>().is_err() {
                err(Field::Escalation(kind.clone()), Want::AlertKind);
            }
            if let Err(e) = p.validate() {
                err(Field::Escalation(kind.clone()), Want::Policy(e));
            }
        }
        out
    }
}

/// What the validator needs to know from the gateway config.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Webhook endpoints defined in `[endpoints]`.
    pub endpoints: BTreeSet<String>,
    /// Whether an SMS gateway endpoint (`sms`) is defined.
    pub sms: bool,
    /// Whether `[smtp]` is configured.
    pub smtp: bool,
    /// Whether `[line]` is configured.
    pub line: bool,
    /// Whether `[voice]` is configured.
    pub voice: bool,
}

/// Whether a phone number is in international form (`+` and 7 to 15 digits).
pub fn valid_phone(p: &str) -> bool {
    p.strip_prefix('+').is_some_and(|d| (7..=15).contains(&d.len()) && d.chars().all(|c| c.is_ascii_digit()))
}

impl Known {
    /// What a channel should have been, when it cannot be used with this config.
    pub fn check(&self, ch: &ChannelRef) -> Option<ChannelWant> {
        match ch {
            ChannelRef::Webhook(n) if !self.endpoints.contains(n) => Some(ChannelWant::Webhook(n.clone())),
            ChannelRef::Email(a) if !a.contains('@') || a.contains(char::is_whitespace) => Some(ChannelWant::Email),
            ChannelRef::Email(_) if !self.smtp => Some(ChannelWant::Smtp),
            ChannelRef::Sms(p) | ChannelRef::Voice(p) if !valid_phone(p) => Some(ChannelWant::Phone),
            ChannelRef::Voice(_) if !self.voice => Some(ChannelWant::Voice),
            ChannelRef::Sms(_) if !self.sms => Some(ChannelWant::Sms),
            ChannelRef::Line(id) if !valid_line_id(id) => Some(ChannelWant::LineId),
            ChannelRef::Line(_) if !self.line => Some(ChannelWant::Line),
            ChannelRef::Console(n) if n.is_empty() => Some(ChannelWant::Console),
            _ => None,
        }
    }
}

/// What a channel that cannot be used should have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelWant {
    /// A webhook endpoint defined in the config (this one is not).
    Webhook(String),
    /// An e-mail address.
    Email,
    /// E-mail needs `[smtp]`.
    Smtp,
    /// A phone number in international form.
    Phone,
    /// Calls need `[voice]`.
    Voice,
    /// SMS needs the `sms` endpoint.
    Sms,
    /// A well-formed LINE id.
    LineId,
    /// LINE needs `[line]`.
    Line,
    /// A console name.
    Console,
}

impl ChannelWant {
    /// In English, as the config and homes-file errors say it.
    pub fn en(&self) -> String {
        match self {
            ChannelWant::Webhook(n) => {
                format!("a webhook endpoint defined in the gateway config's [endpoints] (`{n}` is not)")
            }
            ChannelWant::Email => "an e-mail address".into(),
            ChannelWant::Smtp => "an [smtp] section in the gateway config".into(),
            ChannelWant::Phone => "a phone number in international form (+8190...)".into(),
            ChannelWant::Voice => "a [voice] section in the gateway config".into(),
            ChannelWant::Sms => "an SMS gateway endpoint named `sms` in the gateway config's [endpoints]".into(),
            ChannelWant::LineId => "a LINE user, group or room id (U, C or R and 32 hex digits)".into(),
            ChannelWant::Line => "a [line] section in the gateway config".into(),
            ChannelWant::Console => "a console name".into(),
        }
    }

    /// In Japanese, for the dashboard's plan editor.
    pub fn ja(&self) -> String {
        match self {
            ChannelWant::Webhook(n) => {
                format!("連携先「{n}」はゲートウェイの設定にありません。設定にある連携先の名前を入れてください")
            }
            ChannelWant::Email => "メールアドレスを入れてください".into(),
            ChannelWant::Smtp => "このゲートウェイはメールを送る設定になっていません".into(),
            ChannelWant::Phone => "電話番号は国番号から入れてください（例: +819012345678）".into(),
            ChannelWant::Voice => "このゲートウェイは電話をかける設定になっていません".into(),
            ChannelWant::Sms => "このゲートウェイはSMSを送る設定になっていません".into(),
            ChannelWant::LineId => "LINEのIDは U・C・R のいずれかと32桁の英数字です".into(),
            ChannelWant::Line => "このゲートウェイはLINEに送る設定になっていません".into(),
            ChannelWant::Console => "コンソールの名前を入れてください".into(),
        }
    }
}

/// Where in a home's plan a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The id.
    Id,
    /// The municipality code.
    Municipality,
    /// The municipality's name.
    MunicipalityName,
    /// The label.
    Label,
    /// The devices as a whole.
    Devices,
    /// Device `j`'s watts.
    DeviceWatts(usize),
    /// Device `j`'s name.
    DeviceName(usize),
    /// Backup source `j`.
    Backup(usize),
    /// Backup source `j`'s runtime.
    BackupRuntime(usize),
    /// The evacuation plan.
    Evacuation,
    /// The contacts as a whole.
    Contacts,
    /// Contact `j`'s name.
    ContactName(usize),
    /// Contact `j`'s channels as a whole.
    ContactChannels(usize),
    /// Contact `j`'s channel `k`.
    ContactChannel(usize, usize),
    /// Contact `j`'s later step `s`: its minutes.
    StepAfter(usize, usize),
    /// Contact `j`'s later step `s`: its channels as a whole.
    StepChannels(usize, usize),
    /// Contact `j`'s later step `s`: channel `k`.
    StepChannel(usize, usize, usize),
    /// Contact `j`'s quiet hours.
    QuietHours(usize),
    /// Contact `j`'s consent.
    Consent(usize),
    /// Contact `j`'s phone number to call.
    Phone(usize),
    /// Contact `j`'s role.
    ContactRole(usize),
    /// An escalation override.
    Escalation(String),
}

impl Field {
    /// The homes file's key.
    pub fn key(&self) -> String {
        match self {
            Field::Id => "id".into(),
            Field::Municipality => "municipality".into(),
            Field::MunicipalityName => "municipality_name".into(),
            Field::Label => "label".into(),
            Field::Devices => "devices".into(),
            Field::DeviceWatts(j) => format!("devices[{j}].watts"),
            Field::DeviceName(j) => format!("devices[{j}].name"),
            Field::Backup(j) => format!("backup[{j}]"),
            Field::BackupRuntime(j) => format!("backup[{j}].runtime_min"),
            Field::Evacuation => "evacuation".into(),
            Field::Contacts => "contacts".into(),
            Field::ContactName(j) => format!("contacts[{j}].name"),
            Field::ContactChannels(j) => format!("contacts[{j}].channels"),
            Field::ContactChannel(j, k) => format!("contacts[{j}].channels[{k}]"),
            Field::StepAfter(j, s) => format!("contacts[{j}].then[{s}].after_min"),
            Field::StepChannels(j, s) => format!("contacts[{j}].then[{s}].channels"),
            Field::StepChannel(j, s, k) => format!("contacts[{j}].then[{s}].channels[{k}]"),
            Field::QuietHours(j) => format!("contacts[{j}].quiet_hours"),
            Field::Consent(j) => format!("contacts[{j}].consent"),
            Field::Phone(j) => format!("contacts[{j}].phone"),
            Field::ContactRole(j) => format!("contacts[{j}].role"),
            Field::Escalation(kind) => format!("escalation.{kind}"),
        }
    }

    /// What the dashboard's plan editor calls it (rows counted from 1, as on the page).
    pub fn label(&self, lang: Lang) -> String {
        let ja = lang == Lang::Ja;
        let pick = |j: &str, e: &str| if ja { j.to_string() } else { e.to_string() };
        match self {
            Field::Id => pick("世帯の番号", "Home id"),
            Field::Municipality => pick("市区町村コード", "Municipality code"),
            Field::MunicipalityName => pick("市区町村名", "Municipality name"),
            Field::Label => pick("呼び名", "Label"),
            Field::Devices => pick("機器", "Devices"),
            Field::DeviceWatts(j) => {
                if ja {
                    format!("機器{}の消費電力", j + 1)
                } else {
                    format!("Device {}: watts", j + 1)
                }
            }
            Field::DeviceName(j) => {
                if ja {
                    format!("機器{}の名前", j + 1)
                } else {
                    format!("Device {}: name", j + 1)
                }
            }
            Field::Backup(j) | Field::BackupRuntime(j) => {
                if ja {
                    format!("予備電源{}", j + 1)
                } else {
                    format!("Backup source {}", j + 1)
                }
            }
            Field::Evacuation => pick("避難先", "Evacuation"),
            Field::Contacts => pick("連絡先", "Contacts"),
            Field::ContactName(j) => {
                if ja {
                    format!("連絡先{}の名前", j + 1)
                } else {
                    format!("Contact {}: name", j + 1)
                }
            }
            Field::ContactChannels(j) | Field::ContactChannel(j, _) => {
                if ja {
                    format!("連絡先{}の連絡手段", j + 1)
                } else {
                    format!("Contact {}: channels", j + 1)
                }
            }
            Field::StepAfter(j, s) | Field::StepChannels(j, s) | Field::StepChannel(j, s, _) => {
                if ja {
                    format!("連絡先{}の後で使う連絡手段（{}行目）", j + 1, s + 1)
                } else {
                    format!("Contact {}: later channels, line {}", j + 1, s + 1)
                }
            }
            Field::QuietHours(j) => {
                if ja {
                    format!("連絡先{}の通知を控える時間", j + 1)
                } else {
                    format!("Contact {}: quiet hours", j + 1)
                }
            }
            Field::ContactRole(j) => {
                if ja {
                    format!("連絡先{}の役割", j + 1)
                } else {
                    format!("Contact {}: role", j + 1)
                }
            }
            Field::Phone(j) => {
                if ja {
                    format!("連絡先{}の電話番号", j + 1)
                } else {
                    format!("Contact {}: phone", j + 1)
                }
            }
            Field::Consent(j) => {
                if ja {
                    format!("連絡先{}の同意", j + 1)
                } else {
                    format!("Contact {}: consent", j + 1)
                }
            }
            Field::Escalation(_) => pick("通知の段階の設定", "Escalation overrides"),
        }
    }
}

/// What a field should have been.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// An id of lowercase letters, digits and `-`.
    IdForm,
    /// An id no other home has.
    UniqueId,
    /// A municipality code with its check digit.
    Municipality,
    /// A municipality the editing account may see (the dashboard).
    InScope,
    /// 1 to 40 characters.
    MunicipalityName,
    /// 1 to 80 characters.
    Label,
    /// 1 to 40 characters.
    Name,
    /// A draw between 0 and 5000 W.
    Watts,
    /// Positive numbers.
    Positive,
    /// The internal battery's runtime.
    InternalRuntime,
    /// A UPS's or a station's energy.
    Energy,
    /// Devices when there is a backup source.
    DevicesForBackup,
    /// A destination with its travel time (1 to 1440 min).
    Evacuation,
    /// At least one family contact.
    FamilyContact,
    /// At least one channel.
    Channel,
    /// A usable channel.
    Usable(ChannelWant),
    /// `kind:address`.
    ChannelForm,
    /// Minutes after the step before, at most 1440.
    AfterMin,
    /// A channel not used before.
    ChannelUnused,
    /// `HH:MM-HH:MM`.
    QuietHours,
    /// Who agreed, when, for what; withdrawn not before given.
    Consent,
    /// A role from the list.
    Role,
    /// An alert kind.
    AlertKind,
    /// A valid policy (its own words).
    Policy(String),
}

impl Want {
    /// In English: what the field should have been.
    pub fn en(&self) -> String {
        match self {
            Want::IdForm => "1 to 64 of lowercase letters, digits and `-`".into(),
            Want::UniqueId => "an id not used by another home".into(),
            Want::Municipality => "a six-digit municipality code with a valid check digit (e.g. 431001)".into(),
            Want::InScope => "a municipality in your own scope".into(),
            Want::MunicipalityName | Want::Name => "1 to 40 characters".into(),
            Want::Label => "1 to 80 characters".into(),
            Want::Watts => "a draw in W between 0 and 5000".into(),
            Want::Positive => "positive numbers".into(),
            Want::InternalRuntime => "the internal battery's runtime in minutes".into(),
            Want::Energy => "`usable_wh` or `nameplate_wh` (needed to forecast when the UPS reports no runtime)".into(),
            Want::DevicesForBackup => "the devices on backup power with their watts (needed for the forecast)".into(),
            Want::Evacuation => "a destination (1 to 80 characters) and its travel time, 1 to 1440 minutes".into(),
            Want::FamilyContact => "at least one contact with role `family`".into(),
            Want::Channel => "at least one channel".into(),
            Want::Usable(c) => c.en(),
            Want::ChannelForm => "a channel as kind:address (e.g. sms:+819012345678)".into(),
            Want::AfterMin => "minutes after the one before, at most 1440".into(),
            Want::ChannelUnused => "a channel not used before for this contact".into(),
            Want::QuietHours => "local hours as \"HH:MM-HH:MM\" (e.g. \"22:00-07:00\")".into(),
            Want::Role => "a role from the list".into(),
            Want::Consent => "who agreed (1 to 40 characters), on (YYYY-MM-DD), the purpose (1 to 200 characters), and withdrawn_on (YYYY-MM-DD) not before on".into(),
            Want::AlertKind => {
                "an alert kind (an event kind such as mains_lost, or home_silent, state_unknown, ...) or default".into()
            }
            Want::Policy(e) => e.clone(),
        }
    }

    /// In Japanese, for the dashboard's plan editor.
    pub fn ja(&self) -> String {
        match self {
            Want::IdForm => "英小文字・数字・「-」で64文字までにしてください".into(),
            Want::UniqueId => "ほかの世帯が使っています。別の番号にしてください".into(),
            Want::Municipality => "6桁の市区町村コード（検査数字つき、例: 431001）を入れてください".into(),
            Want::InScope => "担当している市区町村のコードにしてください".into(),
            Want::MunicipalityName | Want::Name => "1〜40文字で入れてください".into(),
            Want::Label => "1〜80文字で入れてください".into(),
            Want::Watts => "0より大きく5000 W未満の数を入れてください".into(),
            Want::Positive => "正の数を入れてください".into(),
            Want::InternalRuntime => "内蔵バッテリーで動く時間（分）を入れてください".into(),
            Want::Energy => {
                "使える電力量か定格容量（Wh）を入れてください（本体が残り時間を知らせないときの見積もりに使います）"
                    .into()
            }
            Want::DevicesForBackup => {
                "予備電源につなぐ機器と消費電力を入れてください（残り時間の見積もりに使います）".into()
            }
            Want::Evacuation => "避難先（80文字まで）と、そこまでの移動時間（1〜1440分）を両方入れてください".into(),
            Want::FamilyContact => "ご家族の連絡先を少なくとも一つ入れてください".into(),
            Want::Channel => "連絡手段を少なくとも一つ入れてください".into(),
            Want::Usable(c) => c.ja(),
            Want::ChannelForm => "「種類:宛先」の形で書いてください（例: SMS:+819012345678）".into(),
            Want::AfterMin => "分は前の行より大きく、1440分までにしてください".into(),
            Want::ChannelUnused => "この人にすでに使っている連絡手段です".into(),
            Want::QuietHours => "「22:00-07:00」のように時刻で入れてください".into(),
            Want::Role => "一覧から役割を選んでください".into(),
            Want::Consent => "同意した方（40文字まで）、同意した日（例 2026-04-01）、目的（200文字まで）を入れてください。撤回した日は同意した日と同じか、それより後にしてください".into(),
            Want::AlertKind | Want::Policy(_) => "設定が正しくありません。世帯ファイルで直してください".into(),
        }
    }

    /// In the reader's language.
    pub fn text(&self, lang: Lang) -> String {
        if lang == Lang::Ja {
            self.ja()
        } else {
            self.en()
        }
    }
}

/// One problem with a home's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where.
    pub field: Field,
    /// What it should have been.
    pub want: Want,
}

/// A homes file that cannot be used: every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct HomesError(pub Vec<String>);

/// Check a municipality code: six digits whose last is the check digit of JIS X 0402
/// (11 − Σ dᵢ·(6,5,4,3,2) mod 11, keeping the last digit; remainder 0 and 1 both give a
/// check digit of 1 or 0, and either is accepted there).
pub fn valid_municipality(code: &str) -> bool {
    let d: Vec<u32> = code.chars().filter_map(|c| c.to_digit(10)).collect();
    if code.len() != 6 || d.len() != 6 {
        return false;
    }
    let r = (d[0] * 6 + d[1] * 5 + d[2] * 4 + d[3] * 3 + d[4] * 2) % 11;
    match r {
        0 | 1 => d[5] <= 1,
        r => d[5] == 11 - r,
    }
}

impl HomesFile {
    /// Read and validate a homes file.
    pub fn load(path: &Path, known: &Known) -> Result<HomesFile, HomesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HomesError(vec![format!("{}: cannot read: {e}", path.display())]))?;
        HomesFile::parse(&text, path, known)
    }

    /// Parse and validate homes-file text.
    pub fn parse(text: &str, path: &Path, known: &Known) -> Result<HomesFile, HomesError> {
        let file = path.display();
        let yaml = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        let homes: HomesFile = if yaml {
            // One-key maps (`webhook: name`) for the channel enum, as in the TOML form.
            serde_yaml_ng::with::singleton_map_recursive::deserialize(serde_yaml_ng::Deserializer::from_str(text))
                .map_err(|e| HomesError(vec![format!("{file}: {e}")]))?
        } else {
            toml::from_str(text).map_err(|e| HomesError(vec![format!("{file}: {}", e.to_string().trim_end())]))?
        };
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, h) in homes.homes.iter().enumerate() {
            let at = format!("{file}: home[{i}] (id `{}`)", h.id.as_str());
            let mut problems = h.problems(known);
            if !seen.insert(h.id.clone()) {
                problems.insert(0, Problem { field: Field::Id, want: Want::UniqueId });
            }
            for p in problems {
                errors.push(format!("{at}: key `{}`: expected {}", p.field.key(), p.want.en()));
            }
        }
        if errors.is_empty() {
            Ok(homes)
        } else {
            Err(HomesError(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known { endpoints: ["coord".to_string()].into(), sms: true, smtp: false, line: false, voice: false }
    }

    const GOOD: &str = r#"
[[home]]
id = "k-01"
municipality = "431001"
label = "K-01 東区"
devices = [{ name = "ventilator", watts = 25 }, { name = "humidifier", watts = 60 }]
backup = [{ kind = "ups", usable_wh = 400 }, { kind = "ventilator_internal", runtime_min = 480 }]
evacuation = { destination = "熊本大学病院", travel_min = 40 }
contacts = [
  { role = "family", name = "母", channels = [{ sms = "+819012345678" }] },
  { role = "coordinator", name = "佐藤", language = "ja", channels = [{ webhook = "coord" }] },
]
"#;

    #[test]
    fn a_good_file_loads_with_its_plan() {
        let f = HomesFile::parse(GOOD, Path::new("homes.toml"), &known()).unwrap();
        let h = &f.homes[0];
        assert_eq!(h.load_w(), 85.0);
        assert_eq!(h.external_wh(), Some(400.0));
        assert_eq!(h.internal_min(), 480.0);
        assert_eq!(h.contacts_for(Role::Coordinator).count(), 1);
    }

    #[test]
    fn every_problem_is_reported_with_file_and_key() {
        let bad = GOOD
            .replace("431001", "431002")
            .replace("watts = 25", "watts = -1")
            .replace("webhook = \"coord\"", "webhook = \"nope\"")
            .replace("runtime_min = 480", "usable_wh = 80");
        let e = HomesFile::parse(&bad, Path::new("homes.toml"), &known()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("homes.toml: home[0] (id `k-01`): key `municipality`"), "{text}");
        assert!(text.contains("key `devices[0].watts`"), "{text}");
        assert!(text.contains("`nope` is not"), "{text}");
        assert!(text.contains("key `backup[1].runtime_min`"), "{text}");
        assert_eq!(e.0.len(), 4, "{text}");
    }

    #[test]
    fn a_line_id_must_be_well_formed_and_line_configured() {
        let with = |id: &str| GOOD.replace("webhook = \"coord\"", &format!("line = \"{id}\""));
        let good = format!("U{}", "0a".repeat(16));
        let line = Known { line: true, ..known() };
        assert!(HomesFile::parse(&with(&good), Path::new("h.toml"), &line).is_ok());
        let e = HomesFile::parse(&with(&good), Path::new("h.toml"), &known()).unwrap_err().to_string();
        assert!(e.contains("a [line] section"), "{e}");
        for bad in ["U123", "X0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a", &format!("U{}", "0A".repeat(16)), "山田"] {
            let e = HomesFile::parse(&with(bad), Path::new("h.toml"), &line).unwrap_err().to_string();
            assert!(e.contains("a LINE user, group or room id"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_phone_to_call_is_in_international_form_and_voice_configured() {
        let with = |p: &str| GOOD.replace("webhook = \"coord\"", &format!("voice = \"{p}\""));
        let voice = Known { voice: true, ..known() };
        assert!(HomesFile::parse(&with("+819012345678"), Path::new("h.toml"), &voice).is_ok());
        let e = HomesFile::parse(&with("+819012345678"), Path::new("h.toml"), &known()).unwrap_err().to_string();
        assert!(e.contains("a [voice] section"), "{e}");
        for bad in ["09012345678", "+81-90-1234", "+", "+1234567890123456"] {
            let e = HomesFile::parse(&with(bad), Path::new("h.toml"), &voice).unwrap_err().to_string();
            assert!(e.contains("international form"), "{bad}: {e}");
        }
    }

    #[test]
    fn later_channels_and_quiet_hours_are_checked() {
        let with = |extra: &str| {
            GOOD.replace(
                "channels = [{ webhook = \"coord\" }]",
                &format!("channels = [{{ webhook = \"coord\" }}], {extra}"),
            )
        };
        let ok =
            with("then = [{ after_min = 5, channels = [{ sms = \"+819012345678\" }] }], quiet_hours = \"22:00-07:00\"");
        let h = HomesFile::parse(&ok, Path::new("h.toml"), &known()).unwrap();
        assert!(h.homes[0].contacts.iter().any(|c| c.then.len() == 1 && c.quiet_hours.is_some()));
        let bad = with(
            "then = [{ after_min = 5, channels = [{ webhook = \"coord\" }] }, { after_min = 3, channels = [] }], quiet_hours = \"25:00-07:00\"",
        );
        let e = HomesFile::parse(&bad, Path::new("h.toml"), &known()).unwrap_err().to_string();
        for key in [
            "then[0].channels[0]`: expected a channel not used before",
            "then[1].after_min",
            "then[1].channels",
            "quiet_hours",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
        assert_eq!(parse_quiet_hours("22:00-07:00"), Some((1320, 420)));
        assert_eq!(parse_quiet_hours("07:00-07:00"), None);
    }

    #[test]
    fn syntax_and_unknown_keys_name_the_line() {
        let e = HomesFile::parse(&GOOD.replace("label =", "lable ="), Path::new("h.toml"), &known()).unwrap_err();
        assert!(e.to_string().contains("h.toml") && e.to_string().contains("lable"), "{e}");
        let e = HomesFile::parse("[[home]]\nid = \"BAD ID\"", Path::new("h.toml"), &known()).unwrap_err();
        assert!(e.to_string().contains("h.toml"), "{e}");
    }

    const GOOD_YAML: &str = r#"
home:
  - id: k-01
    municipality: "431001"
    label: K-01 東区
    devices:
      - { name: ventilator, watts: 25 }
      - { name: humidifier, watts: 60 }
    backup:
      - { kind: ups, usable_wh: 400 }
      - { kind: ventilator_internal, runtime_min: 480 }
    evacuation: { destination: 熊本大学病院, travel_min: 40 }
    contacts:
      - role: family
        name: 母
        channels: [{ sms: "+819012345678" }]
      - role: coordinator
        name: 佐藤
        language: ja
        channels: [{ webhook: coord }]
"#;

    #[test]
    fn a_yaml_file_is_the_same_plan_as_its_toml() {
        let t = HomesFile::parse(GOOD, Path::new("homes.toml"), &known()).unwrap();
        let y = HomesFile::parse(GOOD_YAML, Path::new("homes.yaml"), &known()).unwrap();
        assert_eq!(t.homes, y.homes);
        // The same validation, the same messages.
        let e = HomesFile::parse(&GOOD_YAML.replace("431001", "431002"), Path::new("homes.yml"), &known()).unwrap_err();
        assert!(e.to_string().contains("homes.yml: home[0] (id `k-01`): key `municipality`"), "{e}");
        // A typo names the file, the key and the line.
        let e =
            HomesFile::parse(&GOOD_YAML.replace("label:", "lable:"), Path::new("homes.yaml"), &known()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("homes.yaml") && text.contains("lable") && text.contains("line 5"), "{text}");
    }

    #[test]
    fn consent_holds_from_its_day_until_withdrawn_and_the_family_needs_none() {
        let with = |consent: &str| {
            GOOD.replace(
                "channels = [{ webhook = \"coord\" }]",
                &format!("channels = [{{ webhook = \"coord\" }}], consent = {consent}"),
            )
        };
        let ok = with(r#"{ given_by = "母", on = "2026-04-01", purpose = "停電時の通知と避難の調整" }"#);
        let h = &HomesFile::parse(&ok, Path::new("h.toml"), &known()).unwrap().homes[0];
        let coord = h.contacts_for(Role::Coordinator).next().unwrap();
        let family = h.contacts_for(Role::Family).next().unwrap();
        let day = |s: &str| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        assert!(!coord.may_receive(true, day("2026-03-31")), "not before it was given");
        assert!(coord.may_receive(true, day("2026-04-01")));
        assert!(family.may_receive(true, day("2000-01-01")), "the guardian is who consents");
        let mut withdrawn = coord.clone();
        withdrawn.consent.as_mut().unwrap().withdrawn_on = Some("2026-06-01".into());
        assert!(withdrawn.may_receive(true, day("2026-05-31")) && !withdrawn.may_receive(true, day("2026-06-01")));
        let mut none = coord.clone();
        none.consent = None;
        assert!(!none.may_receive(true, day("2026-06-01")) && none.may_receive(false, day("2026-06-01")));
        // A form that says nothing of who, when or why is refused, as is a withdrawal before it.
        for bad in [
            r#"{ given_by = "", on = "2026-04-01", purpose = "通知" }"#,
            r#"{ given_by = "母", on = "4月1日", purpose = "通知" }"#,
            r#"{ given_by = "母", on = "2026-04-01", purpose = "" }"#,
            r#"{ given_by = "母", on = "2026-04-01", purpose = "通知", withdrawn_on = "2026-03-01" }"#,
        ] {
            let e = HomesFile::parse(&with(bad), Path::new("h.toml"), &known()).unwrap_err().to_string();
            assert!(e.contains("key `contacts[1].consent`"), "{bad}: {e}");
        }
    }

    #[test]
    fn municipality_check_digits() {
        for good in ["431001", "131016", "011002", "202011"] {
            assert!(valid_municipality(good), "{good}");
        }
        for bad in ["431002", "43100", "4310011", "43100a"] {
            assert!(!valid_municipality(bad), "{bad}");
        }
    }

    #[test]
    fn nameplate_energy_is_derated_through_the_inverter() {
        let b = Backup {
            kind: BackupKind::PowerStation,
            usable_wh: None,
            nameplate_wh: Some(1000.0),
            runtime_min: None,
            chemistry: None,
        };
        assert_eq!(b.energy_wh(), Some(850.0));
    }
}
