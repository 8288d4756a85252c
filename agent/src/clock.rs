//! The one place the agent reads the clock. Everything else takes [`Now`] as an argument.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use mamori_protocol::mqtt::ClockInfo;

use crate::monitor::Now;

/// The process's time origin, with the operating system's boot id and uptime at that moment.
struct Origin {
    at: Instant,
    boot: String,
    uptime_ms: u64,
}

fn origin_info() -> &'static Origin {
    static ORIGIN: OnceLock<Origin> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        // The I/O edge: this is where time enters the agent.
        #[allow(clippy::disallowed_methods)]
        let at = Instant::now();
        // Linux: the boot's id, and the seconds since it on a clock that never steps
        // (`/proc/uptime` counts through suspend). Elsewhere: this process is the timeline.
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() <= 64)
            .unwrap_or_else(|| format!("agent-{:08x}", rand::random::<u32>()));
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|u| u.parse::<f64>().ok()))
            .map_or(0, |s| (s * 1000.0) as u64);
        Origin { at, boot, uptime_ms }
    })
}

fn origin() -> Instant {
    origin_info().at
}

/// The current time: monotonic milliseconds since the process started, and the local wall
/// clock with its offset (Japan: +09:00).
pub fn now() -> Now {
    let origin = origin();
    #[allow(clippy::disallowed_methods)]
    let mono_ms = Instant::now().duration_since(origin).as_millis() as u64;
    #[allow(clippy::disallowed_methods)] // the one wall clock
    let wall = chrono::Local::now().fixed_offset();
    Now { mono_ms, wall }
}

/// The earliest wall-clock time a synchronised clock can show: a Raspberry Pi without a
/// real-time clock boots at its last saved time, or at 1970.
const PLAUSIBLE_SINCE: &str = "2026-01-01T00:00:00Z";

/// The clocks at `now` for a message: the boot and its uptime (which never steps), and
/// whether the wall clock is synchronised as far as the agent can tell (`synced_file`: see
/// [`crate::config::ClockConfig`]).
pub fn info(now: &Now, synced_file: &Path) -> ClockInfo {
    let o = origin_info();
    let plausible = chrono::DateTime::parse_from_rfc3339(PLAUSIBLE_SINCE).is_ok_and(|floor| now.wall >= floor);
    let synced = if !plausible {
        Some(false)
    } else if synced_file.exists() {
        Some(true)
    } else if synced_file.parent().is_some_and(Path::is_dir) {
        Some(false)
    } else {
        None
    };
    ClockInfo { boot: o.boot.clone(), uptime_ms: o.uptime_ms + now.mono_ms, synced }
}

/// Milliseconds since the Unix epoch (seeds the spool's first seq).
pub fn unix_ms() -> u64 {
    #[allow(clippy::disallowed_methods)]
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_millis() as u64
}
