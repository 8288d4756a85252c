//! The page around every signed-in page: the navigation for the viewer's role, the language
//! switch, the logout form, and the safety line at the foot (mamori never replaces a device's
//! own alarm). Pages render their body and hand it to `layout`; the login uses the bare page
//! ([`super::html::layout_bare`]).

use axum::response::Html;

use super::auth::Viewer;
use super::escape;
use super::html::T;
use crate::admin::accounts::AccountRole;
use crate::domain::homes::Lang;

/// A signed-in page: `body` inside the navigation and the footer.
pub(super) fn layout(v: &Viewer, title: &str, body: &str) -> Html<String> {
    let t = T(v.lang);
    let l = if v.lang == Lang::En { "en" } else { "ja" };
    let readiness = if matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator) {
        format!("<a href=\"/readiness\">{}</a>", t.t("readiness"))
    } else {
        String::new()
    };
    let admin = if v.user.role == AccountRole::Admin {
        format!(
            "<a href=\"/admin/users\">{}</a><a href=\"/admin/audit\">{}</a><a href=\"/admin/delivery\">{}</a>",
            t.t("users"),
            t.t("audit"),
            t.t("delivery")
        )
    } else {
        String::new()
    };
    let other = if v.lang == Lang::En { ("ja", "日本語") } else { ("en", "English") };
    Html(format!(
        "<!doctype html><html lang=\"{l}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{title} · mamori</title>\
         <link rel=\"stylesheet\" href=\"/static/app.css\"><script src=\"/static/app.js\" defer></script></head>\
         <body><header><nav><a class=\"brand\" href=\"/\">mamori</a><a href=\"/\">{ov}</a><a href=\"/alerts\">{al}</a>{readiness}{admin}\
         <span class=\"spacer\"></span><span class=\"live\" id=\"live\" hidden>● {live}</span>\
         <a href=\"/lang/{ol}?next=/\">{on}</a><a href=\"/account\">{name}</a>\
         <form method=\"post\" action=\"/logout\" class=\"inline\">{csrf}<button class=\"link\">{lo}</button></form></nav></header>\
         <main id=\"main\">{body}</main><footer>{safety}</footer></body></html>",
        title = escape(title),
        ov = t.t("overview"),
        al = t.t("alerts"),
        live = t.t("live"),
        ol = other.0,
        on = other.1,
        name = escape(&v.user.display_name),
        csrf = v.csrf_field(),
        lo = t.t("logout"),
        safety = t.t("safety"),
    ))
}
