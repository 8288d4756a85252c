//! Login, logout, sessions, CSRF and bearer tokens.
//!
//! - `GET /login` sets a short-lived login cookie and puts the same nonce in the form
//!   (double submit), so another site cannot log a browser into an attacker's account.
//! - `POST /login` is throttled per username and per address ([`crate::admin::accounts::Throttle`]);
//!   every failure looks the same (unknown user, wrong password, wrong code, disabled).
//! - [`Viewer`] is a logged-in browser: its session cookie is checked on every request, and
//!   a page without one redirects to the login. [`Viewer::csrf_refusal`] guards every form.
//! - [`ApiUser`] is an API client with `Authorization: Bearer mmr_...`; a missing or bad
//!   token is a 401 in JSON.

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{html, Markup};
use serde::Deserialize;

use super::html::{layout_bare, T};
use super::{App, Busy, Client};
use crate::admin::accounts::{Accounts, Throttle, User};
use crate::domain::homes::Lang;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "mamori_session";
const LOGIN_COOKIE: &str = "mamori_login";
/// The language cookie's name.
pub const LANG_COOKIE: &str = "mamori_lang";

/// A cookie's value from the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn set_cookie(app: &App, name: &str, value: &str, path: &str, max_age_s: i64) -> String {
    let secure = if app.sessions.secure_cookies { "; Secure" } else { "" };
    format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}")
}

/// The page language: the cookie's, else Japanese.
pub fn lang(headers: &HeaderMap) -> Lang {
    match cookie(headers, LANG_COOKIE) {
        Some("en") => Lang::En,
        _ => Lang::Ja,
    }
}

/// Equal in constant time (for tokens).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A relative path to go back to after a form (never another site).
///
/// The target is parsed, not filtered: it must be an RFC 3986 *path-absolute* reference (a
/// `/`, then a segment that is not empty, so never `//host`) with an optional query, made of
/// the RFC's characters only (`pchar`, with `%XX` escapes well formed) and at most 512 bytes.
/// A tab, a space, a backslash or any control character — which browsers strip or rewrite,
/// turning `/\t/host` into `//host` — makes it `/`.
pub fn local_path(next: Option<&str>) -> String {
    match next {
        Some(n) if is_local_path(n) => n.to_string(),
        _ => "/".into(),
    }
}

fn is_local_path(n: &str) -> bool {
    fn pchar(c: u8) -> bool {
        c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&c)
    }
    fn well_formed(part: &str, extra: &[u8]) -> bool {
        let b = part.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    if !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                        return false;
                    }
                    i += 3;
                }
                c if pchar(c) || extra.contains(&c) => i += 1,
                _ => return false,
            }
        }
        true
    }
    if n.len() > 512 {
        return false;
    }
    let (path, query) = n.split_once('?').unwrap_or((n, ""));
    let Some(rest) = path.strip_prefix('/') else { return false };
    if rest.starts_with('/') {
        return false; // `//host`: another site
    }
    well_formed(rest, b"/") && well_formed(query, b"/?")
}

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The account.
    pub user: User,
    /// The session's form token.
    pub csrf: String,
    /// The session's stored id.
    pub session: String,
    /// The page language.
    pub lang: Lang,
    /// The request comes from the live updater (views are not audited again).
    pub live: bool,
}

impl Viewer {
    /// A refusal when a form's CSRF token is not this session's.
    pub fn csrf_refusal(&self, token: &str) -> Option<Response> {
        if same(token, &self.csrf) {
            None
        } else {
            let page = html! { p { "フォームの有効期限が切れました。もう一度開いてください。 / The form expired: open it again." } };
            Some((StatusCode::FORBIDDEN, page).into_response())
        }
    }

    /// `<input type=hidden name=csrf>`.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }
}

impl FromRequestParts<App> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let to_login = || {
            let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let next = if parts.method == axum::http::Method::GET { next } else { "/" };
            Redirect::to(&format!("/login?next={}", urlencode(next))).into_response()
        };
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE).map(str::to_string) else { return Err(to_login()) };
        let (idle, max_age) = (app.sessions.idle, app.sessions.max_age);
        let now = crate::edge::clock::now();
        let found = app.db(move |s| Ok(Accounts::new(s).session(&token, now, idle, max_age)?)).await;
        match found {
            Ok(Some(s)) => Ok(Viewer {
                user: s.user,
                csrf: s.csrf,
                session: s.id_hash,
                lang: lang(&parts.headers),
                live: parts.headers.contains_key("x-mamori-live"),
            }),
            Ok(None) => Err(to_login()),
            Err(e) => {
                tracing::error!(error = %e, "session lookup");
                Err((StatusCode::SERVICE_UNAVAILABLE, "一時的に利用できません / Temporarily unavailable")
                    .into_response())
            }
        }
    }
}

/// An API client.
#[derive(Debug, Clone)]
pub struct ApiUser(pub User);

impl FromRequestParts<App> for ApiUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({"error": "a valid bearer token is required"})),
            )
                .into_response()
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let Some(token) = token.filter(|t| t.starts_with("mmr_") && t.len() < 100) else { return Err(unauthorized()) };
        match app.db(move |s| Ok(Accounts::new(s).token_user(&token)?)).await {
            Ok(Some(u)) => Ok(ApiUser(u)),
            Ok(None) => Err(unauthorized()),
            Err(e) => {
                tracing::error!(error = %e, "token lookup");
                Err((StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "database unavailable"})))
                    .into_response())
            }
        }
    }
}

/// Percent-encode for a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `?next=`.
#[derive(Deserialize, Default)]
pub struct Next {
    next: Option<String>,
}

fn login_form(lang: Lang, nonce: &str, next: &str, error: Option<&str>) -> Markup {
    let t = T(lang);
    html! {
        h1 { "mamori" }
        p.muted { (t.t("subtitle")) }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/login" class="login" {
            input type="hidden" name="csrf" value=(nonce);
            input type="hidden" name="next" value=(next);
            label { (t.t("username")) input name="username" autocomplete="username" required autofocus; }
            label { (t.t("password")) input name="password" type="password" autocomplete="current-password" required; }
            label { (t.t("totp_code")) input name="code" inputmode="numeric" autocomplete="one-time-code" maxlength="6"; }
            button type="submit" { (t.t("login")) }
        }
        p.muted { a href="/lang/ja?next=/login" { "日本語" } " · " a href="/lang/en?next=/login" { "English" } }
    }
}

/// `GET /login`.
pub async fn login_page(State(app): State<App>, headers: HeaderMap, Query(q): Query<Next>) -> Response {
    // The browser's login nonce when it has one: a second load of this page (another tab, or a
    // live refresh of a page whose session just ended, redirected here) must not expire the
    // form already on screen.
    let nonce = cookie(&headers, LOGIN_COOKIE)
        .filter(|c| c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .map_or_else(crate::admin::accounts::new_token, str::to_string);
    let lang = lang(&headers);
    let next = local_path(q.next.as_deref());
    let body = login_form(lang, &nonce, &next, None);
    (
        [(header::SET_COOKIE, set_cookie(&app, LOGIN_COOKIE, &nonce, "/login", 3600))],
        layout_bare(lang, T(lang).t("login"), body),
    )
        .into_response()
}

/// The login form.
#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    csrf: String,
    next: Option<String>,
}

/// `POST /login`.
pub async fn login_post(
    State(app): State<App>,
    client: Client,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let lang = lang(&headers);
    let t = T(lang);
    let next = local_path(f.next.as_deref());
    let again = |status: StatusCode, msg: &str| {
        let nonce = crate::admin::accounts::new_token();
        (
            status,
            [(header::SET_COOKIE, set_cookie(&app, LOGIN_COOKIE, &nonce, "/login", 3600))],
            layout_bare(lang, t.t("login"), login_form(lang, &nonce, &next, Some(msg))),
        )
            .into_response()
    };
    if !cookie(&headers, LOGIN_COOKIE).is_some_and(|c| same(c, &f.csrf)) {
        return again(StatusCode::FORBIDDEN, t.t("form_expired"));
    }
    let username: String = f.username.trim().chars().take(64).collect();
    let ip = client.text();
    let keys = [format!("u:{username}"), format!("ip:{ip}")];
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let now = crate::edge::clock::now();
    // Reserve the attempt before anything is verified; a poisoned lock refuses (fails closed).
    let reserved = match app.throttle.lock() {
        Ok(mut th) => th.reserve(&keys, now).map_err(|wait| (wait, th.refused(keys[0], now))),
        Err(_) => Err((chrono::Duration::minutes(Throttle::WINDOW_MIN), None)),
    };
    let reservation = match reserved {
        Ok(r) => r,
        Err((wait, audit_now)) => {
            if let Some(n) = audit_now {
                app.audit(
                    &username,
                    &ip,
                    "login_failed",
                    &username,
                    &format!("throttled ({n} refused in the last minute)"),
                )
                .await;
            }
            let minutes = wait.num_minutes() + 1;
            return again(StatusCode::TOO_MANY_REQUESTS, &t.t("throttled").replace("{n}", &minutes.to_string()));
        }
    };
    // The account, in one short database step; the password, on the bounded pool.
    let (u, key) = (username.clone(), app.totp_key.clone());
    let creds = match app.db(move |s| Ok(Accounts::new(s).credentials(&u, &key)?)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "login");
            return again(StatusCode::SERVICE_UNAVAILABLE, t.t("unavailable"));
        }
    };
    let hash = creds.as_ref().map_or_else(|| crate::admin::accounts::decoy_hash().to_string(), |c| c.hash.clone());
    let password_ok = match app.verify_password(hash, f.password).await {
        Ok(ok) => ok && creds.is_some(),
        Err(Busy) => return again(StatusCode::SERVICE_UNAVAILABLE, t.t("busy")),
    };
    let result = match (password_ok, creds) {
        (true, Some(c)) => {
            let code = f.code;
            app.db(move |s| {
                let mut acc = Accounts::new(s);
                Ok(match acc.second_factor(&c, &code, now)? {
                    Some(user) => Some((acc.start_session(&user, now)?, user)),
                    None => None,
                })
            })
            .await
        }
        _ => Ok(None),
    };
    match result {
        Ok(Some((token, user))) => {
            if let Ok(mut th) = app.throttle.lock() {
                th.succeed(&keys, reservation);
            }
            app.audit(&user.username, &ip, "login", &user.username, "").await;
            tracing::info!(user = %user.username, client = %ip, "login");
            let max_age = app.sessions.max_age.num_seconds();
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, set_cookie(&app, SESSION_COOKIE, &token, "/", max_age)),
                    (header::LOCATION, next.clone()),
                ],
            )
                .into_response()
        }
        Ok(None) => {
            app.audit(&username, &ip, "login_failed", &username, "").await;
            tracing::warn!(user = %username, client = %ip, "login failed");
            again(StatusCode::UNAUTHORIZED, t.t("login_failed"))
        }
        Err(e) => {
            tracing::error!(error = %e, "login");
            again(StatusCode::SERVICE_UNAVAILABLE, t.t("unavailable"))
        }
    }
}

/// A form with only its CSRF token.
#[derive(Deserialize)]
pub struct CsrfForm {
    /// The token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /logout`.
pub async fn logout(State(app): State<App>, v: Viewer, client: Client, Form(f): Form<CsrfForm>) -> Response {
    if let Some(r) = v.csrf_refusal(&f.csrf) {
        return r;
    }
    let session = v.session.clone();
    if let Err(e) = app.db(move |s| Ok(Accounts::new(s).end_session(&session)?)).await {
        tracing::error!(error = %e, "logout");
    }
    app.audit(&v.user.username, &client.text(), "logout", &v.user.username, "").await;
    ([(header::SET_COOKIE, set_cookie(&app, SESSION_COOKIE, "", "/", 0))], Redirect::to("/login")).into_response()
}

/// `GET /lang/{ja|en}`: remember the language.
pub async fn set_lang(
    State(app): State<App>,
    axum::extract::Path(l): axum::extract::Path<String>,
    Query(q): Query<Next>,
) -> Response {
    let l = if l == "en" { "en" } else { "ja" };
    let next = local_path(q.next.as_deref());
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, set_cookie(&app, LANG_COOKIE, l, "/", 365 * 86_400)), (header::LOCATION, next)],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn a_redirect_stays_on_this_site_whatever_is_hidden_in_it() {
        for ok in ["/", "/homes/home-a1", "/alerts?lang=en&x=%2F", "/incidents/inc-431001-1?next=/a", "/a:b@c"] {
            assert_eq!(local_path(Some(ok)), ok);
        }
        for bad in [
            "//127.0.0.1:9999/pwned",
            "/\t/127.0.0.1:9999/pwned",
            "/\\/evil.example",
            "\\/evil.example",
            "https://evil.example/",
            "/\u{1}",
            "/\r\nSet-Cookie: x=y",
            "/a b",
            "/a#frag",
            "/%zz",
            "/%0",
            "",
            "evil",
        ] {
            assert_eq!(local_path(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(local_path(Some(&format!("/{}", "a".repeat(600)))), "/");
        assert_eq!(local_path(None), "/");
    }
}
