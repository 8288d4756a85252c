//! `bench-failover`: how fast a standby gateway takes over from a killed active one. Not a
//! test: it prints figures for `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-tests
//! target/release/bench-failover [--kills 20] [--lease-s 6]
//! ```
//!
//! Everything is real: a PostgreSQL database of its own on the test server
//! (`MAMORI_TEST_POSTGRES`), a Mosquitto started here, two `e2e-gateway` processes (the
//! gateway's own `main`) in a `[cluster]` on that database, and a webhook receiver. Each
//! round: SIGKILL the active gateway, publish a new outage at once, and measure the time from
//! the kill until the standby holds the lease, until it is subscribed to the broker, and until
//! the family's webhook has the new outage; then start the killed one again as the standby.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mamori_tests::postgres::TestDb;
use mamori_tests::process::Process;
use mamori_tests::procfs::percentile;
use mamori_tests::site::{self, Plan};
use mamori_tests::webhook::WebhookReceiver;
use mamori_tests::Mosquitto;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run(bin: &Path, config: &Path, name: &str) -> Result<Process> {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"]).arg(config);
    Process::spawn(name, cmd)
}

fn main() -> Result<()> {
    let kills = arg("--kills", 20) as usize;
    let lease_s = arg("--lease-s", 6);
    let bin = std::env::current_exe()?.parent().context("exe dir")?.join("e2e-gateway");
    let db = TestDb::new()?;
    let broker = Mosquitto::start("")?;
    let hook = WebhookReceiver::start("hook-secret")?;
    let extra = format!("{}[cluster]\nname = \"gw-a\"\nlease_s = {lease_s}\n", db.store_toml());
    let plan = Plan { homes: kills + 1, extra: &extra, ..Plan::default() };
    let s = site::site(broker.port(), &hook.url(), &hook.url(), &plan)?;
    // The same config again, as gw-b on another HTTP port.
    let b_port = mamori_tests::free_port()?;
    let b_config = s.dir.path().join("gw-b.toml");
    let text = std::fs::read_to_string(&s.config)?
        .replace(&format!("127.0.0.1:{}", s.http), &format!("127.0.0.1:{b_port}"))
        .replace("name = \"gw-a\"", "name = \"gw-b\"");
    std::fs::write(&b_config, text)?;
    site::init(&bin, &s.config)?;
    let configs = [s.config.clone(), b_config];
    let limit = Duration::from_secs(60);

    let mut active = run(&bin, &configs[0], "gw-a")?;
    active.wait_line("lease", limit, |l| l.contains("lease acquired"))?;
    active.wait_line("subscribed", limit, |l| l.contains("\"subscribed\""))?;
    let mut standby = run(&bin, &configs[1], "gw-b")?;
    standby.wait_line("standby", limit, |l| l.contains("standby:"))?;
    let mut standby_is = 1;
    let (mut lease, mut subscribed, mut paged) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..kills {
        active.kill9()?;
        let killed = Instant::now();
        let home = site::home_id(round);
        mamori_tests::publish(broker.port(), &[site::event(&home, 1, "mains_lost", &site::now_ts())])?;
        standby.wait_line("lease", limit, |l| l.contains("lease acquired"))?;
        lease.push(killed.elapsed().as_secs_f64());
        standby.wait_line("subscribed", limit, |l| l.contains("\"subscribed\""))?;
        subscribed.push(killed.elapsed().as_secs_f64());
        let want = format!("\"{home}\"");
        hook.wait("the new outage paged", limit, |d| {
            d.iter().any(|x| x.path == "/family" && x.accepted && x.body.to_string().contains(&want))
        })?;
        paged.push(killed.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: lease {:.2} s, subscribed {:.2} s, paged {:.2} s",
            lease[round], subscribed[round], paged[round]
        );
        // The killed one comes back as the standby.
        let name = if standby_is == 1 { "gw-a" } else { "gw-b" };
        let back = run(&bin, &configs[1 - standby_is], name)?;
        back.wait_line("standby", limit, |l| l.contains("standby:"))?;
        active = std::mem::replace(&mut standby, back);
        standby_is = 1 - standby_is;
    }
    let keys: Vec<String> = hook.deliveries().iter().filter(|d| d.accepted).map(|d| d.key.clone()).collect();
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    for (what, v) in [("lease taken", &mut lease), ("subscribed", &mut subscribed), ("new outage paged", &mut paged)] {
        v.sort_by(f64::total_cmp);
        println!(
            "{what:>17}: p50 {:.2} s, p99 {:.2} s, max {:.2} s over {kills} kills (lease_s {lease_s})",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!("deliveries: {} accepted, {} distinct keys", keys.len(), unique.len());
    Ok(())
}
