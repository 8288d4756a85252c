//! What keeps the pages live and styled: the server-sent events stream (`GET /events`,
//! scoped like the pages) and the static CSS and JavaScript, served by the gateway itself so
//! the dashboard works cut off from the internet.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::auth::Viewer;
use super::view;
use super::App;
use crate::admin::accounts::{self, Accounts};

/// What the user's pages show, reduced to a fingerprint: a change event is sent only when
/// it changes, so one home's telemetry says nothing to a user who cannot see that home.
/// Whether anything `user` may see changed after snapshot version `since`: version numbers
/// only, so a stream costs the same however large the homes' state is.
fn changed_for(snap: &crate::web::Snapshot, user: &crate::admin::accounts::User, since: u64) -> bool {
    let homes = snap
        .home_versions
        .iter()
        .filter(|(_, v)| **v > since)
        .any(|(h, _)| snap.engine.plan(h).is_some_and(|p| view::sees(&snap.engine, user, p)));
    homes || snap.incident_versions.iter().any(|(m, v)| *v > since && user.may_see_municipality(m))
}

/// `GET /events`: server-sent events, `change` when something the user may see changed. At
/// most [`crate::web::MAX_LIVE_STREAMS`] at once (the page refreshes itself every minute
/// without one).
pub async fn live(State(app): State<App>, v: Viewer) -> Response {
    use std::sync::atomic::Ordering;
    struct Slot(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if app.live_streams.fetch_add(1, Ordering::Relaxed) >= crate::web::MAX_LIVE_STREAMS {
        app.live_streams.fetch_sub(1, Ordering::Relaxed);
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "too many live streams\n").into_response();
    }
    let slot = Slot(app.live_streams.clone());
    let rx = app.snapshot.clone();
    let user = v.user;
    let first = rx.borrow().version;
    struct Live {
        rx: tokio::sync::watch::Receiver<std::sync::Arc<crate::web::Snapshot>>,
        user: accounts::User,
        last: u64,
        _slot: Slot,
        app: App,
        session: String,
        checked: tokio::time::Instant,
    }
    // The session is checked again every 15 s: the stream ends (within 15 s) at logout, at the
    // session's expiry, and when the account is disabled.
    #[allow(clippy::disallowed_methods)] // when the session was last rechecked (tokio's clock)
    let live =
        Live { rx, user, last: first, _slot: slot, app, session: v.session, checked: tokio::time::Instant::now() };
    let stream = futures_util::stream::unfold(live, |mut l| async move {
        loop {
            let tick = tokio::time::sleep_until(l.checked + Duration::from_secs(15));
            let changed = tokio::select! {
                r = l.rx.changed() => { r.ok()?; true }
                _ = tick => false,
            };
            if l.checked.elapsed() >= Duration::from_secs(15) {
                let (session, now, s) = (l.session.clone(), crate::edge::clock::now(), l.app.sessions);
                let alive = l
                    .app
                    .db(move |db| Ok(Accounts::new(db).session_alive(&session, now, s.idle, s.max_age)?))
                    .await
                    .unwrap_or(false);
                #[allow(clippy::disallowed_methods)] // when the session was last rechecked (tokio's clock)
                let checked = tokio::time::Instant::now();
                l.checked = checked;
                if !alive {
                    return None;
                }
            }
            if !changed {
                continue;
            }
            let snap = l.rx.borrow_and_update().clone();
            if changed_for(&snap, &l.user, l.last) {
                l.last = snap.version;
                let ev = SseEvent::default().event("change").data(snap.version.to_string());
                return Some((Ok::<_, Infallible>(ev), l));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `GET /static/app.css`.
pub async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("assets/app.css"),
    )
        .into_response()
}

/// `GET /static/app.js`.
pub async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("assets/app.js"),
    )
        .into_response()
}
