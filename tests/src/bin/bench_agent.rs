//! `bench-agent`: the agent's benchmark. Not a test: it prints figures for
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-agent && cargo run --release -p mamori-tests --bin bench-agent -- [--outages 30] [--cpu-seconds 60]
//! ```
//!
//! 1. **Detection latency**: a simulated Megatec UPS on a pseudo-terminal, the agent at its
//!    default 250 ms poll, a Mosquitto started here. For each outage the simulator's mains is
//!    cut and the time until the `mains_lost` PUBLISH arrives at a subscriber on loopback is
//!    taken; p50/p99/max over `--outages` outages, with random gaps so outages fall at every
//!    phase of the poll.
//! 2. **CPU per poll**, side by side in the same window: the agent polling one simulated UPS,
//!    and Network UPS Tools' `nutdrv_qx` → `upsd` → `upsmon` polling another instance of the
//!    same simulated UPS. CPU time comes from `/proc/<pid>/stat` (utime + stime) over
//!    `--cpu-seconds`, divided by the number of status polls each chain made.
//! 3. **Memory**: the agent's resident set (VmRSS, and the peak VmHWM) with three sources
//!    (UPS, oximeter, sensor bridge) after a steady minute.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mamori_protocol::mqtt::{self, Event, EventKind};
use mamori_tests::args::{self, arg};
use mamori_tests::nut::Nut;
use mamori_tests::process::{Collector, Process, Simulator};
use mamori_tests::procfs::{cpu_ns, machine, percentile, status_kb, switches};
use mamori_tests::Mosquitto;

fn agent_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("mamori-agent");
    if !bin.exists() {
        bail!("{} not found: run `cargo build --release -p mamori-agent` first", bin.display());
    }
    Ok(bin)
}

fn agent_config(dir: &Path, port: u16, sim: &Path, devices: &[&str]) -> Result<PathBuf> {
    let mut c = format!(
        "home_id = \"bench-home\"\ndata_dir = \"{}\"\n[broker]\nhost = \"127.0.0.1\"\nport = {port}\n",
        dir.join("data").display()
    );
    for d in devices {
        c.push_str(&match *d {
            "ups" => {
                format!("[[ups]]\nid = \"ups\"\nprotocol = \"megatec\"\nport = \"{}\"\n", sim.join("ups").display())
            }
            "oximeter" => format!(
                "[[oximeter]]\nid = \"oximeter\"\nprotocol = \"masimo\"\nport = \"{}\"\n",
                sim.join("oximeter").display()
            ),
            "bridge" => format!("[[bridge]]\nid = \"bridge\"\nport = \"{}\"\n", sim.join("bridge").display()),
            _ => unreachable!(),
        });
    }
    let path = dir.join(format!("agent-{}.toml", devices.join("-")));
    std::fs::write(&path, c)?;
    Ok(path)
}

fn main() -> Result<()> {
    args::check(&["--outages", "--memory", "--cpu-seconds"], &[])?;
    let outages = arg("--outages", 30)? as usize;
    let memory = arg("--memory", 1)? == 1;
    let cpu_seconds = arg("--cpu-seconds", 60)?;
    let bin = agent_bin()?;
    let nut = Nut::find().context("Network UPS Tools is not installed (apt-get install nut-server nut-client)")?;
    let work = tempfile::tempdir()?;
    let broker = Mosquitto::start("")?;
    println!("# mamori agent benchmark\n");
    println!("machine: {}", machine());

    // 1. Detection latency, UPS only, default poll.
    let simdir = work.path().join("sim-a");
    let mut sim = Simulator::start(&bin, &simdir, "ups", "steady")?;
    let cfg = agent_config(work.path(), broker.port(), &simdir, &["ups"])?;
    let collector = Collector::start(broker.port(), "bench", "mamori/v1/+/event")?;
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--config"]).arg(&cfg).env("RUST_LOG", "warn");
    let agent = Process::spawn("agent", cmd)?;
    collector.wait("agent_started", Duration::from_secs(30), |m| {
        m.iter().any(|x| mqtt::decode::<Event>(&x.payload).is_ok_and(|e| e.kind == EventKind::AgentStarted))
    })?;
    let count = |kind: EventKind| {
        collector.messages().iter().filter(|x| mqtt::decode::<Event>(&x.payload).is_ok_and(|e| e.kind == kind)).count()
    };
    let mut latencies: Vec<f64> = Vec::new();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    for i in 0..outages {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        std::thread::sleep(Duration::from_millis(300 + rng_state % 500)); // a random phase of the poll
        let before = count(EventKind::MainsLost);
        sim.cmd("mains off")?;
        let t0 = Instant::now();
        let m = collector.wait("mains_lost", Duration::from_secs(10), |m| {
            m.iter().filter(|x| mqtt::decode::<Event>(&x.payload).is_ok_and(|e| e.kind == EventKind::MainsLost)).count()
                > before
        })?;
        let at = m
            .iter()
            .filter(|x| mqtt::decode::<Event>(&x.payload).is_ok_and(|e| e.kind == EventKind::MainsLost))
            .nth(before)
            .unwrap()
            .at;
        latencies.push(at.duration_since(t0).as_secs_f64() * 1000.0);
        let restored = count(EventKind::MainsRestored);
        sim.cmd("mains on")?;
        collector.wait("mains_restored", Duration::from_secs(10), |m| {
            m.iter()
                .filter(|x| mqtt::decode::<Event>(&x.payload).is_ok_and(|e| e.kind == EventKind::MainsRestored))
                .count()
                > restored
        })?;
        eprint!("\routage {}/{outages}: {:.1} ms   ", i + 1, latencies.last().unwrap());
    }
    eprintln!();
    if latencies.is_empty() {
        latencies.push(f64::NAN);
    }
    latencies.sort_by(f64::total_cmp);
    println!("\n## Detection latency (simulated Megatec UPS change -> mains_lost PUBLISH at a loopback subscriber), poll 250 ms, {outages} outages");
    println!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target: p99 <= 270 ms)",
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        latencies.last().unwrap()
    );

    // 2. CPU per poll, side by side with NUT on another instance of the simulated UPS.
    let simdir_b = work.path().join("sim-b");
    let _sim_b = Simulator::start(&bin, &simdir_b, "ups", "steady")?;
    let server = nut.start(&simdir_b.join("ups"), "megatec")?;
    std::fs::write(server.dir().join("upsd.users"), "[bench]\n  password = bench\n  upsmon primary\n")?;
    // upsd re-reads users on a reload; restart it by starting a fresh chain with the users in place.
    drop(server);
    let server = nut.start(&simdir_b.join("ups"), "megatec")?;
    std::fs::write(server.dir().join("upsd.users"), "[bench]\n  password = bench\n  upsmon primary\n")?;
    let pids = server.pids();
    let _ = Command::new("kill").arg("-HUP").arg(pids[1].to_string()).status();
    std::fs::write(
        server.dir().join("upsmon.conf"),
        format!("MONITOR sim@127.0.0.1:{} 1 bench bench primary\nPOLLFREQ 1\nPOLLFREQALERT 1\nDEADTIME 15\nMINSUPPLIES 1\nSHUTDOWNCMD \"/bin/true\"\n", server.port()),
    )?;
    let mut upsmon = Command::new(&nut.upsmon);
    upsmon
        .args(["-F", "-p", "-u", "root"])
        .env("NUT_CONFPATH", server.dir())
        .env("NUT_STATEPATH", server.dir())
        .env("NUT_ALTPIDPATH", server.dir());
    let mut upsmon = Process::spawn("upsmon", upsmon)?;
    std::thread::sleep(Duration::from_secs(3)); // let both chains settle before the window
    let agent_pid = agent.pid();
    let nut_pids = [pids[0], pids[1], upsmon.pid()];
    let (a0, n0) = (cpu_ns(agent_pid), nut_pids.iter().map(|p| cpu_ns(*p)).collect::<Vec<_>>());
    let (sa0, sn0) = (switches(agent_pid), nut_pids.iter().map(|p| switches(*p)).sum::<u64>());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(cpu_seconds));
    let secs = t0.elapsed().as_secs_f64();
    let a1 = cpu_ns(agent_pid);
    let (sa1, sn1) = (switches(agent_pid), nut_pids.iter().map(|p| switches(*p)).sum::<u64>());
    let n1: Vec<u64> = nut_pids.iter().map(|p| cpu_ns(*p)).collect();
    let agent_cpu = (a1 - a0) as f64 / 1e9;
    let nut_each: Vec<f64> = n0.iter().zip(&n1).map(|(a, b)| (b - a) as f64 / 1e9).collect();
    let nut_cpu: f64 = nut_each.iter().sum();
    let agent_polls = secs / 0.25;
    let nut_polls = secs / 1.0; // nutdrv_qx pollinterval = 1 s is NUT's shortest
    println!("\n## CPU, same {secs:.0} s window (schedstat, ns resolution)");
    println!("agent (1 UPS, 250 ms poll, MQTT publishing): {agent_cpu:.3} s CPU = {:.3} ms per poll over {agent_polls:.0} polls", agent_cpu * 1000.0 / agent_polls);
    println!(
        "NUT nutdrv_qx + upsd + upsmon (1 s poll, POLLFREQ 1): {nut_cpu:.3} s CPU (driver {:.3}, upsd {:.3}, upsmon {:.3}) = {:.3} ms per poll over {nut_polls:.0} polls",
        nut_each[0],
        nut_each[1],
        nut_each[2],
        nut_cpu * 1000.0 / nut_polls
    );
    println!("per hour: agent {:.1} s, NUT chain {:.1} s", agent_cpu / secs * 3600.0, nut_cpu / secs * 3600.0);
    println!(
        "context switches per poll: agent {:.1}, NUT chain {:.1}",
        (sa1 - sa0) as f64 / agent_polls,
        (sn1 - sn0) as f64 / nut_polls
    );
    eprintln!("upsmon running: {}", upsmon.running());
    for l in upsmon.lines().iter().take(8) {
        eprintln!("upsmon: {l}");
    }
    drop(upsmon);
    drop(server);
    drop(agent);
    drop(sim);

    if !memory {
        return Ok(());
    }
    // 3. Memory with three sources.
    let simdir_c = work.path().join("sim-c");
    let _sim_c = Simulator::start(&bin, &simdir_c, "ups,oximeter,bridge", "steady")?;
    let cfg3 = agent_config(work.path(), broker.port(), &simdir_c, &["ups", "oximeter", "bridge"])?;
    let mut cmd = Command::new(&bin);
    cmd.args(["run", "--config"]).arg(&cfg3).env("RUST_LOG", "warn");
    let agent3 = Process::spawn("agent", cmd)?;
    std::thread::sleep(Duration::from_secs(cpu_seconds.min(60)));
    println!("\n## Memory, three sources (UPS, oximeter, bridge), after {} s", cpu_seconds.min(60));
    println!(
        "VmRSS {} kB, VmHWM (peak) {} kB (target: <= 10240 kB)",
        status_kb(agent3.pid(), "VmRSS:"),
        status_kb(agent3.pid(), "VmHWM:")
    );
    Ok(())
}
