//! The sources: one task or thread per configured device, each feeding [`Observation`]s to the monitor.
//!
//! They are the I/O edge and stay thin: open the port **by path** (so a USB adapter that is
//! unplugged and plugged back, possibly as another `/dev/ttyUSBn`, is found again through its
//! `/dev/serial/by-id/...` link), write queries, feed received bytes to the protocol crate's
//! decoders, and forward what comes out. A port that fails is reported
//! ([`Observation::Failed`] with the reason) and reopened every second; a source that stops
//! answering is declared lost by the monitor, not here. Garbage on a line is counted
//! ([`Observation::Garbage`]) and decoding resynchronises; it never becomes a reading.
//!
//! One serial stack: every serial device (a UPS, an oximeter, a sensor bridge), in `run` and in
//! `probe`, is opened by [`open_serial`] and read with `serialport`'s blocking reads, each
//! bounded by a timeout, on a thread of its own. A UPS thread wakes once per poll (tokio's
//! timer wheel woke twice for a 250 ms timer: `docs/benchmarks.md`); a streaming device's read
//! returns when bytes come or after [`STREAM_READ_MS`], to see whether the agent stops. NUT is
//! a TCP socket, read with tokio.
//!
//! Over 800 lines for a reason: one thin edge per kind of source (serial UPS thread, NUT,
//! streaming serial, I2C, GPIO), each with its reopen and failure handling; what each protocol
//! is sent and how it is read is in [`crate::devices`].

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mamori_protocol::codec::{Decoder, Stream, StreamEvent};
use mamori_protocol::mqtt::{DeviceKind, PowerMeterReading};
use mamori_protocol::reading::UpsReading;
use mamori_protocol::{bridge, megatec, nut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{
    BridgeConfig, Config, ContactsConfig, NutConfig, OximeterConfig, PowerMonitorConfig, SerialUpsConfig, UpsProtocol,
};
use crate::devices::{OximeterRecord, UpsReply};
use crate::monitor::{Now, Observation, SourceSpec};

/// One observation from one source, stamped when it was read.
#[derive(Debug, Clone)]
pub struct Sourced {
    /// The source id.
    pub source: String,
    /// What it produced.
    pub observation: Observation,
    /// When.
    pub at: Now,
}

/// Where sources send what they read.
pub type ObsTx = mpsc::Sender<Sourced>;

/// A request to each serial UPS to start a battery self-test at its next poll, by source id
/// (set by the service, taken by the UPS's thread).
pub type TestRequests = std::collections::BTreeMap<String, Arc<std::sync::atomic::AtomicBool>>;

/// A request flag for every UPS in `config` that can be asked to test: every serial UPS, and
/// each UPS behind `upsd` with a user to send the instant command as.
pub fn test_requests(config: &Config) -> TestRequests {
    let serial = config.ups.iter().map(|u| u.id.clone());
    let nut = config.nut.iter().filter(|n| n.username.is_some()).map(|n| n.id.clone());
    serial.chain(nut).map(|id| (id, Arc::new(std::sync::atomic::AtomicBool::new(false)))).collect()
}

/// Ask `upsd` to start the UPS's quick battery test (`INSTCMD <ups> test.battery.start.quick`)
/// on a connection of its own, logged in as the configured user; every line has a deadline.
async fn nut_instcmd(cfg: &NutConfig) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let (Some(user), Some(password)) = (&cfg.username, &cfg.password) else {
        return Err("no upsd user configured".into());
    };
    let password = password.resolve()?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let deadline = Duration::from_secs(3);
    let sock = tokio::time::timeout(deadline, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("upsd at {addr}: no answer"))?
        .map_err(|e| format!("upsd at {addr}: {e}"))?;
    let (rd, mut wr) = sock.into_split();
    let mut lines = BufReader::new(rd).lines();
    let cmds = [
        nut::Command::Username(user.clone()),
        nut::Command::Password(password),
        nut::Command::InstCmd { ups: cfg.ups.clone(), cmd: "test.battery.start.quick".into() },
    ];
    for cmd in cmds {
        let what = cmd.encode().split(' ').next().unwrap_or_default().to_string();
        wr.write_all(cmd.encode().as_bytes()).await.map_err(|e| format!("upsd at {addr}: {e}"))?;
        let line = tokio::time::timeout(deadline, lines.next_line())
            .await
            .map_err(|_| format!("upsd: no answer to {what}"))?
            .map_err(|e| format!("upsd at {addr}: {e}"))?
            .ok_or_else(|| format!("upsd closed the connection after {what}"))?;
        match nut::parse_line(&line) {
            Ok(nut::Line::Ok) => {}
            Ok(nut::Line::Err(code)) => return Err(format!("upsd refused {what}: ERR {}", code.as_str())),
            _ => return Err(format!("upsd answered {what} with something else")),
        }
    }
    let _ = wr.write_all(b"LOGOUT\n").await;
    Ok(())
}

async fn send(tx: &ObsTx, source: &str, observation: Observation) {
    let _ = tx.send(Sourced { source: source.to_string(), observation, at: crate::clock::now() }).await;
}

/// When a polled device is lost: after `missed` polls without a reply. Replies come at a fixed
/// delay after each poll, so the silence between two replies is a whole number of polls: with
/// `missed` polls unanswered it is `missed + 1` polls, with one fewer it is `missed`. The limit
/// sits half a poll above `missed` polls, away from both.
pub fn polled_lost_after_ms(poll_ms: u64, missed: u32) -> u64 {
    poll_ms * u64::from(missed) + poll_ms / 2
}

/// The monitor's view of every configured source.
pub fn specs(config: &Config) -> Vec<SourceSpec> {
    let mut v = Vec::new();
    for u in &config.ups {
        v.push(SourceSpec {
            id: u.id.clone(),
            kind: DeviceKind::Ups,
            lost_after_ms: polled_lost_after_ms(u.poll_interval_ms, u.lost_after_missed_polls),
            glitch_below_v: (u.protocol == UpsProtocol::Megatec).then_some(u.glitch_below_v),
        });
    }
    for n in &config.nut {
        v.push(SourceSpec {
            id: n.id.clone(),
            kind: DeviceKind::Ups,
            lost_after_ms: n.poll_interval_ms * u64::from(n.lost_after_missed_polls),
            glitch_below_v: None,
        });
    }
    for p in &config.power_monitor {
        v.push(SourceSpec {
            id: p.id.clone(),
            kind: DeviceKind::PowerMonitor,
            lost_after_ms: p.poll_interval_ms * 3,
            glitch_below_v: None,
        });
    }
    for o in &config.oximeter {
        v.push(SourceSpec {
            id: o.id.clone(),
            kind: DeviceKind::Oximeter,
            lost_after_ms: o.lost_after_ms,
            glitch_below_v: None,
        });
    }
    for b in &config.bridge {
        v.push(SourceSpec {
            id: b.id.clone(),
            kind: DeviceKind::Bridge,
            lost_after_ms: b.lost_after_ms,
            glitch_below_v: None,
        });
    }
    if let Some(c) = &config.contacts {
        v.push(SourceSpec {
            id: c.id.clone(),
            kind: DeviceKind::Contacts,
            lost_after_ms: (c.poll_interval_ms * 100).max(1000),
            glitch_below_v: None,
        });
    }
    v
}

/// Start a task (or thread) per configured source.
pub fn spawn_all(
    config: &Config,
    tx: ObsTx,
    tests: &TestRequests,
    cancel: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for u in config.ups.clone() {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        let test = tests.get(&u.id).cloned();
        tasks.push(tokio::task::spawn_blocking(move || serial_ups(&u, &tx, test.as_deref(), &cancel)));
    }
    for n in config.nut.clone() {
        let test = tests.get(&n.id).cloned();
        tasks.push(tokio::spawn(nut_source(n, tx.clone(), test, cancel.clone())));
    }
    for o in config.oximeter.clone() {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        tasks.push(tokio::task::spawn_blocking(move || oximeter(&o, &tx, &cancel)));
    }
    for b in config.bridge.clone() {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        tasks.push(tokio::task::spawn_blocking(move || bridge_source(&b, &tx, &cancel)));
    }
    for p in config.power_monitor.clone() {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        tasks.push(tokio::task::spawn_blocking(move || power_monitor(&p, &tx, &cancel)));
    }
    if let Some(c) = config.contacts.clone() {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        tasks.push(tokio::task::spawn_blocking(move || contacts_cdev(&c, &tx, &cancel)));
    }
    tasks
}

/// Open a serial port by path (blocking reads, `timeout` each), with the reason in words when
/// it fails. Every serial device, in `run` and in `probe`, is read through this one stack:
/// `serialport`, on a thread of its own, each read bounded by its timeout.
pub fn open_serial(path: &Path, baud: u32, timeout: Duration) -> Result<serialport::TTYPort, String> {
    if !path.exists() {
        return Err(format!("port {} missing (unplugged?)", path.display()));
    }
    serialport::new(path.to_string_lossy(), baud).timeout(timeout).open_native().map_err(|e| serial_error(path, &e))
}

/// Hand every decoded item to `on_item` until it accepts one (`true`); count the chunks that
/// did not decode. The part of a transaction that is the same whatever the port.
fn drain<D: Decoder>(stream: &mut Stream<D>, garbage: &mut u64, on_item: &mut impl FnMut(D::Item) -> bool) -> bool {
    while let Some(ev) = stream.next_event() {
        match ev {
            StreamEvent::Item { item, .. } => {
                if on_item(item) {
                    return true;
                }
            }
            StreamEvent::Error { .. } => *garbage += 1,
        }
    }
    false
}

/// [`transact`] on a serial port, blocking: write `cmd`, read until `on_item` accepts a reply
/// or `timeout` passes.
pub fn serial_transact<D: Decoder>(
    port: &mut serialport::TTYPort,
    stream: &mut Stream<D>,
    cmd: &[u8],
    timeout: Duration,
    garbage: &mut u64,
    mut on_item: impl FnMut(D::Item) -> bool,
) -> io::Result<bool> {
    use serialport::SerialPort;
    use std::io::{Read, Write};
    if !cmd.is_empty() {
        port.write_all(cmd)?; // no flush: see `transact`
    }
    #[allow(clippy::disallowed_methods)] // an I/O deadline
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 512];
    loop {
        if drain(stream, garbage, &mut on_item) {
            return Ok(true);
        }
        #[allow(clippy::disallowed_methods)] // an I/O deadline
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        port.set_timeout(left)?;
        match port.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "port closed")),
            Ok(n) => stream.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Read a streaming serial port until an item `accept`s, within `limit`; failing that, the
/// last item read. The error carries the undecodable chunks seen and the port's error, empty
/// when nothing came at all.
pub fn serial_first_item<D: Decoder>(
    port: &mut serialport::TTYPort,
    decoder: D,
    limit: Duration,
    accept: impl Fn(&D::Item) -> bool,
) -> Result<D::Item, (u64, String)> {
    let (mut fallback, mut garbage) = (None, 0);
    let mut stream = Stream::new(decoder);
    let r = serial_transact(port, &mut stream, b"", limit, &mut garbage, |item| {
        let done = accept(&item);
        fallback = Some(item);
        done
    });
    match (fallback, r) {
        (Some(item), _) => Ok(item),
        (None, Ok(_)) => Err((garbage, String::new())),
        (None, Err(e)) => Err((garbage, e.to_string())),
    }
}

/// An open failure in words an installer can act on.
fn serial_error(path: &Path, e: &serialport::Error) -> String {
    match e.kind {
        serialport::ErrorKind::Io(io::ErrorKind::PermissionDenied) => {
            format!("permission denied on {} (add the user to the dialout group)", path.display())
        }
        _ if e.description.contains("exclusive lock") => {
            format!(
                "{} is in use by another program (is mamori-agent running? stop it first: systemctl stop mamori-agent)",
                path.display()
            )
        }
        _ => format!("cannot open {}: {e}", path.display()),
    }
}

async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// Write `cmd` and read until `on_item` accepts a reply or `timeout` passes. Items that are
/// not the reply (APC's unrequested characters) are handed to `on_item` as they come.
/// Returns whether a reply came; an I/O error means the port is gone.
pub async fn transact<P, D>(
    port: &mut P,
    stream: &mut Stream<D>,
    cmd: &[u8],
    timeout: Duration,
    garbage: &mut u64,
    mut on_item: impl FnMut(D::Item) -> bool,
) -> io::Result<bool>
where
    P: AsyncRead + AsyncWrite + Unpin,
    D: Decoder,
{
    if !cmd.is_empty() {
        // No flush: a tty write hands the bytes to the kernel, and flushing a serial port is
        // tcdrain(), which blocks until they have left the UART (12 ms for `Q1\r` at 2400 bps,
        // on the runtime's only thread).
        port.write_all(cmd).await?;
    }
    #[allow(clippy::disallowed_methods)] // an I/O deadline on tokio's clock
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 512];
    loop {
        if drain(stream, garbage, &mut on_item) {
            return Ok(true);
        }
        match tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
            Err(_) => return Ok(false),
            Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "port closed")),
            Ok(Ok(n)) => stream.push(&buf[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A serial UPS, polled on its own thread with blocking I/O.
///
/// Why a thread and not a task: a poll's work is a few microseconds, and what it costs is
/// wake-ups. A blocking loop sleeps exactly until the next tick and then waits in `poll()` for
/// the reply: two wake-ups a poll, as NUT's own driver does. (tokio's timer wheel files a
/// 250 ms timer in its 64 ms level and wakes twice for it; measured in docs/benchmarks.md.)
/// The next tick is the deadline for the previous reply; a cycle's further commands (slower
/// readings, identity) are sent one after another as each reply arrives; an unanswered command
/// is abandoned at the next tick, and the monitor turns silence into `device_lost`.
pub fn serial_ups(
    cfg: &SerialUpsConfig,
    tx: &ObsTx,
    test: Option<&std::sync::atomic::AtomicBool>,
    cancel: &CancellationToken,
) {
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let send_at = |obs, at| {
        let _ = tx.blocking_send(Sourced { source: cfg.id.clone(), observation: obs, at });
    };
    let send = |obs| send_at(obs, crate::clock::now());
    while !cancel.is_cancelled() {
        let mut port = match open_serial(&cfg.port, cfg.baud, poll) {
            Ok(p) => p,
            Err(reason) => {
                send(Observation::Failed(reason));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        tracing::info!(source = %cfg.id, port = %cfg.port.display(), "UPS port open");
        let reason = ups_session(cfg, &mut port, poll, &send_at, test, cancel);
        match reason {
            Some(reason) => {
                tracing::warn!(source = %cfg.id, %reason, "UPS port lost; reopening");
                send(Observation::Failed(reason));
                std::thread::sleep(Duration::from_secs(1));
            }
            None => return,
        }
    }
}

/// Log what a UPS says about itself (identity, ratings) or that it did not understand a query.
fn log_reply(source: &str, r: &UpsReply) {
    match r {
        UpsReply::Megatec(megatec::Reply::Info(i)) => {
            tracing::info!(%source, company = %i.company, model = %i.model, version = %i.version, "UPS identity");
        }
        UpsReply::Megatec(megatec::Reply::Rating(r)) => {
            tracing::info!(%source, voltage_v = ?r.voltage_v, battery_voltage_v = ?r.battery_voltage_v, "UPS ratings");
        }
        UpsReply::Megatec(megatec::Reply::Echo(cmd)) => {
            tracing::warn!(%source, %cmd, "the UPS echoed a command it does not know: is the protocol right?");
        }
        _ => {}
    }
}

/// Whether a UPS reading is worth waking the monitor for: any flag changed, or a value moved
/// by more than its noise (1 V, 2 % load, 0.1 V battery, 0.2 Hz, 1 °C, 1 % charge, a minute of
/// runtime). The input *fault* voltage always counts when it changes: it is how an outage
/// shorter than a poll shows.
pub fn ups_changed(prev: &UpsReading, new: &UpsReading) -> bool {
    fn moved(a: Option<f64>, b: Option<f64>, by: f64) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() >= by,
            (a, b) => a.is_some() != b.is_some(),
        }
    }
    prev.on_battery != new.on_battery
        || prev.battery_low != new.battery_low
        || prev.ups_fault != new.ups_fault
        || prev.replace_battery != new.replace_battery
        || prev.bypass_active != new.bypass_active
        || prev.self_test != new.self_test
        || prev.shutdown_active != new.shutdown_active
        || prev.beeper_on != new.beeper_on
        || prev.input_fault_voltage_v != new.input_fault_voltage_v
        || moved(prev.input_voltage_v, new.input_voltage_v, 1.0)
        || moved(prev.output_voltage_v, new.output_voltage_v, 1.0)
        || moved(prev.load_pct, new.load_pct, 2.0)
        || moved(prev.battery_voltage_v, new.battery_voltage_v, 0.1)
        || moved(prev.frequency_hz, new.frequency_hz, 0.2)
        || moved(prev.temperature_c, new.temperature_c, 1.0)
        || moved(prev.battery_charge_pct, new.battery_charge_pct, 1.0)
        || moved(prev.runtime_s.map(f64::from), new.runtime_s.map(f64::from), 60.0)
}

/// Decides which UPS readings wake the monitor (pure: time passed in).
///
/// A reading goes at once when it says something new ([`ups_changed`]); otherwise only every
/// `keepalive`, which is half the staleness limit, so the monitor's "device lost" never fires
/// while the UPS answers. A reading that was not forwarded is held with its time and handed
/// over as soon as a poll goes unanswered ([`Forwarder::missed`]): the monitor then knows when
/// the UPS last spoke, exactly as if every reading had been forwarded. Each forward wakes the
/// agent's main thread, and a UPS polled four times a second mostly repeats itself.
#[derive(Debug, Clone)]
pub struct Forwarder {
    keepalive_ms: u64,
    last: Option<(UpsReading, u64)>,
    held: Option<(UpsReading, Now)>,
}

impl Forwarder {
    /// A forwarder that forwards unchanged readings every `keepalive`.
    pub fn new(keepalive: Duration) -> Self {
        Forwarder { keepalive_ms: keepalive.as_millis() as u64, last: None, held: None }
    }

    /// A reading taken at `now`: returns what to forward (with its time), if anything.
    pub fn reading(&mut self, r: UpsReading, now: Now) -> Option<(UpsReading, Now)> {
        let due = match &self.last {
            None => true,
            Some((prev, at_ms)) => ups_changed(prev, &r) || now.mono_ms.saturating_sub(*at_ms) >= self.keepalive_ms,
        };
        if !due {
            self.held = Some((r, now));
            return None;
        }
        match &mut self.last {
            Some((prev, at_ms)) => {
                prev.merge(&r);
                *at_ms = now.mono_ms;
            }
            None => self.last = Some((r.clone(), now.mono_ms)),
        }
        self.held = None;
        Some((r, now))
    }

    /// A poll went unanswered: the held reading, if any, with the time it was taken.
    pub fn missed(&mut self) -> Option<(UpsReading, Now)> {
        let (r, at) = self.held.take()?;
        if let Some((_, at_ms)) = &mut self.last {
            *at_ms = at.mono_ms;
        }
        Some((r, at))
    }
}

/// Poll until the port fails (returns the reason) or the agent stops (returns `None`). What is
/// sent and how replies are read come from the registry ([`crate::devices`]).
fn ups_session(
    cfg: &SerialUpsConfig,
    port: &mut serialport::TTYPort,
    poll: Duration,
    send_at: &dyn Fn(Observation, Now),
    test: Option<&std::sync::atomic::AtomicBool>,
    cancel: &CancellationToken,
) -> Option<String> {
    use std::io::Write;
    let driver = cfg.protocol.driver();
    let hourly_every = (3_600_000 / poll.as_millis().max(1) as u64).max(1);
    let mut reader = UpsReader { stream: Stream::new(cfg.protocol.decoder()), buf: [0u8; 512] };
    // What the port is sent first (APC's smart mode), kept until it has gone.
    let mut queue: std::collections::VecDeque<&[u8]> = driver.init.iter().copied().collect();
    let fail = |e: io::Error| Some(format!("{}: {e}", cfg.port.display()));
    #[allow(clippy::disallowed_methods)] // the I/O edge: the poll schedule runs on the clock
    let start = std::time::Instant::now();
    let mut forwarder = Forwarder::new((poll * cfg.lost_after_missed_polls.max(1)) / 2);
    // Every reply, asked for or not, whenever it comes: logged, and a reading forwarded.
    let heard = |forwarder: &mut Forwarder, reply: Option<UpsReply>| match reply {
        Some(it) => {
            log_reply(&cfg.id, &it);
            if let Some((r, at)) = it.reading().and_then(|r| forwarder.reading(r, crate::clock::now())) {
                send_at(Observation::Ups(r), at);
            }
        }
        None => send_at(Observation::Garbage, crate::clock::now()),
    };
    let mut n: u64 = 0;
    let (mut unanswered, reopen_after) = (0u32, cfg.lost_after_missed_polls.max(1).saturating_mul(4));
    while !cancel.is_cancelled() {
        let tenth: &[&[u8]] = if n.is_multiple_of(10) { driver.tenth } else { &[] };
        let hourly: &[&[u8]] = if n.is_multiple_of(hourly_every) { driver.hourly } else { &[] };
        queue.retain(|c| driver.init.contains(c));
        queue.extend(driver.each.iter().chain(tenth).chain(hourly).copied());
        n += 1;
        let tick_end = start + poll * u32::try_from(n).unwrap_or(u32::MAX);
        // A battery test asked for by the service: written before the tick's queries, with no
        // reply awaited (Megatec's `T` has none; Voltronic's `(ACK`/`(NAK` and APC's `OK` are
        // read as they come). Whether it started shows in the status that follows.
        if test.is_some_and(|t| t.swap(false, std::sync::atomic::Ordering::SeqCst)) {
            tracing::info!(source = %cfg.id, "starting a battery self-test");
            if let Err(e) = port.write_all(driver.test) {
                return fail(e);
            }
        }
        // One command at a time; the next goes when its predecessor's reply arrives.
        let mut missed = false;
        while let Some(cmd) = queue.pop_front() {
            if let Err(e) = port.write_all(cmd) {
                return fail(e);
            }
            match reader.read_until(port, tick_end, true, &mut |r| heard(&mut forwarder, r)) {
                Ok(Heard::Answer) => {}
                Ok(Heard::Deadline) => {
                    missed = true; // no reply before the next tick
                    break;
                }
                Err(e) => return fail(e),
            }
        }
        if missed {
            if let Some((r, at)) = forwarder.missed() {
                send_at(Observation::Ups(r), at);
            }
            unanswered += 1;
            // Long after the monitor called it lost: close and reopen the port (a wedged
            // USB-serial adapter comes back this way; a UPS that is off loses nothing by it).
            if unanswered >= reopen_after {
                return Some(format!("{}: no reply to {unanswered} polls in a row; reopening", cfg.port.display()));
            }
        } else {
            unanswered = 0;
        }
        // Until the next tick, wait for bytes rather than sleep: the same single wake-up when
        // nothing comes, and an APC's unrequested `!` (line fail) is seen at once.
        if let Err(e) = reader.read_until(port, tick_end, false, &mut |r| heard(&mut forwarder, r)) {
            return fail(e);
        }
    }
    None
}

/// How [`UpsReader::read_until`] ended.
#[derive(Debug, PartialEq)]
enum Heard {
    /// A read brought a reply to a query (and everything else that read completed was handled).
    Answer,
    /// The deadline passed.
    Deadline,
}

/// A serial UPS's bytes, decoded as they come: the one read loop of [`ups_session`], for its
/// queries and for the wait between ticks alike.
struct UpsReader {
    stream: Stream<crate::devices::UpsDecoder>,
    buf: [u8; 512],
}

impl UpsReader {
    /// Read until `until`, handing every reply (and `None` for each undecodable chunk) to
    /// `heard` as it completes. With `until_answer`, return after the first read that
    /// completed a reply to a query; every item that read brought is handled first, so a
    /// second reply in the same read is not left over for the next command. (A reply to a
    /// query that missed its tick, arriving late, is still taken as the answer to the next
    /// tick's first command, as before.)
    fn read_until(
        &mut self,
        port: &mut serialport::TTYPort,
        until: std::time::Instant,
        until_answer: bool,
        heard: &mut impl FnMut(Option<UpsReply>),
    ) -> io::Result<Heard> {
        use serialport::SerialPort;
        use std::io::Read;
        loop {
            #[allow(clippy::disallowed_methods)] // an I/O deadline
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(Heard::Deadline);
            }
            let _ = port.set_timeout(left);
            match port.read(&mut self.buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "port closed")),
                Ok(got) => self.stream.push(&self.buf[..got]),
                Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
                Err(e) => return Err(e),
            }
            let mut answered = false;
            while let Some(ev) = self.stream.next_event() {
                match ev {
                    StreamEvent::Item { item, .. } => {
                        answered |= item.solicited();
                        heard(Some(item));
                    }
                    StreamEvent::Error { .. } => heard(None),
                }
            }
            if answered && until_answer {
                return Ok(Heard::Answer);
            }
        }
    }
}

/// A UPS behind `upsd`.
pub async fn nut_source(
    cfg: NutConfig,
    tx: ObsTx,
    test: Option<Arc<std::sync::atomic::AtomicBool>>,
    cancel: CancellationToken,
) {
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    while !cancel.is_cancelled() {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let mut sock = match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                send(&tx, &cfg.id, Observation::Failed(format!("upsd at {addr}: {e}"))).await;
                if !pause(&cancel, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                send(&tx, &cfg.id, Observation::Failed(format!("upsd at {addr}: no answer"))).await;
                continue;
            }
        };
        let mut stream = Stream::new(nut::ReadingDecoder::default());
        let cmd = nut::Command::ListVar { ups: cfg.ups.clone() }.encode();
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if test.as_ref().is_some_and(|t| t.swap(false, std::sync::atomic::Ordering::SeqCst)) {
                tracing::info!(source = %cfg.id, "starting a battery self-test through upsd");
                if let Err(reason) = nut_instcmd(&cfg).await {
                    tracing::warn!(source = %cfg.id, %reason, "the battery self-test did not start");
                    send(&tx, &cfg.id, Observation::SelfTestRefused(reason)).await;
                }
            }
            let mut garbage = 0;
            let mut got = None;
            let timeout = poll.max(Duration::from_secs(2));
            let r = transact(&mut sock, &mut stream, cmd.as_bytes(), timeout, &mut garbage, |o| {
                got = Some(o);
                true
            })
            .await;
            match got {
                Some(nut::Output::Reading { reading, .. }) => send(&tx, &cfg.id, Observation::Ups(reading)).await,
                Some(nut::Output::Error(code)) => {
                    send(&tx, &cfg.id, Observation::Failed(format!("upsd: ERR {}", code.as_str()))).await
                }
                None => {}
            }
            match r {
                Err(e) => break format!("upsd at {addr}: {e}"),
                // No reply before the deadline: a `upsd` that hangs mid-reply keeps the socket
                // open and never answers on it again (while it may answer a new connection).
                // Close it and connect again.
                Ok(false) => break format!("upsd at {addr}: no reply within {} ms; reconnecting", timeout.as_millis()),
                Ok(true) => {}
            }
        };
        tracing::warn!(source = %cfg.id, %reason, "NUT connection closed");
        send(&tx, &cfg.id, Observation::Failed(reason)).await;
        if !pause(&cancel, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// How long a streaming device's read waits before looking whether the agent stops.
pub const STREAM_READ_MS: u64 = 500;

/// Read a streaming serial device until it fails; `None` when the agent stops.
fn stream_session<D: Decoder>(
    id: &str,
    port: &mut serialport::TTYPort,
    decoder: D,
    tx: &ObsTx,
    cancel: &CancellationToken,
    to_obs: impl Fn(D::Item) -> Observation,
) -> Option<String> {
    use std::io::Read;
    let send = |obs| {
        let _ = tx.blocking_send(Sourced { source: id.to_string(), observation: obs, at: crate::clock::now() });
    };
    let mut stream = Stream::new(decoder);
    let mut buf = [0u8; 1024];
    while !cancel.is_cancelled() {
        let n = match port.read(&mut buf) {
            Ok(0) => return Some("port closed".into()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
            Err(e) => return Some(e.to_string()),
        };
        stream.push(&buf[..n]);
        while let Some(ev) = stream.next_event() {
            send(match ev {
                StreamEvent::Item { item, .. } => to_obs(item),
                StreamEvent::Error { .. } => Observation::Garbage,
            });
        }
    }
    None
}

/// A streaming serial device on its own thread: open, read until it fails, tell the monitor,
/// open again a second later.
fn streaming(
    id: &str,
    path: &Path,
    baud: u32,
    tx: &ObsTx,
    cancel: &CancellationToken,
    session: impl Fn(&mut serialport::TTYPort) -> Option<String>,
) {
    let failed = |reason: String| {
        let _ = tx.blocking_send(Sourced {
            source: id.to_string(),
            observation: Observation::Failed(reason),
            at: crate::clock::now(),
        });
    };
    while !cancel.is_cancelled() {
        match open_serial(path, baud, Duration::from_millis(STREAM_READ_MS)) {
            Ok(mut port) => {
                tracing::info!(source = %id, port = %path.display(), "port open");
                match session(&mut port) {
                    Some(reason) => {
                        tracing::warn!(source = %id, %reason, "port lost; reopening");
                        failed(format!("{}: {reason}", path.display()));
                    }
                    None => return,
                }
            }
            Err(reason) => failed(reason),
        }
        // A second before trying again, looking whether the agent stops meanwhile.
        for _ in 0..10 {
            if cancel.is_cancelled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A serial oximeter (a blocking loop on its own thread).
pub fn oximeter(cfg: &OximeterConfig, tx: &ObsTx, cancel: &CancellationToken) {
    streaming(&cfg.id, &cfg.port, cfg.baud, tx, cancel, |port| {
        stream_session(&cfg.id, port, cfg.protocol.decoder(), tx, cancel, |r: OximeterRecord| {
            Observation::Oximeter(r.reading())
        })
    });
}

/// A sensor bridge on serial (a blocking loop on its own thread).
pub fn bridge_source(cfg: &BridgeConfig, tx: &ObsTx, cancel: &CancellationToken) {
    streaming(&cfg.id, &cfg.port, cfg.baud, tx, cancel, |port| {
        stream_session(&cfg.id, port, bridge::Decoder, tx, cancel, Observation::Bridge)
    });
}

/// An INA219 on the Pi's I2C bus (a blocking loop on its own thread).
pub fn power_monitor(cfg: &PowerMonitorConfig, tx: &ObsTx, cancel: &CancellationToken) {
    use mamori_firmware::ina219::{Calibration, Config as InaConfig, Ina219};
    use mamori_firmware::power::LowBattery;
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let send = |obs| {
        let _ = tx.blocking_send(Sourced { source: cfg.id.clone(), observation: obs, at: crate::clock::now() });
    };
    let mut low = cfg.low_battery_mv.map(|l| LowBattery::new(l, cfg.battery_recover_mv.unwrap_or(l)));
    while !cancel.is_cancelled() {
        let bus = match linux_embedded_hal::I2cdev::new(&cfg.i2c_bus) {
            Ok(b) => b,
            Err(e) => {
                send(Observation::Failed(format!("{}: {e}", cfg.i2c_bus.display())));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut ina = Ina219::new(bus, cfg.address);
        let setup =
            Calibration::new(cfg.shunt_milliohm, cfg.max_current_ma).map_err(|e| format!("{e:?}")).and_then(|cal| {
                ina.configure(&InaConfig::default())
                    .and_then(|()| ina.calibrate(cal))
                    .map_err(|e| format!("INA219 at {:#x}: {e:?}", cfg.address))
            });
        if let Err(e) = setup {
            send(Observation::Failed(e));
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        while !cancel.is_cancelled() {
            match ina.sample() {
                Ok(s) => {
                    let reading = PowerMeterReading {
                        battery_voltage_v: Some(f64::from(s.bus_mv) / 1000.0),
                        current_a: s.current_ma.map(|ma| f64::from(ma) / 1000.0),
                        power_w: s.power_mw.map(|mw| f64::from(mw) / 1000.0),
                    };
                    let low = low.as_mut().map(|l| l.update(s.bus_mv));
                    send(Observation::PowerMeter { reading, low });
                }
                Err(e) => {
                    send(Observation::Failed(format!("INA219 at {:#x}: {e:?}", cfg.address)));
                    break;
                }
            }
            std::thread::sleep(poll);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// GPIO contacts through the kernel's character device (a blocking loop on its own thread).
pub fn contacts_cdev(cfg: &ContactsConfig, tx: &ObsTx, cancel: &CancellationToken) {
    use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
    use linux_embedded_hal::CdevPin;
    let request = |chip: &mut Chip, line: u32| -> Result<CdevPin, String> {
        let handle = chip
            .get_line(line)
            .and_then(|l| l.request(LineRequestFlags::INPUT, 0, "mamori-agent"))
            .map_err(|e| format!("{} line {line}: {e}", cfg.chip.display()))?;
        CdevPin::new(handle).map_err(|e| format!("{} line {line}: {e}", cfg.chip.display()))
    };
    while !cancel.is_cancelled() {
        let pins = Chip::new(&cfg.chip).map_err(|e| format!("{}: {e}", cfg.chip.display())).and_then(|mut chip| {
            let pair = match (cfg.ventilator_no_line, cfg.ventilator_nc_line) {
                (Some(no), Some(nc)) => Some((request(&mut chip, no)?, request(&mut chip, nc)?)),
                _ => None,
            };
            let mains = cfg.mains_line.map(|l| request(&mut chip, l)).transpose()?;
            Ok((pair, mains))
        });
        match pins {
            Ok((pair, mains)) => {
                if let Some(reason) = contacts_loop(cfg, pair, mains, tx, cancel) {
                    let _ = tx.blocking_send(Sourced {
                        source: cfg.id.clone(),
                        observation: Observation::Failed(reason),
                        at: crate::clock::now(),
                    });
                }
            }
            Err(reason) => {
                let _ = tx.blocking_send(Sourced {
                    source: cfg.id.clone(),
                    observation: Observation::Failed(reason),
                    at: crate::clock::now(),
                });
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Sample contact pins with the firmware's debouncer and pair logic; report a change at once
/// and the state every second (so the monitor knows the input is alive). Generic over
/// embedded-hal pins so tests can drive it. Returns the reason when a pin fails.
pub fn contacts_loop<P: embedded_hal::digital::InputPin>(
    cfg: &ContactsConfig,
    mut pair: Option<(P, P)>,
    mut mains: Option<P>,
    tx: &ObsTx,
    cancel: &CancellationToken,
) -> Option<String> {
    use mamori_firmware::contact::{ContactPair, PairConfig};
    use mamori_firmware::power::MainsSense;
    let mut contacts =
        ContactPair::new(PairConfig { debounce_ms: cfg.debounce_ms, cable_fault_ms: cfg.cable_fault_ms });
    let mut sense = MainsSense::new(cfg.debounce_ms.max(50));
    let mut last_sent: Option<(Option<bool>, Option<mamori_protocol::bridge::ContactState>)> = None;
    let mut last_sent_ms = 0u64;
    let poll = Duration::from_millis(cfg.poll_interval_ms.max(1));
    while !cancel.is_cancelled() {
        let now = crate::clock::now();
        if let Some((no, nc)) = &mut pair {
            let (a, b) = match (no.is_low(), nc.is_low()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return Some("cannot read the ventilator contact lines".into()),
            };
            let closed = |low: bool| low == cfg.closed_when_low;
            contacts.update(closed(a), closed(b), now.mono_ms);
        }
        if let Some(m) = &mut mains {
            match m.is_low() {
                Ok(low) => {
                    sense.update(low == cfg.mains_present_when_low, now.mono_ms);
                }
                Err(_) => return Some("cannot read the mains line".into()),
            }
        }
        let state = (sense.present(), contacts.state());
        let latched = contacts.latched_alarm();
        let due = now.mono_ms.saturating_sub(last_sent_ms) >= 1000;
        if (state.0.is_some() || state.1.is_some()) && (Some(state) != last_sent || latched || due) {
            let obs = Observation::Contacts {
                mains_present: state.0,
                ventilator: state.1,
                alarm_latched: contacts.take_latched_alarm(),
            };
            if tx.blocking_send(Sourced { source: cfg.id.clone(), observation: obs, at: now }).is_err() {
                return None;
            }
            last_sent = Some(state);
            last_sent_ms = now.mono_ms;
        }
        std::thread::sleep(poll);
    }
    None
}

/// A digital input backed by a shared flag (`true` = high), for tests and the simulator.
#[derive(Debug, Clone, Default)]
pub struct FlagPin(pub Arc<std::sync::atomic::AtomicBool>);

impl embedded_hal::digital::ErrorType for FlagPin {
    type Error = std::convert::Infallible;
}

impl embedded_hal::digital::InputPin for FlagPin {
    fn is_high(&mut self) -> Result<bool, Self::Error> {
        Ok(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn is_low(&mut self) -> Result<bool, Self::Error> {
        Ok(!self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamori_protocol::mqtt::EventKind;

    fn at(ms: u64) -> Now {
        let base = chrono::DateTime::parse_from_rfc3339("2026-11-22T03:00:00+09:00").unwrap();
        Now { mono_ms: ms, wall: base + chrono::Duration::milliseconds(ms as i64) }
    }

    #[test]
    fn the_forwarder_holds_repeats_and_releases_them_on_a_missed_poll() {
        let r = UpsReading { on_battery: Some(false), battery_voltage_v: Some(27.4), ..Default::default() };
        let mut f = Forwarder::new(Duration::from_millis(375));
        assert_eq!(f.reading(r.clone(), at(0)).map(|x| x.1.mono_ms), Some(0), "the first reading goes");
        assert!(f.reading(r.clone(), at(250)).is_none(), "a repeat within the keep-alive is held");
        // The poll at 500 goes unanswered: the reading of 250 is handed over with its own time.
        let (held, when) = f.missed().unwrap();
        assert_eq!((held, when.mono_ms), (r.clone(), 250));
        assert!(f.missed().is_none(), "once");
        assert!(f.reading(r.clone(), at(600)).is_none(), "the keep-alive counts from 250");
        assert_eq!(f.reading(r.clone(), at(750)).map(|x| x.1.mono_ms), Some(750), "keep-alive");
        // News goes at once, held or not.
        assert!(f.reading(r.clone(), at(1000)).is_none());
        let news = UpsReading { on_battery: Some(true), ..r.clone() };
        assert_eq!(f.reading(news, at(1260)).map(|x| x.1.mono_ms), Some(1260));
        assert!(f.missed().is_none(), "nothing held after a forward");
    }

    /// With the forwarder in front of it, the monitor sees the same staleness as if every
    /// reading had been forwarded: two missed polls are not a lost UPS, three are.
    #[test]
    fn staleness_is_unchanged_by_holding_repeats() {
        use crate::monitor::{Monitor, SourceSpec};
        let spec = SourceSpec {
            id: "ups".into(),
            kind: DeviceKind::Ups,
            lost_after_ms: polled_lost_after_ms(250, 3),
            glitch_below_v: None,
        };
        for (missed, expect_lost) in [(1u64, false), (2, false), (3, true)] {
            for phase in 0..2u64 {
                let mut m = Monitor::new(vec![spec.clone()], crate::config::Thresholds::default(), &at(0));
                let mut f = Forwarder::new(Duration::from_millis(375));
                let r = UpsReading { on_battery: Some(false), ..Default::default() };
                let mut lost = false;
                let skip_from = 4 + phase; // start the misses at a forwarded or a held poll
                for k in 0..20u64 {
                    let t = k * 250 + 5; // replies arrive a little after each tick
                    lost |= m.tick(&at(k * 250)).iter().any(|e| e.kind == EventKind::DeviceLost);
                    if (skip_from..skip_from + missed).contains(&k) {
                        if let Some((r, when)) = f.missed() {
                            m.observe("ups", Observation::Ups(r), &when);
                        }
                        continue;
                    }
                    if let Some((r, when)) = f.reading(r.clone(), at(t)) {
                        lost |= m
                            .observe("ups", Observation::Ups(r), &when)
                            .iter()
                            .any(|e| e.kind == EventKind::DeviceLost);
                    }
                }
                assert_eq!(lost, expect_lost, "{missed} missed polls from phase {phase}");
            }
        }
    }

    #[test]
    fn only_news_wakes_the_monitor() {
        let base = UpsReading {
            on_battery: Some(false),
            input_voltage_v: Some(100.4),
            input_fault_voltage_v: Some(100.4),
            load_pct: Some(23.0),
            battery_voltage_v: Some(27.4),
            ..Default::default()
        };
        assert!(!ups_changed(&base, &base.clone()));
        assert!(
            !ups_changed(&base, &UpsReading { input_voltage_v: Some(100.9), load_pct: Some(24.0), ..base.clone() }),
            "noise"
        );
        assert!(ups_changed(&base, &UpsReading { on_battery: Some(true), ..base.clone() }));
        assert!(ups_changed(&base, &UpsReading { battery_low: Some(true), ..base.clone() }));
        assert!(
            ups_changed(&base, &UpsReading { input_fault_voltage_v: Some(12.0), ..base.clone() }),
            "a glitch always counts"
        );
        assert!(ups_changed(&base, &UpsReading { battery_voltage_v: Some(27.2), ..base.clone() }));
        assert!(ups_changed(&base, &UpsReading { load_pct: None, ..base.clone() }));
    }
}

#[cfg(test)]
mod contact_tests {
    use super::*;
    use mamori_protocol::bridge::ContactState;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The GPIO glue over pins that tests can set: polarity, the latched short alarm, and a
    /// report on every change and at least once a second.
    #[test]
    fn contacts_loop_reports_changes_latches_pulses_and_keeps_alive() {
        let cfg = ContactsConfig {
            id: "contacts".into(),
            chip: "/dev/null".into(),
            mains_line: Some(1),
            mains_present_when_low: true,
            ventilator_no_line: Some(2),
            ventilator_nc_line: Some(3),
            closed_when_low: true,
            debounce_ms: 20,
            cable_fault_ms: 200,
            poll_interval_ms: 2,
        };
        // Pins read low when closed / present: NO open (high), NC closed (low), mains present (low).
        let (no, nc, mains) =
            (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (tx, mut rx) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let (p, c) = ((FlagPin(no.clone()), FlagPin(nc.clone())), FlagPin(mains.clone()));
        let thread = {
            let cancel = cancel.clone();
            std::thread::spawn(move || contacts_loop(&cfg, Some(p), Some(c), &tx, &cancel))
        };
        // Every wait has a deadline: a loop that stops reporting, or never reports what is
        // waited for, fails the test; it does not hang it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let wait_for = |rx: &mut mpsc::Receiver<Sourced>, want: &dyn Fn(&Observation) -> bool| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        let o = rx.recv().await.expect("the loop stopped").observation;
                        if want(&o) {
                            return o;
                        }
                    }
                })
                .await
                .expect("not reported by the contacts loop within 10 s")
            })
        };
        let first = wait_for(&mut rx, &|o| {
            matches!(o, Observation::Contacts { ventilator: Some(_), mains_present: Some(_), .. })
        });
        assert_eq!(
            first,
            Observation::Contacts {
                mains_present: Some(true),
                ventilator: Some(ContactState::Normal),
                alarm_latched: false
            }
        );
        // A 60 ms alarm pulse: longer than the debounce, over before anyone polls the monitor.
        no.store(false, Ordering::Relaxed);
        nc.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(60)); // the pulse itself, in the physical world
        no.store(true, Ordering::Relaxed);
        nc.store(false, Ordering::Relaxed);
        wait_for(&mut rx, &|o| matches!(o, Observation::Contacts { alarm_latched: true, .. }));
        // Mains lost.
        mains.store(true, Ordering::Relaxed);
        wait_for(&mut rx, &|o| matches!(o, Observation::Contacts { mains_present: Some(false), .. }));
        // A cut cable: both contacts open.
        nc.store(true, Ordering::Relaxed);
        wait_for(&mut rx, &|o| matches!(o, Observation::Contacts { ventilator: Some(ContactState::CableFault), .. }));
        // Nothing changes: still reported (the monitor's liveness), about once a second.
        let quiet = wait_for(&mut rx, &|_| true);
        assert!(matches!(quiet, Observation::Contacts { ventilator: Some(ContactState::CableFault), .. }));
        cancel.cancel();
        assert_eq!(thread.join().unwrap(), None);
    }
}
