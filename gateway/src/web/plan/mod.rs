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
//! | file | what |
//! |---|---|
//! | `mod.rs` | the routes (show, store, create), the refusals, and [`store_plan`] |
//! | `fields.rs` | the form's named values: a plan to fields, and fields back to a plan with every problem placed on its row |
//! | `form.rs` | the form's HTML (problems on top and under their inputs) and the version history |

mod fields;
mod form;

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use mamori_protocol::mqtt::HomeId;
use maud::{html, Markup};
use serde::Deserialize;

use self::fields::Fields;
use self::form::{form, history};
use super::auth::Viewer;
use super::html::{failed, not_found};
use super::layout::layout;
use super::{App, Client, SaveRefusal};
use crate::domain::homes::{Field, Home, Lang, Problem, Want};

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
    let body = html! {
        p { a href={ "/homes/" (id) } { "← " (plan.label) } }
        h1 { (tr(v.lang, "支援計画", "Care plan")) ": " (plan.label) }
        @if let Some(n) = note {
            p.notice role="status" {
                @if v.lang == Lang::Ja {
                    "第" (n) "版の内容を表示しています。保存すると、この内容が新しい版になります。"
                } @else {
                    "Showing version " (n) ". Saving makes it the newest version."
                }
            }
        }
        (form(&v, &Fields::from_home(&shown, v.lang), &format!("/homes/{id}/plan"), latest, false, &[]))
        (history(&versions, &id, &app.style.offset, v.lang))
    };
    layout(&v, tr(v.lang, "支援計画", "Care plan"), body).into_response()
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
    let action = format!("/homes/{id}/plan");
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

fn new_page(v: &Viewer, f: &Fields, based_on: u32, problems: &[Problem]) -> Markup {
    let body = html! {
        h1 { (tr(v.lang, "世帯を追加する", "Add a home")) }
        p {
            (tr(
                v.lang,
                "この世帯の見守り機の設定ファイル（証明書とパスワード）は、追加したあとで管理者がゲートウェイのサーバーで作ります。",
                "The home unit's settings (its certificate and password) are made by an administrator on the gateway's server once the home is added (`mamori-gateway homes provision`)."
            ))
        }
        (form(v, f, "/plans/new", based_on, true, problems))
    };
    layout(v, tr(v.lang, "世帯を追加する", "Add a home"), body)
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
            html! {
                p.error {
                    (tr(
                        v.lang,
                        "支援計画を作ったり変えたりできるのは、管理者と、その市区町村のコーディネーターです。",
                        "Only administrators and the municipality's coordinators may create or change care plans."
                    ))
                }
            },
        ),
    )
        .into_response()
}

/// A refused form's heading: what it is and the way back (the form's own address says which
/// home).
fn heading(v: &Viewer, f: &Fields, action: &str, new: bool) -> Markup {
    if new {
        return html! { h1 { (tr(v.lang, "世帯を追加する", "Add a home")) } };
    }
    let id = action.trim_start_matches("/homes/").trim_end_matches("/plan");
    html! {
        p { a href={ "/homes/" (id) } { "← " (tr(v.lang, "世帯のページへ", "Back to the home")) } }
        h1 { (tr(v.lang, "支援計画", "Care plan")) ": " (f.get("label")) }
    }
}

fn refused(v: &Viewer, f: &Fields, action: &str, based_on: u32, new: bool, problems: &[Problem]) -> Response {
    let page = if new {
        new_page(v, f, based_on, problems)
    } else {
        let body = html! { (heading(v, f, action, false)) (form(v, f, action, based_on, false, problems)) };
        layout(v, tr(v.lang, "支援計画", "Care plan"), body)
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
    let body = html! {
        (heading(v, f, action, new))
        p.error role="alert" { (text) }
        (form(v, f, action, based_on, new, &[]))
    };
    (status, layout(v, tr(v.lang, "支援計画", "Care plan"), body)).into_response()
}
