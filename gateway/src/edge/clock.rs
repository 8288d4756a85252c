//! The one place the gateway reads the clock: everything else takes `now` as an argument.

use crate::domain::engine::Time;

/// The current UTC time.
pub fn now() -> Time {
    // The I/O edge: this is where time enters the gateway.
    #[allow(clippy::disallowed_methods)]
    chrono::Utc::now()
}
