//! `bench-failover`: how fast a standby gateway takes over from an active one that is killed,
//! frozen or cut off from the database. Not a test: it prints figures for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-tests
//! target/release/bench-failover [--kills 20] [--lease-s 6] [--faults kill,freeze,partition]
//! ```
//!
//! Everything is real: a PostgreSQL database of its own on the test server
//! (`MAMORI_TEST_POSTGRES`), a Mosquitto started here, two `e2e-gateway` processes (the
//! gateway's own `main`) in a `[cluster]` on that database, each reaching it through a
//! cuttable link of its own, and a webhook receiver. For each fault, `--kills` rounds: the
//! fault strikes the active gateway (`kill`: SIGKILL; `freeze`: SIGSTOP; `partition`: its link
//! to the database is cut), a new outage is published at once, and the time is measured from
//! the fault until the standby holds the lease, until it is subscribed to the broker, and until
//! the family's webhook has the new outage. The deposed active must send nothing after the
//! fault: a frozen one is woken (SIGCONT) once the standby has paged and must exit without a
//! delivery attempt; a cut-off one must exit by itself (the time from the cut to its exit is
//! when it stopped sending). Then it is started again as the standby.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mamori_tests::args::{self, arg, arg_text};
use mamori_tests::netcut::Link;
use mamori_tests::postgres::TestDb;
use mamori_tests::process::Process;
use mamori_tests::procfs::percentile;
use mamori_tests::site::{self, Plan};
use mamori_tests::webhook::WebhookReceiver;
use mamori_tests::Mosquitto;

fn run(bin: &Path, config: &Path, name: &str) -> Result<Process> {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(config);
    Process::spawn(name, cmd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Freeze,
    Partition,
}

fn faults() -> Result<Vec<Fault>> {
    let text = arg_text("--faults").unwrap_or_else(|| "kill,freeze,partition".into());
    text.split(',')
        .map(|f| match f.trim() {
            "kill" => Ok(Fault::Kill),
            "freeze" => Ok(Fault::Freeze),
            "partition" => Ok(Fault::Partition),
            other => bail!("--faults: `{other}` is not one of kill, freeze, partition"),
        })
        .collect()
}

fn main() -> Result<()> {
    args::check(&["--kills", "--lease-s", "--faults"], &[])?;
    let kills = arg("--kills", 20)? as usize;
    let lease_s = arg("--lease-s", 6)?;
    for fault in faults()? {
        rounds(fault, kills, lease_s)?;
    }
    Ok(())
}

/// A delivery attempt in a gateway's log.
fn attempt(l: &str) -> bool {
    l.contains("\"message\":\"delivery failed\"") || l.contains("\"message\":\"delivered\"")
}

fn rounds(fault: Fault, kills: usize, lease_s: u64) -> Result<()> {
    let bin = std::env::current_exe()?.parent().context("exe dir")?.join("e2e-gateway");
    let db = TestDb::new()?;
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let extra = format!("{}[cluster]\nname = \"gw-a\"\nlease_s = {lease_s}\n", db.store_toml());
    let plan = Plan { homes: kills + 1, extra: &extra, ..Plan::default() };
    let s = site::site(broker.port(), &hook.url(), &hook.url(), &plan)?;
    site::init(&bin, &s.config)?;
    // Each gateway reaches the database through a link of its own; gw-b is the same config
    // on another HTTP port.
    let links = [Link::start(db.port())?, Link::start(db.port())?];
    let b_port = mamori_tests::free_port()?;
    let text = std::fs::read_to_string(&s.config)?;
    let a_text = text.replace(&db.settings(), &db.settings_via(links[0].port()));
    let b_text = a_text
        .replace(&db.settings_via(links[0].port()), &db.settings_via(links[1].port()))
        .replace(&format!("127.0.0.1:{}", s.http), &format!("127.0.0.1:{b_port}"))
        .replace("name = \"gw-a\"", "name = \"gw-b\"");
    let configs = [s.dir.path().join("gw-a-linked.toml"), s.dir.path().join("gw-b-linked.toml")];
    std::fs::write(&configs[0], a_text)?;
    std::fs::write(&configs[1], b_text)?;
    let limit = Duration::from_secs(60);

    let mut active = run(&bin, &configs[0], "gw-a")?;
    active.wait_line("lease", limit, |l| l.contains("lease acquired"))?;
    active.wait_line("subscribed", limit, |l| l.contains("\"subscribed\""))?;
    let mut standby = run(&bin, &configs[1], "gw-b")?;
    standby.wait_line("standby", limit, |l| l.contains("standby:"))?;
    let mut standby_is = 1;
    let (mut lease, mut subscribed, mut paged, mut stopped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sent_after = 0usize;
    for round in 0..kills {
        let active_is = 1 - standby_is;
        let before = active.lines().len();
        let struck = Instant::now();
        match fault {
            Fault::Kill => active.kill9()?,
            Fault::Freeze => active.signal("STOP")?,
            Fault::Partition => links[active_is].cut(),
        }
        let home = site::home_id(round);
        mamori_tests::publish(broker.port(), &[site::event(&home, 1, "mains_lost", &site::now_ts())])?;
        standby.wait_line("lease", limit, |l| l.contains("lease acquired"))?;
        lease.push(struck.elapsed().as_secs_f64());
        standby.wait_line("subscribed", limit, |l| l.contains("\"subscribed\""))?;
        subscribed.push(struck.elapsed().as_secs_f64());
        let want = format!("\"{home}\"");
        hook.wait("the new outage paged", limit, |d| {
            d.iter().any(|x| x.path == "/family" && x.accepted && x.body.to_string().contains(&want))
        })?;
        paged.push(struck.elapsed().as_secs_f64());
        // The deposed active: gone, or on its own way out without sending.
        match fault {
            Fault::Kill => {}
            Fault::Freeze => {
                active.signal("CONT")?;
                let code = active.wait_exit(limit)?;
                if code != Some(1) {
                    bail!("round {round}: the woken active exited with {code:?}: {:?}", active.lines());
                }
            }
            Fault::Partition => {
                let code = active.wait_exit(limit)?;
                stopped.push(struck.elapsed().as_secs_f64());
                if code != Some(1) {
                    bail!("round {round}: the cut-off active exited with {code:?}: {:?}", active.lines());
                }
                links[active_is].restore();
            }
        }
        sent_after += active.lines().iter().skip(before).filter(|l| attempt(l)).count();
        eprintln!(
            "{fault:?} round {round}: lease {:.2} s, subscribed {:.2} s, paged {:.2} s",
            lease[round], subscribed[round], paged[round]
        );
        // The deposed one comes back as the standby.
        let name = if standby_is == 1 { "gw-a" } else { "gw-b" };
        let back = run(&bin, &configs[active_is], name)?;
        back.wait_line("standby", limit, |l| l.contains("standby:"))?;
        active = std::mem::replace(&mut standby, back);
        standby_is = active_is;
    }
    let keys: Vec<String> = hook.deliveries().iter().filter(|d| d.accepted).map(|d| d.key.clone()).collect();
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    println!("\n# {fault:?} (lease_s {lease_s}, {kills} rounds)");
    let mut rows = vec![("lease taken", &mut lease), ("subscribed", &mut subscribed), ("new outage paged", &mut paged)];
    if fault == Fault::Partition {
        rows.push(("cut-off active exited", &mut stopped));
    }
    for (what, v) in rows {
        v.sort_by(f64::total_cmp);
        println!(
            "{what:>21}: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!("delivery attempts by a deposed active after the fault: {sent_after}");
    println!("deliveries: {} accepted, {} distinct keys", keys.len(), unique.len());
    let accepted: Vec<_> = hook.deliveries().into_iter().filter(|d| d.accepted).collect();
    for (i, d) in accepted.iter().enumerate() {
        if let Some(first) = accepted[..i].iter().find(|e| e.key == d.key) {
            println!(
                "sent twice: {} to {} for {} ({:.0} ms apart)",
                d.key,
                d.path,
                d.body["home"],
                d.at.saturating_duration_since(first.at).as_secs_f64() * 1000.0
            );
        }
    }
    Ok(())
}
