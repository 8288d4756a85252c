//! The one place the agent reads the clock. Everything else takes [`Now`] as an argument.

use std::sync::OnceLock;
use std::time::Instant;

use crate::monitor::Now;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // The I/O edge: this is where time enters the agent.
    #[allow(clippy::disallowed_methods)]
    *ORIGIN.get_or_init(Instant::now)
}

/// The current time: monotonic milliseconds since the process started, and the local wall
/// clock with its offset (Japan: +09:00).
pub fn now() -> Now {
    let origin = origin();
    #[allow(clippy::disallowed_methods)]
    let mono_ms = Instant::now().duration_since(origin).as_millis() as u64;
    Now { mono_ms, wall: chrono::Local::now().fixed_offset() }
}

/// Milliseconds since the Unix epoch (seeds the spool's first seq).
pub fn unix_ms() -> u64 {
    #[allow(clippy::disallowed_methods)]
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_millis() as u64
}
