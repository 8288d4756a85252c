//! # mamori-testkit
//!
//! The harness every crate's tests share, depending on no mamori crate, so that the agent's
//! tests do not build the gateway and the other way round. Real parts only: a [`Mosquitto`]
//! broker that a test starts itself on a free loopback port with a generated config (never the
//! machine's broker on 1883), a NATS cluster ([`nats`]), a PostgreSQL database of its own
//! ([`postgres`]), NUT ([`nut`]), a cuttable TCP link ([`netcut::Link`]), local servers that
//! implement the outside services' documented APIs with their failures ([`webhook`], [`line`](mod@line),
//! [`voice`], [`smtp`], [`stall`]), a headless browser ([`cdp`]), and helpers to wait for a
//! condition with a deadline ([`Deadline`]) instead of sleeping.
//!
//! Besides the broker: [`process::Process`] (a child process whose JSON log lines can be
//! waited on, killed with SIGKILL or stopped with SIGTERM), [`process::Simulator`]
//! (`mamori-agent simulate`, driven through its standard input) and [`process::Collector`]
//! (an MQTT subscriber that records what arrives, with a persistent session so it survives a
//! broker restart). The programs under test are passed in as paths.
//!
//! The whole chain (agent and gateway together) lives in the `mamori-tests` crate, which
//! builds on this one.
#![deny(unsafe_code, missing_docs)]

pub mod cdp;
pub mod http;
pub mod line;
pub mod nats;
pub mod netcut;
pub mod nut;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod procfs;
pub mod site;
pub mod smtp;
pub mod stall;
pub mod voice;
pub mod webhook;

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Where Debian installs the broker; `PATH` is searched first.
const MOSQUITTO_CANDIDATES: &[&str] = &["mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"];

/// Find the `mosquitto` binary, with an error that says how to install it.
pub fn mosquitto_binary() -> Result<PathBuf> {
    for c in MOSQUITTO_CANDIDATES {
        let ok = Command::new(c).arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if ok {
            return Ok(PathBuf::from(c));
        }
    }
    bail!("mosquitto is not installed: run scripts/test (installs it as root) or `apt-get install mosquitto`")
}

fn nix_is_root() -> bool {
    // The effective uid from /proc (no unsafe, no extra crate).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)).map(|u| u == "0")
        })
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 for a program the test starts (a broker, a gateway, a
/// database), which binds it itself: the port is released before it is used, and something
/// else could take it in between. Two things keep that from happening:
/// - it is chosen at random **below the kernel's ephemeral range**
///   (`/proc/sys/net/ipv4/ip_local_port_range`), where every `bind(…, 0)` and every outgoing
///   connection of every process on the machine takes its port, and never twice in one
///   process; the kernel's own choice (the old way) was the port most likely to be handed out
///   again at once;
/// - it is bindable when chosen.
///
/// Left: another test process choosing the same port in the same moment (about 1 in 12,000 per
/// pair of starts); Mosquitto's start retries on it.
pub fn free_port() -> Result<u16> {
    use rand::Rng as _;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const LOW: u16 = 20_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32_768);
    if ephemeral < LOW + 1_000 {
        // A machine whose ephemeral range starts low: the kernel's choice it is.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        return Ok(l.local_addr()?.port());
    }
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(LOW..ephemeral);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port between {LOW} and {ephemeral} after 1,000 tries")
}

/// A Mosquitto broker owned by one test: its own config, port, data directory and log.
/// Killed when dropped.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Mosquitto {
    /// Start a broker on a free loopback port with anonymous access, persistence in its own
    /// directory, and `extra` config lines.
    pub fn start(extra: &str) -> Result<Mosquitto> {
        Mosquitto::start_with(|port, _| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nautosave_interval 1\n{extra}\n")
        })
    }

    /// Start a broker whose listener section is written by `listener(port, dir)` (for TLS,
    /// passwords, ACLs, autosave); persistence in the broker's own folder and logging are
    /// added.
    pub fn start_with(listener: impl Fn(u16, &Path) -> String) -> Result<Mosquitto> {
        Mosquitto::start_logging(listener, "all")
    }

    /// As [`Mosquitto::start`], logging only `notice` and worse: for benchmarks, where
    /// `log_type all` would write a line for every packet.
    pub fn start_quiet(extra: &str) -> Result<Mosquitto> {
        Mosquitto::start_logging(
            |port, _| format!("listener {port} 127.0.0.1\nallow_anonymous true\nautosave_interval 1\n{extra}\n"),
            "error\nlog_type warning\nlog_type notice",
        )
    }

    /// As [`Mosquitto::start_with`], logging only `notice` and worse (for benchmarks).
    pub fn start_quiet_with(listener: impl Fn(u16, &Path) -> String) -> Result<Mosquitto> {
        Mosquitto::start_logging(listener, "error\nlog_type warning\nlog_type notice")
    }

    fn start_logging(listener: impl Fn(u16, &Path) -> String, log_types: &str) -> Result<Mosquitto> {
        let mut last_err = None;
        for _ in 0..5 {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    // Run as the invoking user: as root, Mosquitto would otherwise drop to the
                    // `mosquitto` user and could not write its log or persistence database in
                    // this private directory.
                    "{}\n{}persistence true\npersistence_location {}/\nlog_dest file {}/mosquitto.log\nlog_type {log_types}\n",
                    listener(port, dir.path()),
                    if nix_is_root() { "user root\n" } else { "" },
                    dir.path().display(),
                    dir.path().display()
                ),
            )?;
            let mut m = Mosquitto { child: None, port, dir, conf };
            match m.resume() {
                Ok(()) => return Ok(m),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("mosquitto did not start")))
    }

    /// Stop it (SIGTERM, so it saves its persistence database), keeping port and data.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            c.wait()?;
        }
        Ok(())
    }

    /// Kill it without warning (SIGKILL: no save at shutdown), keeping port and data: what
    /// it acknowledged survives only if it had saved it already.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Start it again on the same port with the same data.
    pub fn resume(&mut self) -> Result<()> {
        let bin = mosquitto_binary()?;
        let deadline = Deadline::after(Duration::from_secs(10));
        loop {
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawning mosquitto")?;
            match wait_for_listener(&mut child, self.port, Duration::from_secs(5)) {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The old socket may linger for a moment after a restart.
                    deadline.check(&format!("mosquitto to listen again: {e}"))?;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Its process id while it runs (for `kill -HUP`, as an operator reloads it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The broker's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for_listener(child: &mut Child, port: u16, limit: Duration) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Deadline::after(limit);
    loop {
        if let Some(status) = child.try_wait()? {
            let mut msg = String::new();
            if let Some(err) = child.stderr.take() {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    msg.push_str(&line);
                    msg.push('\n');
                }
            }
            bail!("mosquitto exited with {status}: {msg}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        deadline.check("mosquitto to listen")?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publish as a home (QoS 1), waiting for each PUBACK.
pub fn publish(port: u16, messages: &[(String, Vec<u8>)]) -> Result<()> {
    let mut o = rumqttc::MqttOptions::new(format!("pub-{}", free_port()?), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(o, 100);
    let total = messages.len();
    let waiter = std::thread::spawn(move || -> Result<()> {
        let mut acked = 0;
        for ev in conn.iter() {
            match ev? {
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => {
                    acked += 1;
                    if acked == total {
                        return Ok(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) if total == 0 => return Ok(()),
                _ => {}
            }
        }
        Ok(())
    });
    for (topic, payload) in messages {
        client.publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, payload.clone())?;
    }
    waiter.join().map_err(|_| anyhow::anyhow!("publisher thread"))??;
    let _ = client.disconnect();
    Ok(())
}

/// A valid 全国地方公共団体コード for prefecture 13 and city number `n` (the check digit
/// computed as the gateway checks it), for fleets of many municipalities.
pub fn municipality_code(n: usize) -> String {
    let base = format!("13{:03}", 101 + n);
    let d: Vec<u32> = base.chars().filter_map(|c| c.to_digit(10)).collect();
    let r = (d[0] * 6 + d[1] * 5 + d[2] * 4 + d[3] * 3 + d[4] * 2) % 11;
    let check = if r <= 1 { 0 } else { 11 - r };
    format!("{base}{check}")
}

/// Create a gateway's database as an installer does (`mamori-gateway init`), unless one
/// exists already: `run` never creates it.
pub fn gateway_init(bin: &Path, config: &Path) -> Result<()> {
    let out = Command::new(bin).args(["init", "--config"]).arg(config).output().context("mamori-gateway init")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("exists already") {
        Ok(())
    } else {
        bail!("mamori-gateway init failed ({}): {err}", out.status)
    }
}

/// A deadline for waiting on a condition (instead of a sleep that stands in for one).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(std::time::Instant);

impl Deadline {
    /// A deadline `limit` from now.
    #[allow(clippy::disallowed_methods)] // the test harness is an I/O edge: it reads the clock
    pub fn after(limit: Duration) -> Deadline {
        Deadline(std::time::Instant::now() + limit)
    }

    /// Err once the deadline has passed.
    #[allow(clippy::disallowed_methods)]
    pub fn check(&self, what: &str) -> Result<()> {
        if std::time::Instant::now() > self.0 {
            bail!("timed out waiting for {what}");
        }
        Ok(())
    }

    /// Time left (zero once passed).
    #[allow(clippy::disallowed_methods)]
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(std::time::Instant::now())
    }
}
