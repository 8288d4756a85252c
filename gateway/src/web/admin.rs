//! Account and administration pages: a person's own account (password, two-factor codes),
//! and for administrators the accounts (add, disable, enable, reset, scope, API tokens), the
//! audit log with its chain check and CSV, and delivery statistics. Split from `pages.rs`
//! (issue 20: pages by resource); the words are `html.rs`'s, the layout `layout.rs`'s, and the
//! names of roles and channels `pages.rs`'s.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::Viewer;
use super::html::{account_error, failed, local, not_found, T};
use super::layout::layout;
use super::pages::{account_role_text, channel_text};
use super::{App, Client};
use crate::admin::accounts::{self, AccountRole, Accounts, NewUser};
use crate::admin::audit;
use crate::domain::homes::Lang;

/// `GET /account`.
pub async fn account(State(_app): State<App>, v: Viewer) -> Response {
    account_page(&v, None, None)
}

fn account_page(v: &Viewer, message: Option<&str>, new_secret: Option<String>) -> Response {
    let t = T(v.lang);
    let secret = (!v.user.totp).then(|| new_secret.unwrap_or_else(accounts::new_totp_secret));
    let scope = match v.user.role {
        AccountRole::Admin => "*".to_string(),
        AccountRole::Coordinator => v.user.municipalities.join(", "),
        _ => v.user.homes.join(", "),
    };
    let body = html! {
        h1 { (t.t("account")) }
        @if let Some(m) = message { p.notice role="status" { (m) } }
        p {
            (v.user.display_name) " (" (v.user.username) ") · " (account_role_text(v.user.role, v.lang)) " · "
            (t.t("scope")) ": " (scope)
        }
        h2 { (t.t("change_password")) }
        form method="post" action="/account/password" {
            (v.csrf_field())
            label { (t.t("current_password")) input type="password" name="current" autocomplete="current-password" required; }
            label {
                (t.t("new_password"))
                input type="password" name="new" autocomplete="new-password" minlength="12" required;
            }
            button { (t.t("save")) }
        }
        h2 { (t.t("totp")) }
        @if let Some(secret) = secret {
            p { (t.t("totp_setup")) }
            p { code { (secret) } }
            p { small { code { (accounts::totp_uri(&v.user.username, &secret)) } } }
            form method="post" action="/account/totp" {
                (v.csrf_field())
                input type="hidden" name="secret" value=(secret);
                label { (t.t("totp_code")) input name="code" inputmode="numeric" maxlength="6" required; }
                button { (t.t("save")) }
            }
        } @else {
            p { (t.t("totp_on")) }
        }
    };
    layout(v, t.t("account"), body).into_response()
}

/// The password form.
#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    csrf: String,
    current: String,
    new: String,
}

/// `POST /account/password`.
pub async fn account_password(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Form(f): Form<PasswordForm>,
) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let t = T(v.lang);
    let (name, ip, now) = (v.user.username.clone(), client.text(), crate::edge::clock::now());
    // The current password is a password guess like a login's: throttled and audited.
    let keys = [format!("pw:{name}")];
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let reserved = match app.throttle.lock() {
        Ok(mut th) => th.reserve(&keys, now).map_err(|_| th.refused(keys[0], now)),
        Err(_) => Err(None),
    };
    let reservation = match reserved {
        Ok(r) => r,
        Err(audit_now) => {
            if let Some(n) = audit_now {
                app.audit(
                    &name,
                    &ip,
                    "password_change_failed",
                    &name,
                    &format!("throttled ({n} refused in the last minute)"),
                )
                .await;
            }
            return account_page(&v, Some(t.t("password_throttled")), None);
        }
    };
    let n = name.clone();
    let hash = match app.db(move |s| Ok(Accounts::new(s).password_hash(&n)?)).await {
        Ok(Some(h)) => h,
        Ok(None) => return failed(anyhow::anyhow!("the account vanished")),
        Err(e) => return failed(e),
    };
    match app.verify_password(hash, f.current).await {
        Ok(true) => {}
        Ok(false) => {
            app.audit(&name, &ip, "password_change_failed", &name, "wrong current password").await;
            return account_page(&v, Some(t.t("password_wrong")), None);
        }
        Err(super::Busy) => return account_page(&v, Some(t.t("busy")), None),
    }
    let (n, new) = (name.clone(), f.new);
    let lang = v.lang;
    match app.db(move |s| Ok(Accounts::new(s).set_password(&n, &new).map_err(|e| account_error(&e, lang)))).await {
        Ok(Ok(())) => {
            if let Ok(mut th) = app.throttle.lock() {
                th.succeed(&keys, reservation);
            }
            app.audit(&name, &ip, "password_change", &name, "").await;
            // Changing the password ends every session, this one included, and its tokens.
            Redirect::to("/login").into_response()
        }
        Ok(Err(e)) => account_page(&v, Some(&e), None),
        Err(e) => failed(e),
    }
}

/// The TOTP form.
#[derive(Deserialize)]
pub struct TotpForm {
    #[serde(default)]
    csrf: String,
    secret: String,
    code: String,
}

/// `POST /account/totp`.
pub async fn account_totp(State(app): State<App>, v: Viewer, client: Client, Form(f): Form<TotpForm>) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    if v.user.totp {
        return account_page(&v, None, None);
    }
    let (name, secret, code, now) =
        (v.user.username.clone(), f.secret.clone(), f.code.clone(), crate::edge::clock::now());
    let key = app.totp_key.clone();
    match app.db(move |s| Ok(Accounts::new(s).enable_totp(&name, &secret, &code, &key, now)?)).await {
        Ok(true) => {
            app.audit(&v.user.username, &client.text(), "totp_enable", &v.user.username, "").await;
            let mut v = v;
            v.user.totp = true;
            account_page(&v, Some(T(v.lang).t("done")), None)
        }
        Ok(false) => account_page(&v, Some(T(v.lang).t("login_failed")), Some(f.secret)),
        Err(e) => failed(e),
    }
}

fn admin_refusal(v: &Viewer) -> Option<Response> {
    (v.user.role != AccountRole::Admin).then(|| not_found(v.lang))
}

/// `GET /admin/users`.
pub async fn admin_users(State(app): State<App>, v: Viewer) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    admin_users_page(&app, &v, None).await
}

async fn admin_users_page(app: &App, v: &Viewer, message: Option<String>) -> Response {
    let t = T(v.lang);
    let listed = app
        .db(|s| {
            let acc = Accounts::new(s);
            let users = acc.list()?;
            let mut tokens = BTreeMap::new();
            for u in &users {
                tokens.insert(u.username.clone(), acc.tokens(&u.username)?);
            }
            Ok((users, tokens))
        })
        .await;
    let (users, tokens) = match listed {
        Ok(u) => u,
        Err(e) => return failed(e),
    };
    let body = html! {
        h1 { (t.t("users")) }
        @if let Some(m) = message { p.notice role="status" { (m) } }
        table {
            thead {
                tr { th { (t.t("username")) } th { (t.t("display_name")) } th { (t.t("role")) } th { (t.t("scope")) } th {} }
            }
            tbody {
                @for u in &users {
                    (user_row(v, u, tokens.get(&u.username).map(Vec::as_slice).unwrap_or(&[]), app.style.offset))
                }
            }
        }
        h2 { (t.t("add_user")) }
        form method="post" action="/admin/users" class="stack" {
            (v.csrf_field())
            label { (t.t("username")) input name="username" required pattern="[a-z0-9._-]{3,32}"; }
            label { (t.t("display_name")) input name="display_name" required; }
            label {
                (t.t("role"))
                select name="role" {
                    option value="coordinator" { (account_role_text(AccountRole::Coordinator, v.lang)) }
                    option value="facility" { (account_role_text(AccountRole::Facility, v.lang)) }
                    option value="family" { (account_role_text(AccountRole::Family, v.lang)) }
                    option value="admin" { (account_role_text(AccountRole::Admin, v.lang)) }
                }
            }
            label { (t.t("municipalities")) input name="municipalities"; }
            label { (t.t("homes_scope")) input name="homes"; }
            label {
                (t.t("password"))
                input type="password" name="password" minlength="12" required autocomplete="new-password";
            }
            button { (t.t("add_user")) }
        }
    };
    layout(v, t.t("users"), body).into_response()
}

/// An account's row: who, role and scope, and its forms (disable or enable, a new token, a
/// new password, the role and scope, its tokens).
fn user_row(v: &Viewer, u: &accounts::User, tokens: &[crate::edge::store::TokenRow], offset: FixedOffset) -> Markup {
    let t = T(v.lang);
    let scope = match u.role {
        AccountRole::Admin => "*".to_string(),
        AccountRole::Coordinator => u.municipalities.join(", "),
        _ => u.homes.join(", "),
    };
    let toggle = if u.disabled { ("enable", t.t("enable")) } else { ("disable", t.t("disable")) };
    let action = format!("/admin/users/{}", u.username);
    html! {
        tr {
            td {
                (u.username)
                @if u.disabled { " " span."pill"."bad" { (t.t("disabled")) } }
            }
            td { (u.display_name) }
            td { (account_role_text(u.role, v.lang)) @if u.totp { (t.t("totp_short")) } }
            td { code { (scope) } }
            td {
                form method="post" action=(action) class="inline" {
                    (v.csrf_field())
                    input type="hidden" name="action" value=(toggle.0);
                    button.secondary { (toggle.1) }
                }
                form method="post" action=(action) class="inline" {
                    (v.csrf_field())
                    input type="hidden" name="action" value="token";
                    button.secondary { (t.t("new_token")) }
                }
                form method="post" action=(action) class="inline" {
                    (v.csrf_field())
                    input type="hidden" name="action" value="password";
                    input type="password" name="password" minlength="12" placeholder=(t.t("reset_password"))
                        aria-label=(t.t("reset_password")) autocomplete="new-password";
                    button.secondary { (t.t("reset_password")) }
                }
                @if u.role != AccountRole::Admin {
                    form method="post" action=(action) class="inline scope" {
                        (v.csrf_field())
                        input type="hidden" name="action" value="scope";
                        select name="role" aria-label=(t.t("role")) {
                            @for r in [AccountRole::Coordinator, AccountRole::Facility, AccountRole::Family] {
                                option value=(r.as_str()) selected[r == u.role] { (account_role_text(r, v.lang)) }
                            }
                        }
                        input name="scope" value=(scope) aria-label=(t.t("scope_list")) placeholder=(t.t("scope_list"));
                        button.secondary { (t.t("change_scope")) }
                    }
                }
                (tokens_html(v, &u.username, tokens, offset))
            }
        }
    }
}

/// An account's API tokens, each with a button to revoke it alone (a lost laptop's).
fn tokens_html(v: &Viewer, username: &str, tokens: &[crate::edge::store::TokenRow], offset: FixedOffset) -> Markup {
    let t = T(v.lang);
    html! {
        @if !tokens.is_empty() {
            details.tokens {
                summary { (t.t("api_tokens")) " (" (tokens.len()) ")" }
                ul {
                    @for k in tokens {
                        @let made = chrono::DateTime::parse_from_rfc3339(&k.created_at)
                            .map(|d| local(d.to_utc(), offset))
                            .unwrap_or_else(|_| k.created_at.clone());
                        li {
                            "#" (k.id) " " (k.name) " " small { (made) } " "
                            @if k.revoked {
                                span.pill { (t.t("revoked")) }
                            } @else {
                                form method="post" action={ "/admin/users/" (username) } class="inline" {
                                    (v.csrf_field())
                                    input type="hidden" name="action" value="revoke_token";
                                    input type="hidden" name="token_id" value=(k.id);
                                    button.secondary { (t.t("revoke")) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// An account's role and scope as the audit log and the notice say it.
fn scope_text(u: &accounts::User) -> String {
    match u.role {
        AccountRole::Coordinator => format!("{} {}", u.role.as_str(), u.municipalities.join(",")),
        _ => format!("{} {}", u.role.as_str(), u.homes.join(",")),
    }
}

fn list(s: &str) -> Vec<String> {
    s.split([',', ' ']).map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// The add-user form.
#[derive(Deserialize)]
pub struct AddUserForm {
    #[serde(default)]
    csrf: String,
    username: String,
    display_name: String,
    role: String,
    #[serde(default)]
    municipalities: String,
    #[serde(default)]
    homes: String,
    password: String,
}

/// `POST /admin/users`.
pub async fn admin_add_user(State(app): State<App>, v: Viewer, client: Client, Form(f): Form<AddUserForm>) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let Some(role) = AccountRole::parse(&f.role) else {
        return admin_users_page(&app, &v, Some(format!("unknown role {}", f.role))).await;
    };
    let new = NewUser {
        username: f.username.trim().to_string(),
        display_name: f.display_name.trim().to_string(),
        role,
        municipalities: list(&f.municipalities),
        homes: list(&f.homes),
    };
    let totp = (role == AccountRole::Admin).then(accounts::new_totp_secret);
    let (n, pw, secret, now) = (new.clone(), f.password, totp.clone(), crate::edge::clock::now());
    let (key, lang) = (app.totp_key.clone(), v.lang);
    let r = app
        .db(move |s| {
            Ok(Accounts::new(s).add(&n, &pw, secret.as_deref(), &key, now).map_err(|e| account_error(&e, lang)))
        })
        .await;
    match r {
        Ok(Ok(u)) => {
            let scope = format!("{} {:?}{:?}", u.role.as_str(), u.municipalities, u.homes);
            app.audit(&v.user.username, &client.text(), "user_add", &u.username, &scope).await;
            let msg = match totp {
                Some(s) => format!("{} · TOTP: {}", u.username, accounts::totp_uri(&u.username, &s)),
                None => u.username.clone(),
            };
            admin_users_page(&app, &v, Some(format!("{} {msg}", T(v.lang).t("done")))).await
        }
        Ok(Err(e)) => admin_users_page(&app, &v, Some(e)).await,
        Err(e) => failed(e),
    }
}

/// A change to one account.
#[derive(Deserialize)]
pub struct ChangeUserForm {
    #[serde(default)]
    csrf: String,
    action: String,
    #[serde(default)]
    password: String,
    /// `scope`: the new role.
    #[serde(default)]
    role: String,
    /// `scope`: municipality codes (a coordinator) or home ids, comma-separated.
    #[serde(default)]
    scope: String,
    /// `revoke_token`: which.
    #[serde(default)]
    token_id: Option<i64>,
}

/// `POST /admin/users/{name}`: disable, enable, reset the password, issue a token, revoke one
/// token, change the role and scope (not to or from admin).
pub async fn admin_change_user(
    State(app): State<App>,
    v: Viewer,
    client: Client,
    Path(name): Path<String>,
    Form(f): Form<ChangeUserForm>,
) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    if name == v.user.username && f.action == "disable" {
        return admin_users_page(&app, &v, Some("you cannot disable yourself".into())).await;
    }
    let (n, action, pw, now, lang) = (name.clone(), f.action.clone(), f.password, crate::edge::clock::now(), v.lang);
    let (role, scope, token_id) = (AccountRole::parse(&f.role), list(&f.scope), f.token_id);
    let r = app
        .db(move |s| {
            let mut acc = Accounts::new(s);
            let r = match (action.as_str(), role) {
                ("disable", _) => acc.set_disabled(&n, true).map(|_| None),
                ("enable", _) => acc.set_disabled(&n, false).map(|_| None),
                ("password", _) => acc.set_password(&n, &pw).map(|_| None),
                ("token", _) => acc.add_token(&n, "dashboard", now).map(Some),
                ("scope", Some(AccountRole::Coordinator)) => {
                    acc.set_scope(&n, AccountRole::Coordinator, scope, Vec::new()).map(|u| Some(scope_text(&u)))
                }
                ("scope", Some(r)) => acc.set_scope(&n, r, Vec::new(), scope).map(|u| Some(scope_text(&u))),
                ("scope", None) => Err(accounts::AccountError::Invalid("role: coordinator, facility or family".into())),
                ("revoke_token", _) => {
                    // Said in the admin's language: which token, none such, revoked already.
                    let t = T(lang);
                    let known = match token_id {
                        None => Err(t.t("token_which")),
                        Some(id) => match acc.tokens(&n).map(|ts| ts.into_iter().find(|k| k.id == id)) {
                            Ok(Some(k)) if k.revoked => Err(t.t("token_already")),
                            Ok(Some(_)) => Ok(id),
                            Ok(None) | Err(_) => Err(t.t("token_none")),
                        },
                    };
                    match known {
                        Ok(id) => acc.revoke_token(&n, id).map(|what| Some(format!("{id} {what}"))),
                        Err(text) => Err(accounts::AccountError::Invalid(text.to_string())),
                    }
                }
                (other, _) => Err(accounts::AccountError::Invalid(format!("unknown action {other}"))),
            };
            Ok(r.map_err(|e| account_error(&e, lang)))
        })
        .await;
    match r {
        Ok(Ok(Some(detail))) if f.action == "scope" => {
            app.audit(&v.user.username, &client.text(), "user_scope", &name, &detail).await;
            let (wire, scope) = detail.split_once(' ').unwrap_or((detail.as_str(), ""));
            let role = AccountRole::parse(wire).map(|r| account_role_text(r, v.lang)).unwrap_or_default();
            admin_users_page(&app, &v, Some(format!("{} {name}: {role} {scope}", T(v.lang).t("done")))).await
        }
        Ok(Ok(Some(detail))) if f.action == "revoke_token" => {
            app.audit(&v.user.username, &client.text(), "token_revoke", &name, &detail).await;
            admin_users_page(
                &app,
                &v,
                Some(format!("{} {name}: {} #{detail}", T(v.lang).t("done"), T(v.lang).t("revoked"))),
            )
            .await
        }
        Ok(Ok(token)) => {
            let action: &'static str = match f.action.as_str() {
                "disable" => "user_disable",
                "enable" => "user_enable",
                "password" => "user_password",
                _ => "token_add",
            };
            app.audit(&v.user.username, &client.text(), action, &name, "").await;
            let msg = match token {
                Some(tok) => format!("{} {}: {tok}", T(v.lang).t("token_shown_once"), name),
                None => format!("{} {name}", T(v.lang).t("done")),
            };
            admin_users_page(&app, &v, Some(msg)).await
        }
        Ok(Err(e)) => admin_users_page(&app, &v, Some(e)).await,
        Err(e) => failed(e),
    }
}

/// `?before=`.
#[derive(Deserialize)]
pub struct Page {
    before: Option<i64>,
}

/// `GET /admin/audit`.
pub async fn admin_audit(State(app): State<App>, v: Viewer, Query(q): Query<Page>) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    let t = T(v.lang);
    let before = q.before;
    let r = app.db(move |s| Ok((audit::verify(s)?, audit::entries(s, before, 200)?))).await;
    let (verdict, entries) = match r {
        Ok(x) => x,
        Err(e) => return failed(e),
    };
    let body = html! {
        h1 { (t.t("audit")) }
        @match verdict {
            audit::Verdict::Intact { entries, head } => {
                p."notice"."ok" { (t.t("chain_ok")) " (" (entries) ") · " code { (&head[..16]) } }
            },
            audit::Verdict::Broken { seq, reason } => {
                p.error role="alert" { (t.t("chain_broken")) " #" (seq) ": " (reason) }
            },
        }
        p { a href="/admin/audit.csv" { (t.t("export")) } }
        table.audit {
            tbody {
                @for e in &entries {
                    tr {
                        td { (e.seq) } td { (e.at) } td { (e.actor) } td { (e.ip) } td { (e.action) } td { (e.target) }
                        td { (e.detail) }
                    }
                }
            }
        }
        @if let Some(last) = entries.last().filter(|_| entries.len() == 200) {
            p { a href={ "/admin/audit?before=" (last.seq) } { (t.t("older")) } }
        }
    };
    layout(&v, t.t("audit"), body).into_response()
}

/// `GET /admin/delivery`: delivery statistics per channel and reader (administrators).
pub async fn admin_delivery(State(app): State<App>, v: Viewer) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    let t = T(v.lang);
    let (sent, acked) = match app.db(|s| Ok(s.delivery_inputs()?)).await {
        Ok(x) => x,
        Err(e) => return failed(e),
    };
    let stats = crate::domain::stats::compute(&sent, &acked);
    let median = |m: Option<f64>| match (m, v.lang) {
        (None, _) => "—".to_string(),
        (Some(m), Lang::Ja) if m < 60.0 => format!("{m:.0}秒"),
        (Some(m), Lang::En) if m < 60.0 => format!("{m:.0} s"),
        (Some(m), lang) => crate::domain::message::duration(m.round() as i64, lang),
    };
    let body = html! {
        h1 { (t.t("delivery")) }
        p { (t.t("delivery_intro")) }
        @if stats.by.is_empty() {
            p { (t.t("no_deliveries")) }
        } @else {
            table.stats {
                thead {
                    tr {
                        th { (t.t("channel")) } th { (t.t("reader")) } th { (t.t("delivered")) }
                        th { (t.t("pending")) } th { (t.t("abandoned")) } th { (t.t("failed_attempts")) }
                    }
                }
                tbody {
                    @for ((channel, role), c) in &stats.by {
                        tr {
                            td { (channel_text(channel, v.lang)) }
                            td { (crate::domain::message::role_text(*role, v.lang)) }
                            td { (c.delivered) } td { (c.pending) } td { (c.abandoned) } td { (c.failed_attempts) }
                        }
                    }
                }
            }
        }
        @if !stats.acks.is_empty() {
            table.stats {
                thead { tr { th { (t.t("reader")) } th { (t.t("acknowledged_count")) } th { (t.t("ack_median")) } } }
                tbody {
                    @for (role, a) in &stats.acks {
                        tr {
                            td { (crate::domain::message::role_text(*role, v.lang)) }
                            td { (a.acknowledged) }
                            td { (median(a.median_s)) }
                        }
                    }
                }
            }
        }
    };
    layout(&v, t.t("delivery"), body).into_response()
}

/// `GET /admin/audit.csv`.
pub async fn admin_audit_csv(State(app): State<App>, v: Viewer, client: Client) -> Response {
    if let Some(r) = admin_refusal(&v) {
        return r;
    }
    app.audit(&v.user.username, &client.text(), "audit_export", "audit", "").await;
    match app
        .db(|s| {
            let mut out = Vec::new();
            audit::export_csv(s, &mut out)?;
            Ok(out)
        })
        .await
    {
        Ok(csv) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"mamori-audit.csv\""),
            ],
            csv,
        )
            .into_response(),
        Err(e) => failed(e),
    }
}
