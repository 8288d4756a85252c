//! The care-plan editor: homes and their plans created and changed in the dashboard.
//!
//! `GET /homes/{id}/plan` shows a home's plan as a form — what readers call the home, its
//! municipality, the devices on backup power with their watts, each backup source, the
//! destination and travel time, and every contact with their channels — and below it every
//! version of the plan with who stored it and what changed. `POST` stores the form as the next
//! version; `/plans/new` creates a home. Administrators edit any home; a coordinator the homes
//! of their own municipalities (and may not move a home out of them). Families and facilities
//! cannot edit.
//!
//! **The same checks as the homes file.** The form becomes a [`Home`] and goes through
//! [`Home::problems`] with the gateway's config ([`App::known`]), so a plan the dashboard
//! stores is a plan `homes import` would take. Every problem is listed at once, in the reader's
//! language, with the row the reader sees ([`Field::label`]), never a key. A row left blank is
//! a row removed. The escalation overrides are not in the form and are kept as they were.
//!
//! **Versions.** The store keeps every version ([`crate::edge::store::HomeVersion`]; the homes file
//! and `homes import` add versions too). `?version=N` fills the form with an earlier version:
//! storing it makes it the newest (a restore is a change like any other). The form carries
//! the version it was based on, and the service refuses it when another version was stored
//! meanwhile, so two coordinators editing at once never silently undo each other.
//!
//! **Audit.** `plan_create` and `plan_edit`, with the home and the version. Reading the
//! editor is audited as a view of the home (`view_plan`): it shows every contact.
//!
//! The live updater never swaps this page (`data-no-live`): a refresh would lose edits. A
//! new home still needs its agent's credentials from `mamori-gateway homes provision`.
//!
//! Over 800 lines for a reason: the form's two directions (a plan to fields, fields back to
//! a plan with every problem placed on its row) belong together, and splitting them would
//! leave each half unable to say which input a problem is under.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use mamori_protocol::mqtt::{HomeId, Role};
use serde::Deserialize;

use super::auth::Viewer;
use super::html::{failed, local, not_found};
use super::layout::layout_str as layout;
use super::{escape, App, Client, SaveRefusal};
use crate::domain::homes::{
    Backup, BackupKind, ChannelRef, ChannelStep, Chemistry, Contact, Device, Evacuation, Field, Home, Lang, Problem,
    Want,
};
use crate::edge::store::HomeVersion;

/// Blank rows offered after the plan's own, to add a device, a source or a contact.
const BLANK_ROWS: usize = 2;
/// At most this many rows of each kind are read from a form (and shown).
const MAX_ROWS: usize = 200;

/// Store a plan as its home's next version, unless another version was stored since
/// `based_on` (0: a new home, refused when the id is taken, `known` saying whether the engine
/// has it). Its version. The service calls this between its other work.
pub fn store_plan(
    store: &mut dyn crate::edge::store::Store,
    known: bool,
    home: &Home,
    by: &str,
    based_on: u32,
) -> Result<u32, SaveRefusal> {
    let failed = |e: crate::edge::store::StoreError| SaveRefusal::Failed(e.to_string());
    let latest = store.home_versions(&home.id).map_err(failed)?.first().map_or(0, |v| v.version);
    if based_on == 0 && (known || latest > 0) {
        return Err(SaveRefusal::Exists);
    }
    if based_on != 0 && latest != based_on {
        return Err(SaveRefusal::Changed { now: latest });
    }
    store.upsert_homes(std::slice::from_ref(home), by).map_err(failed)?;
    Ok(store.home_versions(&home.id).map_err(failed)?.first().map_or(0, |v| v.version))
}

fn tr(lang: Lang, ja: &'static str, en: &'static str) -> &'static str {
    if lang == Lang::Ja {
        ja
    } else {
        en
    }
}

/// `?version=N`: show an earlier version in the form.
#[derive(Deserialize, Default)]
pub struct PlanQuery {
    version: Option<u32>,
}

/// `GET /homes/{id}/plan`.
pub async fn edit(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Query(q): Query<PlanQuery>,
) -> Response {
    let snap = app.snap();
    let Some(plan) = super::view::home(&snap.engine, &v.user, &id).cloned() else { return not_found(v.lang) };
    if !v.user.may_edit_plan(&plan.municipality) {
        return forbidden(&v);
    }
    let home = plan.id.clone();
    let versions = match app.db(move |s| Ok(s.home_versions(&home)?)).await {
        Ok(vs) => vs,
        Err(e) => return failed(e),
    };
    app.audit_view(&v, &client.text(), "view_plan", &id, "").await;
    let latest = versions.first().map_or(0, |x| x.version);
    let (shown, note) = match q.version {
        Some(n) if n != latest => match versions.iter().find(|x| x.version == n) {
            Some(x) => (x.plan.clone(), Some(n)),
            None => return not_found(v.lang),
        },
        // The store's newest version, which `based_on` names (the engine's copy may lag it).
        _ => (versions.first().map_or_else(|| plan.clone(), |x| x.plan.clone()), None),
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<p><a href=\"/homes/{id}\">← {}</a></p><h1>{}: {}</h1>",
        escape(&plan.label),
        tr(v.lang, "支援計画", "Care plan"),
        escape(&plan.label),
        id = escape(&id),
    );
    if let Some(n) = note {
        let _ = write!(
            body,
            "<p class=\"notice\" role=\"status\">{}</p>",
            if v.lang == Lang::Ja {
                format!("第{n}版の内容を表示しています。保存すると、この内容が新しい版になります。")
            } else {
                format!("Showing version {n}. Saving makes it the newest version.")
            }
        );
    }
    body.push_str(&form(
        &v,
        &Fields::from_home(&shown, v.lang),
        &format!("/homes/{}/plan", escape(&id)),
        latest,
        false,
        &[],
    ));
    body.push_str(&history(&versions, &id, &app.style.offset, v.lang));
    layout(&v, tr(v.lang, "支援計画", "Care plan"), &body).into_response()
}

/// `POST /homes/{id}/plan`.
pub async fn save(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(id): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let f = Fields::from_pairs(pairs);
    if let Some(r) = v.csrf_refusal(f.get("csrf")) {
        return r;
    }
    let snap = app.snap();
    let Some(stored) = super::view::home(&snap.engine, &v.user, &id).cloned() else { return not_found(v.lang) };
    if !v.user.may_edit_plan(&stored.municipality) {
        return forbidden(&v);
    }
    let based_on: u32 = f.get("based_on").parse().unwrap_or(0);
    // The escalation overrides (not in the form) from the store's newest version.
    let id2 = stored.id.clone();
    let stored = match app.db(move |s| Ok(s.home_versions(&id2)?)).await {
        Ok(vs) => vs.into_iter().next().map_or(stored, |x| x.plan),
        Err(e) => return failed(e),
    };
    let (home, problems) = f.to_home(stored.id.clone(), &stored, &v, &app);
    let action = format!("/homes/{}/plan", escape(&id));
    if !problems.is_empty() {
        return refused(&v, &f, &action, based_on, false, &problems);
    }
    match app.save_plan(home, v.user.username.clone(), based_on.max(1)).await {
        Ok(version) => {
            app.audit(&v.user.username, &client.text(), "plan_edit", &id, &format!("version {version}")).await;
            Redirect::to(&format!("/homes/{id}?saved={version}")).into_response()
        }
        Err(r) => refusal(&v, &f, &action, based_on, false, r),
    }
}

/// `GET /plans/new`.
pub async fn new(State(_app): State<App>, v: Viewer) -> Response {
    if !matches!(
        v.user.role,
        crate::admin::accounts::AccountRole::Admin | crate::admin::accounts::AccountRole::Coordinator
    ) {
        return forbidden(&v);
    }
    let mut f = Fields::default();
    // A coordinator of one municipality starts with it.
    if let [only] = v.user.municipalities.as_slice() {
        f.set("municipality", only);
    }
    new_page(&v, &f, 0, &[]).into_response()
}

fn new_page(v: &Viewer, f: &Fields, based_on: u32, problems: &[Problem]) -> maud::Markup {
    let mut body = format!(
        "<h1>{}</h1><p>{}</p>",
        tr(v.lang, "世帯を追加する", "Add a home"),
        tr(
            v.lang,
            "この世帯の見守り機の設定ファイル（証明書とパスワード）は、追加したあとで管理者がゲートウェイのサーバーで作ります。",
            "The home unit's settings (its certificate and password) are made by an administrator on the gateway's server once the home is added (`mamori-gateway homes provision`)."
        )
    );
    body.push_str(&form(v, f, "/plans/new", based_on, true, problems));
    layout(v, tr(v.lang, "世帯を追加する", "Add a home"), &body)
}

/// `POST /plans/new`.
pub async fn create(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let f = Fields::from_pairs(pairs);
    if let Some(r) = v.csrf_refusal(f.get("csrf")) {
        return r;
    }
    if !matches!(
        v.user.role,
        crate::admin::accounts::AccountRole::Admin | crate::admin::accounts::AccountRole::Coordinator
    ) {
        return forbidden(&v);
    }
    let mut problems = Vec::new();
    let id = match HomeId::new(f.get("id").trim()) {
        Ok(id) if app.snap().engine.plan(&id).is_some() => {
            problems.push(Problem { field: Field::Id, want: Want::UniqueId });
            id
        }
        Ok(id) => id,
        Err(_) => {
            problems.push(Problem { field: Field::Id, want: Want::IdForm });
            // A stand-in, so that the rest of the form is checked too; it is never stored.
            match HomeId::new("new") {
                Ok(id) => id,
                Err(e) => return failed(format!("the stand-in id: {e:?}")),
            }
        }
    };
    let blank = Home {
        id: id.clone(),
        municipality: String::new(),
        municipality_name: None,
        label: String::new(),
        devices: Vec::new(),
        backup: Vec::new(),
        evacuation: None,
        contacts: Vec::new(),
        escalation: BTreeMap::new(),
    };
    let (home, more) = f.to_home(id.clone(), &blank, &v, &app);
    problems.extend(more);
    if !problems.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, new_page(&v, &f, 0, &problems)).into_response();
    }
    match app.save_plan(home, v.user.username.clone(), 0).await {
        Ok(version) => {
            app.audit(&v.user.username, &client.text(), "plan_create", id.as_str(), &format!("version {version}"))
                .await;
            Redirect::to(&format!("/homes/{}?saved={version}", id.as_str())).into_response()
        }
        Err(r) => refusal(&v, &f, "/plans/new", 0, true, r),
    }
}

fn forbidden(v: &Viewer) -> Response {
    (
        StatusCode::FORBIDDEN,
        layout(
            v,
            "403",
            &format!(
                "<p class=\"error\">{}</p>",
                tr(
                    v.lang,
                    "支援計画を作ったり変えたりできるのは、管理者と、その市区町村のコーディネーターです。",
                    "Only administrators and the municipality's coordinators may create or change care plans."
                )
            ),
        ),
    )
        .into_response()
}

/// A refused form's heading: what it is and the way back (the form's own address says which
/// home).
fn heading(v: &Viewer, f: &Fields, action: &str, new: bool) -> String {
    if new {
        return format!("<h1>{}</h1>", tr(v.lang, "世帯を追加する", "Add a home"));
    }
    let id = action.trim_start_matches("/homes/").trim_end_matches("/plan");
    format!(
        "<p><a href=\"/homes/{id}\">← {back}</a></p><h1>{}: {}</h1>",
        tr(v.lang, "支援計画", "Care plan"),
        escape(f.get("label")),
        back = tr(v.lang, "世帯のページへ", "Back to the home"),
    )
}

fn refused(v: &Viewer, f: &Fields, action: &str, based_on: u32, new: bool, problems: &[Problem]) -> Response {
    let page = if new {
        new_page(v, f, based_on, problems)
    } else {
        let body = heading(v, f, action, false) + &form(v, f, action, based_on, false, problems);
        layout(v, tr(v.lang, "支援計画", "Care plan"), &body)
    };
    (StatusCode::UNPROCESSABLE_ENTITY, page).into_response()
}

fn refusal(v: &Viewer, f: &Fields, action: &str, based_on: u32, new: bool, r: SaveRefusal) -> Response {
    let ja = v.lang == Lang::Ja;
    let status = match r {
        SaveRefusal::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::CONFLICT,
    };
    let text = match r {
        SaveRefusal::Changed { now } => {
            if ja {
                format!("ほかの人がこの計画を保存しました（第{now}版）。入力した内容は保存していません。計画を開き直して、変更をもう一度入れてください。")
            } else {
                format!("Someone else saved this plan meanwhile (version {now}). Your changes were not saved: open the plan again and make them again.")
            }
        }
        SaveRefusal::Exists => {
            if ja {
                "この番号の世帯はもうあります。別の番号にしてください。".to_string()
            } else {
                "A home with this id already exists: choose another id.".to_string()
            }
        }
        SaveRefusal::Failed(e) => {
            tracing::error!(error = %e, "care plan not stored");
            if ja {
                "いまは保存できません。入力した内容は保存していません。少し待ってからもう一度保存してください。"
                    .to_string()
            } else {
                "The plan cannot be stored right now; nothing was saved. Try again shortly.".to_string()
            }
        }
    };
    let body = format!(
        "{}<p class=\"error\" role=\"alert\">{}</p>{}",
        heading(v, f, action, new),
        escape(&text),
        form(v, f, action, based_on, new, &[])
    );
    (status, layout(v, tr(v.lang, "支援計画", "Care plan"), &body)).into_response()
}

/// The form's fields by name (the same shape whether filled from a plan or posted back).
#[derive(Default, Debug, Clone)]
struct Fields(BTreeMap<String, String>);

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
    fn from_pairs(pairs: Vec<(String, String)>) -> Fields {
        // The last of a repeated name wins; nothing beyond a sane size is kept.
        Fields(pairs.into_iter().take(2000).map(|(k, v)| (k, v.chars().take(2000).collect())).collect())
    }

    fn get(&self, k: &str) -> &str {
        self.0.get(k).map_or("", String::as_str)
    }

    fn set(&mut self, k: &str, v: &str) {
        self.0.insert(k.to_string(), v.to_string());
    }

    fn from_home(h: &Home, lang: Lang) -> Fields {
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
    fn rows(&self, prefix: char) -> usize {
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
    fn to_home(&self, id: HomeId, stored: &Home, v: &Viewer, app: &App) -> (Home, Vec<Problem>) {
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

/// The form's values and, by input name, what is wrong there (shown under the input).
struct Ctx<'a> {
    fields: &'a Fields,
    errs: BTreeMap<String, Vec<String>>,
}

impl Ctx<'_> {
    fn get(&self, name: &str) -> &str {
        self.fields.get(name)
    }

    fn rows(&self, prefix: char) -> usize {
        self.fields.rows(prefix)
    }

    /// The error lines under an input, and the attributes that tie them to it.
    fn err(&self, name: &str) -> (String, String) {
        match self.errs.get(name) {
            Some(msgs) => (
                format!(" aria-invalid=\"true\" aria-describedby=\"{name}-err\""),
                format!(
                    "<small class=\"error\" id=\"{name}-err\">{}</small>",
                    msgs.iter().map(|m| escape(m)).collect::<Vec<_>>().join("<br>")
                ),
            ),
            None => (String::new(), String::new()),
        }
    }
}

/// The input a problem is shown under.
fn input_of(field: &Field) -> String {
    match field {
        Field::Id => "id".into(),
        Field::Municipality => "municipality".into(),
        Field::MunicipalityName => "municipality_name".into(),
        Field::Label => "label".into(),
        Field::Devices => "d0_name".into(),
        Field::DeviceWatts(j) => format!("d{j}_watts"),
        Field::DeviceName(j) => format!("d{j}_name"),
        Field::Backup(j) | Field::BackupRuntime(j) => format!("b{j}_kind"),
        Field::Evacuation => "evac_destination".into(),
        Field::Contacts => "c0_name".into(),
        Field::ContactName(j) => format!("c{j}_name"),
        Field::ContactChannels(j) | Field::ContactChannel(j, _) => format!("c{j}_channels"),
        Field::StepAfter(j, _) | Field::StepChannels(j, _) | Field::StepChannel(j, _, _) => format!("c{j}_then"),
        Field::QuietHours(j) => format!("c{j}_quiet"),
        Field::Consent(j) => format!("c{j}_consent_by"),
        Field::Phone(j) => format!("c{j}_phone"),
        Field::ContactRole(j) => format!("c{j}_role"),
        Field::Escalation(_) => "label".into(),
    }
}

fn input(f: &Ctx, name: &str, label: &str, extra: &str) -> String {
    let (attrs, err) = f.err(name);
    format!(
        "<label>{label}<input name=\"{name}\" value=\"{}\"{extra}{attrs}>{err}</label>",
        escape(f.get(name)),
        label = escape(label),
    )
}

fn select(f: &Ctx, name: &str, label: &str, options: &[(&str, &str)]) -> String {
    let (attrs, err) = f.err(name);
    let mut s = format!("<label>{}<select name=\"{name}\"{attrs}>", escape(label));
    for (value, text) in options {
        let sel = if f.get(name) == *value { " selected" } else { "" };
        let _ = write!(s, "<option value=\"{value}\"{sel}>{}</option>", escape(text));
    }
    let _ = write!(s, "</select>{err}</label>");
    s
}

fn textarea(f: &Ctx, name: &str, label: &str, hint: &str) -> String {
    let (attrs, err) = f.err(name);
    format!(
        "<label>{}<textarea name=\"{name}\" rows=\"2\"{attrs}>{}</textarea><small>{}</small>{err}</label>",
        escape(label),
        escape(f.get(name)),
        escape(hint)
    )
}

/// The editor: every problem listed on top, and each also under its input.
fn form(v: &Viewer, f: &Fields, action: &str, based_on: u32, new: bool, problems: &[Problem]) -> String {
    let lang = v.lang;
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    let mut errs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in problems {
        errs.entry(input_of(&p.field)).or_default().push(format!("{}: {}", p.field.label(lang), p.want.text(lang)));
    }
    let f = &Ctx { fields: f, errs };
    let mut s = String::new();
    if !problems.is_empty() {
        let _ = write!(
            s,
            "<div class=\"error\" role=\"alert\"><p>{}</p><ul>",
            t("保存していません。次の点を直してください。", "Not saved. Please correct the following.")
        );
        for p in problems {
            let _ = write!(s, "<li>{}: {}</li>", escape(&p.field.label(lang)), escape(&p.want.text(lang)));
        }
        s.push_str("</ul></div>");
    }
    let _ = write!(
        s,
        "<form method=\"post\" action=\"{action}\" class=\"plan\" data-no-live>{}<input type=\"hidden\" name=\"based_on\" value=\"{based_on}\">",
        v.csrf_field().into_string()
    );
    let _ = write!(s, "<fieldset><legend>{}</legend>", t("世帯", "Home"));
    if new {
        s.push_str(&input(
            f,
            "id",
            t(
                "世帯の番号（英小文字・数字・「-」、見守り機が使います）",
                "Home id (lowercase letters, digits, -; the home unit uses it)",
            ),
            " required maxlength=\"64\" pattern=\"[a-z0-9-]{1,64}\"",
        ));
    }
    s.push_str(&input(
        f,
        "label",
        t("呼び名（通知と画面に出ます）", "Label (in messages and on the dashboard)"),
        " required maxlength=\"80\"",
    ));
    s.push_str(&input(
        f,
        "municipality",
        t("市区町村コード（6桁）", "Municipality code (6 digits)"),
        " required inputmode=\"numeric\" maxlength=\"6\"",
    ));
    s.push_str(&input(f, "municipality_name", t("市区町村名", "Municipality name"), " maxlength=\"40\""));
    s.push_str("</fieldset>");

    let _ = write!(
        s,
        "<fieldset><legend>{}</legend><p><small>{}</small></p>",
        t("予備電源につなぐ機器", "Devices on backup power"),
        t(
            "消費電力は銘板ではなく、ふだんの平均（W）です。空欄にした行は削除されます。",
            "Watts are the average draw, not the nameplate. A row left blank is removed."
        )
    );
    for j in 0..(f.rows('d') + BLANK_ROWS).min(MAX_ROWS) {
        let _ = write!(
            s,
            "<div class=\"row\">{}{}</div>",
            input(f, &format!("d{j}_name"), &format!("{} {}", t("機器", "Device"), j + 1), " maxlength=\"40\""),
            input(f, &format!("d{j}_watts"), t("消費電力（W）", "Watts"), " inputmode=\"decimal\""),
        );
    }
    s.push_str("</fieldset>");

    let _ = write!(
        s,
        "<fieldset><legend>{}</legend><p><small>{}</small></p>",
        t("予備電源", "Backup sources"),
        t(
            "無停電電源装置とポータブル電源は、使える電力量か定格容量（Wh）を。人工呼吸器の内蔵バッテリーは動く時間（分）を入れてください。種類を「なし」にした行は削除されます。",
            "A UPS or a power station needs its usable or nameplate energy (Wh); the ventilator's internal battery its runtime (min). A row whose kind is none is removed."
        )
    );
    let kinds = [
        ("", t("なし", "none")),
        ("ups", t("無停電電源装置（UPS）", "UPS")),
        ("power_station", t("ポータブル電源", "Power station")),
        ("ventilator_internal", t("人工呼吸器の内蔵バッテリー", "Ventilator's internal battery")),
    ];
    let chems = [
        ("", t("種類に応じて", "usual for its kind")),
        ("lead_acid", t("鉛蓄電池", "lead-acid")),
        ("lithium", t("リチウム", "lithium")),
    ];
    for j in 0..(f.rows('b') + BLANK_ROWS).min(MAX_ROWS) {
        let _ = write!(
            s,
            "<div class=\"row\">{}{}{}{}{}</div>",
            select(f, &format!("b{j}_kind"), &format!("{} {}", t("予備電源", "Source"), j + 1), &kinds),
            input(f, &format!("b{j}_usable_wh"), t("使える電力量（Wh）", "Usable Wh"), " inputmode=\"decimal\""),
            input(f, &format!("b{j}_nameplate_wh"), t("定格容量（Wh）", "Nameplate Wh"), " inputmode=\"decimal\""),
            input(f, &format!("b{j}_runtime_min"), t("動く時間（分）", "Runtime (min)"), " inputmode=\"decimal\""),
            select(f, &format!("b{j}_chemistry"), t("電池", "Battery"), &chems),
        );
    }
    s.push_str("</fieldset>");

    let _ = write!(
        s,
        "<fieldset><legend>{}</legend><div class=\"row\">{}{}</div></fieldset>",
        t("避難先", "Evacuation"),
        input(f, "evac_destination", t("電源のある避難先", "Powered destination"), " maxlength=\"80\""),
        input(f, "evac_travel_min", t("移動時間（分）", "Travel time (min)"), " inputmode=\"numeric\""),
    );

    let _ = write!(
        s,
        "<fieldset><legend>{}</legend><p><small>{}</small></p>",
        t("連絡先", "Contacts"),
        t(
            "ご家族以外の方には、保護者の同意（同意書の内容）を入れてください。ゲートウェイが同意を求める設定のときは、同意のない方には何も送りません。連絡手段は1行に一つ、「種類:宛先」の形で書きます（SMS:+819012345678、電話:+819012345678、LINE:LINEのID、メール:メールアドレス、連携:設定にある連携先の名前）。後で使う連絡手段は、確認がないときに使うもので、1行に「分: 種類:宛先」と書きます（例「5: 電話:+819012345678」）。名前と連絡手段を空欄にした行は削除されます。",
            "For everyone but the family, record the guardian's consent as on the consent form: when the gateway requires consent, a contact without it is sent nothing. One channel per line as kind:address (sms:+819012345678, voice:+819012345678, line:U…, email:…, webhook:an endpoint named in the config). Later channels are used when the role has not acknowledged, one line each as minutes: kind:address (e.g. 5: voice:+819012345678). A row with no name and no channels is removed."
        )
    );
    let roles: Vec<(&str, &str)> =
        Role::ALL.into_iter().map(|r| (r.as_str(), crate::domain::message::role_text(r, lang))).collect();
    let langs = [("ja", "日本語"), ("en", "English")];
    for j in 0..(f.rows('c') + BLANK_ROWS).min(MAX_ROWS) {
        let _ = write!(
            s,
            "<div class=\"contact\"><div class=\"row\">{}{}{}{}{}</div><div class=\"row\">{}{}</div><div class=\"row\">{}{}{}{}</div></div>",
            input(f, &format!("c{j}_name"), &format!("{} {}", t("連絡先", "Contact"), j + 1), " maxlength=\"40\""),
            select(f, &format!("c{j}_role"), t("役割", "Role"), &roles),
            select(f, &format!("c{j}_language"), t("通知の言語", "Language"), &langs),
            input(
                f,
                &format!("c{j}_phone"),
                t("電話番号（画面から電話をかけるとき）", "Phone (to call from the dashboard)"),
                " type=\"tel\" placeholder=\"+819012345678\""
            ),
            input(
                f,
                &format!("c{j}_quiet"),
                t("通知を控える時間（例 22:00-07:00）", "Quiet hours (e.g. 22:00-07:00)"),
                ""
            ),
            textarea(f, &format!("c{j}_channels"), t("連絡手段", "Channels"), t("すぐに使います", "used at once")),
            textarea(
                f,
                &format!("c{j}_then"),
                t("後で使う連絡手段", "Later channels"),
                t("確認がないとき", "while unacknowledged")
            ),
            input(f, &format!("c{j}_consent_by"), t("同意した方（保護者）", "Consent given by (the guardian)"), " maxlength=\"40\""),
            input(f, &format!("c{j}_consent_on"), t("同意した日", "Consent given on"), " type=\"date\""),
            input(f, &format!("c{j}_consent_purpose"), t("同意の目的", "For what"), " maxlength=\"200\""),
            input(f, &format!("c{j}_consent_withdrawn"), t("撤回した日", "Withdrawn on"), " type=\"date\""),
        );
    }
    s.push_str("</fieldset>");
    let _ = write!(
        s,
        "<p><small>{}</small></p><button type=\"submit\">{}</button></form>",
        t(
            "通知の段階の個別設定は、この画面では変わりません。保存した内容は、次の通知から使われます。",
            "Per-home escalation overrides are kept as they are. A saved plan is used from the next message on."
        ),
        t("保存する", "Save")
    );
    s
}

/// What changed between two versions, in words.
fn changes(new: &Home, old: Option<&Home>, lang: Lang) -> String {
    let Some(old) = old else { return tr(lang, "最初の版", "First version").to_string() };
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    let mut out = Vec::new();
    if new.label != old.label {
        out.push(t("呼び名", "label"));
    }
    if new.municipality != old.municipality || new.municipality_name != old.municipality_name {
        out.push(t("市区町村", "municipality"));
    }
    if new.devices != old.devices {
        out.push(t("機器", "devices"));
    }
    if new.backup != old.backup {
        out.push(t("予備電源", "backup"));
    }
    if new.evacuation != old.evacuation {
        out.push(t("避難先", "evacuation"));
    }
    if new.contacts != old.contacts {
        out.push(t("連絡先", "contacts"));
    }
    if new.escalation != old.escalation {
        out.push(t("通知の段階", "escalation"));
    }
    if out.is_empty() {
        return t("変更なし", "no change").to_string();
    }
    out.join(if lang == Lang::Ja { "・" } else { ", " })
}

fn version_by(by: &str, lang: Lang) -> String {
    match by {
        "" => tr(lang, "記録を始める前から", "before versions were kept").to_string(),
        "homes file" => tr(lang, "世帯ファイル", "the homes file").to_string(),
        "homes import" => tr(lang, "世帯ファイルの取り込み", "homes import").to_string(),
        other => other.to_string(),
    }
}

/// Every version, newest first, with who stored it and what changed.
fn history(versions: &[HomeVersion], id: &str, offset: &chrono::FixedOffset, lang: Lang) -> String {
    let t = |ja: &'static str, en: &'static str| tr(lang, ja, en);
    let mut s = format!(
        "<h2>{}</h2><table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th></th></tr></thead><tbody>",
        t("変更の履歴", "Version history"),
        t("版", "Version"),
        t("日時", "When"),
        t("変更した人", "By"),
        t("変わったところ", "What changed"),
    );
    for (i, x) in versions.iter().enumerate() {
        let show = if i == 0 {
            t("現在の版", "current").to_string()
        } else {
            format!("<a href=\"/homes/{}/plan?version={}\">{}</a>", escape(id), x.version, t("この版を表示", "show"))
        };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{show}</td></tr>",
            x.version,
            local(x.at, *offset),
            escape(&version_by(&x.by, lang)),
            escape(&changes(&x.plan, versions.get(i + 1).map(|p| &p.plan), lang)),
        );
    }
    s.push_str("</tbody></table>");
    s
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
