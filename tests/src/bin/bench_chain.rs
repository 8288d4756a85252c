//! `bench-chain`: end-to-end latency, side by side with Network UPS Tools. Not a test: it
//! prints figures for `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-tests && target/release/bench-chain [--outages 30] [--cpu-seconds 120]
//! ```
//!
//! The whole mamori chain as deployed ([`mamori_tests::chain`]: generated TLS broker config, a
//! provisioned home, the release agent and gateway processes, a webhook receiver for the
//! coordinator) and, in the same run, NUT's `nutdrv_qx` → `upsd` → `upsmon` with a
//! `NOTIFYCMD` on a second instance of the same simulated Megatec UPS. Each outage cuts mains
//! on both simulators back to back; mamori's latency is the simulator command to the
//! coordinator's webhook receiving the alert (remote, through TLS MQTT, the gateway's store
//! and an HTTP POST), NUT's is the command to `upsmon` running its `NOTIFYCMD` for ONBATT
//! (local). Random gaps spread the outages over every phase of both polls.
//!
//! Rounds: (1) both at their defaults — the agent polls every 250 ms; NUT's driver every 2 s
//! with `upsmon` `POLLFREQ 5`/`POLLFREQALERT 5`; (2) the same poll rate — the agent at 1 s,
//! NUT at its tightest (`pollinterval = 1`, `POLLFREQ 1`, `POLLFREQALERT 1`). Then the CPU
//! time of both chains over a steady window, per hour of monitoring.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mamori_tests::args::{self, arg};
use mamori_tests::chain::{Bins, Chain, Options};
use mamori_tests::nut::{Nut, NutServer};
use mamori_tests::process::{Process, Simulator};
use mamori_tests::procfs::{cpu_ns, machine, percentile};
use mamori_tests::Deadline;
use rand::Rng;

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// NUT's chain on one simulated UPS, with `upsmon` running a command on ONBATT and ONLINE.
struct NutChain {
    server: NutServer,
    upsmon: Process,
    log: PathBuf,
}

impl NutChain {
    fn start(nut: &Nut, device: &Path, poll_s: u32, pollfreq_s: u32) -> Result<NutChain> {
        let server = nut.start_with(device, "megatec", &format!("pollinterval = {poll_s}\n"))?;
        std::fs::write(server.dir().join("upsd.users"), "[bench]\n  password = bench\n  upsmon primary\n")?;
        // upsd re-reads its users on SIGHUP.
        let _ = Command::new("kill").arg("-HUP").arg(server.pids()[1].to_string()).status();
        let log = server.dir().join("notify.log");
        let script = server.dir().join("notify.sh");
        std::fs::write(&script, format!("#!/bin/sh\necho \"$(date +%s.%N) $NOTIFYTYPE $*\" >> {}\n", log.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::write(
            server.dir().join("upsmon.conf"),
            format!(
                "MONITOR sim@127.0.0.1:{} 1 bench bench primary\nPOLLFREQ {pollfreq_s}\nPOLLFREQALERT {pollfreq_s}\n\
                 DEADTIME 15\nMINSUPPLIES 1\nSHUTDOWNCMD \"/bin/true\"\nNOTIFYCMD {}\n\
                 NOTIFYFLAG ONBATT EXEC\nNOTIFYFLAG ONLINE EXEC\n",
                server.port(),
                script.display()
            ),
        )?;
        let mut cmd = Command::new(&nut.upsmon);
        cmd.args(["-F", "-p", "-u", "root"])
            .env("NUT_CONFPATH", server.dir())
            .env("NUT_STATEPATH", server.dir())
            .env("NUT_ALTPIDPATH", server.dir());
        let upsmon = Process::spawn("upsmon", cmd)?;
        Ok(NutChain { server, upsmon, log })
    }

    /// Times (epoch s) of the notifications of `kind` so far.
    fn notified(&self, kind: &str) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(kind))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    fn wait(&self, kind: &str, n: usize, limit: Duration) -> Result<f64> {
        let deadline = Deadline::after(limit);
        loop {
            let got = self.notified(kind);
            if got.len() >= n {
                return Ok(got[n - 1]);
            }
            deadline.check(&format!("upsmon to notify {kind} #{n}"))?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pids(&self) -> Vec<u32> {
        let mut p = self.server.pids();
        p.push(self.upsmon.pid());
        p
    }
}

struct Round {
    mamori_ms: Vec<f64>,
    nut_ms: Vec<f64>,
}

fn summary(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n = {})",
        percentile(v, 50.0),
        percentile(v, 90.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    )
}

fn round(c: &mut Chain, sim_b: &mut Simulator, nut: &NutChain, outages: usize) -> Result<Round> {
    let mut r = Round { mamori_ms: Vec::new(), nut_ms: Vec::new() };
    let mut rng = rand::rng();
    let limit = Duration::from_secs(60);
    // Settle: both chains have seen mains on.
    std::thread::sleep(Duration::from_secs(6));
    for i in 0..outages {
        let seen = c.hook.deliveries().len();
        let (onbatt, online) = (nut.notified("ONBATT").len(), nut.notified("ONLINE").len());
        let ta = Instant::now();
        c.sim("home-a", "mains off")?;
        let sb = SystemTime::now();
        sim_b.cmd("mains off")?;
        let d = c.hook.wait("the coordinator", limit, |d| {
            d[seen..]
                .iter()
                .any(|x| x.path == "/coord" && x.accepted && x.body["content"]["type"] == "alert" && x.at > ta)
        })?;
        let at = d[seen..].iter().find(|x| x.path == "/coord" && x.body["content"]["type"] == "alert").unwrap().at;
        r.mamori_ms.push(at.duration_since(ta).as_secs_f64() * 1000.0);
        let nb = nut.wait("ONBATT", onbatt + 1, limit)?;
        r.nut_ms.push((nb - epoch(sb)) * 1000.0);
        c.sim("home-a", "mains on")?;
        sim_b.cmd("mains on")?;
        c.hook.wait("the all-clear", limit, |d| {
            d[seen..].iter().any(|x| x.path == "/coord" && x.body["content"]["type"] == "cleared")
        })?;
        nut.wait("ONLINE", online + 1, limit)?;
        eprint!(
            "\routage {}/{outages}: mamori {:.0} ms, NUT {:.0} ms   ",
            i + 1,
            r.mamori_ms.last().unwrap(),
            r.nut_ms.last().unwrap()
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2500)));
    }
    eprintln!();
    Ok(r)
}

fn set_agent_poll(c: &mut Chain, poll_ms: u64) -> Result<()> {
    let h = c.home("home-a")?;
    let text = std::fs::read_to_string(&h.config)?;
    let text = match text.find("poll_interval_ms") {
        Some(_) => text
            .lines()
            .map(|l| if l.starts_with("poll_interval_ms") { format!("poll_interval_ms = {poll_ms}") } else { l.into() })
            .collect::<Vec<_>>()
            .join("\n"),
        // The harness's `[[ups]]` (the bundle also has a commented-out example).
        None => text.replace(
            "\n[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\n",
            &format!("\n[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\npoll_interval_ms = {poll_ms}\n"),
        ),
    };
    std::fs::write(&h.config, text)?;
    if let Some(mut a) = h.agent.take() {
        a.terminate(Duration::from_secs(10))?;
    }
    let starts = |c: &Chain| c.events("home-a").map(|e| e.iter().filter(|e| e.kind == "agent_started").count());
    let before = starts(c)?;
    c.start_agent("home-a")?;
    let deadline = Deadline::after(Duration::from_secs(30));
    while starts(c)? == before {
        let agent = c.homes["home-a"].agent.as_ref().unwrap();
        if let Err(e) = deadline.check("the restarted agent") {
            anyhow::bail!("{e}: {:?}", agent.lines());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn main() -> Result<()> {
    args::check(&["--outages", "--cpu-seconds"], &[])?;
    let outages = arg("--outages", 30)? as usize;
    let cpu_seconds = arg("--cpu-seconds", 120)?;
    let dir = std::env::current_exe()?.parent().context("exe dir")?.to_path_buf();
    let bins = Bins { agent: dir.join("e2e-agent"), gateway: dir.join("e2e-gateway") };
    anyhow::ensure!(bins.agent.exists() && bins.gateway.exists(), "build first: cargo build --release -p mamori-tests");
    let nut = Nut::find().context("Network UPS Tools (apt-get install nut-server nut-client)")?;
    println!("# bench-chain on {}", machine());
    let o = Options {
        // The agent's defaults: UPS poll 250 ms, telemetry every 60 s.
        telemetry_interval_s: 60,
        policy: "[policy.default]\nsteps = [{ tier = \"T0\", roles = [\"family\", \"coordinator\"] }]\n".into(),
        ..Options::default()
    };
    let mut c = Chain::start(&bins, &o)?;
    let simdir = tempfile::tempdir()?;
    let mut sim_b = Simulator::start(&bins.agent, simdir.path(), "ups", "steady")?;

    let mut results = Vec::new();
    {
        let nut_chain = NutChain::start(&nut, &simdir.path().join("ups"), 2, 5)?;
        eprintln!("round 1: defaults (agent 250 ms; NUT pollinterval 2 s, POLLFREQ 5 s)");
        results.push((
            "defaults: agent poll 250 ms; NUT pollinterval 2, POLLFREQ 5",
            round(&mut c, &mut sim_b, &nut_chain, outages)?,
        ));
    }
    set_agent_poll(&mut c, 1000)?;
    let nut_chain = NutChain::start(&nut, &simdir.path().join("ups"), 1, 1)?;
    eprintln!("round 2: the same poll rate (agent 1 s; NUT pollinterval 1 s, POLLFREQ 1 s)");
    results.push((
        "same poll rate: agent poll 1 s; NUT pollinterval 1, POLLFREQ 1",
        round(&mut c, &mut sim_b, &nut_chain, outages)?,
    ));

    println!("\n## Latency: UPS loses mains → notification");
    println!("| round | mamori: coordinator's webhook (remote) | NUT: upsmon NOTIFYCMD ONBATT (local) |");
    println!("|---|---|---|");
    for (name, r) in &mut results {
        println!("| {name} | {} | {} |", summary(&mut r.mamori_ms), summary(&mut r.nut_ms));
    }

    // CPU over a steady window: the agent at 1 s (as in round 2) and at its default 250 ms,
    // NUT at its tightest, the gateway (shared by every home it serves).
    let snapshot = |pids: &[u32]| pids.iter().map(|p| cpu_ns(*p)).collect::<Vec<u64>>();
    let spent = |pids: &[u32], before: &[u64]| {
        pids.iter().zip(before).map(|(p, b)| cpu_ns(*p).saturating_sub(*b)).sum::<u64>() as f64 / 1e9
    };
    let per_hour = |cpu: f64, secs: u64| cpu / secs as f64 * 3600.0;
    let window = Duration::from_secs(cpu_seconds);
    let agent = vec![c.homes["home-a"].agent.as_ref().unwrap().pid()];
    let (nut_pids, gw) = (nut_chain.pids(), vec![c.gateway.as_ref().unwrap().pid()]);
    let before = [snapshot(&agent), snapshot(&nut_pids), snapshot(&gw)];
    std::thread::sleep(window);
    let (a1, n1, g1) = (spent(&agent, &before[0]), spent(&nut_pids, &before[1]), spent(&gw, &before[2]));
    set_agent_poll(&mut c, 250)?;
    std::thread::sleep(Duration::from_secs(3));
    let agent = vec![c.homes["home-a"].agent.as_ref().unwrap().pid()];
    let before = snapshot(&agent);
    std::thread::sleep(window);
    let a250 = spent(&agent, &before);
    println!("\n## CPU per hour of monitoring (steady, mains on, {cpu_seconds} s windows, /proc schedstat)");
    println!("| chain | CPU s per hour |");
    println!("|---|---|");
    println!("| mamori agent, UPS poll 1 s, telemetry 60 s, TLS MQTT | {:.2} |", per_hour(a1, cpu_seconds));
    println!("| mamori agent, UPS poll 250 ms (default) | {:.2} |", per_hour(a250, cpu_seconds));
    println!("| NUT nutdrv_qx + upsd + upsmon, pollinterval 1, POLLFREQ 1 | {:.2} |", per_hour(n1, cpu_seconds));
    println!("| mamori gateway (one home; shared by every home it serves) | {:.2} |", per_hour(g1, cpu_seconds));
    Ok(())
}
