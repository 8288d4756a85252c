//! Account and administration pages: a person's own account (password, two-factor codes),
//! and for administrators the accounts (add, disable, enable, reset, scope, API tokens), the
//! audit log with its chain check and CSV, and delivery statistics. Split from `pages.rs`
//! (issue 20: pages by resource); the layout, the words table and the helpers stay there.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use chrono::FixedOffset;
use serde::Deserialize;

use super::auth::Viewer;
use super::html::{account_error, failed, local, not_found, T};
use super::layout::layout_str as layout;
use super::pages::{account_role_text, channel_text};
use super::{escape, App, Client};
use crate::admin::accounts::{self, AccountRole, Accounts, NewUser};
use crate::admin::audit;
use crate::domain::homes::Lang;

/// `GET /account`.
pub async fn account(State(_app): State<App>, v: Viewer) -> Response {
    account_page(&v, None, None)
}

fn account_page(v: &Viewer, message: Option<&str>, new_secret: Option<String>) -> Response {
    let t = T(v.lang);
    let msg = message.map(|m| format!("<p class=\"notice\" role=\"status\">{}</p>", escape(m))).unwrap_or_default();
    let totp = if v.user.totp {
        format!("<p>{}</p>", t.t("totp_on"))
    } else {
        let secret = new_secret.unwrap_or_else(accounts::new_totp_secret);
        format!(
            "<p>{}</p><p><code>{}</code></p><p><small><code>{}</code></small></p>\
             <form method=\"post\" action=\"/account/totp\">{csrf}<input type=\"hidden\" name=\"secret\" value=\"{s}\">\
             <label>{c}<input name=\"code\" inputmode=\"numeric\" maxlength=\"6\" required></label><button>{save}</button></form>",
            t.t("totp_setup"),
            escape(&secret),
            escape(&accounts::totp_uri(&v.user.username, &secret)),
            csrf = v.csrf_field().into_string(),
            s = escape(&secret),
            c = t.t("totp_code"),
            save = t.t("save"),
        )
    };
    let scope = match v.user.role {
        AccountRole::Admin => "*".to_string(),
        AccountRole::Coordinator => v.user.municipalities.join(", "),
        _ => v.user.homes.join(", "),
    };
    let body = format!(
        "<h1>{acc}</h1>{msg}<p>{name} ({user}) · {role} · {scope_l}: {scope}</p>\
         <h2>{cp}</h2><form method=\"post\" action=\"/account/password\">{csrf}\
         <label>{cur}<input type=\"password\" name=\"current\" autocomplete=\"current-password\" required></label>\
         <label>{new}<input type=\"password\" name=\"new\" autocomplete=\"new-password\" minlength=\"12\" required></label>\
         <button>{save}</button></form><h2>{totp_h}</h2>{totp}",
        acc = t.t("account"),
        name = escape(&v.user.display_name),
        user = escape(&v.user.username),
        role = account_role_text(v.user.role, v.lang),
        scope_l = t.t("scope"),
        scope = escape(&scope),
        cp = t.t("change_password"),
        csrf = v.csrf_field().into_string(),
        cur = t.t("current_password"),
        new = t.t("new_password"),
        save = t.t("save"),
        totp_h = t.t("totp"),
    );
    layout(v, t.t("account"), &body).into_response()
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
    let mut body = format!("<h1>{}</h1>", t.t("users"));
    if let Some(m) = message {
        let _ = write!(body, "<p class=\"notice\" role=\"status\">{}</p>", escape(&m));
    }
    let _ = write!(
        body,
        "<table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th></th></tr></thead><tbody>",
        t.t("username"),
        t.t("display_name"),
        t.t("role"),
        t.t("scope")
    );
    for u in &users {
        let scope = match u.role {
            AccountRole::Admin => "*".to_string(),
            AccountRole::Coordinator => u.municipalities.join(", "),
            _ => u.homes.join(", "),
        };
        let toggle = if u.disabled { ("enable", t.t("enable")) } else { ("disable", t.t("disable")) };
        let _ = write!(
            body,
            "<tr><td>{name}{dis}</td><td>{disp}</td><td>{role}{totp}</td><td><code>{scope}</code></td><td>\
             <form method=\"post\" action=\"/admin/users/{name}\" class=\"inline\">{csrf}<input type=\"hidden\" name=\"action\" value=\"{ta}\"><button class=\"secondary\">{tl}</button></form>\
             <form method=\"post\" action=\"/admin/users/{name}\" class=\"inline\">{csrf}<input type=\"hidden\" name=\"action\" value=\"token\"><button class=\"secondary\">{tok}</button></form>\
             <form method=\"post\" action=\"/admin/users/{name}\" class=\"inline\">{csrf}<input type=\"hidden\" name=\"action\" value=\"password\">\
             <input type=\"password\" name=\"password\" minlength=\"12\" placeholder=\"{rp}\" aria-label=\"{rp}\" autocomplete=\"new-password\"><button class=\"secondary\">{rp}</button></form>{scope_form}{token_list}</td></tr>",
            token_list = tokens_html(v, &u.username, tokens.get(&u.username).map(Vec::as_slice).unwrap_or(&[]), app.style.offset),
            scope_form = if u.role == AccountRole::Admin {
                String::new()
            } else {
                let opt = |r: AccountRole| {
                    format!(
                        "<option value=\"{}\"{}>{}</option>",
                        r.as_str(),
                        if r == u.role { " selected" } else { "" },
                        account_role_text(r, v.lang)
                    )
                };
                format!(
                    "<form method=\"post\" action=\"/admin/users/{name}\" class=\"inline scope\">{csrf}<input type=\"hidden\" name=\"action\" value=\"scope\">\
                     <select name=\"role\" aria-label=\"{rl}\">{o1}{o2}{o3}</select>\
                     <input name=\"scope\" value=\"{cur}\" aria-label=\"{sl}\" placeholder=\"{sl}\"><button class=\"secondary\">{cs}</button></form>",
                    name = escape(&u.username),
                    csrf = v.csrf_field().into_string(),
                    rl = t.t("role"),
                    o1 = opt(AccountRole::Coordinator),
                    o2 = opt(AccountRole::Facility),
                    o3 = opt(AccountRole::Family),
                    cur = escape(&scope),
                    sl = t.t("scope_list"),
                    cs = t.t("change_scope"),
                )
            },
            name = escape(&u.username),
            dis = if u.disabled { format!(" <span class=\"pill bad\">{}</span>", t.t("disabled")) } else { String::new() },
            disp = escape(&u.display_name),
            role = account_role_text(u.role, v.lang),
            totp = if u.totp { t.t("totp_short") } else { "" },
            scope = escape(&scope),
            csrf = v.csrf_field().into_string(),
            ta = toggle.0,
            tl = toggle.1,
            tok = t.t("new_token"),
            rp = t.t("reset_password"),
        );
    }
    let _ = write!(
        body,
        "</tbody></table><h2>{add}</h2><form method=\"post\" action=\"/admin/users\" class=\"stack\">{csrf}\
         <label>{u}<input name=\"username\" required pattern=\"[a-z0-9._-]{{3,32}}\"></label>\
         <label>{d}<input name=\"display_name\" required></label>\
         <label>{r}<select name=\"role\"><option value=\"coordinator\">{ro_c}</option><option value=\"facility\">{ro_f}</option><option value=\"family\">{ro_fam}</option><option value=\"admin\">{ro_a}</option></select></label>\
         <label>{m}<input name=\"municipalities\"></label><label>{h}<input name=\"homes\"></label>\
         <label>{p}<input type=\"password\" name=\"password\" minlength=\"12\" required autocomplete=\"new-password\"></label>\
         <button>{add}</button></form>",
        add = t.t("add_user"),
        ro_c = account_role_text(AccountRole::Coordinator, v.lang),
        ro_f = account_role_text(AccountRole::Facility, v.lang),
        ro_fam = account_role_text(AccountRole::Family, v.lang),
        ro_a = account_role_text(AccountRole::Admin, v.lang),
        csrf = v.csrf_field().into_string(),
        u = t.t("username"),
        d = t.t("display_name"),
        r = t.t("role"),
        m = t.t("municipalities"),
        h = t.t("homes_scope"),
        p = t.t("password"),
    );
    layout(v, t.t("users"), &body).into_response()
}

/// An account's API tokens, each with a button to revoke it alone (a lost laptop's).
fn tokens_html(v: &Viewer, username: &str, tokens: &[crate::edge::store::TokenRow], offset: FixedOffset) -> String {
    if tokens.is_empty() {
        return String::new();
    }
    let t = T(v.lang);
    let mut out = format!("<details class=\"tokens\"><summary>{} ({})</summary><ul>", t.t("api_tokens"), tokens.len());
    for k in tokens {
        let action = if k.revoked {
            format!("<span class=\"pill\">{}</span>", t.t("revoked"))
        } else {
            format!(
                "<form method=\"post\" action=\"/admin/users/{name}\" class=\"inline\">{csrf}<input type=\"hidden\" name=\"action\" value=\"revoke_token\">\
                 <input type=\"hidden\" name=\"token_id\" value=\"{id}\"><button class=\"secondary\">{rv}</button></form>",
                name = escape(username),
                csrf = v.csrf_field().into_string(),
                id = k.id,
                rv = t.t("revoke"),
            )
        };
        let made = chrono::DateTime::parse_from_rfc3339(&k.created_at)
            .map(|d| local(d.to_utc(), offset))
            .unwrap_or_else(|_| k.created_at.clone());
        let _ = write!(out, "<li>#{} {} <small>{}</small> {action}</li>", k.id, escape(&k.name), escape(&made));
    }
    out.push_str("</ul></details>");
    out
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
    let verdict = match verdict {
        audit::Verdict::Intact { entries, head } => {
            format!("<p class=\"notice ok\">{} ({entries}) · <code>{}</code></p>", t.t("chain_ok"), &head[..16])
        }
        audit::Verdict::Broken { seq, reason } => {
            format!("<p class=\"error\" role=\"alert\">{} #{seq}: {}</p>", t.t("chain_broken"), escape(&reason))
        }
    };
    let mut body = format!(
        "<h1>{}</h1>{verdict}<p><a href=\"/admin/audit.csv\">{}</a></p><table class=\"audit\"><tbody>",
        t.t("audit"),
        t.t("export")
    );
    for e in &entries {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            escape(&e.at),
            escape(&e.actor),
            escape(&e.ip),
            escape(&e.action),
            escape(&e.target),
            escape(&e.detail)
        );
    }
    body.push_str("</tbody></table>");
    if let Some(last) = entries.last().filter(|_| entries.len() == 200) {
        let _ = write!(body, "<p><a href=\"/admin/audit?before={}\">{}</a></p>", last.seq, t.t("older"));
    }
    layout(&v, t.t("audit"), &body).into_response()
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
    let mut body = format!("<h1>{}</h1><p>{}</p>", t.t("delivery"), t.t("delivery_intro"));
    if stats.by.is_empty() {
        let _ = write!(body, "<p>{}</p>", t.t("no_deliveries"));
    } else {
        let _ = write!(
            body,
            "<table class=\"stats\"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
            t.t("channel"),
            t.t("reader"),
            t.t("delivered"),
            t.t("pending"),
            t.t("abandoned"),
            t.t("failed_attempts")
        );
        for ((channel, role), c) in &stats.by {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                channel_text(channel, v.lang),
                crate::domain::message::role_text(*role, v.lang),
                c.delivered,
                c.pending,
                c.abandoned,
                c.failed_attempts
            );
        }
        body.push_str("</tbody></table>");
    }
    if !stats.acks.is_empty() {
        let _ = write!(
            body,
            "<table class=\"stats\"><thead><tr><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
            t.t("reader"),
            t.t("acknowledged_count"),
            t.t("ack_median")
        );
        for (role, a) in &stats.acks {
            let median = match (a.median_s, v.lang) {
                (None, _) => "—".to_string(),
                (Some(m), Lang::Ja) if m < 60.0 => format!("{m:.0}秒"),
                (Some(m), Lang::En) if m < 60.0 => format!("{m:.0} s"),
                (Some(m), lang) => crate::domain::message::duration(m.round() as i64, lang),
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                crate::domain::message::role_text(*role, v.lang),
                a.acknowledged,
                median
            );
        }
        body.push_str("</tbody></table>");
    }
    layout(&v, t.t("delivery"), &body).into_response()
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
