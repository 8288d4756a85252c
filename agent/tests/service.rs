//! The agent as a service, with real parts: a Mosquitto the test starts on a free port, the
//! real `mamori-agent run` process, and simulated devices on pseudo-terminals
//! (`mamori-agent simulate`). Each test waits for conditions with deadlines, never a sleep
//! standing in for one.
//!
//! Over 800 lines for a reason: each test is one scenario an installer or a family meets (a
//! pulled cable, a broker that refuses, NUT, TLS, a shutdown), and they share one rig.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // the tests are an I/O edge: they time the outage they cause

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mamori_agent::spool::{FileStorage, Spool};
use mamori_protocol::mqtt::{self, Event, EventKind, Status, Telemetry};
use mamori_testkit::process::{Collector, Process, Received, Simulator};
use mamori_testkit::Mosquitto;

const AGENT: &str = env!("CARGO_BIN_EXE_mamori-agent");
const LONG: Duration = Duration::from_secs(30);

fn config(port: u16, data: &Path, sim: &Path, devices: &[&str]) -> String {
    let mut c = format!(
        "home_id = \"test-home\"\ndata_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n[telemetry]\ninterval_s = 1\n",
        data.display()
    );
    for d in devices {
        let p = sim.join(d);
        c.push_str(&match *d {
            "ups" => format!("[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"{}\"\n", p.display()),
            "ups-voltronic" => format!("[[ups]]\nid = \"ups\"\nprotocol = \"voltronic\"\nport = \"{}\"\n", p.display()),
            "ups-apc" => format!("[[ups]]\nid = \"ups\"\nprotocol = \"apc\"\nport = \"{}\"\n", p.display()),
            "oximeter" => format!(
                "[[oximeter]]\nid = \"oximeter\"\nprotocol = \"masimo\"\nport = \"{}\"\nlost_after_ms = 3000\n",
                p.display()
            ),
            "nonin" => format!("[[oximeter]]\nid = \"nonin\"\nprotocol = \"nonin-2\"\nport = \"{}\"\n", p.display()),
            "bridge" => format!("[[bridge]]\nid = \"bridge\"\nport = \"{}\"\n", p.display()),
            other => panic!("{other}"),
        });
    }
    c
}

struct Rig {
    broker: Mosquitto,
    sim: Simulator,
    data: PathBuf,
    config: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn rig(devices: &[&str]) -> Result<Rig> {
    let broker = Mosquitto::start("")?;
    let simdir = tempfile::tempdir()?;
    let datadir = tempfile::tempdir()?;
    let sim = Simulator::start(Path::new(AGENT), simdir.path(), &devices.join(","), "steady")?;
    let data = datadir.path().join("data");
    let config = datadir.path().join("agent.toml");
    std::fs::write(&config, config_text(broker.port(), &data, simdir.path(), devices))?;
    Ok(Rig { broker, sim, data, config, _dirs: (simdir, datadir) })
}

fn config_text(port: u16, data: &Path, sim: &Path, devices: &[&str]) -> String {
    config(port, data, sim, devices)
}

/// A rig, a collector on `filter`, and an agent that has announced itself.
fn started(devices: &[&str], client: &str, filter: &str) -> Result<(Rig, Collector, Process)> {
    let r = rig(devices)?;
    let c = Collector::start(r.broker.port(), client, filter)?;
    let a = agent(&r.config)?;
    c.wait("agent_started", LONG, |m| has(m, EventKind::AgentStarted, None))?;
    Ok((r, c, a))
}

fn agent(config: &Path) -> Result<Process> {
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "--log-json", "--config"]).arg(config);
    Process::spawn("agent", cmd)
}

fn events(msgs: &[Received]) -> Vec<Event> {
    msgs.iter().filter(|m| m.topic.ends_with("/event")).filter_map(|m| mqtt::decode::<Event>(&m.payload).ok()).collect()
}

fn has(msgs: &[Received], kind: EventKind, source: Option<&str>) -> bool {
    events(msgs).iter().any(|e| e.kind == kind && (source.is_none() || e.source.as_deref() == source))
}

/// Seqs of the events the agent logged as spooled.
fn logged_events(agent: &Process) -> Vec<(u64, String)> {
    agent
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "event")
        .map(|v| (v["fields"]["seq"].as_u64().unwrap_or(0), v["fields"]["kind"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn an_outage_reaches_the_broker_and_a_killed_agent_leaves_its_last_will() -> Result<()> {
    let mut r = rig(&["ups", "oximeter", "bridge"])?;
    let c = Collector::start(r.broker.port(), "t1", "mamori/v1/#")?;
    let mut a = agent(&r.config)?;
    c.wait("online status", LONG, |m| {
        m.iter().any(|x| {
            x.topic == "mamori/v1/test-home/status"
                && mqtt::decode::<Status>(&x.payload).is_ok_and(|s| s.state == mqtt::ConnectionState::Online)
        })
    })?;
    c.wait("first telemetry with every device", LONG, |m| {
        m.iter()
            .filter(|x| x.topic.ends_with("/telemetry"))
            .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
            .any(|t| t.ups.is_some() && t.oximeter.is_some() && t.power_meter.is_some())
    })?;
    r.sim.cmd("mains off")?;
    let m = c.wait("mains_lost", LONG, |m| has(m, EventKind::MainsLost, None))?;
    let e = events(&m).into_iter().find(|e| e.kind == EventKind::MainsLost).unwrap();
    assert_eq!(e.severity, mqtt::Severity::Critical);
    r.sim.cmd("mains on")?;
    c.wait("mains_restored", LONG, |m| has(m, EventKind::MainsRestored, None))?;
    let before = c.messages().len();
    a.kill9()?;
    let m = c.wait("the Last Will", LONG, |m| {
        m[before..].iter().any(|x| x.topic == "mamori/v1/test-home/status" && x.payload == br#"{"state":"offline"}"#)
    })?;
    assert!(
        events(&m).iter().all(|e| e.kind != EventKind::AgentStopping),
        "a killed agent says nothing; the broker speaks for it"
    );
    Ok(())
}

#[test]
fn sigterm_publishes_agent_stopping_and_a_clean_offline_status() -> Result<()> {
    let (r, c, mut a) = started(&["ups"], "t2", "mamori/v1/#")?;
    assert_eq!(a.terminate(LONG)?, Some(0));
    let m = c.wait("agent_stopping and the shutdown status", LONG, |m| {
        has(m, EventKind::AgentStopping, None)
            && m.iter()
                .any(|x| x.topic.ends_with("/status") && x.payload == br#"{"state":"offline","reason":"shutdown"}"#)
    })?;
    assert!(!m.iter().any(|x| x.payload == br#"{"state":"offline"}"#), "a clean stop is not a Last Will");
    // Nothing left in the spool: the PUBACKs were awaited.
    let (spool, _) = Spool::open(FileStorage::open(&r.data)?, 1 << 20, 0)?;
    assert_eq!(spool.pending().count(), 0);
    Ok(())
}

#[test]
fn a_broker_outage_replays_every_event_in_order_with_its_original_time() -> Result<()> {
    let (mut r, c, a) = started(&["bridge"], "t3", "mamori/v1/+/event")?;
    r.broker.stop()?;
    let outage_started = Instant::now();
    // Twenty events while nobody outside can hear.
    for i in 1..=10 {
        r.sim.cmd("mains off")?;
        a.wait_line("mains_lost spooled", LONG, |_| {
            logged_events(&a).iter().filter(|(_, k)| k == "mains_lost").count() >= i
        })?;
        r.sim.cmd("mains on")?;
        a.wait_line("mains_restored spooled", LONG, |_| {
            logged_events(&a).iter().filter(|(_, k)| k == "mains_restored").count() >= i
        })?;
    }
    let spooled: Vec<u64> = logged_events(&a).iter().map(|(s, _)| *s).collect();
    r.broker.resume()?;
    let resumed = Instant::now();
    let m = c
        .wait("every spooled event", LONG, |m| {
            let got: Vec<u64> = events(m).iter().map(|e| e.seq).collect();
            spooled.iter().all(|s| got.contains(s))
        })
        .map_err(|e| e.context(format!("broker log:\n{}\nagent log:\n{}", r.broker.log(), a.lines().join("\n"))))?;
    let got = events(&m);
    let mut ids = BTreeMap::new();
    for e in &got {
        *ids.entry(e.id.clone()).or_insert(0) += 1;
    }
    assert!(ids.values().all(|&n| n == 1), "an event was delivered twice: {ids:?}");
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order: {seqs:?}");
    let kinds: Vec<EventKind> = got.iter().filter(|e| e.kind != EventKind::AgentStarted).map(|e| e.kind).collect();
    assert_eq!(kinds.len(), 20);
    assert!(kinds.chunks(2).all(|p| p == [EventKind::MainsLost, EventKind::MainsRestored]));
    // Their times are when they happened, during the outage, not when they were delivered.
    let outage_len = chrono::Duration::from_std(resumed - outage_started)?;
    let last_ts = got.last().unwrap().ts;
    let first_outage_ts = got.iter().find(|e| e.kind == EventKind::MainsLost).unwrap().ts;
    assert!(last_ts - first_outage_ts <= outage_len, "timestamps span more than the outage");
    assert!(got.iter().filter(|e| e.kind == EventKind::MainsLost).all(|e| e.ts >= first_outage_ts));
    Ok(())
}

#[test]
fn kill_9_while_spooling_loses_nothing_that_was_flushed() -> Result<()> {
    let mut r = rig(&["bridge"])?;
    r.broker.stop()?; // nobody to publish to: everything stays in the spool
    let mut a = agent(&r.config)?;
    a.wait_line("the spool to open", LONG, |l| l.contains("spool opened"))?;
    // Events in quick succession; the agent is killed while they are being written.
    let mut i = 0;
    while logged_events(&a).len() < 15 {
        r.sim.cmd(if i % 2 == 0 { "mains off" } else { "mains on" })?;
        i += 1;
        std::thread::sleep(Duration::from_millis(80)); // pacing the simulated power, not synchronisation
        assert!(i < 500, "no events were spooled");
    }
    a.kill9()?;
    let flushed: Vec<u64> = logged_events(&a).iter().map(|(s, _)| *s).collect();
    // The spool opens cleanly and holds at least everything the agent had reported as spooled.
    let (spool, recovery) = Spool::open(FileStorage::open(&r.data)?, 16 << 20, 0)?;
    let pending: Vec<(u64, String)> = spool.pending().map(|p| (p.event.seq, p.event.id.clone())).collect();
    drop(spool);
    assert!(
        flushed.iter().all(|s| pending.iter().any(|(p, _)| p == s)),
        "flushed {flushed:?} but the spool has {pending:?} (torn {} bytes)",
        recovery.torn_bytes
    );
    // Restart everything: each spooled event arrives exactly once.
    r.broker.resume()?;
    let c = Collector::start(r.broker.port(), "t4", "mamori/v1/+/event")?;
    let _a2 = agent(&r.config)?;
    let m = c.wait("every spooled event after the restart", LONG, |m| {
        let got: Vec<String> = events(m).iter().map(|e| e.id.clone()).collect();
        pending.iter().all(|(_, id)| got.contains(id))
    })?;
    for (_, id) in &pending {
        assert_eq!(events(&m).iter().filter(|e| &e.id == id).count(), 1, "{id} delivered more than once");
    }
    let seqs: Vec<u64> = events(&m).iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    Ok(())
}

#[test]
fn unplugged_devices_and_garbage_make_no_false_outage() -> Result<()> {
    let (mut r, c, mut a) = started(&["ups", "oximeter", "bridge"], "t5", "mamori/v1/#")?;
    for dev in ["ups", "oximeter", "bridge"] {
        r.sim.cmd(&format!("garbage {dev} 400"))?;
    }
    r.sim.cmd("unplug oximeter")?;
    c.wait("device_lost(oximeter)", LONG, |m| has(m, EventKind::DeviceLost, Some("oximeter")))?;
    r.sim.cmd("plug oximeter")?;
    c.wait("device_restored(oximeter)", LONG, |m| has(m, EventKind::DeviceRestored, Some("oximeter")))?;
    r.sim.cmd("unplug ups")?;
    c.wait("device_lost(ups)", LONG, |m| has(m, EventKind::DeviceLost, Some("ups")))?;
    r.sim.cmd("garbage bridge 1000")?;
    r.sim.cmd("plug ups")?;
    let m = c.wait("device_restored(ups)", LONG, |m| has(m, EventKind::DeviceRestored, Some("ups")))?;
    // Telemetry after the replug reads the UPS again.
    c.wait("telemetry with the UPS back", LONG, |m| {
        m.iter()
            .rev()
            .filter(|x| x.topic.ends_with("/telemetry"))
            .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
            .next()
            .is_some_and(|t| t.devices.iter().all(|d| d.state == mqtt::DeviceState::Ok))
    })?;
    assert!(!has(&m, EventKind::MainsLost, None), "garbage or an unplugged UPS is not an outage");
    assert!(a.running(), "the agent survived");
    assert!(!a.lines().iter().any(|l| l.contains("panicked")));
    Ok(())
}

/// A real full disk: the data directory on a tiny tmpfs. Mounting needs root: `scripts/test`
/// runs the ignored tests when it is root (CI is); the spool's disk-full handling is also
/// covered by its unit test.
#[test]
#[ignore = "needs root: mounts a tmpfs (scripts/test runs it as root)"]
fn a_full_disk_keeps_events_in_memory_warns_and_recovers() -> Result<()> {
    anyhow::ensure!(nix_is_root(), "mounting a tmpfs needs root");
    let mut r = rig(&["bridge"])?;
    std::fs::create_dir_all(&r.data)?;
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&r.data).status()?;
    assert!(mounted.success(), "mount tmpfs failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(r.data.clone());
    let c = Collector::start(r.broker.port(), "t6", "mamori/v1/#")?;
    let a = agent(&r.config)?;
    c.wait("agent_started", LONG, |m| has(m, EventKind::AgentStarted, None))?;
    // Fill the disk.
    let filler = r.data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler)?;
        let block = [0u8; 4096];
        while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
    }
    // Appends that still fit in the spool file's last page succeed on a full tmpfs: keep
    // producing events until one needs new space.
    let mut toggles = 0;
    while !has(&c.messages(), EventKind::SpoolDegraded, None) {
        let n = logged_events(&a).len();
        r.sim.cmd(if toggles % 2 == 0 { "mains off" } else { "mains on" })?;
        toggles += 1;
        a.wait_line("the event to be handled", LONG, |_| logged_events(&a).len() > n)?;
        assert!(toggles < 200, "the spool never noticed the full disk");
    }
    if toggles % 2 == 1 {
        r.sim.cmd("mains on")?;
        toggles += 1;
    }
    let m = c.wait("every outage event, including those held in memory", LONG, |m| {
        events(m).iter().filter(|e| matches!(e.kind, EventKind::MainsLost | EventKind::MainsRestored)).count()
            >= toggles
    })?;
    r.sim.cmd("mains off")?;
    assert!(
        m.iter()
            .filter(|x| x.topic.ends_with("/telemetry"))
            .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
            .any(|t| t.spool.is_some_and(|s| s.degraded)),
        "telemetry shows the spool degraded"
    );
    a.wait_line("the family warned in the log", LONG, |l| l.contains("cannot write to disk"))?;
    std::fs::remove_file(&filler)?;
    r.sim.cmd("mains on")?;
    let m = c.wait("spool_ok", LONG, |m| has(m, EventKind::SpoolOk, None))?;
    let outage: Vec<u64> = events(&m)
        .iter()
        .filter(|e| matches!(e.kind, EventKind::MainsLost | EventKind::MainsRestored))
        .map(|e| e.seq)
        .collect();
    assert!(outage.windows(2).all(|w| w[0] < w[1]), "{outage:?}");
    assert!(r.data.join("spool.log").exists(), "the spool is on disk again");
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[test]
fn probe_names_each_problem() -> Result<()> {
    let r = rig(&["ups", "oximeter", "bridge"])?;
    let out = Command::new(AGENT).args(["probe", "--config"]).arg(&r.config).output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("on mains"), "{table}");
    assert!(table.contains("broker: yes, connected to 127.0.0.1:"), "{table}");
    assert!(table.contains("SpO2 97 %"), "{table}");
    assert!(table.contains("mains present, ventilator contact normal"), "the bridge's settled state: {table}");
    // Wrong protocol, no answer, missing port.
    let bad = r.config.with_file_name("bad.toml");
    let sim = r.sim.dir.clone();
    std::fs::write(
        &bad,
        format!(
            "home_id = \"test-home\"\ndata_dir = \"/tmp/x\"\n[broker]\nhost = \"127.0.0.1\"\nport = 1\n\
             [[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"{}\"\n\
             [[oximeter]]\nid = \"silent\"\nprotocol = \"nonin-ascii\"\nport = \"{}\"\nlost_after_ms = 1000\n\
             [[oximeter]]\nid = \"gone\"\nprotocol = \"masimo\"\nport = \"{}\"\n",
            sim.join("oximeter").display(),
            sim.join("ups").display(),
            sim.join("nothing-here").display()
        ),
    )?;
    let out = Command::new(AGENT).args(["probe", "--json", "--timeout-ms", "1500", "--config"]).arg(&bad).output()?;
    assert_eq!(out.status.code(), Some(1));
    let probes: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let detail = |id: &str| {
        probes["sources"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Nothing listens on port 1: the broker's line says so.
    assert_eq!(probes["broker"]["ok"], false);
    let broker = probes["broker"]["detail"].as_str().unwrap();
    assert!(broker.contains("nothing listens there"), "{broker}");
    assert!(detail("ups").contains("wrong protocol or baud"), "{}", detail("ups"));
    assert!(detail("silent").contains("no answer"), "{}", detail("silent"));
    assert!(detail("gone").contains("missing"), "{}", detail("gone"));
    Ok(())
}

/// The simulated UPS is good enough for Network UPS Tools' own `nutdrv_qx`, and the agent's
/// NUT source reads the result from a real `upsd`.
#[test]
fn nut_reads_the_simulated_ups_and_the_agent_reads_nut() -> Result<()> {
    let Some(nut) = mamori_testkit::nut::Nut::find() else {
        panic!("Network UPS Tools is not installed: run scripts/test (installs nut-server) or `apt-get install nut-server`");
    };
    let mut r = rig(&["ups"])?;
    let server = nut.start(&r.sim.device("ups"), "megatec")?;
    let cfg = r.config.with_file_name("nut.toml");
    std::fs::write(&cfg, format!("home_id = \"test-home\"\ndata_dir = \"/tmp/x\"\n[broker]\nhost = \"127.0.0.1\"\nport = 1\n[[nut]]\nid = \"ups\"\nport = {}\nups = \"sim\"\n", server.port()))?;
    let probe = |want: &str| -> Result<String> {
        let deadline = mamori_testkit::Deadline::after(LONG);
        loop {
            let out = Command::new(AGENT).args(["probe", "--config"]).arg(&cfg).output()?;
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            if s.contains(want) {
                return Ok(s);
            }
            deadline.check(&format!("NUT to report `{want}`; last probe: {s}"))?;
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    probe("on mains")?;
    r.sim.cmd("mains off")?;
    probe("ON BATTERY")?;
    Ok(())
}

#[test]
fn tls_with_a_client_certificate_or_a_password_and_never_a_stranger_ca() -> Result<()> {
    let pki_dir = tempfile::tempdir()?;
    mamori_testkit::pki::make(pki_dir.path())?;
    let p = pki_dir.path().to_path_buf();
    // The [broker.tls] lines for the home's client certificate, trusting `ca`.
    let cert_tls = |ca: &str| {
        format!(
            "ca_file = \"{0}/{ca}\"\nclient_cert_file = \"{0}/home.pem\"\nclient_key_file = \"{0}/home.key\"",
            p.display()
        )
    };
    let passwd = p.join("passwd");
    let out =
        Command::new("mosquitto_passwd").args(["-b", "-c"]).arg(&passwd).args(["test-home", "s3cret"]).output()?;
    anyhow::ensure!(out.status.success(), "mosquitto_passwd: {out:?}");
    let tls_listener = |require_cert: bool| {
        let p = p.clone();
        let passwd = passwd.clone();
        move |port: u16, _: &Path| {
            let auth = if require_cert {
                "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n".to_string()
            } else {
                format!("allow_anonymous false\npassword_file {}\n", passwd.display())
            };
            format!(
                "listener {port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n{auth}",
                p.display()
            )
        }
    };
    let simdir = tempfile::tempdir()?;
    let _sim = Simulator::start(Path::new(AGENT), simdir.path(), "ups", "steady")?;
    let work = tempfile::tempdir()?;
    let ups =
        format!("[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"{}\"\n", simdir.path().join("ups").display());
    let write = |name: &str, port: u16, tls: &str, auth: &str| -> Result<PathBuf> {
        let path = work.path().join(name);
        std::fs::write(&path, format!("home_id = \"test-home\"\ndata_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n{auth}[broker.tls]\n{tls}\n{ups}", work.path().join(name).with_extension("d").display()))?;
        Ok(path)
    };
    // A client certificate.
    let b = Mosquitto::start_with(tls_listener(true))?;
    let cfg = write("cert.toml", b.port(), &cert_tls("ca.pem"), "")?;
    let a = agent(&cfg)?;
    a.wait_line("a TLS connection with the client certificate", LONG, |l| l.contains("connected to the broker"))
        .map_err(|e| e.context(b.log()))?;
    drop(a);
    // A username and password over TLS.
    let b2 = Mosquitto::start_with(tls_listener(false))?;
    let cfg = write(
        "password.toml",
        b2.port(),
        &format!("ca_file = \"{}/ca.pem\"", p.display()),
        "username = \"test-home\"\npassword = { value = \"s3cret\" }\n",
    )?;
    let a = agent(&cfg)?;
    a.wait_line("a TLS connection with the password", LONG, |l| l.contains("connected to the broker"))
        .map_err(|e| e.context(b2.log()))?;
    drop(a);
    // A wrong password is refused, and so is a broker whose certificate another CA signed.
    let cfg = write(
        "wrong.toml",
        b2.port(),
        &format!("ca_file = \"{}/ca.pem\"", p.display()),
        "username = \"test-home\"\npassword = { value = \"guess\" }\n",
    )?;
    let a = agent(&cfg)?;
    a.wait_line("the broker to refuse a wrong password", LONG, |l| {
        l.contains("broker connection lost") && l.contains("refused")
    })?;
    assert!(!a.lines().iter().any(|l| l.contains("connected to the broker")));
    assert!(!a.lines().iter().any(|l| l.contains("guess")), "no secret in the logs");
    drop(a);
    // The installer's probe says the same in words, and says yes with the right password.
    let probe_broker = |cfg: &Path| -> Result<(bool, String)> {
        let out = Command::new(AGENT).args(["probe", "--json", "--config"]).arg(cfg).output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok((v["broker"]["ok"] == true, v["broker"]["detail"].as_str().unwrap_or_default().to_string()))
    };
    let (ok, detail) = probe_broker(&cfg)?;
    assert!(!ok && detail.contains("refused this home's credentials"), "{detail}");
    assert!(!detail.contains("guess"), "no secret in the probe's words: {detail}");
    let (ok, detail) = probe_broker(&work.path().join("password.toml"))?;
    assert!(ok && detail.contains("TLS, username and password"), "{detail}");
    let cfg = write("stranger.toml", b.port(), &cert_tls("other-ca.pem"), "")?;
    let a = agent(&cfg)?;
    a.wait_line("the agent to refuse a broker it cannot verify", LONG, |l| {
        l.contains("broker connection lost") && l.to_lowercase().contains("certificate")
    })?;
    assert!(!a.lines().iter().any(|l| l.contains("connected to the broker")));
    drop(a);
    let (ok, detail) = probe_broker(&cfg)?;
    assert!(!ok && detail.contains("TLS failed"), "{detail}");
    // A private key readable by others is refused at start.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p.join("home.key"), std::fs::Permissions::from_mode(0o644))?;
    }
    let cfg = write("loose.toml", b.port(), &cert_tls("ca.pem"), "")?;
    let out = Command::new(AGENT).args(["run", "--config"]).arg(&cfg).output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("readable by group or others"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn an_acknowledgement_from_outside_is_shown_and_logged() -> Result<()> {
    let (r, _c, a) = started(&["ups"], "t7", "mamori/v1/#")?;
    let ack =
        br#"{"alert_id":"a-000173","alert_kind":"mains_lost","role":"coordinator","at":"2026-11-22T03:09:12+09:00"}"#;
    for (topic, payload) in [("mamori/v1/test-home/ack", &b"not json"[..]), ("mamori/v1/test-home/ack", &ack[..])] {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &r.broker.port().to_string(), "-q", "1", "-t", topic, "-m"])
            .arg(String::from_utf8_lossy(payload).as_ref())
            .output()?;
        assert!(out.status.success());
    }
    a.wait_line("the bad ack to be ignored", LONG, |l| l.contains("ignoring an ack message"))?;
    let line = a.wait_line("the ack to be logged", LONG, |l| l.contains("was acknowledged"))?;
    assert!(line.contains("a-000173") && line.contains("Coordinator"), "{line}");
    Ok(())
}

#[test]
fn two_missed_polls_are_not_a_lost_ups_but_several_are() -> Result<()> {
    let (mut r, c, _a) = started(&["ups"], "t8", "mamori/v1/#")?;
    r.sim.cmd("drop ups 2")?;
    r.sim.process.wait_line("the UPS to miss two polls", LONG, |l| l.starts_with("dropped ups query, 0 more"))?;
    // Two telemetry snapshots later (more than the 750 ms staleness limit), the UPS is still fine.
    let seen = c.messages().len();
    c.wait("two more snapshots", LONG, |m| m[seen..].iter().filter(|x| x.topic.ends_with("/telemetry")).count() >= 2)?;
    assert!(!has(&c.messages(), EventKind::DeviceLost, Some("ups")), "two missed polls raised device_lost");
    r.sim.cmd("drop ups 8")?;
    c.wait("device_lost(ups) after several missed polls", LONG, |m| has(m, EventKind::DeviceLost, Some("ups")))?;
    c.wait("device_restored(ups)", LONG, |m| has(m, EventKind::DeviceRestored, Some("ups")))?;
    assert_eq!(events(&c.messages()).iter().filter(|e| e.kind == EventKind::DeviceLost).count(), 1);
    Ok(())
}

/// The Voltronic and APC pollers against simulated units: mains lost and restored, the
/// runtime each UPS reports (in minutes on the wire) in telemetry as seconds, and probe.
#[test]
fn voltronic_and_apc_upses_are_polled() -> Result<()> {
    for device in ["ups-voltronic", "ups-apc"] {
        let (mut r, c, a) = started(&[device], &format!("t9-{device}"), "mamori/v1/#")?;
        c.wait(&format!("{device}: telemetry with the UPS's runtime"), LONG, |m| {
            m.iter()
                .filter(|x| x.topic.ends_with("/telemetry"))
                .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
                .any(|t| {
                    t.ups.as_ref().is_some_and(|u| {
                        u.on_battery == Some(false) && u.runtime_s == Some(999 * 60) && u.battery_charge_pct.is_some()
                    })
                })
        })?;
        r.sim.cmd("drain 2")?;
        r.sim.cmd("mains off")?;
        c.wait(&format!("{device}: mains_lost"), LONG, |m| has(m, EventKind::MainsLost, Some("ups")))?;
        c.wait(&format!("{device}: runtime on battery"), LONG, |m| {
            m.iter()
                .rev()
                .filter(|x| x.topic.ends_with("/telemetry"))
                .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
                .any(|t| {
                    t.ups
                        .as_ref()
                        .is_some_and(|u| u.on_battery == Some(true) && u.runtime_s.is_some_and(|s| s < 999 * 60))
                })
        })?;
        r.sim.cmd("mains on")?;
        c.wait(&format!("{device}: mains_restored"), LONG, |m| has(m, EventKind::MainsRestored, Some("ups")))?;
        assert!(!has(&c.messages(), EventKind::DeviceLost, None), "{device}: a device was lost");
        // While the agent runs, probe says who holds the port; once it stops, probe reads it.
        let out = Command::new(AGENT).args(["probe", "--config"]).arg(&r.config).output()?;
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!out.status.success() && table.contains("is mamori-agent running?"), "{table}");
        drop(a);
        let out = Command::new(AGENT).args(["probe", "--config"]).arg(&r.config).output()?;
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success() && table.contains("on mains"), "{device}: {table}");
    }
    Ok(())
}

/// With systemd's notify protocol (a datagram socket in NOTIFY_SOCKET and WATCHDOG_USEC),
/// the agent says READY, pings the watchdog while it runs, and says STOPPING on SIGTERM.
#[test]
fn systemd_readiness_watchdog_and_stopping() -> Result<()> {
    let r = rig(&["ups"])?;
    let sock_path = r.config.with_file_name("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "--log-json", "--config"])
        .arg(&r.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000");
    let mut a = Process::spawn("agent", cmd)?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while seen.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3 {
        let n = sock.recv(&mut buf).context("waiting for a notification from the agent")?;
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(seen[0].contains("READY=1"), "{seen:?}");
    assert_eq!(a.terminate(LONG)?, Some(0));
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        if stopping {
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after {seen:?}");
    Ok(())
}

/// The spool's fsync hung (a worn SD card can take seconds): the agent's loop keeps turning,
/// shown by systemd's watchdog pings, which the loop sends only while it turns. Were the
/// uplink, which appends and syncs the spool, on the loop's thread, the pings would stop and
/// systemd would restart the agent in the middle of an outage. Once the disk answers, the
/// event held behind the sync reaches the broker. The hang is real: `fsync_gate.c`, loaded
/// with `LD_PRELOAD`, holds fsync() and fdatasync() while a file exists.
#[test]
fn a_spool_stuck_in_fsync_stops_neither_the_loop_nor_the_watchdog() -> Result<()> {
    let mut r = rig(&["ups"])?;
    let dir = r.config.parent().context("the config's folder")?.to_path_buf();
    let shim = dir.join("fsync_gate.so");
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fsync_gate.c"))
        .arg("-ldl")
        .output()
        .context("running cc (a C compiler links Rust here too)")?;
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let (gate, stalled) = (dir.join("fsync.gate"), dir.join("fsync.stalled"));
    let c = Collector::start(r.broker.port(), "t-fsync", "mamori/v1/+/event")?;
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "--log-json", "--config"])
        .arg(&r.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("LD_PRELOAD", &shim)
        .env("MAMORI_TEST_FSYNC_GATE", &gate)
        .env("MAMORI_TEST_FSYNC_STALLED", &stalled);
    let _a = Process::spawn("agent", cmd)?;
    c.wait("agent_started", LONG, |m| has(m, EventKind::AgentStarted, None))?;
    let mut buf = [0u8; 512];
    // Close the gate, then cut the mains: the uplink's next sync is held (the mains_lost
    // append's, or a compaction's before it; either way the uplink's thread waits there and the
    // event cannot be published until the gate opens).
    std::fs::write(&gate, "")?;
    r.sim.cmd("mains off")?;
    let deadline = Instant::now() + LONG;
    while !stalled.exists() {
        anyhow::ensure!(Instant::now() < deadline, "no fsync was held within {LONG:?}");
        let _ = sock.recv(&mut buf); // drain the pings while waiting (2 s at most each)
    }
    // What was sent before now proves nothing: drop it.
    sock.set_nonblocking(true)?;
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false)?;
    // Two seconds of a held sync, in ten pings 200 ms apart; each must come within 2 s.
    let mut pings = 0;
    while pings < 10 {
        let n = sock.recv(&mut buf).with_context(|| format!("watchdog ping {pings} with the spool's fsync held"))?;
        pings += usize::from(String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1"));
    }
    assert!(!has(&c.messages(), EventKind::MainsLost, None), "the event was published before it was synced");
    std::fs::remove_file(&gate)?;
    c.wait("mains_lost once the disk answers", LONG, |m| has(m, EventKind::MainsLost, None))?;
    Ok(())
}

/// A TCP proxy in front of the broker that, on its first connection only, swallows every QoS 1
/// PUBLISH to an `event` topic: the broker never sees the event and never acknowledges it,
/// while pings and everything else pass (a broker that took a message and went quiet about
/// it, as a clustered broker's node can when its store stalls). Counts connections.
struct SwallowingProxy {
    port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SwallowingProxy {
    fn start(upstream: u16) -> Result<SwallowingProxy> {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let (Ok(mut from_server), Ok(mut to_client)) = (server.try_clone(), client.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
                let (mut from_client, mut to_server) = (client, server);
                std::thread::spawn(move || -> std::io::Result<()> {
                    loop {
                        // One MQTT packet: a fixed header byte, the remaining length (a varint), the rest.
                        let mut head = [0u8; 1];
                        from_client.read_exact(&mut head)?;
                        let (mut len, mut shift, mut lenbytes) = (0usize, 0, Vec::new());
                        loop {
                            let mut b = [0u8; 1];
                            from_client.read_exact(&mut b)?;
                            lenbytes.push(b[0]);
                            len |= usize::from(b[0] & 0x7f) << shift;
                            shift += 7;
                            if b[0] & 0x80 == 0 {
                                break;
                            }
                        }
                        let mut body = vec![0u8; len];
                        from_client.read_exact(&mut body)?;
                        let qos1_publish = head[0] >> 4 == 3 && (head[0] >> 1) & 3 == 1;
                        let topic_len = body.get(..2).map_or(0, |t| usize::from(u16::from_be_bytes([t[0], t[1]])));
                        let to_event = body.get(2..2 + topic_len).is_some_and(|t| t.ends_with(b"/event"));
                        if n == 0 && qos1_publish && to_event {
                            continue; // swallowed: no PUBLISH upstream, so no PUBACK back
                        }
                        to_server.write_all(&head)?;
                        to_server.write_all(&lenbytes)?;
                        to_server.write_all(&body)?;
                    }
                });
            }
        });
        Ok(SwallowingProxy { port, connections })
    }
}

/// A broker that takes an event and never acknowledges it (while answering pings, so the
/// keep-alive sees nothing wrong) would hold the event until the next reconnect, which may be
/// never. After `puback_timeout_s` the agent drops the connection, says why, and the spool
/// sends the event again on the next one.
#[test]
fn an_event_the_broker_never_acknowledges_is_sent_again_on_a_new_connection() -> Result<()> {
    let r = rig(&["ups"])?;
    let proxy = SwallowingProxy::start(r.broker.port())?;
    let text = std::fs::read_to_string(&r.config)?
        .replace(&format!("port = {}\n", r.broker.port()), &format!("port = {}\npuback_timeout_s = 5\n", proxy.port));
    std::fs::write(&r.config, text)?;
    let c = Collector::start(r.broker.port(), "t-puback", "mamori/v1/+/event")?;
    let a = agent(&r.config)?;
    c.wait("agent_started, sent again after the first connection swallowed it", LONG, |m| {
        has(m, EventKind::AgentStarted, None)
    })?;
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2, "sent again without a new connection?");
    a.wait_line("the agent's reason", LONG, |l| l.contains("has not acknowledged an event"))?;
    Ok(())
}

/// A fake `upsd` on a free port: every connection is answered, except that the `hang_at`-th
/// `LIST VAR` of the first connection gets half a reply and then nothing, with the socket left
/// open (as a `upsd` stuck on its driver does). Counts connections.
struct HangingUpsd {
    port: u16,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HangingUpsd {
    fn start(hang_at: usize) -> Result<HangingUpsd> {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let first = c.fetch_add(1, Ordering::SeqCst) == 0;
                std::thread::spawn(move || -> Result<()> {
                    let mut out = stream.try_clone()?;
                    let mut lines = BufReader::new(stream).lines();
                    let mut n = 0;
                    while let Some(Ok(line)) = lines.next() {
                        n += 1;
                        if !line.starts_with("LIST VAR") {
                            continue;
                        }
                        write!(out, "BEGIN LIST VAR sim\nVAR sim ups.status \"OL\"\n")?;
                        if first && n >= hang_at {
                            // Stuck mid-reply: the socket stays open, nothing more comes.
                            while lines.next().is_some_and(|l| l.is_ok()) {}
                            return Ok(());
                        }
                        write!(out, "VAR sim battery.charge \"100\"\nEND LIST VAR sim\n")?;
                    }
                    Ok(())
                });
            }
        });
        Ok(HangingUpsd { port, connections })
    }
}

#[test]
fn a_upsd_that_hangs_mid_reply_is_closed_and_reconnected() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let upsd = HangingUpsd::start(3)?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "home_id = \"test-home\"\ndata_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {}\n[telemetry]\ninterval_s = 1\n\
             [[nut]]\nid = \"ups\"\nport = {}\nups = \"sim\"\npoll_interval_ms = 500\nlost_after_missed_polls = 10\n",
            dir.path().join("data").display(),
            broker.port(),
            upsd.port
        ),
    )?;
    let c = Collector::start(broker.port(), "nut-hang", "mamori/v1/#")?;
    let a = agent(&cfg)?;
    // The third reply hangs; the agent gives up on that socket at its deadline and connects
    // again, so the UPS keeps being read...
    a.wait_line("the reconnection", LONG, |l| l.contains("no reply within") && l.contains("reconnecting"))?;
    let deadline = mamori_testkit::Deadline::after(LONG);
    while upsd.connections.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        deadline.check("a second connection to upsd")?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let reconnected = c.messages().len();
    c.wait("readings on the new connection", LONG, |m| {
        m[reconnected..]
            .iter()
            .filter(|x| x.topic.ends_with("/telemetry"))
            .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
            .any(|t| t.ups.as_ref().is_some_and(|u| u.battery_charge_pct == Some(100.0)))
    })?;
    // ...and it was never reported lost (10 polls = 5 s; the deadline is 2 s).
    assert!(!has(&c.messages(), EventKind::DeviceLost, Some("ups")), "the UPS was reported lost");
    Ok(())
}

#[test]
fn an_agent_whose_every_source_is_lost_does_not_spin() -> Result<()> {
    let broker = Mosquitto::start("")?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("agent.toml");
    // Every source points at nothing: unplugged serial ports and a upsd that is not there.
    std::fs::write(
        &cfg,
        format!(
            "home_id = \"test-home\"\ndata_dir = \"{d}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {p}\n\
             [[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"{d}/no-ups\"\n\
             [[oximeter]]\nid = \"oximeter\"\nprotocol = \"masimo\"\nport = \"{d}/no-oximeter\"\n\
             [[nut]]\nid = \"nut\"\nport = {free}\nups = \"sim\"\n",
            d = dir.path().display(),
            p = broker.port(),
            free = mamori_testkit::free_port()?
        ),
    )?;
    let c = Collector::start(broker.port(), "spin", "mamori/v1/#")?;
    let a = agent(&cfg)?;
    c.wait("every source lost", LONG, |m| {
        ["ups", "oximeter", "nut"].iter().all(|s| has(m, EventKind::DeviceLost, Some(s)))
    })?;
    // Once everything is lost there is nothing to do but wait: over 5 s the agent uses a
    // small share of a core (a spinning loop uses all of it, 5 s).
    let before = mamori_testkit::procfs::cpu_ns(a.pid());
    std::thread::sleep(Duration::from_secs(5)); // the measured interval itself
    let used_ms = (mamori_testkit::procfs::cpu_ns(a.pid()) - before) / 1_000_000;
    assert!(used_ms < 500, "{used_ms} ms of CPU in 5 s with every source lost");
    Ok(())
}

/// `simulate` ends on SIGTERM or SIGINT even while its devices wait, unread, on their
/// pseudo-terminals and its scenario is over (it once needed `kill -9` then).
#[test]
fn the_simulator_stops_on_a_signal_with_its_devices_idle() -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use std::io::BufRead;
    // Ten of each, the signal sent the moment `ready` is read: a handler installed late is
    // a race this has to catch (it once did, one run in many).
    for signal in [Signal::SIGTERM, Signal::SIGINT].into_iter().cycle().take(20) {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(AGENT)
            .args(["simulate", "--scenario", "steady", "--devices", "ups,oximeter,bridge", "--dir"])
            .arg(dir.path())
            .stdin(std::process::Stdio::piped()) // open, never written: a blocked reader
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        while !line.starts_with("ready") {
            line.clear();
            anyhow::ensure!(out.read_line(&mut line)? > 0, "simulate ended before `ready`");
        }
        kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        let deadline = mamori_testkit::Deadline::after(LONG);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if deadline.remaining().is_zero() {
                let _ = child.kill();
                anyhow::bail!("simulate did not stop on {signal:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{signal:?}: {status}");
    }
    Ok(())
}

/// `simulate … &` in a terminal, as the README has it: a background job that read the terminal
/// would be stopped by the kernel ("Stopped (tty input)") and then deaf to every signal but
/// SIGKILL. It says it takes no commands, keeps serving, and stops on SIGTERM. The terminal
/// is util-linux's `script`, a job-controlling shell inside it.
#[test]
fn the_simulator_in_the_background_of_a_terminal_leaves_the_terminal_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let job = format!(
        "set -m; {AGENT} simulate --devices ups --dir {d}/dev >{o} 2>{e} & pid=$!; \
         for i in $(seq 300); do grep -q 'no commands' {e} && break; sleep 0.1; done; \
         kill -TERM $pid; wait $pid; echo exit=$?",
        d = dir.path().display(),
        o = out.display(),
        e = err.display()
    );
    let script = dir.path().join("job.sh");
    std::fs::write(&script, job)?;
    let result = Command::new("script")
        .args(["-qec", &format!("bash --norc {}", script.display()), "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("util-linux `script` (Debian's bsdutils)")?;
    let said = String::from_utf8_lossy(&result.stdout);
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(stderr.contains("no commands from standard input"), "{stderr}\n{said}");
    assert!(std::fs::read_to_string(&out)?.contains("ready"));
    assert!(said.contains("exit=0"), "stopped on SIGTERM: {said}");
    Ok(())
}

/// Logs to a file or the journal are plain text: colour codes only on a terminal.
#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() -> Result<()> {
    let r = rig(&["bridge"])?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "--config"]).arg(&r.config);
    let a = Process::spawn("agent", cmd)?;
    a.wait_line("a log line", LONG, |l| l.contains("INFO"))?;
    let lines = a.lines();
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "{lines:?}");
    Ok(())
}

/// `[self_test]` due now: local noon at an offset chosen for the test's own time, the test
/// at 11:59, so the hour's window holds whatever the time of day.
fn self_test_due_now() -> String {
    use chrono::Timelike;
    let now = chrono::Utc::now();
    let utc_min = i32::try_from(now.hour() * 60 + now.minute()).unwrap();
    let offset = 12 * 60 - utc_min; // -720..=720
    format!("[self_test]\nenabled = true\nat_local = \"11:59\"\nutc_offset_min = {offset}\n")
}

/// Append [`self_test_due_now`] to an agent config file.
fn add_self_test_due_now(config: &Path) -> Result<()> {
    let mut text = std::fs::read_to_string(config)?;
    text.push_str(&self_test_due_now());
    Ok(std::fs::write(config, text)?)
}

fn battery_tests(msgs: &[Received]) -> Vec<Event> {
    events(msgs).into_iter().filter(|e| e.kind == EventKind::BatteryTest).collect()
}

#[test]
fn a_scheduled_battery_test_runs_on_the_ups_and_is_not_taken_for_an_outage() -> Result<()> {
    let r = rig(&["ups"])?;
    add_self_test_due_now(&r.config)?;
    let c = Collector::start(r.broker.port(), "t-selftest", "mamori/v1/#")?;
    let _a = agent(&r.config)?;
    // The simulated Megatec UPS switches to battery with its "testing" bit for 10 s.
    let m = c.wait("the battery test's result", Duration::from_secs(60), |m| !battery_tests(m).is_empty())?;
    let t = battery_tests(&m).remove(0);
    assert_eq!(t.data.get("result").and_then(|v| v.as_str()), Some("passed"), "{t:?}");
    assert_eq!(t.source.as_deref(), Some("ups"));
    assert!(t.data.get("seconds").and_then(serde_json::Value::as_u64).is_some_and(|s| (8..=30).contains(&s)), "{t:?}");
    assert!(
        !has(&m, EventKind::MainsLost, None),
        "the test's switch to battery must not page anyone as an outage: {:?}",
        events(&m).iter().map(|e| e.kind).collect::<Vec<_>>()
    );
    // The telemetry during the test saw no outage either.
    assert!(m
        .iter()
        .filter(|x| x.topic.ends_with("/telemetry"))
        .filter_map(|x| mqtt::decode::<Telemetry>(&x.payload).ok())
        .all(|t| t.mains_present != Some(false)));
    // Its time is kept, so a restart does not test again.
    let last = std::fs::read_to_string(r.data.join("self_test_last"))?;
    assert!(chrono::DateTime::parse_from_rfc3339(last.trim()).is_ok(), "{last}");
    Ok(())
}

#[test]
fn a_battery_test_due_during_an_outage_is_skipped_and_says_why() -> Result<()> {
    let mut r = rig(&["ups"])?;
    r.sim.cmd("mains off")?;
    add_self_test_due_now(&r.config)?;
    let c = Collector::start(r.broker.port(), "t-selftest-skip", "mamori/v1/#")?;
    let _a = agent(&r.config)?;
    let m = c.wait("a skipped battery test", Duration::from_secs(60), |m| !battery_tests(m).is_empty())?;
    let t = battery_tests(&m).remove(0);
    assert_eq!(t.data.get("result").and_then(|v| v.as_str()), Some("skipped"), "{t:?}");
    assert_eq!(t.data.get("reason").and_then(|v| v.as_str()), Some("on_battery"), "{t:?}");
    assert!(has(&m, EventKind::MainsLost, None), "the outage itself is reported");
    assert!(!r.data.join("self_test_last").exists(), "a skipped test is not a test");
    Ok(())
}

#[test]
fn a_ups_behind_nut_is_tested_through_upsd_with_its_user() -> Result<()> {
    let Some(nut) = mamori_testkit::nut::Nut::find() else {
        panic!("Network UPS Tools is not installed: run scripts/test (installs nut-server) or `apt-get install nut-server`");
    };
    let r = rig(&["ups"])?;
    // NUT's own nutdrv_qx drives the simulated Megatec UPS; upsd lets `mamori` send commands.
    let users = "[mamori]\n  password = s3cret\n  instcmds = ALL\n";
    let server = nut.start_with_users(&r.sim.device("ups"), "megatec", "pollinterval = 1\n", users)?;
    let text = format!(
        "{}[[nut]]\nid = \"ups\"\nport = {}\nups = \"sim\"\npoll_interval_ms = 500\nusername = \"mamori\"\npassword = {{ value = \"s3cret\" }}\n{}",
        config(r.broker.port(), &r.data, Path::new("/nonexistent"), &[]),
        server.port(),
        self_test_due_now()
    );
    std::fs::write(&r.config, text)?;
    let c = Collector::start(r.broker.port(), "t-selftest-nut", "mamori/v1/#")?;
    let _a = agent(&r.config)?;
    let m = c.wait("the battery test's result", Duration::from_secs(90), |m| !battery_tests(m).is_empty())?;
    let t = battery_tests(&m).remove(0);
    assert_eq!(t.data.get("result").and_then(|v| v.as_str()), Some("passed"), "{t:?}");
    assert!(!has(&m, EventKind::MainsLost, None), "{:?}", events(&m).iter().map(|e| e.kind).collect::<Vec<_>>());
    Ok(())
}
