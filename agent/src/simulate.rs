//! `mamori-agent simulate`: virtual devices on pseudo-terminals, for the demo, the tests and an
//! installer's dry run.
//!
//! Each device is a pseudo-terminal whose slave side is linked as `DIR/<name>`; the agent (or
//! NUT's `nutdrv_qx`) opens that path as it would a USB serial adapter. The devices:
//!
//! | name | device | behaviour |
//! |---|---|---|
//! | `ups` | Megatec Q1 UPS | answers `Q1`, `F`, `I` as a real unit (47-byte status, fixed widths), echoes unknown commands; the battery drains on battery and recharges on mains |
//! | `ups-voltronic` | Voltronic UPS | answers `QPI`, `QGS`, `QMOD`, `QBV` (and `Q1`); `(NAK` to anything else |
//! | `ups-apc` | APC Smart UPS | answers `Y`, `Q`, `f`, `j`, `B`; `NA` to anything else; sends `!` and `$` the moment mains fails or returns |
//! | `oximeter` | Masimo ASCII 1 | one line a second |
//! | `nonin` | Nonin data format #2 | three 25-frame packets a second |
//! | `bridge` | the sensor bridge | **the firmware's own bridge loop** over a simulated INA219 and pins |
//!
//! It is driven by commands, from a scenario (`<seconds> <command>` lines, or a built-in name)
//! and from standard input, one per line:
//!
//! ```text
//! mains off|on        glitch                 battery <V>     drain <V/min>    load <%>
//! pack <Wh> <health%> speed <x>
//! spo2 <n|none>       pulse <n|none>         oxalarm off|on|silenced          sensor off|on
//! vent normal|alarm|cut|pulse                station <V>     station-current <mA>
//! unplug <device>     plug <device>          garbage <device> [bytes]        drop <device> <n>
//! quit
//! ```
//! `pack <Wh> <health%>` gives the UPS a battery of that nameplate (80 % usable) holding only
//! `health%` of it, as a 3-year-old lead-acid battery does: it then drains by energy, at the
//! load (`load <%>` of a 300 W rating), `speed` times faster than real time; its voltage and
//! charge follow what is really left, and its runtime (APC `j`, Voltronic `QBV`) is estimated
//! as UPS firmware does, *as if the battery were new* (the charge × the nameplate ÷ the load).
//! Without `pack`, the battery drains by `drain` volts a minute.
//!
//! `unplug` closes the pseudo-terminal (the reader gets an I/O error, as when a USB adapter is
//! pulled) and removes the link; `plug` creates a new one behind the same link.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mamori_protocol::bridge::ContactState;
use mamori_protocol::{masimo, megatec, nonin};

/// The simulated world.
#[derive(Debug, Clone)]
pub struct World {
    /// Mains present.
    pub mains_on: bool,
    /// The next Q1 reply shows a glitch in its input fault voltage.
    pub glitch: bool,
    /// UPS battery voltage (24 V nominal pack), V.
    pub battery_v: f64,
    /// Drain on battery, V/min.
    pub drain_v_per_min: f64,
    /// UPS load, %.
    pub load_pct: f64,
    /// SpO2, %.
    pub spo2: Option<u8>,
    /// Pulse, /min.
    pub pulse: Option<u16>,
    /// The oximeter's alarm: 0 off, 1 sounding, 2 silenced.
    pub oxalarm: u8,
    /// Oximeter sensor off.
    pub sensor_off: bool,
    /// The ventilator contact.
    pub vent: ContactState,
    /// A short ventilator alarm pulse until this instant.
    pub vent_pulse_until: Option<Instant>,
    /// The power station behind the bridge's INA219, mV and mA.
    pub station_mv: u16,
    /// Its current, mA.
    pub station_ma: i32,
    /// Garbage bytes to inject, per device.
    pub garbage: BTreeMap<String, usize>,
    /// Devices currently unplugged.
    pub unplugged: BTreeMap<String, bool>,
    /// Queries to ignore, per device (a UPS that misses polls).
    pub drop_replies: BTreeMap<String, u32>,
    /// A battery drained by energy (`pack`), instead of by `drain` volts a minute.
    pub pack: Option<Pack>,
    /// The Megatec UPS runs its 10-second battery test (`T`) until this instant.
    pub testing_until: Option<Instant>,
}

/// A UPS battery drained by energy: its nameplate, how much of it it still holds, and what is
/// left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pack {
    /// Nameplate energy, Wh (80 % usable through the inverter).
    pub nameplate_wh: f64,
    /// The share of that it still holds (0.5: a 3-year-old lead-acid battery).
    pub health: f64,
    /// State of charge of what it holds, 0–1.
    pub soc: f64,
    /// Time runs this many times faster for the battery.
    pub speed: f64,
}

/// The simulated UPS's rating for `load <%>` under `pack`, W.
pub const UPS_RATING_W: f64 = 300.0;

impl Pack {
    fn usable_wh(&self) -> f64 {
        self.nameplate_wh * 0.8
    }
}

impl Default for World {
    fn default() -> Self {
        World {
            mains_on: true,
            glitch: false,
            battery_v: 27.4,
            drain_v_per_min: 0.2,
            load_pct: 23.0,
            spo2: Some(97),
            pulse: Some(92),
            oxalarm: 0,
            sensor_off: false,
            vent: ContactState::Normal,
            vent_pulse_until: None,
            station_mv: 12_800,
            station_ma: 1_900,
            garbage: BTreeMap::new(),
            unplugged: BTreeMap::new(),
            drop_replies: BTreeMap::new(),
            pack: None,
            testing_until: None,
        }
    }
}

/// The battery voltage under which the simulated UPS reports battery low.
pub const UPS_LOW_V: f64 = 22.0;
const UPS_EMPTY_V: f64 = 20.4;
const UPS_FULL_V: f64 = 27.4;

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Apply one command.
pub fn apply(world: &Shared, cmd: &str) -> Result<(), String> {
    let mut w = lock(world);
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let num = |i: usize| -> Result<f64, String> {
        words.get(i).and_then(|s| s.parse().ok()).ok_or_else(|| format!("`{cmd}`: expected a number"))
    };
    let opt = |i: usize| -> Result<Option<f64>, String> {
        if words.get(i) == Some(&"none") {
            Ok(None)
        } else {
            num(i).map(Some)
        }
    };
    match words.as_slice() {
        ["mains", "off"] => w.mains_on = false,
        ["mains", "on"] => w.mains_on = true,
        ["glitch"] => w.glitch = true,
        ["battery", _] => w.battery_v = num(1)?,
        ["drain", _] => w.drain_v_per_min = num(1)?,
        ["load", _] => w.load_pct = num(1)?,
        ["pack", _, _] => {
            let (wh, health) = (num(1)?, num(2)? / 100.0);
            if !(wh > 0.0 && wh < 100_000.0 && health > 0.0 && health <= 1.5) {
                return Err(format!("`{cmd}`: expected a nameplate in Wh and a health in %"));
            }
            let speed = w.pack.map_or(1.0, |p| p.speed);
            w.pack = Some(Pack { nameplate_wh: wh, health, soc: 1.0, speed });
            w.battery_v = UPS_FULL_V;
        }
        ["speed", _] => {
            let x = num(1)?;
            if !(x > 0.0 && x <= 10_000.0) {
                return Err(format!("`{cmd}`: expected a factor above 0"));
            }
            if let Some(p) = w.pack.as_mut() {
                p.speed = x;
            }
        }
        ["spo2", _] => w.spo2 = opt(1)?.map(|v| v as u8),
        ["pulse", _] => w.pulse = opt(1)?.map(|v| v as u16),
        ["oxalarm", "off"] => w.oxalarm = 0,
        ["oxalarm", "on"] => w.oxalarm = 1,
        ["oxalarm", "silenced"] => w.oxalarm = 2,
        ["sensor", "off"] => w.sensor_off = true,
        ["sensor", "on"] => w.sensor_off = false,
        ["vent", "normal"] => w.vent = ContactState::Normal,
        ["vent", "alarm"] => w.vent = ContactState::Alarm,
        ["vent", "cut"] => w.vent = ContactState::CableFault,
        ["vent", "pulse"] => {
            #[allow(clippy::disallowed_methods)] // the simulator is an I/O edge
            let now = Instant::now();
            w.vent_pulse_until = Some(now + Duration::from_millis(400));
        }
        ["station", _] => w.station_mv = num(1)? as u16,
        ["station-current", _] => w.station_ma = num(1)? as i32,
        ["unplug", dev] => {
            w.unplugged.insert((*dev).to_string(), true);
        }
        ["plug", dev] => {
            w.unplugged.insert((*dev).to_string(), false);
        }
        ["garbage", dev] => {
            w.garbage.insert((*dev).to_string(), 64);
        }
        ["garbage", dev, _] => {
            w.garbage.insert((*dev).to_string(), num(2)? as usize);
        }
        ["drop", dev, _] => {
            w.drop_replies.insert((*dev).to_string(), num(2)? as u32);
        }
        _ => return Err(format!("unknown command `{cmd}`")),
    }
    Ok(())
}

/// A built-in scenario by name, as `<seconds> <command>` lines.
pub fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "steady" => "",
        "outage" => "5 mains off\n5 drain 1.5\n40 spo2 87\n55 spo2 96\n70 vent pulse\n90 mains on\n",
        "faults" => "3 garbage ups 200\n5 unplug oximeter\n20 plug oximeter\n25 garbage oximeter 300\n",
        "bedside" => {
            "5 oxalarm on\n5 spo2 86\n8 oxalarm silenced\n30 spo2 96\n32 oxalarm off\n40 vent alarm\n45 vent normal\n"
        }
        _ => return None,
    })
}

/// Parse a scenario into timed commands.
pub fn parse_scenario(text: &str) -> Result<Vec<(f64, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (at, cmd) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected `<seconds> <command>`", n + 1))?;
        let at: f64 = at.parse().map_err(|_| format!("line {}: `{at}` is not a number of seconds", n + 1))?;
        apply(&Arc::new(Mutex::new(World::default())), cmd.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        out.push((at, cmd.trim().to_string()));
    }
    Ok(out)
}

/// A pseudo-terminal with its slave side linked at a path.
struct Pty {
    master: File,
    _slave: OwnedFd,
}

fn open_pty(link: &Path) -> io::Result<Pty> {
    use nix::sys::termios;
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    // Raw, so the line discipline neither echoes nor rewrites bytes before a reader sets its own mode.
    let mut t = termios::tcgetattr(pty.slave.as_fd()).map_err(io::Error::from)?;
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(pty.slave.as_fd(), termios::SetArg::TCSANOW, &t).map_err(io::Error::from)?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pty.slave)))?;
    let tmp = link.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, link)?;
    Ok(Pty { master: File::from(pty.master), _slave: pty.slave })
}

/// Wait up to `ms` for the master to be readable.
fn readable(f: &File, ms: u16) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

fn take_garbage(world: &Shared, name: &str) -> Vec<u8> {
    let n = lock(world).garbage.remove(name).unwrap_or(0);
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[1] | 0x01).collect()
}

fn unplugged(world: &Shared, name: &str) -> bool {
    lock(world).unplugged.get(name).copied().unwrap_or(false)
}

/// What each kind of device does while plugged in; returns when unplugged or stopped.
type Serve = fn(&Shared, &str, &mut File, &AtomicBool) -> io::Result<()>;

/// Serve a device that takes `\r`-terminated queries: `reply` answers each line. Shared by the
/// Megatec and Voltronic units; `drop <device> <n>` makes it ignore the next n queries, and
/// `garbage` goes before the next reply.
fn serve_lines(
    world: &Shared,
    name: &str,
    master: &mut File,
    stop: &AtomicBool,
    reply: fn(&Shared, &[u8]) -> Vec<u8>,
) -> io::Result<()> {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        if !readable(master, 50) {
            continue;
        }
        let n = master.read(&mut buf)?;
        for &b in &buf[..n] {
            if b != b'\r' {
                line.push(b);
                continue;
            }
            let dropped = {
                let mut w = lock(world);
                w.drop_replies.get_mut(name).filter(|n| **n > 0).map(|n| {
                    *n -= 1;
                    *n
                })
            };
            if let Some(left) = dropped {
                println!("dropped {name} query, {left} more to drop");
                let _ = io::stdout().flush();
            } else {
                let mut out = take_garbage(world, name);
                out.extend(reply(world, &line));
                master.write_all(&out)?;
            }
            line.clear();
        }
    }
    Ok(())
}

fn serve_ups(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    serve_lines(world, name, master, stop, megatec_reply)
}

/// A Megatec unit's answer to one query line: echo what it does not know.
fn megatec_reply(world: &Shared, line: &[u8]) -> Vec<u8> {
    match megatec::Query::parse(line) {
        Some(megatec::Query::Status) => ups_status(world).encode(),
        Some(megatec::Query::Test) => {
            // A 10-second battery test: on battery, status bit b2 set; no reply.
            #[allow(clippy::disallowed_methods)] // the simulator is an I/O edge
            let until = Instant::now() + Duration::from_secs(10);
            lock(world).testing_until = Some(until);
            Vec::new()
        }
        Some(megatec::Query::Rating) => megatec::Rating {
            voltage_v: Some(100.0),
            current_a: Some(5.0),
            battery_voltage_v: Some(24.0),
            frequency_hz: Some(60.0),
        }
        .encode(),
        Some(megatec::Query::Info) => megatec::Info {
            company: "mamori-sim".into(),
            model: "SIM-Q1".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
        .encode(),
        None => {
            let mut echo = line.to_vec();
            echo.push(b'\r');
            echo
        }
    }
}

/// The pack's charge, %, from its voltage (linear between empty and full).
fn charge_pct(battery_v: f64) -> f64 {
    ((battery_v - UPS_EMPTY_V) / (UPS_FULL_V - UPS_EMPTY_V) * 100.0).clamp(0.0, 100.0)
}

/// Minutes left as the UPS estimates them (a generous 999 on mains): at the current drain
/// rate, or with a `pack`, as UPS firmware does, as if the battery were new.
fn runtime_min(w: &World) -> u32 {
    if let Some(p) = w.pack {
        let load_w = w.load_pct / 100.0 * UPS_RATING_W;
        if w.mains_on || load_w <= 0.0 {
            return 999;
        }
        let as_if_new_h = charge_pct(w.battery_v) / 100.0 * p.usable_wh() / load_w / p.speed;
        return (as_if_new_h * 60.0).round().min(999.0) as u32;
    }
    if w.mains_on || w.drain_v_per_min <= 0.0 {
        return 999;
    }
    ((w.battery_v - UPS_EMPTY_V).max(0.0) / w.drain_v_per_min) as u32
}

fn serve_voltronic(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    serve_lines(world, name, master, stop, voltronic_reply)
}

/// A Voltronic unit's answer to one query line: `(NAK` to what it does not know.
fn voltronic_reply(world: &Shared, line: &[u8]) -> Vec<u8> {
    let w = lock(world);
    let (input, mode) = if w.mains_on { (100.4, 'L') } else { (0.0, 'B') };
    let reply = match line {
        b"QPI" => "(PI00\r".to_string(),
        b"QMOD" => format!("({mode}\r"),
        b"QGS" => {
            // a1a0 = 10 (online type), then b9 utility fail, b8 battery low.
            let bits = format!(
                "10{}{}0000000{}",
                u8::from(!w.mains_on),
                u8::from(w.battery_v < UPS_LOW_V),
                u8::from(!w.mains_on)
            );
            format!(
                "({input:05.1} 60.0 100.0 60.0 002.1 {:03.0} 380.0 380.0 {:05.1} ---.- 030.0 {bits}\r",
                w.load_pct, w.battery_v
            )
        }
        b"QBV" => {
            format!("({:05.1} 02 01 {:03.0} {:03}\r", w.battery_v, charge_pct(w.battery_v), runtime_min(&w).min(999))
        }
        b"Q1" => {
            drop(w);
            return ups_status(world).encode();
        }
        _ => "(NAK\r".to_string(),
    };
    reply.into_bytes()
}

fn serve_apc(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    use mamori_protocol::apc::{encode_reply, Command, Notification, Reply, StatusByte};
    let mut buf = [0u8; 64];
    let mut was_on = lock(world).mains_on;
    while !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        // Unrequested characters, the moment mains changes.
        let on = lock(world).mains_on;
        if on != was_on {
            let n = if on { Notification::LineRestored } else { Notification::LineFail };
            master.write_all(&encode_reply(&Reply::Notification(n)))?;
            was_on = on;
        }
        if !readable(master, 20) {
            continue;
        }
        let n = master.read(&mut buf)?;
        for &b in &buf[..n] {
            let reply = {
                let w = lock(world);
                match Command::from_byte(b) {
                    Some(Command::SmartMode) => Reply::SmartMode,
                    Some(Command::Status) => {
                        let low = if w.battery_v < UPS_LOW_V { 0x40 } else { 0 };
                        Reply::Status(StatusByte(if w.mains_on { 0x08 } else { 0x10 } | low))
                    }
                    Some(Command::BatteryCharge) => Reply::BatteryChargePct(charge_pct(w.battery_v).round()),
                    Some(Command::Runtime) => Reply::RuntimeMin(runtime_min(&w)),
                    Some(Command::BatteryVoltage) => Reply::BatteryVoltage((w.battery_v * 100.0).round() / 100.0),
                    None => Reply::NotAvailable,
                }
            };
            let mut out = take_garbage(world, name);
            out.extend(encode_reply(&reply));
            master.write_all(&out)?;
        }
    }
    Ok(())
}

fn ups_status(world: &Shared) -> megatec::Status {
    let mut w = lock(world);
    let glitch = std::mem::take(&mut w.glitch);
    let input = if w.mains_on { Some(100.4) } else { Some(0.0) };
    #[allow(clippy::disallowed_methods)] // the simulator is an I/O edge
    let now = Instant::now();
    let testing = w.testing_until.is_some_and(|t| now < t);
    megatec::Status {
        input_voltage_v: input,
        input_fault_voltage_v: if glitch { Some(12.0) } else { input },
        output_voltage_v: Some(100.0),
        load_pct: Some(w.load_pct.round()),
        frequency_hz: Some(60.0),
        battery_voltage_v: Some((w.battery_v * 10.0).round() / 10.0),
        temperature_c: Some(30.0),
        bits: megatec::StatusBits {
            utility_fail: !w.mains_on || testing,
            battery_low: w.battery_v < UPS_LOW_V,
            self_test: testing,
            standby_type: true,
            shutdown_active: false,
            ..Default::default()
        },
    }
}

fn serve_masimo(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        let rec = {
            let w = lock(world);
            let (spo2, pulse) = if w.sensor_off { (None, None) } else { (w.spo2, w.pulse) };
            let alarm = match w.oxalarm {
                1 => masimo::alarm::ACTIVE | masimo::alarm::SPO2_LOW,
                2 => masimo::alarm::SILENCED | masimo::alarm::SPO2_LOW,
                _ => 0,
            };
            masimo::Record {
                device_time: Some(format!("11/22/26 03:{:02}:{:02}", (n / 60) % 60, n % 60)),
                serial: Some("0000000042".into()),
                spo2_pct: spo2,
                pulse_bpm: pulse,
                perfusion_index: Some(3.6),
                alarm: Some(alarm),
                exception: Some(if w.sensor_off { masimo::exc::SENSOR_OFF } else { masimo::exc::NORMAL }),
            }
        };
        let mut bytes = take_garbage(world, name);
        bytes.extend(rec.encode());
        master.write_all(&bytes)?;
        n += 1;
        sleep_unless_stopped(world, name, stop, Duration::from_secs(1));
    }
    Ok(())
}

fn serve_nonin(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    while !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        let bytes = {
            let w = lock(world);
            let status = if w.sensor_off { nonin::status::SENSOR_DISCONNECTED } else { nonin::status::PERFUSION_GREEN };
            let (spo2, pulse) = if w.sensor_off { (None, None) } else { (w.spo2, w.pulse) };
            nonin::encode_packet(spo2, pulse, status, false)
        };
        let mut out = take_garbage(world, name);
        out.extend(bytes);
        master.write_all(&out)?;
        sleep_unless_stopped(world, name, stop, Duration::from_millis(333));
    }
    Ok(())
}

/// A port written by the bridge loop.
struct PortWriter<'a>(&'a mut File);

impl embedded_io::ErrorType for PortWriter<'_> {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Write for PortWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.0.write(buf).map_err(|_| embedded_io::ErrorKind::BrokenPipe)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.flush().map_err(|_| embedded_io::ErrorKind::BrokenPipe)
    }
}

fn serve_bridge(world: &Shared, name: &str, master: &mut File, stop: &AtomicBool) -> io::Result<()> {
    use core::cell::Cell;
    use mamori_firmware::bridge::{Bridge, BridgeConfig, HalSensors};
    use mamori_firmware::ina219::{self, Ina219};
    use mamori_firmware::sim::{SimIna219, SimPin};
    let ina = SimIna219::new(12_800, 1_900);
    let (no, nc, mains) = (Cell::new(true), Cell::new(false), Cell::new(false));
    let mut driver = Ina219::new(&ina, ina219::DEFAULT_ADDRESS);
    let _ = driver.calibrate(
        ina219::Calibration::new(100, 3200).unwrap_or(ina219::Calibration { current_lsb_na: 97_657, register: 4194 }),
    );
    let sensors = HalSensors {
        ina219: Some(driver),
        contacts: Some((SimPin(&no), SimPin(&nc))),
        mains: Some(SimPin(&mains)),
        closed_when_low: true,
        mains_present_when_low: true,
    };
    let cfg = BridgeConfig { low_battery_mv: Some(11_800), battery_recover_mv: 12_200, ..BridgeConfig::default() };
    #[allow(clippy::disallowed_methods)] // the simulator is an I/O edge
    let start = Instant::now();
    let mut bridge = Bridge::new(cfg, sensors, PortWriter(master), (), false);
    while !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        {
            let w = lock(world);
            ina.set(w.station_mv, w.station_ma);
            mains.set(!w.mains_on); // pin low = mains present
            let vent = if w.vent_pulse_until.is_some_and(|t| now < t) { ContactState::Alarm } else { w.vent };
            // Pins read low when their contact is closed.
            let (no_closed, nc_closed) = match vent {
                ContactState::Normal => (false, true),
                ContactState::Alarm => (true, false),
                ContactState::CableFault => (false, false),
            };
            no.set(!no_closed);
            nc.set(!nc_closed);
        }
        let now_ms = now.duration_since(start).as_millis() as u64;
        if bridge.step(now_ms).is_err() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "bridge port"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn sleep_unless_stopped(world: &Shared, name: &str, stop: &AtomicBool, d: Duration) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) && !unplugged(world, name) {
        std::thread::sleep(step.min(left));
        left = left.saturating_sub(step);
    }
}

/// Run one device: plug, serve, unplug, wait to be plugged again.
fn device(
    world: Shared,
    name: String,
    link: PathBuf,
    serve: Serve,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<String>,
) {
    let mut announced = false;
    while !stop.load(Ordering::Relaxed) {
        if unplugged(&world, &name) {
            let _ = std::fs::remove_file(&link);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let mut pty = match open_pty(&link) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("simulate: {name}: cannot create a pseudo-terminal: {e}");
                return;
            }
        };
        if !announced {
            let target = std::fs::read_link(&link).map(|p| p.display().to_string()).unwrap_or_default();
            let _ = ready.send(format!("device {name} {} -> {target}", link.display()));
            announced = true;
        }
        if let Err(e) = serve(&world, &name, &mut pty.master, &stop) {
            // The reader went away; keep the device plugged and serve again.
            if e.kind() != io::ErrorKind::BrokenPipe {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        drop(pty);
        let _ = std::fs::remove_file(&link);
    }
    let _ = std::fs::remove_file(&link);
}

/// The battery model, four times a second.
fn physics(world: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        tick(&mut lock(&world), 0.25);
    }
}

/// Advance the battery by `dt_s` seconds of real time.
fn tick(w: &mut World, dt_s: f64) {
    if let Some(mut p) = w.pack {
        // `speed` times faster for the battery.
        let hours = dt_s / 3600.0 * p.speed;
        let held = p.usable_wh() * p.health;
        p.soc = if w.mains_on {
            (p.soc + hours / 8.0).min(1.0) // a full recharge in 8 h
        } else {
            (p.soc - w.load_pct / 100.0 * UPS_RATING_W * hours / held).max(0.0)
        };
        w.battery_v = UPS_EMPTY_V + (UPS_FULL_V - UPS_EMPTY_V) * p.soc;
        w.pack = Some(p);
        return;
    }
    let per_tick = w.drain_v_per_min / 60.0 * dt_s;
    w.battery_v = if w.mains_on {
        (w.battery_v + 0.5 / 60.0 * dt_s).min(UPS_FULL_V)
    } else {
        (w.battery_v - per_tick).max(UPS_EMPTY_V)
    };
    if !w.mains_on {
        w.station_mv = w.station_mv.saturating_sub((per_tick * 250.0) as u16).max(10_500);
    }
}

/// Devices `simulate` creates by default.
pub const DEVICES: &[&str] = &["ups", "oximeter", "nonin", "bridge"];

/// Every device `simulate` can create.
pub const ALL_DEVICES: &[&str] = &["ups", "ups-voltronic", "ups-apc", "oximeter", "nonin", "bridge"];

/// Run the simulator: create the devices under `dir`, print their paths and `ready`, play
/// `scenario`, and take commands from standard input until `quit`, end of input with no
/// scenario left, or a signal.
pub fn run(dir: &Path, devices: &[String], scenario: Vec<(f64, String)>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let world: Shared = Arc::new(Mutex::new(World::default()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for name in devices {
        let serve: Serve = match name.as_str() {
            "ups" => serve_ups,
            "ups-voltronic" => serve_voltronic,
            "ups-apc" => serve_apc,
            "oximeter" => serve_masimo,
            "nonin" => serve_nonin,
            "bridge" => serve_bridge,
            other => anyhow::bail!("unknown device `{other}` (known: {})", ALL_DEVICES.join(", ")),
        };
        let (w, n, l, s, r) = (world.clone(), name.clone(), dir.join(name), stop.clone(), ready_tx.clone());
        threads.push(std::thread::spawn(move || device(w, n, l, serve, s, r)));
    }
    drop(ready_tx);
    for _ in devices {
        let line = ready_rx.recv_timeout(Duration::from_secs(5))?;
        println!("{line}");
    }
    println!("ready");
    let _ = io::stdout().flush();
    {
        let (w, s) = (world.clone(), stop.clone());
        threads.push(std::thread::spawn(move || physics(w, s)));
    }
    {
        let (w, s) = (world.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            #[allow(clippy::disallowed_methods)]
            let start = Instant::now();
            for (at, cmd) in scenario {
                while start.elapsed() < Duration::from_secs_f64(at) {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                match apply(&w, &cmd) {
                    Ok(()) => println!("scenario {at}s: {cmd}"),
                    Err(e) => eprintln!("scenario: {e}"),
                }
                let _ = io::stdout().flush();
            }
        }));
    }
    // Commands on standard input (a closed stdin just leaves the scenario and devices running).
    // Started in the background of a terminal (`simulate … &`), reading the terminal would
    // stop the whole process ("Stopped (tty input)"): then it takes no commands.
    if background_of_a_terminal() {
        eprintln!("simulate: in the background of a terminal, so no commands from standard input (run it in the foreground, or pipe commands in)");
    } else {
        let (w, s) = (world.clone(), stop.clone());
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines().map_while(Result::ok) {
                let cmd = line.trim();
                if cmd.is_empty() {
                    continue;
                }
                if cmd == "quit" {
                    s.store(true, Ordering::Relaxed);
                    break;
                }
                match apply(&w, cmd) {
                    Ok(()) => println!("ok {cmd}"),
                    Err(e) => println!("error {e}"),
                }
                let _ = io::stdout().flush();
            }
        });
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A device thread can be blocked reading its pseudo-terminal, which nothing will wake: wait
    // a moment for the threads to see `stop`, then leave (the process ends with them).
    #[allow(clippy::disallowed_methods)] // the process's own exit, at the I/O edge
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    #[allow(clippy::disallowed_methods)]
    while threads.iter().any(|t| !t.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether standard input is a terminal whose foreground is another process group.
fn background_of_a_terminal() -> bool {
    use std::io::IsTerminal;
    let stdin = io::stdin();
    stdin.is_terminal() && nix::unistd::tcgetpgrp(&stdin).is_ok_and(|fg| fg != nix::unistd::getpgrp())
}

#[cfg(test)]
mod tests;
