//! A real headless Chromium driven over the Chrome DevTools Protocol, for the dashboard's
//! browser test. Small on purpose: launch, open a page, evaluate JavaScript, wait for a
//! condition with a deadline, take a screenshot, and record every request the page makes.
//!
//! The browser is Debian's `chromium` (`scripts/test` installs it). It runs with its own
//! empty profile, `--no-sandbox` (tests run as root in CI), and a host resolver that resolves
//! nothing but loopback, so a page that tried to reach the internet would fail rather than
//! leak; [`Browser::requests`] lists every URL the page asked for, so a test can also fail
//! on the attempt itself.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::Deadline;

/// Where Debian puts Chromium, or `MAMORI_CHROMIUM`.
pub fn chromium_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MAMORI_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running browser with one page.
pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    requests: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Launch Chromium with a page of `width`×`height` CSS pixels.
    pub fn launch(width: u32, height: u32) -> Result<Browser> {
        let exe = chromium_path().context("chromium is not installed (apt-get install chromium)")?;
        let profile = tempfile::tempdir()?;
        let child = Command::new(&exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-port=0",
                "--lang=ja",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Deadline::after(Duration::from_secs(30));
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&port_file) {
                if t.lines().count() >= 2 {
                    break t;
                }
            }
            if deadline.remaining().is_zero() {
                bail!("chromium did not open its DevTools port within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut lines = text.lines();
        let port = lines.next().unwrap_or_default().trim().to_string();
        let path = lines.next().unwrap_or_default().trim().to_string();
        let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}{path}")).context("DevTools websocket")?;
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
        }
        let mut b = Browser { child, ws, session: String::new(), next_id: 0, requests: Vec::new(), _profile: profile };
        let target = b.call_browser("Target.createTarget", json!({ "url": "about:blank" }))?;
        let target_id = target["targetId"].as_str().ok_or_else(|| anyhow!("no targetId"))?.to_string();
        let attached = b.call_browser("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }))?;
        b.session = attached["sessionId"].as_str().ok_or_else(|| anyhow!("no sessionId"))?.to_string();
        b.call("Page.enable", json!({}))?;
        b.call("Network.enable", json!({}))?;
        b.call("Runtime.enable", json!({}))?;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600 }),
        )?;
        Ok(b)
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Result<Value> {
        self.send(method, params, None)
    }

    /// A DevTools command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string()))?;
        let deadline = Deadline::after(Duration::from_secs(30));
        loop {
            if deadline.remaining().is_zero() {
                bail!("{method}: no answer within 30 s");
            }
            let m = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) => return Err(e).context("DevTools websocket"),
            };
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["method"] == "Network.requestWillBeSent" {
                if let Some(url) = v["params"]["request"]["url"].as_str() {
                    self.requests.push(url.to_string());
                }
            }
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluate JavaScript in the page (promises awaited); its value.
    pub fn eval(&mut self, js: &str) -> Result<Value> {
        let r =
            self.call("Runtime.evaluate", json!({ "expression": js, "returnByValue": true, "awaitPromise": true }))?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{js}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Poll a JavaScript condition until it is true, or fail after `timeout`.
    pub fn wait_for(&mut self, js: &str, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout);
        loop {
            if self.eval(js).ok() == Some(Value::Bool(true)) {
                return Ok(());
            }
            if deadline.remaining().is_zero() {
                let url = self.eval("location.href").unwrap_or_default();
                let text = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''").unwrap_or_default();
                bail!("not true within {timeout:?}: {js}\nat {url}\n{}", text.as_str().unwrap_or(""));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Open a URL and wait for the page to load.
    pub fn goto(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({ "url": url }))?;
        self.wait_for(
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                json!(url.split('?').next().unwrap_or(url))
            ),
            Duration::from_secs(20),
        )
    }

    /// Save a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }))?;
        let data = r["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Every URL the page has requested so far (pages, styles, scripts, fetches, streams).
    pub fn requests(&self) -> &[String] {
        &self.requests
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a URL's host is loopback (or the URL is the browser's own `about:`/`data:`).
pub fn is_loopback_url(url: &str) -> bool {
    if url.starts_with("about:") || url.starts_with("data:") {
        return true;
    }
    let Some(rest) = url.split_once("://").map(|(_, r)| r) else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_urls_are_told_apart_from_the_internet() {
        assert!(is_loopback_url("http://127.0.0.1:8080/static/app.css"));
        assert!(is_loopback_url("http://[::1]:80/"));
        assert!(is_loopback_url("about:blank"));
        assert!(!is_loopback_url("https://fonts.googleapis.com/css"));
        assert!(!is_loopback_url("http://127.0.0.1.evil.example/"));
        assert!(!is_loopback_url("http://user@203.0.113.9/"));
    }
}
