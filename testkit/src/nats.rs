//! A three-node NATS cluster (MQTT on JetStream) owned by one test, on the configuration
//! `mamori-gateway pki nats` generates from the deployment's PKI: TLS with client
//! certificates, bcrypt passwords, per-home permissions, TLS routes with a route password.
//! Each node has its own free loopback ports and JetStream folder; nodes can be killed and
//! started again. Killed when dropped.
//!
//! [`NatsCluster::start_plain`] starts the same cluster without TLS or users (anonymous MQTT
//! on loopback) for the fleet benchmark, whose publishers speak for many homes each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::Process;
use crate::{free_port, Deadline};

/// Where Debian installs the server; `PATH` is searched first. Debian 12's (2.9.10) loses
/// events (`docs/operations.md`): `scripts/test` sets `MAMORI_NATS_SERVER` to a current one.
const CANDIDATES: &[&str] = &["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server"];

/// Find `nats-server`, with an error that says how to install it: `MAMORI_NATS_SERVER` when
/// set (a path; it must answer `--version`), otherwise `PATH` and Debian's places.
pub fn binary() -> Result<PathBuf> {
    if let Some(chosen) = std::env::var_os("MAMORI_NATS_SERVER") {
        let chosen = PathBuf::from(chosen);
        return match Command::new(&chosen).arg("--version").output() {
            Ok(o) if o.status.success() => Ok(chosen),
            Ok(o) => bail!("MAMORI_NATS_SERVER={}: `--version` failed ({})", chosen.display(), o.status),
            Err(e) => bail!("MAMORI_NATS_SERVER={}: cannot run it: {e}", chosen.display()),
        };
    }
    for c in CANDIDATES {
        if Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Ok(PathBuf::from(c));
        }
    }
    bail!("nats-server is not installed: set MAMORI_NATS_SERVER=$(scripts/nats-server) (a pinned current release; scripts/test does it), or install one >= 2.10")
}

/// One node.
pub struct Node {
    /// Its server name (`n1`…).
    pub name: String,
    /// Its MQTT (TLS) port.
    pub mqtt_port: u16,
    /// Its monitoring port (`/healthz`).
    pub monitor_port: u16,
    conf: PathBuf,
    process: Option<Process>,
}

/// The cluster.
pub struct NatsCluster {
    /// Its nodes.
    pub nodes: Vec<Node>,
    bin: PathBuf,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Generate the three nodes' configs with the gateway's own command (`pki nats`, into the
    /// PKI folder of `gateway_config`, which `pki init` made) and start them; returns when
    /// every node says it is healthy (routes up, JetStream current).
    pub fn start(gateway_bin: &Path, gateway_config: &Path, pki: &Path) -> Result<NatsCluster> {
        let bin = binary()?;
        let store = tempfile::tempdir()?;
        let mut specs = Vec::new();
        let mut nodes = Vec::new();
        let order = distinct_ports(9)?;
        for i in 1..=3 {
            let (mqtt, cluster, monitor) = (order[3 * i - 3], order[3 * i - 2], order[3 * i - 1]);
            specs.push(format!("n{i}=127.0.0.1:{mqtt}:{cluster}:{monitor}"));
            nodes.push(Node {
                name: format!("n{i}"),
                mqtt_port: mqtt,
                monitor_port: monitor,
                conf: pki.join(format!("nats-n{i}.conf")),
                process: None,
            });
        }
        let mut cmd = Command::new(gateway_bin);
        cmd.args(["pki", "nats", "--config"])
            .arg(gateway_config)
            .arg("--store-dir")
            .arg(store.path())
            .args(["--bind", "127.0.0.1"]);
        for s in &specs {
            cmd.args(["--node", s]);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("pki nats: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        NatsCluster::launch(nodes, bin, store)
    }

    /// Three nodes with the MQTT and JetStream settings `pki nats` writes (three replicas,
    /// `ack_wait` 10 s) but no TLS and no users: anonymous MQTT on loopback, for benchmarks.
    pub fn start_plain() -> Result<NatsCluster> {
        let bin = binary()?;
        let store = tempfile::tempdir()?;
        // Every port named (NATS's own client port too: one it picked could be another
        // node's route port, released here a moment before).
        let order = distinct_ports(12)?;
        let mut nodes = Vec::new();
        for i in 0..3 {
            let (mqtt, cluster, monitor, client) = (order[4 * i], order[4 * i + 1], order[4 * i + 2], order[4 * i + 3]);
            let routes: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("\"nats-route://127.0.0.1:{}\"", order[4 * j + 1]))
                .collect();
            let conf = store.path().join(format!("n{}.conf", i + 1));
            std::fs::write(
                &conf,
                format!(
                    "server_name: \"n{n}\"\nhost: \"127.0.0.1\"\nport: {client}\nhttp: \"127.0.0.1:{monitor}\"\n\
                     max_payload: 65536\njetstream {{\n  store_dir: \"{dir}\"\n}}\n\
                     mqtt {{\n  listen: \"127.0.0.1:{mqtt}\"\n  stream_replicas: 3\n  ack_wait: \"10s\"\n}}\n\
                     cluster {{\n  name: \"bench\"\n  listen: \"127.0.0.1:{cluster}\"\n  routes: [{routes}]\n}}\n",
                    n = i + 1,
                    dir = store.path().join(format!("n{}", i + 1)).display(),
                    routes = routes.join(", "),
                ),
            )?;
            nodes.push(Node {
                name: format!("n{}", i + 1),
                mqtt_port: mqtt,
                monitor_port: monitor,
                conf,
                process: None,
            });
        }
        NatsCluster::launch(nodes, bin, store)
    }

    /// Start every node and wait until each is healthy.
    fn launch(nodes: Vec<Node>, bin: PathBuf, store: tempfile::TempDir) -> Result<NatsCluster> {
        let mut c = NatsCluster { nodes, bin, _store: store };
        for i in 0..c.nodes.len() {
            c.start_node(i)?;
        }
        for i in 0..c.nodes.len() {
            c.wait_healthy(i, Duration::from_secs(30))?;
        }
        Ok(c)
    }

    /// Start (or start again) node `i` (0-based) on its config.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let n = self.nodes.get_mut(i).context("no such node")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&n.conf);
        n.process = Some(Process::spawn(&format!("nats {}", n.name), cmd)?);
        Ok(())
    }

    /// Kill node `i` with SIGKILL (it publishes nothing on the way out: no wills).
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let n = self.nodes.get_mut(i).context("no such node")?;
        if let Some(mut p) = n.process.take() {
            p.kill9()?;
        }
        Ok(())
    }

    /// Wait until node `i` answers `/healthz?js-server-only=true` with `ok`: its routes are up
    /// and it is current with the cluster's JetStream metadata. (Not every stream: a restarted
    /// node may keep waiting on a consumer of a session that ended while it was dead.)
    pub fn wait_healthy(&self, i: usize, limit: Duration) -> Result<()> {
        let n = self.nodes.get(i).context("no such node")?;
        let deadline = Deadline::after(limit);
        loop {
            if healthz(n.monitor_port).is_ok_and(|b| b.contains("\"ok\"")) {
                return Ok(());
            }
            deadline.check(&format!("NATS node {} healthy; its log: {}", n.name, self.log(i).join("\n")))?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pids of the running nodes (for `[pki] reload_command`).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.process.as_ref().map(Process::pid)).collect()
    }

    /// Node `i`'s log lines.
    pub fn log(&self, i: usize) -> Vec<String> {
        self.nodes.get(i).and_then(|n| n.process.as_ref()).map(Process::lines).unwrap_or_default()
    }
}

/// `n` distinct free ports ([`free_port`] never gives one twice in a process; kept distinct
/// here too, so the cluster's nodes never share a port whatever `free_port` becomes).
fn distinct_ports(n: usize) -> Result<Vec<u16>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut order = Vec::new();
    while order.len() < n {
        let p = free_port()?;
        if seen.insert(p) {
            order.push(p);
        }
    }
    Ok(order)
}

fn healthz(port: u16) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET /healthz?js-server-only=true HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}
