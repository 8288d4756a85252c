//! The page around every signed-in page: the navigation for the viewer's role, the language
//! switch, the logout form, and the safety line at the foot (mamori never replaces a device's
//! own alarm). Pages render their body and hand it to `layout`; the login uses the bare page
//! ([`super::html::layout_bare`]).

use maud::{html, Markup, DOCTYPE};

use super::auth::Viewer;
use super::html::T;
use crate::admin::accounts::AccountRole;
use crate::domain::homes::Lang;

/// A signed-in page: `body` inside the navigation and the footer.
pub(super) fn layout(v: &Viewer, title: &str, body: Markup) -> Markup {
    let t = T(v.lang);
    let l = if v.lang == Lang::En { "en" } else { "ja" };
    let other = if v.lang == Lang::En { ("ja", "日本語") } else { ("en", "English") };
    html! {
        (DOCTYPE)
        html lang=(l) {
            (super::html::head(title, true))
            body {
                header {
                    nav {
                        a.brand href="/" { "mamori" }
                        a href="/" { (t.t("overview")) }
                        a href="/alerts" { (t.t("alerts")) }
                        @if matches!(v.user.role, AccountRole::Admin | AccountRole::Coordinator) {
                            a href="/readiness" { (t.t("readiness")) }
                        }
                        @if v.user.role == AccountRole::Admin {
                            a href="/admin/users" { (t.t("users")) }
                            a href="/admin/audit" { (t.t("audit")) }
                            a href="/admin/delivery" { (t.t("delivery")) }
                        }
                        span.spacer {}
                        span.live #live hidden { "● " (t.t("live")) }
                        a href={ "/lang/" (other.0) "?next=/" } { (other.1) }
                        a href="/account" { (v.user.display_name) }
                        form method="post" action="/logout" class="inline" {
                            (v.csrf_field())
                            button.link { (t.t("logout")) }
                        }
                    }
                }
                main #main { (body) }
                footer { (t.t("safety")) }
            }
        }
    }
}
