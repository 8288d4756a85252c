//! The dashboard in a real browser: headless Chromium against `mamori-demo`.
//!
//! A coordinator logs in, sees the demo's regional outage arrive and a home go silent
//! without reloading the page (server-sent events), opens a home, acknowledges its alert
//! with a note and sees it recorded. The test fails if the page asks for anything that is
//! not on loopback. It saves screenshots of the overview, a home page and a family's page (phone and desktop)
//! under `target/screenshots/`, or `docs/screenshots/` with `MAMORI_UPDATE_SCREENSHOTS=1`.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mamori_testkit::cdp::{is_loopback_url, Browser};

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // Ctrl-C: the demo stops its homes and the gateway.
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn screenshots_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if std::env::var("MAMORI_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        root.join("docs/screenshots")
    } else {
        root.join("target/screenshots")
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_coordinator_follows_the_demo_outage_live_and_acknowledges_from_the_dashboard() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mamori-demo"))
        .args(["--linger-s", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().unwrap();
    let _demo = Demo(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (mut base, mut admin_secret) = (None, None);
    while base.is_none() || admin_secret.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the demo prints its address and admin's secret");
        if let Some(url) = line.strip_prefix("dashboard: ") {
            base = Some(url.trim().trim_end_matches('/').to_string());
        }
        if let Some(secret) = line.strip_prefix("admin-secret: ") {
            admin_secret = Some(secret.trim().to_string());
        }
    }
    let (base, admin_secret) = (base.unwrap(), admin_secret.unwrap());
    std::thread::spawn(move || while rx.recv().is_ok() {}); // keep draining the demo's output

    let mut b = Browser::launch(1280, 900).expect("launch chromium");
    b.goto(&format!("{base}/login")).unwrap();
    b.eval(
        "document.querySelector('input[name=username]').value = 'kumamoto';\
         document.querySelector('input[name=password]').value = 'mamori-demo-password';\
         document.querySelector('form.login').submit(); true",
    )
    .unwrap();
    b.wait_for(
        "location.pathname === '/' && document.readyState === 'complete' && !!document.querySelector('table.homes')",
        20 * SECOND,
    )
    .unwrap();
    // Only Kumamoto's homes (the coordinator's scope), under the municipality's name, not its code.
    let text = b.eval("document.body.innerText").unwrap();
    let text = text.as_str().unwrap();
    assert!(
        text.contains("熊本市") && !text.contains("431001") && text.contains("K-01") && !text.contains("N-01"),
        "{text}"
    );

    // From here on the page is never reloaded: a marker on `window` would not survive one.
    b.eval("window.__mamori_marker = 'same page'; true").unwrap();
    b.wait_for("!document.getElementById('live').hidden", 10 * SECOND).unwrap();
    // The outage arrives (at 10 s into the story): five homes on battery, one incident.
    b.wait_for(
        "document.querySelectorAll('tr.urgent').length >= 5 && !!document.querySelector('section.incident')",
        60 * SECOND,
    )
    .unwrap();
    // K-04 goes silent during the outage (at 30 s).
    b.wait_for(
        "[...document.querySelectorAll('tr[data-home=\"demo-k04\"] .pill.bad')].some(p => /通信途絶/.test(p.textContent))",
        60 * SECOND,
    )
    .unwrap();
    assert_eq!(b.eval("window.__mamori_marker").unwrap(), "same page", "the updates came live, without a reload");
    let order: Vec<String> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('table.homes tr[data-home]')].map(r => r.dataset.home)").unwrap(),
    )
    .unwrap();
    // Whoever must leave soonest first: K-03 with minutes left, above K-04, silent with hours.
    let (k03, k04) =
        (order.iter().position(|h| h == "demo-k03").unwrap(), order.iter().position(|h| h == "demo-k04").unwrap());
    assert!(k03 < k04, "by the time to leave, not silence first: {order:?}");
    let shots = screenshots_dir();
    b.screenshot(&shots.join("overview.png")).unwrap();

    // A home page: acknowledge its power alert with a note.
    b.goto(&format!("{base}/homes/demo-k03")).unwrap();
    b.wait_for("!!document.querySelector('tr[data-alert] form.ack')", 20 * SECOND).unwrap();
    b.eval(
        "const f = document.querySelector('tr[data-alert] form.ack');\
         f.querySelector('input[name=note]').value = '向かっています';\
         f.submit(); true",
    )
    .unwrap();
    b.wait_for(
        "location.pathname === '/homes/demo-k03' && document.readyState === 'complete' && \
         /確認済み kumamoto/.test(document.querySelector('table.alerts').innerText) && \
         /向かっています/.test(document.body.innerText)",
        20 * SECOND,
    )
    .unwrap();
    assert_eq!(b.eval("!!document.querySelector('svg polyline')").unwrap(), true, "the charts have data");
    // The family can be called from the page with one tap.
    assert_eq!(
        b.eval("[...document.querySelectorAll('ul.contacts li')].some(li => /k03の家族/.test(li.innerText) && !!li.querySelector('a[href=\"tel:+819000000003\"]'))").unwrap(),
        true,
        "a tel: link to the family"
    );
    b.screenshot(&shots.join("home.png")).unwrap();

    // The same home on a phone.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true }),
    )
    .unwrap();
    b.goto(&format!("{base}/")).unwrap();
    b.wait_for("!!document.querySelector('table.homes')", 20 * SECOND).unwrap();
    b.screenshot(&shots.join("overview-phone.png")).unwrap();

    // The family of K-03, on the phone: its own page, what to do, and an answer.
    b.eval("document.querySelector('form[action=\"/logout\"]').submit(); true").unwrap();
    b.wait_for("location.pathname === '/login' && document.readyState === 'complete'", 20 * SECOND).unwrap();
    b.eval(
        "document.querySelector('input[name=username]').value = 'family-k03';\
         document.querySelector('input[name=password]').value = 'mamori-demo-password';\
         document.querySelector('form.login').submit(); true",
    )
    .unwrap();
    b.wait_for(
        "location.pathname === '/homes/demo-k03' && !!document.querySelector('section.family form.answers')",
        20 * SECOND,
    )
    .unwrap();
    let text = b.eval("document.querySelector('section.family').innerText").unwrap();
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("停電しています") && text.contains("今すること") && text.contains("119番"), "{text}");
    assert!(!text.contains("T2") && !text.contains("最後のエラー"), "no tiers or routing tables: {text}");
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth").unwrap(),
        true,
        "nothing overflows a 390 px screen"
    );
    b.screenshot(&shots.join("family-phone.png")).unwrap();
    b.eval("document.querySelector('form.answers button[value=evacuating]').click(); true").unwrap();
    // K-03's plan names a coordinator and a facility, both with the guardian's consent.
    b.wait_for("/コーディネーターと受け入れ先に伝えました/.test(document.body.innerText)", 20 * SECOND).unwrap();

    // The hospital, on the phone: the children who may come, when, and with what.
    b.eval("document.querySelector('form[action=\"/logout\"]').submit(); true").unwrap();
    b.wait_for("location.pathname === '/login' && document.readyState === 'complete'", 20 * SECOND).unwrap();
    b.eval(
        "document.querySelector('input[name=username]').value = 'hospital';\
         document.querySelector('input[name=password]').value = 'mamori-demo-password';\
         document.querySelector('form.login').submit(); true",
    )
    .unwrap();
    b.wait_for("!!document.querySelector('section.facility article.coming form.answers')", 20 * SECOND).unwrap();
    let text = b.eval("document.querySelector('section.facility').innerText").unwrap();
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("到着") && text.contains("人工呼吸器 30W") && !text.contains("431001"), "{text}");
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth").unwrap(),
        true,
        "nothing overflows a 390 px screen"
    );
    b.screenshot(&shots.join("facility-phone.png")).unwrap();
    b.eval(
        "document.querySelector('section.facility article.coming form.answers button[value=can_accept]').click(); true",
    )
    .unwrap();
    b.wait_for("/答え: コーディネーターに伝えました/.test(document.body.innerText)", 20 * SECOND).unwrap();

    // The demo's administrator, with the code an authenticator app would show: the audit log,
    // whole, with the admin's own login in it.
    b.eval("document.querySelector('form[action=\"/logout\"]').submit(); true").unwrap();
    b.wait_for("location.pathname === '/login' && document.readyState === 'complete'", 20 * SECOND).unwrap();
    let step = chrono::Utc::now().timestamp() / 30;
    let code = mamori_gateway::admin::accounts::totp_code(&admin_secret, step).unwrap();
    b.eval(&format!(
        "document.querySelector('input[name=username]').value = 'admin';\
         document.querySelector('input[name=password]').value = 'mamori-demo-password';\
         document.querySelector('input[name=code]').value = '{code:06}';\
         document.querySelector('form.login').submit(); true"
    ))
    .unwrap();
    b.wait_for("location.pathname === '/' && document.readyState === 'complete'", 20 * SECOND).unwrap();
    b.goto(&format!("{base}/admin/audit")).unwrap();
    b.wait_for(
        "!!document.querySelector('p.notice.ok') && [...document.querySelectorAll('table.audit td')].some(td => td.textContent === 'admin')",
        20 * SECOND,
    )
    .unwrap();

    // The administrator changes K-03's travel time on the phone: the editor fits the screen,
    // and the saved plan is the next version.
    b.goto(&format!("{base}/homes/demo-k03/plan")).unwrap();
    b.wait_for("!!document.querySelector('form.plan input[name=evac_travel_min]')", 20 * SECOND).unwrap();
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth").unwrap(),
        true,
        "the plan editor fits a 390 px screen"
    );
    b.screenshot(&shots.join("plan-phone.png")).unwrap();
    b.eval(
        "document.querySelector('form.plan input[name=evac_travel_min]').value = '25';\
         document.querySelector('form.plan').submit(); true",
    )
    .unwrap();
    b.wait_for(
        "location.pathname === '/homes/demo-k03' && /支援計画を保存しました（第2版）/.test(document.body.innerText) && /移動25分/.test(document.body.innerText)",
        20 * SECOND,
    )
    .unwrap();
    // And the change is in the audit log, by the admin, for that home.
    b.goto(&format!("{base}/admin/audit")).unwrap();
    b.wait_for(
        "[...document.querySelectorAll('table.audit tr')].some(tr => /plan_edit/.test(tr.innerText) && /demo-k03/.test(tr.innerText) && /admin/.test(tr.innerText))",
        20 * SECOND,
    )
    .unwrap();

    let outside: Vec<&String> = b.requests().iter().filter(|u| !is_loopback_url(u)).collect();
    assert!(outside.is_empty(), "the dashboard asked for something off loopback: {outside:?}");
    assert!(b.requests().iter().any(|u| u.ends_with("/events")), "the live stream was used: {:?}", b.requests());
}
