//! `bench-reconnect`: a prefecture's homes come back at once after a regional network cut.
//! Not a test: it prints figures for `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p mamori-gateway -p mamori-tests
//! target/release/bench-reconnect [--homes 19000] [--municipalities 40] [--cut-s 60] [--outages 1000]
//!     [--probes 300] [--telemetry-s 60] [--work DIR] [--autosave-changes N]
//! ```
//!
//! Everything is as deployed, on one machine: `pki init` and `homes provision` make the
//! deployment's CA and every home's bundle (a client certificate and a password of its own);
//! a Mosquitto runs the configuration `pki init` generated (TLS only, client certificates,
//! the password file, the per-home ACL); the release `mamori-gateway` runs on SQLite with a
//! webhook receiver for the phones. Each home is the agent's own uplink code in this process
//! (`mamori_agent::uplink::Uplink` over its `FileStorage` spool, configured from its bundle by
//! `mamori_agent::config::Config::load`), run by worker processes, so there are `--homes` real
//! MQTT connections over
//! TLS, each with its own credentials. The spools live on tmpfs (`/dev/shm`): the disk is not
//! what is measured.
//!
//! Between the homes and the broker sits a cuttable link (a TCP forwarder in each worker, as
//! a region's access network): the gateway reaches the broker directly, as a centre in
//! another place would.
//!
//! 1. **Cold start**: every home starts at once; the time until every one is connected and the
//!    gateway has stored every home's `online`.
//! 2. **The cut**: every connection through the link is closed and new ones are refused for
//!    `--cut-s` (the broker publishes every home's will). Five seconds in, `--outages` homes
//!    lose mains: their `mains_lost` and their on-battery telemetry wait in their spools, as
//!    does every home's telemetry (one kept per period). The notifications sent during the cut
//!    are counted by receiver: the mass-silence rule should send one notice and page nobody.
//! 3. **The reconnection storm**: the link comes back. Measured from that moment: every home
//!    connected again (each agent's own backoff decides when it tries), the gateway holding
//!    every home's `online` and every spooled `mains_lost`, and the families of the outage
//!    homes paged. During the storm, `--probes` homes that are already back lose mains one by
//!    one: the time from each `mains_lost` to the family's webhook is the gateway's latency
//!    for a new outage while the fleet reconnects.
//! 4. **Memory and CPU**: VmHWM of the broker, the gateway and the workers (the agents'
//!    uplinks), and the CPU each of the broker and the gateway used during the storm.
//!
//! `--work DIR` keeps the PKI and the bundles in `DIR` (made on the first run) so that later
//! runs skip provisioning, which for 20,000 homes takes minutes (bcrypt hashes for a NATS
//! cluster are made with every Mosquitto password).
//!
//! Every process here is bound by the machine's hard limit on open files (`ulimit -Hn`,
//! 20,000 on the benchmark machine, which cannot be raised without CAP_SYS_RESOURCE). The
//! broker holds one descriptor per home, so `--homes` must stay under it (the default,
//! 19,000, does); the homes are split over worker processes (this same program with
//! `--worker`), each with its own link, at four descriptors per home.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock: that is its job
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mamori_agent::config::Config as AgentConfig;
use mamori_agent::spool::{FileStorage, Spool};
use mamori_agent::uplink::{Connection, FromUplink, ToUplink, Uplink, UplinkSettings};
use mamori_protocol::mqtt::{Event, EventKind, Severity};
use mamori_tests::args::{self, arg, arg_text};
use mamori_tests::chain::generated_broker_quiet;
use mamori_tests::fleet::{self, gateway_bin, ingested, kind_of, ms, summary, Fleet};
use mamori_tests::process::Process;
use mamori_tests::procfs::{cpu_ns, machine, percentile, status_kb};
use mamori_tests::webhook::{Delivery, WebhookReceiver};
use mamori_tests::{free_port, Deadline};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "bench-hook-secret";

/// The region's access network: a TCP forwarder to the broker that can be cut. A cut closes
/// every connection through it (each side sees its peer go) and refuses new ones (accepted
/// and closed at once, as a router whose uplink is down answers) until it is restored.
struct Region {
    port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<HashMap<u64, AbortHandle>>>,
}

impl Region {
    async fn start(target: u16) -> Result<Region> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener: TcpListener = socket.listen(8192)?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
        let (u, o) = (up.clone(), open.clone());
        tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                let Ok((mut home, _)) = listener.accept().await else {
                    // Out of descriptors, most likely: the homes retry.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                next += 1;
                let id = next;
                let o2 = o.clone();
                let task = tokio::spawn(async move {
                    let upstream =
                        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(("127.0.0.1", target))).await;
                    if let Ok(Ok(mut broker)) = upstream {
                        let _ = (home.set_nodelay(true), broker.set_nodelay(true));
                        let _ = tokio::io::copy_bidirectional(&mut home, &mut broker).await;
                    }
                    o2.lock().unwrap().remove(&id);
                });
                o.lock().unwrap().insert(id, task.abort_handle());
                // A cut between the check above and the insert must still close this one.
                if !u.load(Ordering::SeqCst) {
                    task.abort();
                }
            }
        });
        Ok(Region { port, up, open })
    }

    fn cut(&self) -> usize {
        self.up.store(false, Ordering::SeqCst);
        let open: Vec<AbortHandle> = self.open.lock().unwrap().drain().map(|(_, h)| h).collect();
        for h in &open {
            h.abort();
        }
        open.len()
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// What the workers have told us, per home: connected since (ms after `base`, 0 when not
/// connected) and how many connections it has made.
struct Homes {
    base: Instant,
    since_ms: Vec<AtomicU64>,
    connects: Vec<AtomicU64>,
    connected: AtomicUsize,
}

impl Homes {
    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(1))
    }

    fn set(&self, i: usize, up: bool) {
        let Some(since) = self.since_ms.get(i) else { return };
        let was = since.load(Ordering::SeqCst) != 0;
        if up {
            since.store(ms_u64(self.base.elapsed()) + 1, Ordering::SeqCst);
            self.connects[i].fetch_add(1, Ordering::SeqCst);
            if !was {
                self.connected.fetch_add(1, Ordering::SeqCst);
            }
        } else {
            since.store(0, Ordering::SeqCst);
            if was {
                self.connected.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// One home as the agent runs it: its uplink over its spool, from its bundle. Every
/// connection made or lost is a line on standard output (`up <i>`, `down <i>`).
async fn start_home(
    i: usize,
    bundle: &Path,
    spools: &Path,
    region_port: u16,
    telemetry_s: u32,
    cancel: CancellationToken,
) -> Result<mpsc::Sender<ToUplink>> {
    // The bundle as the installer carries it, with the device the installer adds (a UPS
    // behind NUT; never polled here: only the uplink runs).
    let text = std::fs::read_to_string(bundle).with_context(|| format!("{}", bundle.display()))?;
    let text = format!("{text}\n[[nut]]\nid = \"ups\"\nups = \"ups\"\n");
    let config = AgentConfig::parse(&text, bundle)?;
    let home = config.home();
    let mut conn = Connection::from_config(home.clone(), &config.broker)?;
    // The bundle names the broker as the homes reach it; here that is the region's link.
    conn.host = "127.0.0.1".into();
    conn.port = region_port;
    conn.brokers = vec![("127.0.0.1".into(), region_port)];
    let storage = FileStorage::open(&spools.join(home.as_str()))?;
    let (spool, _) = Spool::open(storage, config.spool.capacity_bytes, unix_ms())?;
    let settings = UplinkSettings {
        inflight: usize::from(config.spool.inflight),
        telemetry_interval: Duration::from_secs(u64::from(telemetry_s)),
        online: Uplink::<FileStorage>::announce(Vec::new(), telemetry_s, chrono::Utc::now().fixed_offset()),
        shutdown_grace: Duration::from_secs(1),
    };
    let (tx, rx) = mpsc::channel(64);
    let (from_tx, mut from_rx) = mpsc::channel(64);
    tokio::spawn(Uplink::new(conn, settings, spool).run(rx, from_tx, cancel));
    tokio::spawn(async move {
        while let Some(m) = from_rx.recv().await {
            if let FromUplink::Connected(up) = m {
                println!("{} {i}", if up { "up" } else { "down" });
            }
        }
    });
    Ok(tx)
}

/// A worker: homes `from..to` of the fleet behind a region link of its own, driven by lines
/// on standard input (`cut`, `restore`, `lose <i>`, `quit`). Homes are split over workers
/// because one process may hold at most `ulimit -Hn` descriptors, and each home costs four
/// here (its socket, its spool, both sides of the link).
async fn worker() -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let n_homes = arg("--homes", 20_000)? as usize;
    let n_munis = arg("--municipalities", 40)? as usize;
    let (from, to) = (arg("--from", 0)? as usize, arg("--to", 0)? as usize);
    let broker_port = u16::try_from(arg("--broker-port", 0)?)?;
    let telemetry_s = u32::try_from(arg("--telemetry-s", 60)?)?;
    let bundles = arg_text("--bundles").map(PathBuf::from).context("--bundles")?;
    let spools = arg_text("--spools").map(PathBuf::from).context("--spools")?;
    let fleet = Fleet::new(n_homes, n_munis);
    let region = Region::start(broker_port).await?;
    let cancel = CancellationToken::new();
    let mut homes = Vec::with_capacity(to.saturating_sub(from));
    for i in from..to.min(n_homes) {
        let bundle = bundles.join(format!("{}.toml", fleet.homes[i]));
        homes.push(start_home(i, &bundle, &spools, region.port, telemetry_s, cancel.child_token()).await?);
    }
    let homes = Arc::new(homes);
    let on_battery: Arc<Vec<AtomicBool>> = Arc::new((0..homes.len()).map(|_| AtomicBool::new(false)).collect());
    // Telemetry: every home once per period, in slices every 100 ms.
    {
        let (homes, on_battery) = (homes.clone(), on_battery.clone());
        tokio::spawn(async move {
            let slices = (telemetry_s as usize) * 10;
            let per = homes.len().div_ceil(slices);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut slice = 0usize;
            loop {
                tick.tick().await;
                let start = (slice % slices) * per;
                for k in start..(start + per).min(homes.len()) {
                    let b = on_battery[k].load(Ordering::Relaxed);
                    let t = fleet::telemetry(b, 7200 + ((from + k) % 50) as u32 * 360, telemetry_s);
                    let _ = homes[k].try_send(ToUplink::Telemetry(t));
                }
                slice += 1;
            }
        });
    }
    println!("ready {}", homes.len());
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().and_then(|w| w.parse::<usize>().ok())) {
            (Some("cut"), _) => println!("cut {}", region.cut()),
            (Some("restore"), _) => region.restore(),
            (Some("lose"), Some(i)) if (from..to).contains(&i) => {
                let k = i - from;
                on_battery[k].store(true, Ordering::Relaxed);
                homes[k].send(ToUplink::Event(mains_lost())).await?;
                homes[k].send(ToUplink::Telemetry(fleet::telemetry(true, 7200, telemetry_s))).await?;
            }
            (Some("quit"), _) => break,
            _ => eprintln!("worker: not understood: {line}"),
        }
    }
    cancel.cancel();
    Ok(())
}

/// A worker process, seen from the coordinator: its lines update [`Homes`].
struct Worker {
    child: std::process::Child,
    stdin: Mutex<std::process::ChildStdin>,
    ready: Arc<AtomicBool>,
    cut: Arc<AtomicUsize>,
    gone: Arc<AtomicBool>,
}

impl Worker {
    fn spawn(args: &[String], homes: Arc<Homes>) -> Result<Worker> {
        use std::io::BufRead as _;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        let stdin = Mutex::new(child.stdin.take().context("worker stdin")?);
        let out = child.stdout.take().context("worker stdout")?;
        let (ready, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let gone = Arc::new(AtomicBool::new(false));
        let (r, c, g) = (ready.clone(), cut.clone(), gone.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut w = line.split_whitespace();
                match (w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
                    (Some("up"), Some(i)) => homes.set(i, true),
                    (Some("down"), Some(i)) => homes.set(i, false),
                    (Some("ready"), _) => r.store(true, Ordering::SeqCst),
                    (Some("cut"), Some(n)) => {
                        c.fetch_add(n, Ordering::SeqCst);
                    }
                    _ => eprintln!("{line}"),
                }
            }
            g.store(true, Ordering::SeqCst);
        });
        Ok(Worker { child, stdin, ready, cut, gone })
    }

    fn send(&self, line: &str) -> Result<()> {
        use std::io::Write as _;
        let mut s = self.stdin.lock().unwrap();
        writeln!(s, "{line}")?;
        s.flush()?;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.send("quit");
        let deadline = Deadline::after(Duration::from_secs(5));
        while matches!(self.child.try_wait(), Ok(None)) && !deadline.remaining().is_zero() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn ms_u64(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn mains_lost() -> Event {
    Event {
        id: "bench".into(),
        seq: 0,
        ts: chrono::Utc::now().fixed_offset(),
        kind: EventKind::MainsLost,
        severity: Severity::Critical,
        source: None,
        data: serde_json::Map::new(),
        clock: None,
    }
}

/// What the gateway has stored since a mark: homes whose latest status after `mark` is
/// `online`, and `mains_lost` events in all.
struct Stored {
    db: PathBuf,
}

impl Stored {
    fn status_mark(&self) -> Result<i64> {
        let c = self.open()?;
        Ok(c.query_row("SELECT coalesce(max(rowid), 0) FROM status", [], |r| r.get(0))?)
    }

    fn online_since(&self, mark: i64) -> Result<usize> {
        let c = self.open()?;
        let n: i64 = c.query_row(
            "SELECT count(DISTINCT home) FROM status WHERE rowid > ?1 AND payload LIKE '%\"state\":\"online\"%'",
            [mark],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn mains_lost(&self) -> Result<usize> {
        let c = self.open()?;
        let n: i64 = c.query_row("SELECT count(*) FROM events WHERE kind = 'mains_lost'", [], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn open(&self) -> Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        c.busy_timeout(Duration::from_secs(5))?;
        Ok(c)
    }
}

fn write_config(work: &Path, broker_port: u16, http: u16, hook: &str) -> Result<PathBuf> {
    let p = work.join("data").join("pki");
    let mut c = format!(
        "homes_file = \"homes.toml\"\n\
         data_dir = \"data\"\n\
         public_url = \"http://127.0.0.1:{http}\"\n\
         link_secret = {{ value = \"bench-link-secret\" }}\n\
         [broker]\nhost = \"127.0.0.1\"\nport = {broker_port}\nclient_id = \"bench-gateway\"\n\
         username = \"mamori-gateway\"\npassword = {{ file = \"{p}/gateway-password\" }}\n\
         [broker.tls]\nca_file = \"{p}/ca.pem\"\nclient_cert_file = \"{p}/gateway.pem\"\n\
         client_key_file = \"{p}/gateway.key\"\n\
         [http]\nbind = \"127.0.0.1:{http}\"\n",
        p = p.display()
    );
    for name in ["family", "coord", "facility", "centre"] {
        c.push_str(&format!("[endpoints.{name}]\nurl = \"{hook}/{name}\"\nsecret = {{ value = \"{SECRET}\" }}\n"));
    }
    let path = work.join("gateway.toml");
    std::fs::write(&path, c)?;
    Ok(path)
}

fn run(bin: &Path, args: &[&str], what: &str) -> Result<std::process::Output> {
    let out = Command::new(bin).args(args).output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// Wait until `done` holds, polling every 100 ms, up to `limit`; the time it first held.
async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Instant> {
    let deadline = Deadline::after(limit);
    loop {
        if done()? {
            return Ok(Instant::now());
        }
        deadline.check(what)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first page to each family about `mains_lost`, by home.
fn paged(ds: &[Delivery]) -> HashMap<&str, Instant> {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for d in ds.iter().filter(|d| d.path == "/family" && kind_of(d) == ("alert", "mains_lost")) {
        if let Some(h) = d.body["home"].as_str() {
            let e = first.entry(h).or_insert(d.at);
            *e = (*e).min(d.at);
        }
    }
    first
}

fn by_path(ds: &[Delivery]) -> String {
    let mut n: std::collections::BTreeMap<(String, String), usize> = std::collections::BTreeMap::new();
    for d in ds {
        let (t, k) = kind_of(d);
        *n.entry((d.path.clone(), format!("{t}/{k}"))).or_default() += 1;
    }
    if n.is_empty() {
        return "none".into();
    }
    n.iter().map(|((p, k), c)| format!("{p} {k} ×{c}")).collect::<Vec<_>>().join(", ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let worker_args =
        ["--homes", "--municipalities", "--from", "--to", "--broker-port", "--telemetry-s", "--bundles", "--spools"];
    if std::env::args().any(|a| a == "--worker") {
        args::check(&worker_args, &["--worker"])?;
        return worker().await;
    }
    args::check(
        &[
            "--homes",
            "--municipalities",
            "--cut-s",
            "--outages",
            "--probes",
            "--telemetry-s",
            "--work",
            "--autosave-changes",
        ],
        &[],
    )?;
    let n_homes = arg("--homes", 19_000)? as usize;
    let n_munis = arg("--municipalities", 40)? as usize;
    let cut_s = arg("--cut-s", 60)?;
    let n_outages = (arg("--outages", 1_000)? as usize).min(n_homes / 2);
    let n_probes = (arg("--probes", 300)? as usize).min(n_homes / 2);
    let telemetry_s = u32::try_from(arg("--telemetry-s", 60)?).unwrap_or(60).max(10);
    let bin = gateway_bin()?;
    println!("# mamori reconnection benchmark\n");
    println!("machine: {}", machine());
    println!(
        "homes {n_homes} in {n_munis} municipalities, each its own TLS connection and credentials; \
         telemetry every {telemetry_s} s; cut {cut_s} s; {n_outages} outages during the cut; {n_probes} new outages during the storm"
    );
    // The broker holds one descriptor per home: it must fit under the hard limit every
    // process here has (`ulimit -Hn`), with room for its own files.
    let (soft, hard) = nofile_limits()?;
    if n_homes as u64 + 64 > soft {
        bail!(
            "{n_homes} homes need a broker with more than {} open files, and the limit here is {soft} \
             (`ulimit -n`; the hard limit is {hard}, and raising that needs CAP_SYS_RESOURCE): \
             raise it with `ulimit -n {hard}` or run with --homes {}",
            n_homes + 64,
            soft.saturating_sub(64)
        );
    }
    let per_worker = usize::try_from((soft.saturating_sub(200)) / 4).unwrap_or(1000).clamp(100, 4_000);

    let keep = arg_text("--work").map(PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let work = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let fleet = Fleet::new(n_homes, n_munis);
    std::fs::write(work.join("homes.toml"), fleet.homes_toml())?;
    let hook = WebhookReceiver::start(SECRET)?;
    let http = free_port()?;
    // The broker's port is not known before the broker runs: a first config for `pki init`
    // and `homes provision` (which do not connect), the real one after.
    let config = write_config(&work, 8883, http, &hook.url())?;
    let c = config.to_str().context("config path")?;
    let bundles = work.join("bundles");
    let have = fleet.homes.iter().all(|h| bundles.join(format!("{h}.toml")).exists());
    if !have {
        let t = Instant::now();
        if !work.join("data").join("pki").join("ca.pem").exists() {
            run(&bin, &["pki", "init", "--config", c, "--broker-host", "127.0.0.1"], "pki init")?;
        }
        let mut args: Vec<&str> = vec!["homes", "provision", "--config", c, "--broker-host", "127.0.0.1", "--force"];
        let out_dir = bundles.to_str().context("bundles path")?;
        args.extend(["--out", out_dir]);
        args.extend(fleet.homes.iter().map(String::as_str));
        run(&bin, &args, "homes provision")?;
        println!("\n`pki init` and `homes provision` of {n_homes} homes: {:.1} s", t.elapsed().as_secs_f64());
    } else {
        println!("\nPKI and bundles reused from {}", work.display());
    }

    // A fresh store every run (a kept `--work` keeps only the PKI and the bundles).
    for f in ["mamori.db", "mamori.db-wal", "mamori.db-shm"] {
        let _ = std::fs::remove_file(work.join("data").join(f));
    }
    // `--autosave-changes N`: Mosquitto saves its persistence file after N changes instead of
    // after every one (the generated config's `autosave_interval 1`), for comparison.
    let extra = match arg("--autosave-changes", 0)? {
        0 => String::new(),
        n => format!("autosave_interval {n}\n"),
    };
    let broker = generated_broker_quiet(&work.join("data").join("pki"), &extra)?;
    let broker_pid = broker.pid().context("broker pid")?;
    let config = write_config(&work, broker.port(), http, &hook.url())?;
    mamori_tests::gateway_init(&bin, &config)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&config).env("RUST_LOG", "warn,mamori_gateway=info");
    let gw = Process::spawn("gateway", cmd)?;
    gw.wait_line("subscribed", Duration::from_secs(120), |l| l.contains("\"subscribed\""))?;
    let gw_pid = gw.pid();
    let stored = Stored { db: work.join("data").join("mamori.db") };

    // 1. Cold start: the workers start their homes at once.
    let spools = tempfile::Builder::new().prefix("mamori-bench-spools").tempdir_in("/dev/shm")?;
    let state = Arc::new(Homes {
        base: Instant::now(),
        since_ms: (0..n_homes).map(|_| AtomicU64::new(0)).collect(),
        connects: (0..n_homes).map(|_| AtomicU64::new(0)).collect(),
        connected: AtomicUsize::new(0),
    });
    let mark = stored.status_mark()?;
    let t0 = Instant::now();
    let mut workers = Vec::new();
    let mut owner = vec![0usize; n_homes];
    for (w, from) in (0..n_homes).step_by(per_worker).enumerate() {
        let to = (from + per_worker).min(n_homes);
        owner[from..to].iter_mut().for_each(|o| *o = w);
        let args: Vec<String> = [
            ("--homes", n_homes.to_string()),
            ("--municipalities", n_munis.to_string()),
            ("--from", from.to_string()),
            ("--to", to.to_string()),
            ("--broker-port", broker.port().to_string()),
            ("--telemetry-s", telemetry_s.to_string()),
            ("--bundles", bundles.display().to_string()),
            ("--spools", spools.path().display().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        workers.push(Worker::spawn(&args, state.clone())?);
    }
    let s2 = state.clone();
    let all_connected = until("every home connected", Duration::from_secs(900), || {
        if workers.iter().any(|w| w.gone.load(Ordering::SeqCst)) {
            bail!("a worker stopped (its error is above)");
        }
        Ok(s2.connected.load(Ordering::SeqCst) == n_homes)
    })
    .await?;
    let all_online = until("the gateway storing every home's online", Duration::from_secs(900), || {
        Ok(stored.online_since(mark)? >= n_homes)
    })
    .await?;
    if !workers.iter().all(|w| w.ready.load(Ordering::SeqCst)) {
        bail!("every home connected before every worker said it was ready");
    }
    println!("\n## 1. Cold start: {n_homes} homes in {} worker processes", workers.len());
    println!(
        "every home connected {:.1} s after the workers started · the gateway held every `online` at {:.1} s",
        (all_connected - t0).as_secs_f64(),
        (all_online - t0).as_secs_f64()
    );
    // Settle: a full telemetry period, so every home is heard as usual before the cut.
    tokio::time::sleep(Duration::from_secs(u64::from(telemetry_s))).await;
    let before_cut = hook.deliveries().len();
    println!("notifications before the cut (should be none): {}", by_path(&hook.deliveries()));

    // 2. The cut.
    let cut_at = Instant::now();
    for w in &workers {
        w.send("cut")?;
    }
    let s2 = state.clone();
    let all_down =
        until("every home seeing the cut", Duration::from_secs(120), || Ok(s2.connected.load(Ordering::SeqCst) == 0))
            .await?;
    let closed: usize = workers.iter().map(|w| w.cut.load(Ordering::SeqCst)).sum();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outage_homes: Vec<usize> = (0..n_outages).map(|k| k * n_homes / n_outages.max(1)).collect();
    for &i in &outage_homes {
        workers[owner[i]].send(&format!("lose {i}"))?;
    }
    let ingested_before = ingested(http).await?;
    tokio::time::sleep_until((cut_at + Duration::from_secs(cut_s)).into()).await;
    let during_cut: Vec<Delivery> = hook.deliveries().into_iter().skip(before_cut).collect();
    println!(
        "\n## 2. The cut: {closed} connections closed; every home saw it in {:.1} s",
        (all_down - cut_at).as_secs_f64()
    );
    println!("notifications during the {cut_s} s cut: {}", by_path(&during_cut));

    // 3. The reconnection storm.
    let mark = stored.status_mark()?;
    let connects_before: u64 = state.connects.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    let (cpu_b0, cpu_g0) = (cpu_ns(broker_pid), cpu_ns(gw_pid));
    let restored = Instant::now();
    let restored_ms = ms_u64(restored - state.base);
    for w in &workers {
        w.send("restore")?;
    }
    // Probes: homes already back, not among the outages, losing mains one by one.
    let probe_gap = Duration::from_millis(100);
    let outage_set: HashSet<usize> = outage_homes.iter().copied().collect();
    let mut probe_sent: HashMap<String, Instant> = HashMap::new();
    let mut candidates = (0..n_homes).filter(|i| !outage_set.contains(i)).cycle();
    let storm_deadline = Deadline::after(Duration::from_secs(900));
    let mut next = Instant::now() + Duration::from_millis(500);
    while probe_sent.len() < n_probes && state.connected.load(Ordering::SeqCst) < n_homes {
        storm_deadline.check("probes during the storm")?;
        tokio::time::sleep_until(next.into()).await;
        next += probe_gap;
        // The next home that is back (at most one pass over the fleet).
        let pick = candidates.by_ref().take(n_homes).find(|&i| {
            state.since_ms[i].load(Ordering::SeqCst) > restored_ms && !probe_sent.contains_key(&fleet.homes[i])
        });
        if let Some(i) = pick {
            workers[owner[i]].send(&format!("lose {i}"))?;
            probe_sent.insert(fleet.homes[i].clone(), Instant::now());
        }
    }
    let s2 = state.clone();
    let all_back = until("every home connected again", Duration::from_secs(900), || {
        Ok(s2.connected.load(Ordering::SeqCst) == n_homes)
    })
    .await?;
    // Reconnection times (as the coordinator read each worker's line): each home's connection
    // after the restore, taken now, before a later reconnection could replace it.
    let mut back: Vec<f64> = state
        .since_ms
        .iter()
        .map(|s| s.load(Ordering::SeqCst))
        .filter(|&s| s > restored_ms)
        .map(|s| ms(state.at(s).saturating_duration_since(restored)))
        .collect();
    back.sort_by(f64::total_cmp);
    let want_lost = n_outages + probe_sent.len();
    let all_online = until("the gateway storing every home's online again", Duration::from_secs(900), || {
        Ok(stored.online_since(mark)? >= n_homes)
    })
    .await?;
    let all_events = until("the gateway storing every spooled mains_lost", Duration::from_secs(900), || {
        Ok(stored.mains_lost()? >= want_lost)
    })
    .await?;
    let cpu_b = (cpu_ns(broker_pid) - cpu_b0) as f64 / 1e9;
    let cpu_g = (cpu_ns(gw_pid) - cpu_g0) as f64 / 1e9;
    let storm_wall = (all_online.max(all_events) - restored).as_secs_f64();
    let outage_ids: Vec<&str> = outage_homes.iter().map(|&i| fleet.homes[i].as_str()).collect();
    let everyone = |ds: &[Delivery]| {
        let p = paged(ds);
        outage_ids.iter().all(|h| p.contains_key(*h)) && probe_sent.keys().all(|h| p.contains_key(h.as_str()))
    };
    // The receiver's wait blocks its thread: not one the runtime needs.
    let ds = tokio::task::block_in_place(|| hook.wait("every family paged", Duration::from_secs(300), everyone))
        .unwrap_or_else(|e| {
            println!("{e:#}");
            hook.deliveries()
        });
    let first_page = paged(&ds);
    let connects_after: u64 = state.connects.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    println!("\n## 3. The reconnection storm");
    println!(
        "homes connected again: p50 {:.1} s · p99 {:.1} s · all {:.1} s after the restore ({} connections made)",
        percentile(&back, 50.0) / 1000.0,
        percentile(&back, 99.0) / 1000.0,
        (all_back - restored).as_secs_f64(),
        connects_after - connects_before
    );
    println!(
        "the gateway held every home's `online` {:.1} s and every spooled `mains_lost` {:.1} s after the restore",
        (all_online - restored).as_secs_f64(),
        (all_events - restored).as_secs_f64()
    );
    let late: Vec<f64> = outage_ids
        .iter()
        .filter_map(|h| first_page.get(*h))
        .map(|t| ms(t.saturating_duration_since(restored)))
        .collect();
    summary(&format!("outage during the cut: restore → family paged ({} of {n_outages})", late.len()), late);
    let probe: Vec<f64> = probe_sent
        .iter()
        .filter_map(|(h, at)| first_page.get(h.as_str()).map(|t| ms(t.saturating_duration_since(*at))))
        .collect();
    summary(
        &format!("new outage during the storm: mains_lost → family paged ({} of {})", probe.len(), probe_sent.len()),
        probe,
    );
    let after: Vec<Delivery> = ds.iter().skip(before_cut + during_cut.len()).cloned().collect();
    println!("notifications after the restore: {}", by_path(&after));
    let mut keys = HashSet::new();
    let twice = ds.iter().filter(|d| !keys.insert(d.key.clone())).count();
    println!("notifications with a key received twice: {twice}");
    println!(
        "messages the gateway took in from the cut to the end of the storm: {}",
        ingested(http).await? - ingested_before
    );
    println!(
        "CPU during the storm ({storm_wall:.1} s): broker {cpu_b:.1} s ({:.0} % of one core) · gateway {cpu_g:.1} s ({:.0} %)",
        100.0 * cpu_b / storm_wall.max(0.001),
        100.0 * cpu_g / storm_wall.max(0.001)
    );

    // 4. Memory.
    let homes_kb: u64 = workers.iter().map(|w| status_kb(w.pid(), "VmHWM")).sum();
    println!("\n## 4. Memory");
    println!(
        "broker VmRSS {} kB · VmHWM {} kB\ngateway VmRSS {} kB · VmHWM {} kB\nthe homes' uplinks and links ({} workers) VmHWM {homes_kb} kB in all",
        status_kb(broker_pid, "VmRSS"),
        status_kb(broker_pid, "VmHWM"),
        status_kb(gw_pid, "VmRSS"),
        status_kb(gw_pid, "VmHWM"),
        workers.len()
    );
    drop(workers);
    drop(gw);
    drop(broker);
    Ok(())
}

/// The limits on open files (`ulimit -n`, `ulimit -Hn`) that the broker and the workers
/// inherit from this process.
fn nofile_limits() -> Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line =
        limits.lines().find(|l| l.starts_with("Max open files")).context("Max open files in /proc/self/limits")?;
    let value = |n: usize| -> Result<u64> {
        let v = line.split_whitespace().nth(n).context("Max open files: its limits")?;
        Ok(if v == "unlimited" { u64::MAX } else { v.parse()? })
    };
    Ok((value(3)?, value(4)?))
}
